//! The in-cluster manifests in `deploy/` are valid for a real apiserver, and the controller does
//! its whole job with exactly the permissions `deploy/rbac.yaml` grants (least privilege).

mod common;

use std::time::Duration;

use common::{TestEnv, eventually, pod_events};
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use module_controller::model::ModuleKey;
use serde_json::json;

const T: Duration = Duration::from_secs(60);

fn plural(kind: &str) -> String {
    match kind {
        "ClusterRoleBinding" | "RoleBinding" | "ClusterRole" | "Role" | "ServiceAccount"
        | "Deployment" | "Namespace" | "Service" | "ConfigMap" => {
            format!("{}s", kind.to_ascii_lowercase())
        }
        other => panic!("deploy/ has a kind this test does not know: {other}"),
    }
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

    env.start_controller_as(env.settings(), sa_client).await;
    let good = env.mqtt_base("g1").await;
    let bad = env.mqtt_base("g2").await;
    bad.fail_installs("rbacbiz", "InstallBizFailed", "denied by test");
    for id in ["g1", "g2"] {
        eventually(T, "VNode Ready (nodes, nodes/status, leases)", || async {
            (env.node_ready(id).await.as_deref() == Some("True")).then_some(())
        })
        .await;
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
                == Some("Arklet.InstallBizFailed")
        })?;
        (ready == 1).then(|| failing.metadata.name.clone().unwrap_or_default())
    })
    .await;
    eventually(
        T,
        "Event published with the ServiceAccount's rights",
        || async { (!pod_events(&env.client, &env.ns, &failing).await.is_empty()).then_some(()) },
    )
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
            .contains(&ModuleKey::new("rbacbiz", "1.0.0"))
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
