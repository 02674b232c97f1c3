//! The controller as `deploy/` ships it: manifests applied with server-side apply, and clients
//! with the rights of `deploy/rbac.yaml` (or fewer), as a pod running as its ServiceAccount.

use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

use super::TestEnv;

/// The plural resource name of a manifest kind (the kinds `deploy/` and `examples/` use).
pub fn plural(kind: &str) -> String {
    const KNOWN: [&str; 11] = [
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
        "PodDisruptionBudget",
    ];
    assert!(
        KNOWN.contains(&kind),
        "a manifest has a kind this test does not know: {kind}"
    );
    format!("{}s", kind.to_ascii_lowercase())
}

/// The documents of a YAML file (empty ones skipped).
pub fn documents(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            let v: Value =
                serde::Deserialize::deserialize(doc).unwrap_or_else(|e| panic!("{path}: {e}"));
            v
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// The API of a manifest object's kind, in its namespace (cluster-wide without one).
pub fn api_for(client: &kube::Client, obj: &DynamicObject) -> Api<DynamicObject> {
    let types = obj.types.clone().expect("apiVersion and kind");
    let (group, version) = types
        .api_version
        .rsplit_once('/')
        .unwrap_or(("", &types.api_version));
    let gvk = GroupVersionKind::gvk(group, version, &types.kind);
    let ar = ApiResource::from_gvk_with_plural(&gvk, &plural(&types.kind));
    match obj.metadata.namespace.as_deref() {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    }
}

/// Applies `docs` (server-side apply, as `manager`); returns how many.
pub async fn apply(client: &kube::Client, docs: Vec<Value>, manager: &str) -> usize {
    let mut n = 0;
    for value in docs {
        let obj: DynamicObject =
            serde_json::from_value(value).unwrap_or_else(|e| panic!("manifest: {e}"));
        let name = obj.metadata.name.clone().expect("name");
        api_for(client, &obj)
            .patch(
                &name,
                &PatchParams::apply(manager).force(),
                &Patch::Apply(&obj),
            )
            .await
            .unwrap_or_else(|e| panic!("applying {name}: {e}"));
        n += 1;
    }
    n
}

/// Applies the manifest file `path`; returns how many objects it holds.
pub async fn apply_manifest(client: &kube::Client, path: &str) -> usize {
    apply(client, documents(path), "e2e-deploy").await
}

/// A client with the token of ServiceAccount `ns/sa`, as a pod running as it would have.
pub async fn service_account_client(env: &TestEnv, ns: &str, sa: &str) -> kube::Client {
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(env.client.clone(), ns);
    let req: k8s_openapi::api::authentication::v1::TokenRequest = serde_json::from_value(
        json!({"spec": {"audiences": ["https://kubernetes.default.svc"], "expirationSeconds": 3600}}),
    )
    .expect("token request");
    let resp: k8s_openapi::api::authentication::v1::TokenRequest = sas
        .create_subresource("token", sa, &PostParams::default(), &req)
        .await
        .expect("token request");
    let token = resp.status.expect("token status").token;
    let mut cfg = env.cp.kube_config();
    cfg.auth_info.token = Some(token.into());
    kube::Client::try_from(cfg).expect("client")
}

/// A client with the rights `deploy/rbac.yaml` grants, after `edit` changed the ClusterRole's
/// rules: a ServiceAccount, roles and bindings of this test's own (named after its namespace,
/// so tests running at once do not share them).
pub async fn controller_client(env: &TestEnv, edit: impl FnOnce(&mut Vec<Value>)) -> kube::Client {
    let name = format!("mc-{}", env.ns);
    let mut docs = documents("deploy/rbac.yaml");
    for d in &mut docs {
        let kind = d["kind"].as_str().unwrap_or_default().to_string();
        let meta = &mut d["metadata"];
        // Same kind and namespace, this test's names; the controller's namespace is the test's.
        let own = match meta["name"].as_str().unwrap_or_default() {
            "module-controller" => name.clone(),
            other => other.replacen("module-controller", &name, 1),
        };
        meta["name"] = own.into();
        if meta["namespace"] == "module-controller" {
            meta["namespace"] = env.ns.clone().into();
        }
        // `get_mut`: indexing a missing key would add it (as null).
        if let Some(subjects) = d.get_mut("subjects").and_then(Value::as_array_mut) {
            for s in subjects {
                s["name"] = name.clone().into();
                s["namespace"] = env.ns.clone().into();
            }
        }
        if kind.ends_with("Binding") {
            let role = d["roleRef"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            d["roleRef"]["name"] = match role.as_str() {
                "module-controller" => name.clone(),
                other => other.replacen("module-controller", &name, 1),
            }
            .into();
        }
    }
    let role = docs
        .iter_mut()
        .find(|d| d["kind"] == "ClusterRole")
        .expect("deploy/rbac.yaml has a ClusterRole");
    edit(role["rules"].as_array_mut().expect("ClusterRole rules"));
    assert_eq!(apply(&env.client, docs, "e2e-rbac").await, 7);
    service_account_client(env, &env.ns, &name).await
}
