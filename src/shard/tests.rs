use super::*;
use k8s_openapi::api::coordination::v1::LeaseSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

fn settings(me: &str) -> ShardSettings {
    ShardSettings {
        me: me.into(),
        env: "dev".into(),
        namespace: "mc".into(),
        lease: Duration::from_secs(15),
        max_level: 3,
        endpoint: None,
    }
}

fn lease(name: &str, holder: Option<&str>, rv: &str) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(name.into()),
            resource_version: Some(rv.into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: holder.map(str::to_string),
            lease_duration_seconds: Some(15),
            ..Default::default()
        }),
    }
}

/// A replica that listed the Leases and joined (membership written) a while ago.
fn synced(me: &str, now: Instant) -> Shards {
    let mut s = Shards::new(settings(me));
    s.on_lease_event(watcher::Event::Init, now);
    s.on_lease_event(watcher::Event::InitDone, now);
    let before = now - JOIN_SETTLE;
    let m = s.claim(&s.cfg.membership_name(), Some(me.into()), "replica");
    s.on_written(&m, Ok(Some("m1".into())), before);
    s
}

fn writes(out: &[ShardOut]) -> Vec<(String, Option<String>)> {
    out.iter()
        .filter_map(|o| match o {
            ShardOut::Write(c) if !c.name.starts_with("module-controller.") => {
                Some((c.name.clone(), c.holder.clone()))
            }
            _ => None,
        })
        .collect()
}

/// Applies this replica's writes as if the apiserver accepted them.
fn accept(s: &mut Shards, out: &[ShardOut], now: Instant) -> Vec<ShardOut> {
    let mut more = Vec::new();
    for o in out {
        if let ShardOut::Write(c) = o {
            more.extend(s.on_written(c, Ok(Some(format!("rv-{}", c.name))), now));
        }
    }
    more
}

#[test]
fn nothing_is_decided_before_the_leases_are_listed_or_the_replica_joined() {
    let now = Instant::now();
    let mut s = Shards::new(settings("a"));
    s.base_seen("vnode.b1.dev");
    assert!(s.tick(now).is_empty());
    s.on_lease_event(watcher::Event::InitDone, now);
    let out = s.tick(now);
    assert!(writes(&out).is_empty(), "only the membership first");
    accept(&mut s, &out, now);
    assert!(writes(&s.tick(now)).is_empty(), "settling");
    assert_eq!(writes(&s.tick(now + JOIN_SETTLE)).len(), 1);
}

#[test]
fn a_lone_replica_claims_every_base_and_drives_it_once_written() {
    let now = Instant::now();
    let mut s = synced("a", now);
    s.base_seen("vnode.b1.dev");
    let out = s.tick(now);
    assert_eq!(
        writes(&out),
        vec![("vnode.b1.dev".into(), Some("a".into()))]
    );
    assert!(s.owned().is_empty(), "not before the write is accepted");
    let more = accept(&mut s, &out, now);
    assert_eq!(more, vec![ShardOut::Owned("vnode.b1.dev".into(), true)]);
    // No second write while nothing is due; a renewal after a third of the duration.
    assert!(writes(&s.tick(now + Duration::from_secs(1))).is_empty());
    let renew = s.tick(now + Duration::from_secs(5));
    assert_eq!(
        writes(&renew),
        vec![("vnode.b1.dev".into(), Some("a".into()))]
    );
}

#[test]
fn a_base_held_by_a_live_replica_is_left_alone_and_taken_over_when_it_expires() {
    let t0 = Instant::now();
    let mut s = synced("a", t0);
    s.on_lease_event(
        watcher::Event::Apply(lease("vnode.b1.dev", Some("b"), "1")),
        t0,
    );
    s.base_seen("vnode.b1.dev");
    assert!(writes(&s.tick(t0 + Duration::from_secs(10))).is_empty());
    // b stopped renewing: after the Lease duration a takes over, from the version it saw.
    let out = s.tick(t0 + Duration::from_secs(16));
    let claim = out
        .iter()
        .find_map(|o| match o {
            ShardOut::Write(c) if c.name == "vnode.b1.dev" => Some(c.clone()),
            _ => None,
        })
        .expect("claim");
    assert_eq!(claim.holder.as_deref(), Some("a"));
    assert_eq!(claim.resource_version.as_deref(), Some("1"));
    assert_eq!(claim.transitions, 1);
}

#[test]
fn a_lost_race_or_a_new_holder_stops_driving() {
    let now = Instant::now();
    let mut s = synced("a", now);
    s.base_seen("vnode.b1.dev");
    let out = s.tick(now);
    accept(&mut s, &out, now);
    assert!(s.owned().contains("vnode.b1.dev"));
    s.on_lease_event(
        watcher::Event::Apply(lease("vnode.b1.dev", Some("b"), "9")),
        now,
    );
    let out = s.tick(now);
    assert!(out.contains(&ShardOut::Owned("vnode.b1.dev".into(), false)));
    assert!(s.owned().is_empty());
}

#[test]
fn failing_renewals_stop_driving_before_others_may_take_over() {
    let now = Instant::now();
    let mut s = synced("a", now);
    s.base_seen("vnode.b1.dev");
    let out = s.tick(now);
    accept(&mut s, &out, now);
    // Renewals keep failing (no accept): 10 s later, 5 s before expiry, a lets go.
    let out = s.tick(now + Duration::from_secs(10));
    assert!(out.contains(&ShardOut::Owned("vnode.b1.dev".into(), false)));
}

#[test]
fn replicas_share_the_bases_within_one() {
    let now = Instant::now();
    let names = ["a", "b", "c"];
    let mut shards: Vec<Shards> = names.iter().map(|n| synced(n, now)).collect();
    // Every replica sees the others' membership.
    for s in shards.iter_mut() {
        for n in names {
            s.on_lease_event(
                watcher::Event::Apply(lease(&membership_name(n), Some(n), "1")),
                now,
            );
        }
    }
    let nodes: Vec<String> = (0..10).map(|i| format!("vnode.b{i}.dev")).collect();
    // Everyone sees every base and every Lease (as over MQTT and the Lease watch).
    let mut t = now;
    for _ in 0..200 {
        t += Duration::from_millis(100);
        let mut written: Vec<OwnerClaim> = Vec::new();
        for s in shards.iter_mut() {
            for n in &nodes {
                s.base_seen(n);
            }
            for o in s.tick(t) {
                if let ShardOut::Write(c) = o {
                    written.push(c);
                }
            }
        }
        // The apiserver: the first write for a Lease at its version wins.
        let mut versions: HashMap<String, u64> = HashMap::new();
        for s in &shards {
            for (name, seen) in &s.leases {
                if let Some(v) = seen
                    .lease
                    .resource_version
                    .as_deref()
                    .and_then(|v| v.parse().ok())
                {
                    let e = versions.entry(name.clone()).or_insert(v);
                    *e = (*e).max(v);
                }
            }
        }
        let mut accepted: Vec<(OwnerClaim, u64)> = Vec::new();
        for c in written {
            let current = versions.get(&c.name).copied();
            let based = c.resource_version.as_deref().and_then(|v| v.parse().ok());
            if current == based {
                let v = current.unwrap_or(0) + 1;
                versions.insert(c.name.clone(), v);
                accepted.push((c, v));
            } else if let Some(s) = shards
                .iter_mut()
                .find(|s| c.holder.as_deref() == Some(s.cfg.me.as_str()) || c.holder.is_none())
            {
                s.on_written(&c, Err("conflict".into()), t);
            }
        }
        for (c, v) in &accepted {
            for s in shards.iter_mut() {
                let mine = c.holder.as_deref() == Some(s.cfg.me.as_str());
                if mine {
                    s.on_written(c, Ok(Some(v.to_string())), t);
                }
                s.on_lease_event(
                    watcher::Event::Apply(lease(&c.name, c.holder.as_deref(), &v.to_string())),
                    t,
                );
            }
        }
    }
    let counts: Vec<usize> = shards.iter().map(|s| s.owned().len()).collect();
    assert_eq!(
        counts.iter().sum::<usize>(),
        10,
        "every base owned exactly once: {counts:?}"
    );
    let (min, max) = (counts.iter().min(), counts.iter().max());
    assert!(max.zip(min).is_some_and(|(a, b)| a - b <= 1), "{counts:?}");
    for n in &nodes {
        let owners = shards.iter().filter(|s| s.owned().contains(n)).count();
        assert_eq!(owners, 1, "{n}");
    }
}

#[test]
fn leaving_releases_everything_at_once() {
    let now = Instant::now();
    let mut s = synced("a", now);
    s.base_seen("vnode.b1.dev");
    let out = s.tick(now);
    accept(&mut s, &out, now);
    let out = s.leave();
    assert!(out.contains(&ShardOut::Owned("vnode.b1.dev".into(), false)));
    assert_eq!(writes(&out), vec![("vnode.b1.dev".into(), None)]);
    assert!(out.contains(&ShardOut::Delete(s.settings().membership_name())));
    assert!(
        writes(&s.tick(now + Duration::from_secs(30))).is_empty(),
        "no claims after leaving"
    );
}
