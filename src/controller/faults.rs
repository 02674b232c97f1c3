//! Plugin faults as Kubernetes Events: on the Deployment a decision was for, else on the
//! controller's own pod, else only in the log and the metrics.

use k8s_openapi::api::core::v1::ObjectReference;
use tokio::sync::broadcast;
use tracing::warn;

use crate::apiserver::Api;
use crate::apiserver::events::Notice;
use crate::plugin::PluginFault;

/// The controller's own pod (`POD_NAMESPACE`/`POD_NAME`), when running in a cluster.
fn own_pod() -> Option<ObjectReference> {
    match (std::env::var("POD_NAMESPACE"), std::env::var("POD_NAME")) {
        (Ok(ns), Ok(name)) if !ns.is_empty() && !name.is_empty() => Some(ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(ns),
            name: Some(name),
            ..Default::default()
        }),
        _ => None,
    }
}

/// The Deployment a fault's subject (`ns/Deployment/name` or `ns/name`) names.
fn subject_ref(subject: &str) -> Option<ObjectReference> {
    let parts: Vec<&str> = subject.split('/').collect();
    match parts.as_slice() {
        [ns, "Deployment", name] | [ns, name] => Some(ObjectReference {
            api_version: Some("apps/v1".into()),
            kind: Some("Deployment".into()),
            namespace: Some(ns.to_string()),
            name: Some(name.to_string()),
            ..Default::default()
        }),
        _ => None,
    }
}

/// Publishes every fault from `faults` as an Event, in its own task.
pub fn report_plugin_faults(api: Api, mut faults: broadcast::Receiver<PluginFault>) {
    let own = own_pod();
    tokio::spawn(async move {
        loop {
            let f = match faults.recv().await {
                Ok(f) => f,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    warn!(skipped = n, "plugin fault reporter lagged");
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            warn!(plugin = %f.plugin, reason = %f.reason, subject = ?f.subject, "plugin fault: {}", f.message);
            let object = f
                .subject
                .as_deref()
                .and_then(subject_ref)
                .or_else(|| own.clone());
            if let Some(o) = object {
                let notice = Notice {
                    warning: true,
                    reason: f.reason.clone(),
                    action: "PluginCall".into(),
                    note: format!("plugin {}: {}", f.plugin, f.message),
                };
                api.event(&o, notice).await;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::subject_ref;

    #[test]
    fn subjects_name_deployments() {
        let r = subject_ref("ns/Deployment/d").expect("ref");
        assert_eq!(
            (r.namespace.as_deref(), r.name.as_deref()),
            (Some("ns"), Some("d"))
        );
        assert!(subject_ref("ns/d").is_some());
        assert!(subject_ref("just-a-name").is_none());
    }
}
