//! `arklet-double`: runs N double bases against an MQTT broker or an HTTP controller until
//! Ctrl-C, for manual tries and benchmarks.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use arklet_double::{BaseConfig, Fleet, Transport};

const USAGE: &str = "\
usage: arklet-double (--mqtt HOST:PORT | --http CONTROLLER_URL) [options]
  --count N            bases to run (default 1); identities <identity>-<i>
  --identity ID        identity (template) (default double)
  --env ENV            topic environment (default dev)
  --name NAME          base name (default base)
  --version V          base version (default 1.0.0)
  --cluster NAME       cluster name (default default)
  --heartbeat-secs N   heartbeat period (default 10)
  --install-ms N       time a module stays RESOLVED (default 0)
  --listen-port P      Arklet HTTP port (0 = free port; with --count, P+i)
  --prefix P           MQTT client id prefix (default koupleless)
  --username U         MQTT username
  --password P         MQTT password
  --legacy-biz         answer queryAllBiz on base/biz (pre-2024-10 Arklet)
  --report-secs N      print a summary every N seconds (default 10)";

/// What runs: one base (identity as given) or a fleet.
enum Running {
    One(arklet_double::Base),
    Many(Fleet),
}

struct Args {
    transport: Transport,
    count: usize,
    cfg: BaseConfig,
    report: Duration,
}

fn parse(mut argv: impl Iterator<Item = String>) -> anyhow::Result<Args> {
    let mut transport = None;
    let mut count = 1usize;
    let mut listen_port = 0u16;
    let mut cfg = BaseConfig::new("double");
    let mut report = Duration::from_secs(10);
    while let Some(flag) = argv.next() {
        let mut value = || argv.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--mqtt" => {
                let v = value()?;
                let (host, port) = v.rsplit_once(':').context("--mqtt wants HOST:PORT")?;
                let port = port.parse().context("--mqtt port")?;
                transport = Some(Transport::Mqtt {
                    host: host.to_string(),
                    port,
                });
            }
            "--http" => {
                transport = Some(Transport::Http {
                    controller_url: value()?,
                    listen_port: 0,
                })
            }
            "--count" => count = value()?.parse().context("--count")?,
            "--identity" => {
                cfg.identity = value()?;
                cfg.host_name = cfg.identity.clone();
            }
            "--env" => cfg.env = value()?,
            "--name" => cfg.name = value()?,
            "--version" => cfg.version = value()?,
            "--cluster" => cfg.cluster_name = value()?,
            "--heartbeat-secs" => {
                cfg.heartbeat_interval = Duration::from_secs(value()?.parse()?);
            }
            "--install-ms" => cfg.install_time = Duration::from_millis(value()?.parse()?),
            "--listen-port" => listen_port = value()?.parse().context("--listen-port")?,
            "--prefix" => cfg.client_prefix = value()?,
            "--username" => cfg.mqtt_username = Some(value()?),
            "--password" => cfg.mqtt_password = Some(value()?),
            "--legacy-biz" => cfg.legacy_biz_topic = true,
            "--report-secs" => report = Duration::from_secs(value()?.parse()?),
            "-h" | "--help" => bail!("{USAGE}"),
            other => bail!("unknown flag {other}\n{USAGE}"),
        }
    }
    let mut transport =
        transport.with_context(|| format!("--mqtt or --http is required\n{USAGE}"))?;
    if let Transport::Http { listen_port: p, .. } = &mut transport {
        *p = listen_port;
    }
    Ok(Args {
        transport,
        count,
        cfg,
        report,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse(std::env::args().skip(1))?;
    if let Transport::Mqtt { host, port } = &args.transport {
        arklet_double::probe_broker(host, *port).await?;
    }
    let started = Instant::now();
    let fleet = if args.count == 1 {
        // A single base keeps its identity as given.
        let base = arklet_double::Base::start(args.cfg.clone(), args.transport.clone()).await?;
        println!(
            "base {} up{}",
            base.identity(),
            base.http_port()
                .map(|p| format!(", Arklet HTTP on {}:{p}", args.cfg.local_ip))
                .unwrap_or_default()
        );
        Running::One(base)
    } else {
        let fleet = Fleet::start(args.count, args.cfg.clone(), args.transport.clone()).await?;
        println!(
            "{} bases up in {:.2} s",
            fleet.len(),
            started.elapsed().as_secs_f64()
        );
        Running::Many(fleet)
    };
    let bases: Vec<arklet_double::Base> = match &fleet {
        Running::Many(f) => f.bases().to_vec(),
        Running::One(b) => vec![b.clone()],
    };
    let mut tick = tokio::time::interval(args.report);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {
                let heartbeats: u64 = bases.iter().map(|b| b.heartbeats_sent()).sum();
                let commands: usize = bases.iter().map(|b| b.commands().len()).sum();
                let modules: usize = bases.iter().map(|b| b.modules().len()).sum();
                println!("heartbeats {heartbeats}, commands {commands}, modules {modules}");
            }
        }
    }
    match fleet {
        Running::Many(f) => f.shutdown_graceful().await,
        Running::One(b) => b.shutdown_graceful().await,
    }
    Ok(())
}
