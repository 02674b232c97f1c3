//! The in-cluster manifests in `deploy/` are valid for a real apiserver, and the controller does
//! its whole job with exactly the permissions `deploy/rbac.yaml` grants (least privilege).

mod common;

use std::time::Duration;

use arklet_double::BizId;
use common::deploy::{api_for, apply_manifest, documents, service_account_client};
use common::{TestEnv, eventually, pod_events};
use kube::api::{Api, DynamicObject, Patch, PatchParams};

const T: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_runs_with_exactly_the_rbac_of_deploy() {
    let mut env = TestEnv::new("rbac").await;
    let admin = env.client.clone();
    let applied = apply_manifest(&admin, "deploy/namespace.yaml").await
        + apply_manifest(&admin, "deploy/rbac.yaml").await
        + apply_manifest(&admin, "deploy/deployment.yaml").await;
    assert!(applied >= 7, "all manifests applied ({applied})");

    // A token for the ServiceAccount, as a pod would have.
    let sa_client = service_account_client(&env, "module-controller", "module-controller").await;

    let mut settings = env.settings();
    settings.replicas_sync = true;
    env.start_controller_as(settings, sa_client).await;
    let good = env.mqtt_base("g1").await;
    let bad = env.mqtt_base("g2").await;
    // A module whose start throws, as Arklet reports it (thrown; reason in the `Caused by:`).
    bad.fail_installs(
        "rbacbiz",
        "FAILED",
        "java.lang.SecurityException: denied by test",
    );
    for id in ["g1", "g2"] {
        env.wait_node_ready(id, T).await;
    }
    env.apply_deployment(&env.module_deployment("rbacbiz", "rbacbiz", "1.0.0", 2))
        .await;
    // One pod Ready (pods/status), the other failing with an Event (events.k8s.io).
    let failing = eventually(T, "one pod Ready and one failing", || async {
        let pods = env.app_pods("rbacbiz").await;
        let ready = pods
            .iter()
            .filter(|p| module_controller::vpod::status::is_ready(p.status.as_ref()))
            .count();
        let failing = pods.iter().find(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|c| c.first())
                .and_then(|c| c.state.as_ref())
                .and_then(|s| s.waiting.as_ref())
                .and_then(|w| w.reason.as_deref())
                == Some("Arklet.InstallModuleFailed")
        })?;
        (ready == 1).then(|| failing.metadata.name.clone().unwrap_or_default())
    })
    .await;
    // `pod_events` keeps only the Events the module controller reported: the ServiceAccount's
    // `events` rights are what is tested, not someone else's.
    eventually(
        T,
        "Event published with the ServiceAccount's rights",
        || async {
            pod_events(&env.client, &env.ns, &failing)
                .await
                .into_iter()
                .any(|(reason, note)| {
                    reason == "Arklet.InstallModuleFailed" && note.contains("denied by test")
                })
                .then_some(())
        },
    )
    .await;
    // Control: other components write Events about the same pod (the scheduler's
    // `Scheduled`), and the filter leaves them out.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(admin.clone(), &env.ns);
    let about_pod: Vec<_> = events
        .list(&Default::default())
        .await
        .expect("list events")
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(failing.as_str()))
        .collect();
    let others: Vec<(Option<String>, Option<String>)> = about_pod
        .iter()
        .filter(|e| e.reporting_controller.as_deref() != Some(common::REPORTING_CONTROLLER))
        .map(|e| (e.reporting_controller.clone(), e.reason.clone()))
        .collect();
    assert!(
        others
            .iter()
            .any(|(_, reason)| reason.as_deref() == Some("Scheduled")),
        "the scheduler's Event about the pod, which the check must not take: {others:?}"
    );
    let ours = pod_events(&env.client, &env.ns, &failing).await;
    assert!(
        ours.iter().all(|(reason, _)| reason != "Scheduled"),
        "{ours:?}"
    );
    // Peer sync rescales with the ServiceAccount's rights (deployments/scale).
    let mut peer = env.module_deployment("peerbiz", "peerbiz", "1.0.0", 1);
    peer.metadata.labels = Some(
        [(
            "virtual-kubelet.koupleless.io/strategy".to_string(),
            "peer".to_string(),
        )]
        .into(),
    );
    env.apply_deployment(&peer).await;
    eventually(T, "peer Deployment scaled to the 2 Ready bases", || async {
        let d = env.deployments().get("peerbiz").await.expect("get");
        (d.spec.and_then(|s| s.replicas) == Some(2)).then_some(())
    })
    .await;
    // Scale to zero: uninstall, then pods removed (pods delete).
    env.scale("rbacbiz", 0).await;
    eventually(T, "pods removed", || async {
        env.app_pods("rbacbiz").await.is_empty().then_some(())
    })
    .await;
    assert!(
        !good
            .active_modules()
            .contains(&BizId::new("rbacbiz", "1.0.0"))
    );
    // Drain: node and lease deleted.
    good.shutdown_graceful().await;
    eventually(T, "VNode removed (nodes delete, leases delete)", || async {
        env.nodes()
            .get_opt(&env.node_name("g1"))
            .await
            .expect("get")
            .is_none()
            .then_some(())
    })
    .await;
    env.stop_controller().await;
}

/// `deploy/pdb.yaml` is `policy/v1`, which the tests' v1.20 apiserver does not serve: it is
/// parsed as a `policy/v1` PodDisruptionBudget, checked against the Deployment it protects,
/// and validated server-side (dry run) as `policy/v1beta1`, whose schema has the same fields
/// (server-side apply refuses fields the schema does not declare).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disruption_budget_is_a_valid_policy_v1_pdb_for_the_deployment() {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    let docs = documents("deploy/pdb.yaml");
    assert_eq!(docs.len(), 1, "deploy/pdb.yaml holds one object");
    let value = docs.into_iter().next().expect("one");
    assert_eq!(value["apiVersion"], "policy/v1", "{value}");
    assert_eq!(value["kind"], "PodDisruptionBudget", "{value}");
    let pdb: PodDisruptionBudget = serde_json::from_value(value.clone()).expect("a PDB");
    let spec = pdb.spec.clone().expect("spec");
    let deployment: Deployment = documents("deploy/deployment.yaml")
        .into_iter()
        .find(|d| d["kind"] == "Deployment")
        .map(|d| serde_json::from_value(d).expect("a Deployment"))
        .expect("deploy/deployment.yaml has the Deployment");
    assert_eq!(
        pdb.metadata.namespace, deployment.metadata.namespace,
        "the PDB is in the Deployment's namespace"
    );
    let template_labels = deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .expect("pod template labels");
    let selector = spec
        .selector
        .as_ref()
        .and_then(|s| s.match_labels.clone())
        .expect("the PDB selects by labels");
    assert!(
        !selector.is_empty()
            && selector
                .iter()
                .all(|(k, v)| template_labels.get(k) == Some(v)),
        "the PDB selects the controller's pods: {selector:?} vs {template_labels:?}"
    );
    let replicas = deployment.spec.and_then(|s| s.replicas).unwrap_or(1);
    match spec.min_available {
        Some(IntOrString::Int(min)) => assert!(
            (1..replicas).contains(&min),
            "minAvailable {min} keeps one replica and lets a drain evict another ({replicas} replicas)"
        ),
        other => panic!("minAvailable as a number expected: {other:?}"),
    }
    // The kustomization ships it, with every other manifest.
    let kustomization: serde_json::Value = serde_yaml::from_str(
        &std::fs::read_to_string("deploy/kustomization.yaml").expect("kustomization"),
    )
    .expect("YAML");
    let resources: Vec<&str> = kustomization["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .filter_map(|r| r.as_str())
        .collect();
    let mut manifests: Vec<String> = std::fs::read_dir("deploy")
        .expect("deploy/")
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|f| f.ends_with(".yaml") && f != "kustomization.yaml")
        .collect();
    manifests.sort();
    for m in &manifests {
        assert!(
            resources.contains(&m.as_str()),
            "{m} not in deploy/kustomization.yaml"
        );
    }

    // Server-side validation of the same object as policy/v1beta1, in a test namespace.
    let env = TestEnv::new("pdb").await;
    let mut beta = value;
    beta["apiVersion"] = "policy/v1beta1".into();
    beta["metadata"]["namespace"] = env.ns.clone().into();
    let obj: DynamicObject = serde_json::from_value(beta.clone()).expect("object");
    let api = api_for(&env.client, &obj);
    let pp = PatchParams::apply("e2e-pdb").force().dry_run();
    api.patch("module-controller", &pp, &Patch::Apply(&obj))
        .await
        .unwrap_or_else(|e| panic!("deploy/pdb.yaml rejected by the apiserver: {e}"));
    // Control: the dry run does validate (a field the schema lacks is refused).
    beta["spec"]["maxUnavailablePods"] = 1.into();
    let bad: DynamicObject = serde_json::from_value(beta).expect("object");
    let refused = api
        .patch("module-controller", &pp, &Patch::Apply(&bad))
        .await;
    assert!(
        refused.is_err(),
        "a PDB with an unknown field passed the dry run: {refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_is_valid_for_a_real_apiserver() {
    let env = TestEnv::new("examples").await;
    let mut checked = 0;
    let mut entries: Vec<_> = std::fs::read_dir("examples")
        .expect("examples/")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    entries.sort();
    for path in entries
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
    {
        for value in documents(&path.display().to_string()) {
            let mut obj: DynamicObject =
                serde_json::from_value(value).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            // Validate in this test's namespace, server-side, without creating anything.
            obj.metadata.namespace = Some(env.ns.clone());
            let name = obj.metadata.name.clone().expect("name");
            let pp = PatchParams::apply("e2e-examples").force().dry_run();
            api_for(&env.client, &obj)
                .patch(&name, &pp, &Patch::Apply(&obj))
                .await
                .unwrap_or_else(|e| panic!("{}: {name} rejected: {e}", path.display()));
            checked += 1;
        }
    }
    assert!(checked >= 6, "examples checked: {checked}");
}
