//! A watch that records every Ready transition of Pods or Nodes, and fails the test when it
//! errors or ends (a watch that stops silently would make a "never went NotReady" check pass
//! without looking).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::Api;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;

/// One observed state change of one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// When the watch saw it (epoch millis, the clock of the Arklet double's records).
    pub at_ms: u64,
    /// Ready (Pod: `Ready` condition True; Node: `Ready` condition True).
    pub ready: bool,
    /// The object has a deletion timestamp.
    pub deleting: bool,
    /// The object was deleted (last transition of a name).
    pub gone: bool,
    /// The object's labels then.
    pub labels: BTreeMap<String, String>,
}

/// A Ready→NotReady change of an object that was not being deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drop_ {
    /// Object name.
    pub name: String,
    /// When it was seen NotReady.
    pub at_ms: u64,
    /// Its labels then.
    pub labels: BTreeMap<String, String>,
    /// It was seen Ready again later.
    pub ready_again: bool,
    /// It was later deleted (deletion timestamp or gone).
    pub deleted_later: bool,
}

#[derive(Default)]
struct State {
    objects: BTreeMap<String, Vec<Transition>>,
    problems: Vec<String>,
    synced: bool,
    events: u64,
}

/// Records the Ready transitions of the objects a watch selects, from its initial list on.
pub struct ReadyRecorder {
    what: String,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

fn pod_ready(p: &Pod) -> bool {
    module_controller::vpod::status::is_ready(p.status.as_ref())
}

/// Whether a Node's `Ready` condition is True.
pub fn node_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

impl ReadyRecorder {
    /// Records the pods `cfg` selects; returns once the initial list is recorded.
    pub async fn pods(what: &str, api: Api<Pod>, cfg: watcher::Config) -> ReadyRecorder {
        Self::start(what, api, cfg, pod_ready).await
    }

    /// Records the nodes `cfg` selects; returns once the initial list is recorded.
    pub async fn nodes(what: &str, api: Api<Node>, cfg: watcher::Config) -> ReadyRecorder {
        Self::start(what, api, cfg, node_ready).await
    }

    /// Records the VNodes of `env`'s controller (its env label).
    pub async fn vnodes(env: &super::TestEnv) -> ReadyRecorder {
        Self::nodes(
            "VNodes",
            env.nodes(),
            watcher::Config::default()
                .labels(&format!("virtual-kubelet.koupleless.io/env={}", env.env)),
        )
        .await
    }

    async fn start<K>(
        what: &str,
        api: Api<K>,
        cfg: watcher::Config,
        ready: fn(&K) -> bool,
    ) -> ReadyRecorder
    where
        K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    {
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        let name = what.to_string();
        let task = tokio::spawn(async move {
            let mut stream = watcher(api, cfg).boxed();
            loop {
                let Some(item) = stream.next().await else {
                    let mut s = st.lock().unwrap_or_else(|p| p.into_inner());
                    s.problems
                        .push(format!("{name}: the watch ended at {}", now_ms()));
                    return;
                };
                let now = now_ms();
                let failed = {
                    let mut s = st.lock().unwrap_or_else(|p| p.into_inner());
                    record(&mut s, &name, now, item, ready)
                };
                if failed {
                    // Keep watching (the test fails anyway), without spinning.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        });
        let rec = ReadyRecorder {
            what: what.to_string(),
            state,
            task,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !rec.lock().synced {
            rec.assert_alive();
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: the watch did not list within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        rec
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Panics if the watch errored or ended: then it may have missed transitions.
    pub fn assert_alive(&self) {
        let s = self.lock();
        assert!(
            s.problems.is_empty() && !self.task.is_finished(),
            "{}: the recording watch is not trustworthy: {:?}",
            self.what,
            s.problems
        );
    }

    /// Every object's transitions, by name.
    pub fn history(&self) -> BTreeMap<String, Vec<Transition>> {
        self.lock().objects.clone()
    }

    /// Watch events seen so far (to show the watch was alive).
    pub fn events(&self) -> u64 {
        self.lock().events
    }

    /// Waits until the watch delivered more than `before` events. A recorder is back from
    /// its start once the initial list is read; the watch request that follows may not be
    /// open yet, and a test that then stops the apiserver would see it fail. Change one of
    /// the watched objects, then wait here, to know the watch is open.
    pub async fn wait_event_after(&self, before: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.events() <= before {
            self.assert_alive();
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}: no watch event within 30 s of a change",
                self.what
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every change from Ready to NotReady of an object not being deleted.
    pub fn drops(&self) -> Vec<Drop_> {
        let mut out = Vec::new();
        for (name, ts) in self.history() {
            for (i, w) in ts.windows(2).enumerate() {
                let (a, b) = (&w[0], &w[1]);
                if a.ready && !b.ready && !b.deleting && !b.gone {
                    let later = &ts[i + 2..];
                    out.push(Drop_ {
                        name: name.clone(),
                        at_ms: b.at_ms,
                        labels: b.labels.clone(),
                        ready_again: later.iter().any(|t| t.ready),
                        deleted_later: later.iter().any(|t| t.deleting || t.gone),
                    });
                }
            }
        }
        out
    }

    /// Names of objects seen Ready at some point.
    pub fn ever_ready(&self) -> Vec<String> {
        self.history()
            .into_iter()
            .filter(|(_, ts)| ts.iter().any(|t| t.ready))
            .map(|(n, _)| n)
            .collect()
    }
}

impl Drop for ReadyRecorder {
    /// A watch that failed fails the test even when the test forgot to look.
    fn drop(&mut self) {
        self.task.abort();
        if std::thread::panicking() {
            return;
        }
        let s = self.lock();
        assert!(
            s.problems.is_empty(),
            "{}: the recording watch failed: {:?}",
            self.what,
            s.problems
        );
    }
}

/// Records one watch item; true when it was an error.
fn record<K>(
    s: &mut State,
    name: &str,
    now: u64,
    item: Result<watcher::Event<K>, watcher::Error>,
    ready: fn(&K) -> bool,
) -> bool
where
    K: Resource + Clone,
{
    s.events += 1;
    match item {
        Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
            let t = Transition {
                at_ms: now,
                ready: ready(&o),
                deleting: o.meta().deletion_timestamp.is_some(),
                gone: false,
                labels: o.labels().clone(),
            };
            let list = s.objects.entry(o.name_any()).or_default();
            let changed = list
                .last()
                .is_none_or(|l| l.ready != t.ready || l.deleting != t.deleting || l.gone);
            if changed {
                list.push(t);
            }
        }
        Ok(watcher::Event::Delete(o)) => {
            let t = Transition {
                at_ms: now,
                ready: ready(&o),
                deleting: true,
                gone: true,
                labels: o.labels().clone(),
            };
            s.objects.entry(o.name_any()).or_default().push(t);
        }
        Ok(watcher::Event::Init) => {}
        Ok(watcher::Event::InitDone) => s.synced = true,
        Err(e) => {
            s.problems
                .push(format!("{name}: watch error at {now}: {e}"));
            return true;
        }
    }
    false
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    arklet_double::now_ms()
}
