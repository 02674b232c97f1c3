//! Hot reload: watch the plugins directory, debounce, rescan.
//!
//! Any event counts as "something changed": ConfigMap volumes update by swapping the `..data`
//! symlink, so watching individual files would miss updates. The rescan compares content
//! hashes, so spurious events cost a few file reads. A periodic resync covers missed events.
//!
//! This module knows nothing of the host: it calls [`Rescan::rescan`] on whatever it watches
//! for, so the dependency goes one way (host → reload).

use std::path::Path;
use std::sync::Weak;
use std::time::Duration;

use anyhow::Context;
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until, timeout};
use tracing::{debug, warn};

/// A burst of events never delays a rescan by more than this many debounce periods.
const MAX_DEBOUNCE_PERIODS: u32 = 5;

/// What a directory change triggers: a full rescan (blocking; run on a blocking thread).
pub(crate) trait Rescan: Send + Sync + 'static {
    /// Re-reads the directory and applies what changed.
    fn rescan(&self);
}

/// How to watch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WatchTiming {
    /// Quiet time after a change before rescanning.
    pub debounce: Duration,
    /// Rescan this often without changes.
    pub resync: Duration,
}

/// Watches `dir` and rescans `target` on changes (debounced) and periodically, until `target`
/// is dropped or the returned watcher is: the caller keeps the watcher alive.
pub(crate) fn watch<T: Rescan>(
    dir: &Path,
    timing: WatchTiming,
    target: Weak<T>,
) -> anyhow::Result<notify::RecommendedWatcher> {
    let (tx, rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        match res {
            Ok(ev) if !changes_content(&ev.kind) => return,
            Ok(ev) => debug!(kind = ?ev.kind, paths = ?ev.paths, "plugins directory event"),
            Err(e) => warn!(error = %e, "plugins directory watch error"),
        }
        // Errors also trigger a rescan: the rescan is the source of truth.
        let _ = tx.send(());
    })
    .context("creating the file watcher")?;
    watcher
        .watch(dir, RecursiveMode::Recursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    tokio::spawn(debounce_loop(target, timing, rx));
    Ok(watcher)
}

/// Whether an event may mean new content. Reads are not: the rescan itself opens every file,
/// and reacting to that would rescan forever.
fn changes_content(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

async fn debounce_loop<T: Rescan>(
    target: Weak<T>,
    timing: WatchTiming,
    mut rx: mpsc::UnboundedReceiver<()>,
) {
    loop {
        match timeout(timing.resync.max(Duration::from_millis(10)), rx.recv()).await {
            // The watcher (owned by the host) is gone: the host was dropped.
            Ok(None) => return,
            Ok(Some(())) => quiet(&mut rx, timing.debounce).await,
            Err(_) => {} // periodic resync
        }
        let Some(target) = target.upgrade() else {
            return;
        };
        if tokio::task::spawn_blocking(move || target.rescan())
            .await
            .is_err()
        {
            warn!("plugin rescan panicked; will retry on the next change");
        }
    }
}

/// Waits until no event arrived for `debounce` (bounded), draining what comes meanwhile.
async fn quiet(rx: &mut mpsc::UnboundedReceiver<()>, debounce: Duration) {
    let hard_stop = Instant::now() + debounce * MAX_DEBOUNCE_PERIODS;
    loop {
        let until = (Instant::now() + debounce).min(hard_stop);
        tokio::select! {
            ev = rx.recv() => if ev.is_none() { return },
            _ = sleep_until(until) => return,
        }
        if Instant::now() >= hard_stop {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use notify::event::{CreateKind, ModifyKind, RenameMode};

    use super::*;

    #[test]
    fn reads_do_not_trigger_rescans() {
        assert!(!changes_content(&EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(!changes_content(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(changes_content(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(changes_content(&EventKind::Modify(ModifyKind::Name(
            RenameMode::Both
        ))));
        assert!(changes_content(&EventKind::Create(CreateKind::File)));
        assert!(changes_content(&EventKind::Any));
    }
}
