//! Many simulated bases in one process, e.g. for scale tests and the `base-sim` binary.

use anyhow::Context;
use futures::future::{join_all, try_join_all};

use super::{SimBase, SimBaseConfig, SimTransport};

/// A set of simulated bases started from one template.
#[derive(Debug, Clone)]
pub struct SimFleet {
    bases: Vec<SimBase>,
}

impl SimFleet {
    /// Starts `n` bases named `<template.identity>-0` .. `-<n-1>`. A host name equal to the
    /// template identity follows each base's identity; a non-zero HTTP port becomes
    /// `port + i`.
    pub async fn start(
        n: usize,
        template: SimBaseConfig,
        transport: SimTransport,
    ) -> anyhow::Result<SimFleet> {
        let starts = (0..n).map(|i| {
            let cfg = member_config(&template, i);
            let transport = member_transport(&transport, i);
            async move {
                let id = cfg.identity.clone();
                SimBase::start(cfg, transport?)
                    .await
                    .with_context(|| format!("starting simulated base {id}"))
            }
        });
        let bases = try_join_all(starts).await?;
        Ok(SimFleet { bases })
    }

    /// The bases, in index order.
    pub fn bases(&self) -> &[SimBase] {
        &self.bases
    }

    /// Stops every base abruptly.
    pub async fn stop_all(&self) {
        join_all(self.bases.iter().map(SimBase::stop)).await;
    }

    /// Shuts every base down gracefully (a `DEACTIVATED` heartbeat each).
    pub async fn shutdown_all(&self) {
        join_all(self.bases.iter().map(SimBase::shutdown_graceful)).await;
    }
}

fn member_config(template: &SimBaseConfig, i: usize) -> SimBaseConfig {
    let mut cfg = template.clone();
    cfg.identity = format!("{}-{i}", template.identity);
    if template.host_name == template.identity {
        cfg.host_name = cfg.identity.clone();
    }
    cfg
}

fn member_transport(t: &SimTransport, i: usize) -> anyhow::Result<SimTransport> {
    Ok(match t {
        SimTransport::Http {
            controller_url,
            listen_port,
        } if *listen_port != 0 => {
            let offset = u16::try_from(i).context("too many bases for consecutive ports")?;
            SimTransport::Http {
                controller_url: controller_url.clone(),
                listen_port: listen_port
                    .checked_add(offset)
                    .context("HTTP port range overflows")?,
            }
        }
        other => other.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_get_indexed_identities_and_ports() {
        let t = SimBaseConfig::new("b");
        let c = member_config(&t, 3);
        assert_eq!(c.identity, "b-3");
        assert_eq!(c.host_name, "b-3");
        let mut t2 = SimBaseConfig::new("b");
        t2.host_name = "shared-host".into();
        assert_eq!(member_config(&t2, 1).host_name, "shared-host");
        let http = SimTransport::Http {
            controller_url: "http://x".into(),
            listen_port: 9000,
        };
        assert_eq!(
            member_transport(&http, 2).expect("port"),
            SimTransport::Http {
                controller_url: "http://x".into(),
                listen_port: 9002
            }
        );
        let high = SimTransport::Http {
            controller_url: "http://x".into(),
            listen_port: 65535,
        };
        assert!(member_transport(&high, 1).is_err());
    }
}
