//! Performs the shard logic's Lease writes, each in its own task, and reports the answers.

use tokio::sync::mpsc;
use tracing::debug;

use crate::apiserver::Api;
use crate::apiserver::leases::OwnerClaim;

/// The answer to a Lease write: `Ok(new version)` or why not.
pub type Written = (OwnerClaim, Result<Option<String>, String>);

/// Writes ownership Leases in `namespace`.
#[derive(Clone)]
pub struct LeaseWriter {
    api: Api,
    namespace: String,
    done: mpsc::UnboundedSender<Written>,
}

impl LeaseWriter {
    /// A writer whose answers arrive on `done`.
    pub fn new(api: Api, namespace: &str, done: mpsc::UnboundedSender<Written>) -> Self {
        LeaseWriter {
            api,
            namespace: namespace.to_string(),
            done,
        }
    }

    /// Writes `claim` in the background.
    pub fn write(&self, claim: OwnerClaim) {
        let w = self.clone();
        tokio::spawn(async move {
            let r = w
                .api
                .write_owner_lease(&w.namespace, &claim)
                .await
                .map_err(|e| e.to_string());
            if let Err(e) = &r {
                debug!(lease = %claim.name, error = %e, "ownership Lease not written");
            }
            let _ = w.done.send((claim, r));
        });
    }

    /// Deletes a Lease in the background (best effort: an expired Lease is harmless).
    pub fn delete(&self, name: String) {
        let w = self.clone();
        tokio::spawn(async move {
            if let Err(e) = w.api.delete_owner_lease(&w.namespace, &name).await {
                debug!(lease = %name, error = %e, "ownership Lease not deleted");
            }
        });
    }

    /// Deletes a Lease and waits for the answer (shutdown).
    pub async fn delete_now(&self, name: &str) {
        if let Err(e) = self.api.delete_owner_lease(&self.namespace, name).await {
            debug!(lease = %name, error = %e, "ownership Lease not deleted");
        }
    }

    /// Writes a Lease and waits for the answer (shutdown).
    pub async fn write_now(&self, claim: &OwnerClaim) -> bool {
        self.api
            .write_owner_lease(&self.namespace, claim)
            .await
            .is_ok()
    }
}
