//! Test helpers: a private mosquitto and a raw MQTT "controller" that records what bases
//! publish. Nothing here comes from the controller crate.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// A mosquitto on a free loopback port, killed on drop.
pub struct Mosquitto {
    pub port: u16,
    child: Child,
    dir: PathBuf,
    binary: &'static str,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl Mosquitto {
    pub async fn start() -> Mosquitto {
        let binary = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("mosquitto is installed");
        for _ in 0..5 {
            let port = free_port();
            let dir = std::env::temp_dir().join(format!(
                "arklet-double-mosquitto-{}-{port}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let conf = dir.join("mosquitto.conf");
            std::fs::write(
                &conf,
                format!(
                    "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\n"
                ),
            )
            .unwrap();
            let child = Command::new(binary)
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("spawn mosquitto");
            for _ in 0..100 {
                if tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
                {
                    return Mosquitto {
                        port,
                        child,
                        dir,
                        binary,
                    };
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Port taken meanwhile: try another.
        }
        panic!("mosquitto did not come up");
    }

    /// Kills the broker (every session is lost) and starts a new one on the same port.
    pub async fn restart(&mut self) {
        self.child.kill().await.expect("kill mosquitto");
        self.child = Command::new(self.binary)
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("respawn mosquitto");
        for _ in 0..250 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("mosquitto did not come back on {}", self.port);
    }
}

/// One message a base published.
#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    pub raw: Vec<u8>,
    pub json: Option<Value>,
}

impl Msg {
    /// The envelope's `data`.
    pub fn data(&self) -> &Value {
        &self.json.as_ref().expect("json")["data"]
    }
}

/// A raw MQTT client playing the controller.
#[derive(Clone)]
pub struct Ctl {
    client: AsyncClient,
    seen: Arc<Mutex<Vec<Msg>>>,
    subacks: Arc<std::sync::atomic::AtomicUsize>,
    changed: watch::Sender<u64>,
    pub env: String,
}

impl Ctl {
    pub async fn connect(port: u16, env: &str) -> Ctl {
        let id = format!("test-ctl-{}", free_port());
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_max_packet_size(8 << 20, 8 << 20);
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let changed = watch::Sender::new(0u64);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let s = seen.clone();
        let ch = changed.clone();
        let sub = client.clone();
        let subacks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let acks = subacks.clone();
        let filter = format!("koupleless_{env}/+/base/#");
        tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            loop {
                match eventloop.poll().await {
                    // Subscribe on every connect: a restarted broker forgets sessions.
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        sub.try_subscribe(filter.clone(), QoS::AtLeastOnce).unwrap();
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        acks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        ch.send_modify(|n| *n += 1);
                        if let Some(tx) = ready.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let json = serde_json::from_slice(&p.payload).ok();
                        s.lock().unwrap().push(Msg {
                            topic: p.topic.clone(),
                            raw: p.payload.to_vec(),
                            json,
                        });
                        ch.send_modify(|n| *n += 1);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("controller subscribed")
            .unwrap();
        Ctl {
            client,
            seen,
            subacks,
            changed,
            env: env.to_string(),
        }
    }

    /// How many times the controller's subscription was acknowledged (1 per connect).
    pub fn subscriptions(&self) -> usize {
        self.subacks.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Sends a command to `koupleless_<env>/<id>/<cmd>` (QoS 1, not retained).
    pub async fn send(&self, id: &str, cmd: &str, body: &Value) {
        self.send_raw(id, cmd, body.to_string().into_bytes()).await;
    }

    pub async fn send_raw(&self, id: &str, cmd: &str, body: Vec<u8>) {
        self.client
            .publish(
                format!("koupleless_{}/{id}/{cmd}", self.env),
                QoS::AtLeastOnce,
                false,
                body,
            )
            .await
            .unwrap();
    }

    /// Every message so far on `koupleless_<env>/<id>/<suffix>`.
    pub fn on(&self, id: &str, suffix: &str) -> Vec<Msg> {
        let topic = format!("koupleless_{}/{id}/{suffix}", self.env);
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.topic == topic)
            .cloned()
            .collect()
    }

    /// Every message from base `id`.
    pub fn all(&self, id: &str) -> Vec<Msg> {
        let prefix = format!("koupleless_{}/{id}/", self.env);
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.topic.starts_with(&prefix))
            .cloned()
            .collect()
    }

    /// Waits until `pred` holds over everything seen so far.
    pub async fn wait(&self, timeout: Duration, pred: impl Fn(&Ctl) -> bool) -> bool {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if pred(self) {
                return true;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return pred(self),
            }
        }
    }

    /// Waits for the `n`-th (1-based) message on a topic suffix and returns it.
    pub async fn nth(&self, id: &str, suffix: &str, n: usize) -> Msg {
        assert!(
            self.wait(Duration::from_secs(10), |c| c.on(id, suffix).len() >= n)
                .await,
            "no message #{n} on {suffix} from {id}; saw {:?}",
            self.all(id)
                .iter()
                .map(|m| m.topic.clone())
                .collect::<Vec<_>>()
        );
        self.on(id, suffix)[n - 1].clone()
    }
}

pub fn fixture(path: &str) -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures")
        .join(path);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn walk(v: &Value, path: String, out: &mut std::collections::BTreeSet<String>) {
    out.insert(format!("{path}: {}", kind(v)));
    match v {
        Value::Array(items) => {
            for i in items {
                walk(i, format!("{path}[]"), out);
            }
        }
        Value::Object(m) => {
            for (k, i) in m {
                walk(i, format!("{path}.{k}"), out);
            }
        }
        _ => {}
    }
}

/// Every `path: type` in a JSON value (array elements merged under `[]`).
pub fn shape(v: &Value) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    walk(v, "$".to_string(), &mut out);
    out
}

/// Asserts two values have the same shape, listing the differences.
pub fn assert_same_shape(name: &str, fixture: &Value, ours: &Value) {
    let a = shape(fixture);
    let b = shape(ours);
    let missing: Vec<_> = a.difference(&b).collect();
    let extra: Vec<_> = b.difference(&a).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{name}: shape differs\n  only in fixture: {missing:#?}\n  only in double: {extra:#?}\n  double sent: {ours}"
    );
}
