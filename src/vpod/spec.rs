//! What a module pod asks of its base: one module per container (name, `BIZ_VERSION`, image URL).

use k8s_openapi::api::core::v1::Pod;

use crate::model::ModuleSpec;
use crate::time::time_secs;

/// Labels that mark a module pod (either one).
pub const MODULE_LABELS: [&str; 2] = [
    "virtual-kubelet.koupleless.io/component",
    "module-controller.koupleless.io/component",
];
/// Value of the module label.
pub const MODULE_LABEL_VALUE: &str = "module";
/// Container env var holding the module version.
pub const BIZ_VERSION_ENV: &str = "BIZ_VERSION";

/// Whether a pod is a module pod.
pub fn is_module_pod(pod: &Pod) -> bool {
    pod.metadata.labels.as_ref().is_some_and(|l| {
        MODULE_LABELS
            .iter()
            .any(|k| l.get(*k).map(String::as_str) == Some(MODULE_LABEL_VALUE))
    })
}

/// Why a container cannot be installed as a module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    /// Container name.
    pub container: String,
    /// Human-readable explanation.
    pub message: String,
}

/// One container's module, or why it is not one.
pub type ContainerModule = Result<ModuleSpec, SpecError>;

/// Whether `url` looks like a module package: a file, http or https URL.
pub fn is_package_url(url: &str) -> bool {
    let lower = url.to_ascii_lowercase();
    ["file://", "http://", "https://"]
        .iter()
        .any(|p| lower.starts_with(p) && lower.len() > p.len())
}

/// The modules a pod asks for, one per container, in container order.
pub fn modules_of(pod: &Pod) -> Vec<ContainerModule> {
    let Some(spec) = pod.spec.as_ref() else {
        return Vec::new();
    };
    spec.containers
        .iter()
        .map(|c| {
            let err = |message: String| SpecError {
                container: c.name.clone(),
                message,
            };
            let version = c
                .env
                .as_ref()
                .and_then(|env| env.iter().find(|e| e.name == BIZ_VERSION_ENV))
                .and_then(|e| e.value.clone())
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty());
            let Some(version) = version else {
                return Err(err(format!(
                    "container {:?} has no {BIZ_VERSION_ENV} env value; a module needs its version there",
                    c.name
                )));
            };
            let image = c.image.clone().unwrap_or_default();
            if !is_package_url(&image) {
                return Err(err(format!(
                    "container {:?} image {image:?} is not a module package URL (file://, http:// or https:// to a jar)",
                    c.name
                )));
            }
            Ok(ModuleSpec {
                name: c.name.clone(),
                version,
                url: image,
            })
        })
        .collect()
}

/// Pod creation time in epoch seconds (0 if unknown).
pub fn creation_secs(pod: &Pod) -> i64 {
    pod.metadata
        .creation_timestamp
        .as_ref()
        .map(time_secs)
        .unwrap_or(0)
}

/// `namespace/name` of a pod.
pub fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, EnvVar, PodSpec};

    fn pod(containers: Vec<Container>) -> Pod {
        Pod {
            spec: Some(PodSpec {
                containers,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn container(name: &str, image: &str, version: Option<&str>) -> Container {
        Container {
            name: name.into(),
            image: Some(image.into()),
            env: version.map(|v| {
                vec![EnvVar {
                    name: BIZ_VERSION_ENV.into(),
                    value: Some(v.into()),
                    value_from: None,
                }]
            }),
            ..Default::default()
        }
    }

    #[test]
    fn valid_containers_become_modules() {
        let p = pod(vec![container(
            "biz1",
            "https://x/biz1-0.0.1-ark-biz.jar",
            Some("0.0.1"),
        )]);
        let m = modules_of(&p);
        assert_eq!(
            m,
            vec![Ok(ModuleSpec {
                name: "biz1".into(),
                version: "0.0.1".into(),
                url: "https://x/biz1-0.0.1-ark-biz.jar".into()
            })]
        );
    }

    #[test]
    fn invalid_containers_explain_why() {
        let p = pod(vec![
            container("a", "https://x/a.jar", None),
            container("b", "nginx:latest", Some("1")),
        ]);
        let m = modules_of(&p);
        assert!(matches!(&m[0], Err(e) if e.message.contains("BIZ_VERSION")));
        assert!(matches!(&m[1], Err(e) if e.message.contains("not a module package")));
    }

    #[test]
    fn module_label_either_family() {
        let mut p = Pod::default();
        assert!(!is_module_pod(&p));
        p.metadata.labels = Some(
            [(
                "module-controller.koupleless.io/component".to_string(),
                "module".to_string(),
            )]
            .into(),
        );
        assert!(is_module_pod(&p));
    }
}

/// The workload a pod belongs to and its template revision, for rollout tracking.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owner {
    /// `namespace/Kind/name` of the workload (the Deployment for ReplicaSet-owned pods).
    pub key: String,
    /// Template revision (`pod-template-hash` or `controller-revision-hash`), if any.
    pub template_hash: Option<String>,
}

/// The owning workload of a pod: a Deployment (derived from its ReplicaSet's name and the
/// `pod-template-hash` label), else the controller owner itself.
pub fn owner_of(pod: &Pod) -> Option<Owner> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let r = pod
        .metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|r| r.controller == Some(true))?;
    let labels = pod.metadata.labels.as_ref();
    let label = |k: &str| labels.and_then(|l| l.get(k)).cloned();
    let (key, template_hash) = match r.kind.as_str() {
        "ReplicaSet" => {
            let hash = label("pod-template-hash");
            let deployment = hash
                .as_deref()
                .and_then(|h| r.name.strip_suffix(h))
                .and_then(|n| n.strip_suffix('-'));
            match deployment {
                Some(d) => (format!("{ns}/Deployment/{d}"), hash),
                None => (format!("{ns}/ReplicaSet/{}", r.name), hash),
            }
        }
        kind => (
            format!("{ns}/{kind}/{}", r.name),
            label("controller-revision-hash"),
        ),
    };
    Some(Owner { key, template_hash })
}

#[cfg(test)]
mod owner_tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    fn pod_owned(kind: &str, name: &str, labels: &[(&str, &str)]) -> Pod {
        let mut p = Pod::default();
        p.metadata.namespace = Some("ns".into());
        p.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        p.metadata.owner_references = Some(vec![OwnerReference {
            kind: kind.into(),
            name: name.into(),
            controller: Some(true),
            ..Default::default()
        }]);
        p
    }

    #[test]
    fn replica_set_pods_belong_to_their_deployment() {
        let o = owner_of(&pod_owned(
            "ReplicaSet",
            "biz1-7b5f959786",
            &[("pod-template-hash", "7b5f959786")],
        ))
        .expect("owner");
        assert_eq!(o.key, "ns/Deployment/biz1");
        assert_eq!(o.template_hash.as_deref(), Some("7b5f959786"));
        let o = owner_of(&pod_owned("ReplicaSet", "plain", &[])).expect("owner");
        assert_eq!(o.key, "ns/ReplicaSet/plain");
        let o = owner_of(&pod_owned(
            "DaemonSet",
            "ds",
            &[("controller-revision-hash", "abc")],
        ))
        .expect("owner");
        assert_eq!(
            (o.key.as_str(), o.template_hash.as_deref()),
            ("ns/DaemonSet/ds", Some("abc"))
        );
        assert!(owner_of(&Pod::default()).is_none());
    }
}
