//! What a module pod asks of its base: one module per container (name, `BIZ_VERSION`, image URL).

use k8s_openapi::api::core::v1::Pod;

use crate::kube_util::time_secs;
use crate::model::ModuleSpec;

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
