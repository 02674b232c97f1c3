//! The in-cluster manifests in `deploy/` are valid for a real apiserver, and the controller does
//! its whole job with exactly the permissions `deploy/rbac.yaml` grants (least privilege).

mod common;

use std::time::Duration;

use arklet_double::BizId;
use common::{TestEnv, eventually, pod_events};
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::json;

const T: Duration = Duration::from_secs(60);

fn plural(kind: &str) -> String {
    const KNOWN: [&str; 10] = [
        "ClusterRoleBinding",
        "RoleBinding",
        "ClusterRole",
        "Role",
        "ServiceAccount",
        "Deployment",
        "DaemonSet",
        "Namespace",
        "Service",
        "ConfigMap",
    ];
    assert!(
        KNOWN.contains(&kind),
        "a manifest has a kind this test does not know: {kind}"
    );
    format!("{}s", kind.to_ascii_lowercase())
}

async fn apply_manifest(client: &kube::Client, path: &str) -> usize {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut n = 0;
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value: serde_json::Value =
            serde::Deserialize::deserialize(doc).unwrap_or_else(|e| panic!("{path}: {e}"));
        if value.is_null() {
            continue;
        }
        let obj: DynamicObject =
            serde_json::from_value(value).unwrap_or_else(|e| panic!("{path}: {e}"));
        let types = obj.types.clone().expect("apiVersion and kind");
        let (group, version) = types
            .api_version
            .rsplit_once('/')
            .unwrap_or(("", &types.api_version));
        let gvk = GroupVersionKind::gvk(group, version, &types.kind);
        let ar = ApiResource::from_gvk_with_plural(&gvk, &plural(&types.kind));
        let api: Api<DynamicObject> = match obj.metadata.namespace.as_deref() {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
            None => Api::all_with(client.clone(), &ar),
        };
        let name = obj.metadata.name.clone().expect("name");
        api.patch(
            &name,
            &PatchParams::apply("e2e-deploy").force(),
            &Patch::Apply(&obj),
        )
        .await
        .unwrap_or_else(|e| panic!("{path}: applying {} {name}: {e}", types.kind));
        n += 1;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_runs_with_exactly_the_rbac_of_deploy() {
    let mut env = TestEnv::new("rbac").await;
    let admin = env.client.clone();
    let applied = apply_manifest(&admin, "deploy/namespace.yaml").await
        + apply_manifest(&admin, "deploy/rbac.yaml").await
        + apply_manifest(&admin, "deploy/deployment.yaml").await;
    assert!(applied >= 7, "all manifests applied ({applied})");

    // A token for the ServiceAccount, as a pod would have.
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), "module-controller");
    let req: TokenRequest = serde_json::from_value(json!({"spec": {"audiences": ["https://kubernetes.default.svc"], "expirationSeconds": 3600}})).expect("req");
    let resp: TokenRequest = sas
        .create_subresource("token", "module-controller", &PostParams::default(), &req)
        .await
        .expect("token request");
    let token = resp.status.expect("status").token;
    let mut cfg = env.cp.kube_config();
    cfg.auth_info.token = Some(token.into());
    let sa_client = kube::Client::try_from(cfg).expect("client");

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
        let text = std::fs::read_to_string(&path).expect("read");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value: serde_json::Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if value.is_null() {
                continue;
            }
            let mut obj: DynamicObject =
                serde_json::from_value(value).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            // Validate in this test's namespace, server-side, without creating anything.
            obj.metadata.namespace = Some(env.ns.clone());
            let types = obj.types.clone().expect("apiVersion and kind");
            let (group, version) = types
                .api_version
                .rsplit_once('/')
                .unwrap_or(("", &types.api_version));
            let gvk = GroupVersionKind::gvk(group, version, &types.kind);
            let ar = ApiResource::from_gvk_with_plural(&gvk, &plural(&types.kind));
            let api: Api<DynamicObject> = Api::namespaced_with(env.client.clone(), &env.ns, &ar);
            let name = obj.metadata.name.clone().expect("name");
            let pp = PatchParams::apply("e2e-examples").force().dry_run();
            api.patch(&name, &pp, &Patch::Apply(&obj))
                .await
                .unwrap_or_else(|e| {
                    panic!("{}: {} {name} rejected: {e}", path.display(), types.kind)
                });
            checked += 1;
        }
    }
    assert!(checked >= 6, "examples checked: {checked}");
}
