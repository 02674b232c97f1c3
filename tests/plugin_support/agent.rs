//! A simulated base agent speaking the "simple agent" JSON protocol (not Arklet): publishes its
//! status with its module list, answers `hello` with nothing (the controller sends a baseline),
//! applies install/uninstall commands and reports results. Records every command it got.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

/// One simulated agent; its tasks stop on drop.
pub struct SimpleAgent {
    pub node: String,
    prefix: String,
    client: AsyncClient,
    state: Arc<Mutex<AgentState>>,
    tasks: Vec<JoinHandle<()>>,
}

#[derive(Default)]
struct AgentState {
    modules: Vec<(String, String)>,
    commands: Vec<Value>,
    statuses_sent: u64,
    connection_errors: Vec<String>,
}

impl SimpleAgent {
    /// Connects to the broker, subscribes to its command topic, announces itself and then
    /// publishes its status every `period`.
    pub async fn start(
        host: &str,
        port: u16,
        prefix: &str,
        node: &str,
        period: Duration,
    ) -> SimpleAgent {
        let mut opts = MqttOptions::new(format!("agent-{node}-{}", std::process::id()), host, port);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_clean_session(true);
        let (client, mut eventloop) = AsyncClient::new(opts, 256);
        let state = Arc::new(Mutex::new(AgentState::default()));
        let cmd_topic = format!("{prefix}/{node}/cmd");
        client
            .subscribe(cmd_topic.clone(), QoS::AtLeastOnce)
            .await
            .expect("queueing the agent's subscription");

        let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel::<()>();
        let loop_state = state.clone();
        let loop_client = client.clone();
        let (p, n) = (prefix.to_string(), node.to_string());
        let event_task = tokio::spawn(async move {
            let mut subscribed = Some(subscribed_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = subscribed.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(msg))) if msg.topic == cmd_topic => {
                        let Ok(cmd) = serde_json::from_slice::<Value>(&msg.payload) else {
                            continue;
                        };
                        let reply = apply(&loop_state, &cmd);
                        if let Some(reply) = reply {
                            let _ = loop_client
                                .publish(
                                    format!("{p}/{n}/result"),
                                    QoS::AtLeastOnce,
                                    false,
                                    reply.to_string(),
                                )
                                .await;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        loop_state
                            .lock()
                            .expect("agent state lock")
                            .connection_errors
                            .push(e.to_string());
                        tokio::time::sleep(Duration::from_millis(100)).await
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), subscribed_rx)
            .await
            .expect("agent subscription acknowledged in time")
            .expect("agent event loop alive");

        let hello =
            json!({"node": node, "app": "simple-base", "version": "1.0.0", "cluster": "test"});
        client
            .publish(
                format!("{prefix}/{node}/hello"),
                QoS::AtLeastOnce,
                false,
                hello.to_string(),
            )
            .await
            .expect("queueing hello");

        let status_state = state.clone();
        let status_client = client.clone();
        let (p, n) = (prefix.to_string(), node.to_string());
        let status_task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let body = {
                    let mut s = status_state.lock().expect("agent state lock");
                    s.statuses_sent += 1;
                    status_body(&n, &s.modules)
                };
                let _ = status_client
                    .publish(
                        format!("{p}/{n}/status"),
                        QoS::AtLeastOnce,
                        false,
                        body.to_string(),
                    )
                    .await;
            }
        });
        SimpleAgent {
            node: node.to_string(),
            prefix: prefix.to_string(),
            client,
            state,
            tasks: vec![event_task, status_task],
        }
    }

    /// Every command received so far, in order.
    pub fn commands(&self) -> Vec<Value> {
        self.state
            .lock()
            .expect("agent state lock")
            .commands
            .clone()
    }

    /// Modules installed now.
    pub fn modules(&self) -> Vec<(String, String)> {
        self.state.lock().expect("agent state lock").modules.clone()
    }

    /// Connection errors the agent's MQTT client saw.
    pub fn connection_errors(&self) -> Vec<String> {
        self.state
            .lock()
            .expect("agent state lock")
            .connection_errors
            .clone()
    }

    /// Status messages published so far.
    pub fn statuses_sent(&self) -> u64 {
        self.state.lock().expect("agent state lock").statuses_sent
    }

    /// The topic prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Disconnects.
    pub async fn stop(self) {
        let _ = self.client.disconnect().await;
    }
}

impl Drop for SimpleAgent {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn status_body(node: &str, modules: &[(String, String)]) -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    json!({
        "node": node,
        "ip": "10.1.0.7",
        "hostname": format!("{node}.local"),
        "app": "simple-base",
        "version": "1.0.0",
        "cluster": "test",
        "state": "up",
        "ts": now,
        "modules": modules
            .iter()
            .map(|(n, v)| json!({"name": n, "version": v, "state": "ACTIVATED"}))
            .collect::<Vec<_>>(),
    })
}

/// Applies a command; returns the result message to publish, if the command has one.
fn apply(state: &Mutex<AgentState>, cmd: &Value) -> Option<Value> {
    let mut s = state.lock().expect("agent state lock");
    s.commands.push(cmd.clone());
    let name = cmd["name"].as_str().unwrap_or_default().to_string();
    let version = cmd["version"].as_str().unwrap_or_default().to_string();
    match cmd["op"].as_str() {
        Some("install") => {
            s.modules.retain(|(n, _)| *n != name);
            s.modules.push((name.clone(), version.clone()));
            Some(
                json!({"op": "install", "name": name, "version": version, "ok": true, "message": "installed"}),
            )
        }
        Some("uninstall") => {
            s.modules.retain(|(n, v)| !(*n == name && *v == version));
            Some(
                json!({"op": "uninstall", "name": name, "version": version, "ok": true, "message": "uninstalled"}),
            )
        }
        _ => None,
    }
}
