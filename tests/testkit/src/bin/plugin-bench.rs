//! Plugin benchmark: prints the costs of the WASM plugin host against its targets.
//!
//! ```text
//! plugins/build.sh && cargo run --release --bin plugin-bench [-- --dist plugins/dist]
//! ```
//!
//! Measures the ordering hook through the real host path (fresh instance per call) for 10,
//! 100 and 1000 pods next to the built-in native decision, the cost of a fresh instance, the
//! reload time from a file write to the new version serving, and memory per loaded plugin.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use module_controller::plugin::{PluginConfig, PluginHost};
use module_controller::rollout::ordering::{StatusChange, default_waves, order_with};

/// Benchmark options.
#[derive(Debug, Parser)]
#[command(about = "Benchmark the WASM plugin host")]
struct Args {
    /// Directory with the built plugin components (plugins/build.sh output).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/plugins/dist"))]
    dist: PathBuf,
    /// Calls per measured size.
    #[arg(long, default_value_t = 2000)]
    iterations: usize,
    /// Reloads to time.
    #[arg(long, default_value_t = 20)]
    reloads: usize,
    /// Debounce of the directory watcher during the reload measurement, in milliseconds.
    #[arg(long, default_value_t = 200)]
    debounce_ms: u64,
}

fn changes(n: usize) -> Vec<StatusChange> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..n as u32)
        .map(|i| StatusChange {
            pod_index: i,
            creation_ts: 1_700_000_000 + (next() % 10_000) as i64,
            revision: (next() % 4) as i64,
            from_ready: next() % 2 == 0,
            to_ready: next() % 2 == 0,
            deleting: next() % 10 == 0,
        })
        .collect()
}

/// p50 and p99 of `samples`.
fn percentiles(samples: &mut [Duration]) -> (Duration, Duration) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    (at(0.50), at(0.99))
}

fn time_calls(iterations: usize, mut f: impl FnMut()) -> (Duration, Duration) {
    for _ in 0..iterations / 10 {
        f();
    }
    let mut samples: Vec<Duration> = (0..iterations)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    percentiles(&mut samples)
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "MISSED" }
}

/// Appends a custom section: same behaviour, different bytes and content hash.
fn with_custom_section(wasm: &[u8], data: &[u8]) -> Vec<u8> {
    fn leb(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }
    let name = b"bench";
    let mut body = Vec::new();
    leb(name.len(), &mut body);
    body.extend_from_slice(name);
    body.extend_from_slice(data);
    let mut out = wasm.to_vec();
    out.push(0);
    leb(body.len(), &mut out);
    out.extend_from_slice(&body);
    out
}

fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// Resident set size of this process.
fn rss_bytes() -> Option<usize> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: usize = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * usize::try_from(page).ok()?)
}

fn config(dir: &Path, cache: &Path, debounce: Duration) -> PluginConfig {
    let mut cfg = PluginConfig::new(dir);
    cfg.cache_dir = cache.to_path_buf();
    cfg.debounce = debounce;
    cfg
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let read = |name: &str| {
        let p = args.dist.join(format!("{name}.wasm"));
        std::fs::read(&p)
            .with_context(|| format!("reading {} (run plugins/build.sh first)", p.display()))
    };
    let ordering = read("default-ordering")?;
    let newest = read("fixture-newest-first")?;
    if cfg!(debug_assertions) {
        println!("WARNING: debug build; run with --release for meaningful numbers\n");
    }

    let dir = tempfile::tempdir().context("plugins temp dir")?;
    let cache = tempfile::tempdir().context("cache temp dir")?;
    write_atomic(&dir.path().join("ordering.wasm"), &ordering)?;
    let manifest = r#"{"plugins":{"ord":{"file":"ordering.wasm"}},"ordering":"ord"}"#;
    write_atomic(&dir.path().join("plugins.json"), manifest.as_bytes())?;
    let debounce = Duration::from_millis(args.debounce_ms);
    let host = PluginHost::start(config(dir.path(), cache.path(), debounce)).await?;
    if host.ordering_rule().name() != "ord" {
        bail!("the ordering plugin did not load: {:?}", host.load_errors());
    }

    println!(
        "== ordering hook: fresh instance per call, {} calls per size ==",
        args.iterations
    );
    println!(
        "{:>6} | {:>12} {:>12} | {:>12} {:>12} | {:>8} | target",
        "pods", "wasm p50", "wasm p99", "native p50", "native p99", "p99 ratio"
    );
    let mut p99_100 = Duration::ZERO;
    for n in [10usize, 100, 1000] {
        let c = changes(n);
        let rule = host.ordering_rule();
        let expected = default_waves(&c);
        if rule.order(&c).ok().as_ref() != Some(&expected) {
            bail!("the plugin's decision differs from the built-in for {n} pods");
        }
        let iters = if n >= 1000 {
            args.iterations / 4
        } else {
            args.iterations
        };
        let (wp50, wp99) = time_calls(iters, || {
            let _ = std::hint::black_box(rule.order(std::hint::black_box(&c)));
        });
        let (np50, np99) = time_calls(iters, || {
            let _ = std::hint::black_box(default_waves(std::hint::black_box(&c)));
        });
        let target = if n == 100 {
            p99_100 = wp99;
            format!(
                "p99 ≤ 200 µs: {}",
                verdict(wp99 <= Duration::from_micros(200))
            )
        } else {
            String::new()
        };
        println!(
            "{n:>6} | {:>12} {:>12} | {:>12} {:>12} | {:>8.1}x | {target}",
            us(wp50),
            us(wp99),
            us(np50),
            us(np99),
            wp99.as_secs_f64() / np99.as_secs_f64().max(1e-9)
        );
    }

    let empty: Vec<StatusChange> = Vec::new();
    let rule = host.ordering_rule();
    let one = changes(1);
    let (ip50, ip99) = time_calls(args.iterations, || {
        let _ = std::hint::black_box(rule.order(std::hint::black_box(&empty)));
    });
    let (op50, op99) = time_calls(args.iterations, || {
        let _ = std::hint::black_box(rule.order(std::hint::black_box(&one)));
    });
    println!("\n== instantiation ==");
    println!(
        "fresh Store + instance + empty call: p50 {} p99 {}",
        us(ip50),
        us(ip99)
    );
    println!(
        "same with one pod record:            p50 {} p99 {}",
        us(op50),
        us(op99)
    );

    println!(
        "\n== reload: write → new version serving (debounce {} ms) ==",
        args.debounce_ms
    );
    let probe = changes(12);
    let want = [default_waves(&probe), {
        // newest-first puts everything in one wave; the host splits Ready writes last.
        let mut idx: Vec<usize> = (0..probe.len()).collect();
        idx.sort_by_key(|&i| std::cmp::Reverse((probe[i].creation_ts, i as u32)));
        module_controller::rollout::ordering::enforce_invariant(&probe, vec![idx])
    }];
    let mut reloads = Vec::new();
    let mut compiles = Vec::new();
    for i in 0..args.reloads {
        let variant = (i + 1) % 2;
        let base = if variant == 0 { &ordering } else { &newest };
        let bytes = with_custom_section(base, format!("reload {i}").as_bytes());
        let written = Instant::now();
        write_atomic(&dir.path().join("ordering.wasm"), &bytes)?;
        loop {
            if order_with(host.ordering_rule().as_ref(), &probe).0 == want[variant] {
                break;
            }
            if written.elapsed() > Duration::from_secs(10) {
                bail!(
                    "reload {i} did not serve within 10 s: got {:?}, want {:?}, errors {:?}",
                    host.ordering_rule().order(&probe),
                    want[variant],
                    host.load_errors()
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        reloads.push(written.elapsed());
        if let Some(s) = host.status().first() {
            compiles.push(s.load_time);
        }
    }
    let (rp50, rp99) = percentiles(&mut reloads);
    let (cp50, cp99) = percentiles(&mut compiles);
    println!(
        "write → serving:                p50 {rp50:?} max {rp99:?}  (target ≤ 1 s: {})",
        verdict(rp99 <= Duration::from_secs(1))
    );
    println!("of which compile + validate:    p50 {cp50:?} max {cp99:?}");

    println!("\n== memory ==");
    let peak = host.status().first().map_or(0, |s| s.peak_instance_memory);
    let c = changes(1000);
    let _ = host.ordering_rule().order(&c);
    let peak_1000 = host.status().first().map_or(0, |s| s.peak_instance_memory);
    println!(
        "linear memory of one instance:  {:.2} MiB (after ordering 1000 pods: {:.2} MiB)  (target ≤ 4 MiB: {})",
        peak as f64 / 1048576.0,
        peak_1000 as f64 / 1048576.0,
        verdict(peak_1000 <= 4 << 20)
    );
    drop(host);

    // Resident memory per loaded plugin version: compiled code, pre-instance, metadata.
    let many = 20;
    let dir2 = tempfile::tempdir().context("plugins temp dir")?;
    let mut plugins = Vec::new();
    for i in 0..many {
        let file = format!("p{i}.wasm");
        write_atomic(
            &dir2.path().join(&file),
            &with_custom_section(&ordering, format!("copy {i}").as_bytes()),
        )?;
        plugins.push(format!(r#""p{i}":{{"file":"{file}"}}"#));
    }
    let before = rss_bytes();
    let empty_manifest = tempfile::tempdir().context("plugins temp dir")?;
    let idle = PluginHost::start(config(empty_manifest.path(), cache.path(), debounce)).await?;
    let baseline = rss_bytes();
    write_atomic(
        &dir2.path().join("plugins.json"),
        format!(r#"{{"plugins":{{{}}}}}"#, plugins.join(",")).as_bytes(),
    )?;
    let loaded = PluginHost::start(config(dir2.path(), cache.path(), debounce)).await?;
    let after = rss_bytes();
    if loaded.status().len() != many {
        bail!(
            "only {} of {many} copies loaded: {:?}",
            loaded.status().len(),
            loaded.load_errors()
        );
    }
    if let (Some(_), Some(b), Some(a)) = (before, baseline, after) {
        println!(
            "resident memory per loaded plugin version: {:.2} MiB ({many} versions loaded, compiled fresh)",
            a.saturating_sub(b) as f64 / many as f64 / 1048576.0
        );
    }
    drop((idle, loaded));

    println!("\n== summary ==");
    println!(
        "ordering of 100 pods p99 {} (≤ 200 µs: {})",
        us(p99_100),
        verdict(p99_100 <= Duration::from_micros(200))
    );
    println!(
        "reload write→serving max {rp99:?} (≤ 1 s: {})",
        verdict(rp99 <= Duration::from_secs(1))
    );
    println!(
        "instance memory {:.2} MiB (≤ 4 MiB: {})",
        peak_1000 as f64 / 1048576.0,
        verdict(peak_1000 <= 4 << 20)
    );
    Ok(())
}
