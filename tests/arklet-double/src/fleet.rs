//! Many double bases in one process.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::base::Base;
use crate::config::{BaseConfig, Transport};

/// `n` bases started from one template: identities and host names `<template>-<i>`.
#[derive(Debug, Clone)]
pub struct Fleet {
    bases: Vec<Base>,
}

impl Fleet {
    /// Starts `n` bases (at most 64 connecting at a time, so a broker is not stormed). HTTP
    /// bases with a fixed template port get `port + i`.
    pub async fn start(
        n: usize,
        template: BaseConfig,
        transport: Transport,
    ) -> anyhow::Result<Fleet> {
        let gate = Arc::new(Semaphore::new(64));
        let mut set = JoinSet::new();
        for i in 0..n {
            let mut cfg = template.clone();
            cfg.identity = format!("{}-{i}", template.identity);
            cfg.host_name = format!("{}-{i}", template.host_name);
            let transport = match &transport {
                Transport::Http {
                    controller_url,
                    listen_port,
                } if *listen_port != 0 => Transport::Http {
                    controller_url: controller_url.clone(),
                    listen_port: listen_port.saturating_add(i as u16),
                },
                t => t.clone(),
            };
            let gate = gate.clone();
            set.spawn(async move {
                let _permit = gate.acquire_owned().await;
                (i, Base::start(cfg, transport).await)
            });
        }
        let mut bases: Vec<Option<Base>> = vec![None; n];
        while let Some(joined) = set.join_next().await {
            let (i, started) = joined?;
            bases[i] = Some(started?);
        }
        Ok(Fleet {
            bases: bases.into_iter().flatten().collect(),
        })
    }

    /// The bases, in identity order.
    pub fn bases(&self) -> &[Base] {
        &self.bases
    }

    /// Base number `i`.
    pub fn base(&self, i: usize) -> Option<&Base> {
        self.bases.get(i)
    }

    /// How many bases.
    pub fn len(&self) -> usize {
        self.bases.len()
    }

    /// Whether the fleet is empty.
    pub fn is_empty(&self) -> bool {
        self.bases.is_empty()
    }

    /// Waits until `pred` holds for every base, at most `timeout` in all.
    pub async fn wait_all(&self, timeout: Duration, pred: impl Fn(&Base) -> bool + Clone) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        for b in &self.bases {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if !b.wait_until(left, pred.clone()).await {
                return false;
            }
        }
        true
    }

    /// Gracefully shuts every base down.
    pub async fn shutdown_graceful(&self) {
        let mut set = JoinSet::new();
        for b in &self.bases {
            let b = b.clone();
            set.spawn(async move { b.shutdown_graceful().await });
        }
        while set.join_next().await.is_some() {}
    }

    /// Stops every base abruptly.
    pub async fn stop(&self) {
        let mut set = JoinSet::new();
        for b in &self.bases {
            let b = b.clone();
            set.spawn(async move { b.stop().await });
        }
        while set.join_next().await.is_some() {}
    }
}
