//! The controller's built-in status ordering, as a plugin: every write that does not make a
//! pod Ready first (oldest revision first), then the Ready writes (oldest pod first).

use ordering_sdk::{Metadata, Ordering, PluginInfo, StatusChange, becomes_ready};

struct DefaultOrdering;

/// Same decision as `module_controller::rollout::ordering::default_waves`.
fn waves(changes: &[StatusChange]) -> Vec<Vec<u32>> {
    let n = changes.len() as u32;
    let at = |i: u32| &changes[i as usize];
    let mut first: Vec<u32> = (0..n).filter(|&i| !becomes_ready(at(i))).collect();
    let mut second: Vec<u32> = (0..n).filter(|&i| becomes_ready(at(i))).collect();
    first.sort_by_key(|&i| (at(i).revision, at(i).creation_ts, i));
    second.sort_by_key(|&i| (at(i).creation_ts, at(i).revision, i));
    [first, second]
        .into_iter()
        .filter(|w| !w.is_empty())
        .collect()
}

fn change(i: u32, from_ready: bool, to_ready: bool, revision: i64) -> StatusChange {
    StatusChange {
        pod_index: i,
        creation_ts: 100 - i64::from(i),
        revision,
        from_ready,
        to_ready,
        deleting: false,
    }
}

impl Metadata for DefaultOrdering {
    fn info() -> PluginInfo {
        ordering_sdk::info(env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"))
    }

    fn init(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn self_check() -> Result<(), String> {
        let sample = [
            change(0, false, true, 2),
            change(1, true, false, 1),
            change(2, false, true, 2),
            change(3, true, false, 2),
        ];
        let got = waves(&sample);
        let want = vec![vec![1, 3], vec![2, 0]];
        if got != want {
            return Err(format!("sample ordering: got {got:?}, want {want:?}"));
        }
        if !waves(&[]).is_empty() {
            return Err("empty input must give no waves".into());
        }
        Ok(())
    }
}

impl Ordering for DefaultOrdering {
    fn order(changes: Vec<StatusChange>) -> Result<Vec<Vec<u32>>, String> {
        Ok(waves(&changes))
    }
}

ordering_sdk::export_plugin!(DefaultOrdering);
