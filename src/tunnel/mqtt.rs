//! The MQTT tunnel: one broker connection shared by every base. The tunnel owns the connection
//! and its subscriptions; codecs (the built-in Arklet one and plugin adapters) only translate.
//! Subscriptions are restored on every reconnect and follow codec swaps without reconnecting.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, Transport};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::model::{BaseCommand, BaseEvent};
use crate::offload::{self, Pool};
use crate::protocol::arklet::now_ms;
use crate::tunnel::codec::{CodecSet, MessageCodec};
use crate::tunnel::{Tunnel, TunnelError, TunnelMetrics};

/// Plugin-adapter messages waiting for the plugin pool; beyond that they are dropped and
/// counted (`overloaded`).
const PLUGIN_DECODE_QUEUE: usize = 4096;

/// Connection settings (from `MQTT_*` configuration).
#[derive(Debug, Clone)]
pub struct MqttSettings {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Client id (must be unique per controller instance).
    pub client_id: String,
    /// Username, if any.
    pub username: Option<String>,
    /// Password, if any.
    pub password: Option<String>,
    /// CA bundle (PEM) to verify the broker; enables TLS.
    pub ca_path: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    pub client_cert_path: Option<std::path::PathBuf>,
    /// Client key (PEM) for mutual TLS.
    pub client_key_path: Option<std::path::PathBuf>,
    /// Keep-alive interval.
    pub keep_alive: Duration,
    /// TLS without verifying the broker's certificate (`MQTT_TLS_INSECURE_SKIP_VERIFY`).
    pub insecure_skip_verify: bool,
}

struct Shared {
    client: AsyncClient,
    builtin: Arc<dyn MessageCodec>,
    plugins: Mutex<CodecSet>,
    /// Which codec each base was first seen on; commands go back through it.
    base_codec: Mutex<HashMap<String, String>>,
    subscribed: Mutex<BTreeSet<String>>,
    metrics: TunnelMetrics,
    pool: Option<Pool>,
}

impl Shared {
    fn all_codecs(&self) -> Vec<Arc<dyn MessageCodec>> {
        let plugins = self
            .plugins
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut v = vec![self.builtin.clone()];
        v.extend(plugins.iter().cloned());
        v
    }

    fn wanted_subscriptions(&self) -> BTreeSet<String> {
        self.all_codecs()
            .iter()
            .flat_map(|c| c.subscriptions())
            .collect()
    }

    /// Subscribes to what is wanted and not yet subscribed; unsubscribes what is gone.
    /// `reset` forgets the current set (after a reconnect with a clean session).
    async fn sync_subscriptions(&self, reset: bool) {
        let wanted = self.wanted_subscriptions();
        let (add, remove): (Vec<String>, Vec<String>) = {
            let mut cur = self.subscribed.lock().unwrap_or_else(|p| p.into_inner());
            if reset {
                cur.clear();
            }
            let add = wanted.difference(&cur).cloned().collect();
            let remove = cur.difference(&wanted).cloned().collect();
            *cur = wanted;
            (add, remove)
        };
        for f in add {
            if let Err(e) = self.client.subscribe(f.clone(), QoS::AtLeastOnce).await {
                warn!(filter = %f, error = %e, "subscribe failed; retried on next reconnect");
                self.subscribed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&f);
            } else {
                debug!(filter = %f, "subscribed");
            }
        }
        for f in remove {
            if let Err(e) = self.client.unsubscribe(f.clone()).await {
                warn!(filter = %f, error = %e, "unsubscribe failed");
            }
        }
    }

    /// Decodes a message with the codec that handles its topic: the built-in Arklet codec
    /// here, a plugin adapter on the plugin pool (through `plugin_jobs`, in arrival order).
    fn route(
        &self,
        topic: &str,
        payload: &[u8],
        events: &mpsc::Sender<BaseEvent>,
        plugin_jobs: &mpsc::Sender<PluginDecode>,
    ) {
        let codecs = self.all_codecs();
        // Plugins first: an adapter may claim topics the built-in codec would reject.
        let Some(codec) = codecs.iter().rev().find(|c| c.handles(topic)) else {
            self.metrics.count_received("unknown_topic");
            debug!(%topic, "message on a topic no codec handles");
            return;
        };
        if Arc::ptr_eq(codec, &self.builtin) || self.pool.is_none() {
            let decoded = codec.decode(topic, payload, now_ms());
            self.forward(codec.name(), decoded, events);
            return;
        }
        let job = PluginDecode {
            codec: codec.clone(),
            topic: topic.to_string(),
            payload: payload.to_vec(),
            received_ms: now_ms(),
        };
        if plugin_jobs.try_send(job).is_err() {
            self.metrics.count_received("overloaded");
            warn!(%topic, "tunnel adapter queue full; message dropped");
        }
    }

    /// Forwards what a codec decoded, counting the outcome.
    fn forward(
        &self,
        codec: &str,
        decoded: Result<Vec<BaseEvent>, crate::tunnel::codec::DecodeError>,
        events: &mpsc::Sender<BaseEvent>,
    ) {
        match decoded {
            Ok(evs) => {
                self.metrics.count_received("ok");
                for ev in evs {
                    // Only bases speaking through an adapter are remembered (the built-in codec
                    // is everyone else's): a flood of unknown ids grows nothing.
                    if codec != self.builtin.name() {
                        let mut map = self.base_codec.lock().unwrap_or_else(|p| p.into_inner());
                        map.entry(ev.base_id.clone())
                            .or_insert_with(|| codec.to_string());
                        self.metrics.tracked.set(map.len() as i64);
                    }
                    if let Err(e) = events.try_send(ev) {
                        self.metrics.count_received("queue_full");
                        warn!(error = %e, "event queue full or closed; message dropped");
                    }
                }
            }
            Err(e) => {
                self.metrics.count_received(e.label());
                debug!(codec, error = %e, "message dropped");
            }
        }
    }
}

/// A message for a plugin tunnel adapter, decoded on the plugin pool.
struct PluginDecode {
    codec: Arc<dyn MessageCodec>,
    topic: String,
    payload: Vec<u8>,
    received_ms: i64,
}

/// Decodes plugin-adapter messages one at a time on the plugin pool, so their order is kept
/// and a slow adapter never stalls the broker connection.
async fn run_plugin_decoder(
    shared: Arc<Shared>,
    pool: Pool,
    mut jobs: mpsc::Receiver<PluginDecode>,
    events: mpsc::Sender<BaseEvent>,
) {
    while let Some(job) = jobs.recv().await {
        let codec = job.codec.clone();
        let decoded = offload::run(pool.as_ref(), move || {
            job.codec.decode(&job.topic, &job.payload, job.received_ms)
        })
        .await;
        match decoded {
            Ok(d) => shared.forward(codec.name(), d, &events),
            Err(e) => {
                shared.metrics.count_received("codec_failed");
                warn!(codec = codec.name(), error = %e, "tunnel adapter call failed; message dropped");
            }
        }
    }
}

/// The MQTT tunnel handle.
pub struct MqttTunnel {
    shared: Arc<Shared>,
    cancel: CancellationToken,
}

impl MqttTunnel {
    /// Connects (retrying in the background), subscribes for every codec, and forwards decoded
    /// events to `events`. Plugin codecs come and go through `plugin_codecs`.
    pub fn start(
        settings: &MqttSettings,
        builtin: Arc<dyn MessageCodec>,
        mut plugin_codecs: watch::Receiver<CodecSet>,
        events: mpsc::Sender<BaseEvent>,
        metrics: TunnelMetrics,
        pool: Option<Pool>,
    ) -> Result<MqttTunnel, TunnelError> {
        let opts = mqtt_options(settings)?;
        let (client, mut eventloop) = AsyncClient::new(opts, 1024);
        // Commands are small and each waits for its answer: Nagle's algorithm would hold one
        // back until the broker acknowledges the previous packet (40 ms with delayed ACKs),
        // on the critical path of every install.
        let mut net = eventloop.network_options();
        net.set_tcp_nodelay(true);
        eventloop.set_network_options(net);
        let initial = plugin_codecs.borrow_and_update().clone();
        let shared = Arc::new(Shared {
            client,
            builtin,
            plugins: Mutex::new(initial),
            base_codec: Mutex::new(HashMap::new()),
            subscribed: Mutex::new(BTreeSet::new()),
            metrics,
            pool: pool.clone(),
        });
        let cancel = CancellationToken::new();
        let (plugin_tx, plugin_rx) = mpsc::channel(PLUGIN_DECODE_QUEUE);
        if let Some(pool) = pool {
            tokio::spawn(run_plugin_decoder(
                shared.clone(),
                pool,
                plugin_rx,
                events.clone(),
            ));
        }
        tokio::spawn(run_eventloop(
            eventloop,
            shared.clone(),
            events,
            plugin_tx,
            cancel.clone(),
            format!("{}:{}", settings.host, settings.port),
        ));
        let watcher_shared = shared.clone();
        let watcher_cancel = cancel.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = watcher_cancel.cancelled() => return,
                    changed = plugin_codecs.changed() => {
                        if changed.is_err() { return; }
                        let set = plugin_codecs.borrow_and_update().clone();
                        let names: Vec<String> = set.iter().map(|c| c.name().to_string()).collect();
                        *watcher_shared.plugins.lock().unwrap_or_else(|p| p.into_inner()) = set;
                        info!(codecs = ?names, "tunnel adapters changed; updating subscriptions");
                        watcher_shared.sync_subscriptions(false).await;
                    }
                }
            }
        });
        Ok(MqttTunnel { shared, cancel })
    }

    fn codec_for(&self, base_id: &str) -> Arc<dyn MessageCodec> {
        let name = self
            .shared
            .base_codec
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(base_id)
            .cloned();
        let codecs = self.shared.all_codecs();
        name.and_then(|n| codecs.iter().find(|c| c.name() == n).cloned())
            .unwrap_or_else(|| self.shared.builtin.clone())
    }
}

impl Drop for MqttTunnel {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Tunnel for MqttTunnel {
    fn name(&self) -> &str {
        "mqtt"
    }

    /// The codec a base speaks: `mqtt` (Arklet) or a tunnel adapter's name.
    fn label_for(&self, base_id: &str) -> String {
        self.codec_for(base_id).name().to_string()
    }

    fn forget(&self, base_id: &str) {
        let mut map = self
            .shared
            .base_codec
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.remove(base_id);
        self.shared.metrics.tracked.set(map.len() as i64);
    }

    fn stop(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.cancel.cancel();
            let _ = self.shared.client.disconnect().await;
        })
    }

    fn send<'a>(
        &'a self,
        base_id: &'a str,
        cmd: &'a BaseCommand,
    ) -> BoxFuture<'a, Result<(), TunnelError>> {
        Box::pin(async move {
            let codec = self.codec_for(base_id);
            let encoded = match &self.shared.pool {
                Some(pool) if !Arc::ptr_eq(&codec, &self.shared.builtin) => {
                    let (base, c) = (base_id.to_string(), cmd.clone());
                    offload::run(pool.as_ref(), move || codec.encode(&base, &c))
                        .await
                        .map_err(TunnelError::Encode)?
                }
                _ => codec.encode(base_id, cmd),
            };
            let msgs = encoded.map_err(|e| {
                self.shared.metrics.count_sent("encode_failed");
                TunnelError::Encode(e.to_string())
            })?;
            for m in msgs {
                // QoS 1 and never retained: a reconnecting base must not replay stale commands.
                self.shared
                    .client
                    .publish(m.topic.clone(), QoS::AtLeastOnce, false, m.payload)
                    .await
                    .map_err(|e| TunnelError::Transport(e.to_string()))?;
                self.shared.metrics.count_sent(cmd.kind());
                debug!(base = base_id, topic = %m.topic, "command published");
            }
            Ok(())
        })
    }
}

async fn run_eventloop(
    mut eventloop: EventLoop,
    shared: Arc<Shared>,
    events: mpsc::Sender<BaseEvent>,
    plugin_jobs: mpsc::Sender<PluginDecode>,
    cancel: CancellationToken,
    broker: String,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let polled = tokio::select! {
            _ = cancel.cancelled() => return,
            p = eventloop.poll() => p,
        };
        match polled {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = Duration::from_millis(200);
                shared.metrics.connected.set(1);
                info!(%broker, "connected to MQTT broker");
                // Clean session: the broker forgot our subscriptions; restore them off this task
                // so the event loop keeps draining while the requests are queued.
                let s = shared.clone();
                tokio::spawn(async move { s.sync_subscriptions(true).await });
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                shared.route(&p.topic, &p.payload, &events, &plugin_jobs);
            }
            Ok(_) => {}
            Err(e) => {
                shared.metrics.connected.set(0);
                shared.metrics.reconnects.inc();
                warn!(%broker, error = %e, retry_in_ms = backoff.as_millis() as u64, "MQTT connection lost");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

fn mqtt_options(s: &MqttSettings) -> Result<MqttOptions, TunnelError> {
    let mut o = MqttOptions::new(s.client_id.clone(), s.host.clone(), s.port);
    o.set_keep_alive(s.keep_alive);
    o.set_clean_session(true);
    o.set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024);
    if let Some(u) = &s.username {
        o.set_credentials(u.clone(), s.password.clone().unwrap_or_default());
    }
    if s.insecure_skip_verify {
        tracing::warn!("MQTT_TLS_INSECURE_SKIP_VERIFY: the broker's certificate is not verified");
        o.set_transport(Transport::tls_with_config(insecure_tls_config(
            s.client_cert_path.as_deref(),
            s.client_key_path.as_deref(),
        )?));
    } else if let Some(ca) = &s.ca_path {
        o.set_transport(Transport::tls_with_config(tls_config(
            ca,
            s.client_cert_path.as_deref(),
            s.client_key_path.as_deref(),
        )?));
    }
    Ok(o)
}

fn read_file(p: &std::path::Path) -> Result<Vec<u8>, TunnelError> {
    std::fs::read(p).map_err(|e| TunnelError::Config(format!("reading {}: {e}", p.display())))
}

fn tls_config(
    ca: &std::path::Path,
    cert: Option<&std::path::Path>,
    key: Option<&std::path::Path>,
) -> Result<rumqttc::TlsConfiguration, TunnelError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut read_file(ca)?.as_slice()) {
        let c = c.map_err(|e| TunnelError::Config(format!("CA {}: {e}", ca.display())))?;
        roots
            .add(c)
            .map_err(|e| TunnelError::Config(format!("CA {}: {e}", ca.display())))?;
    }
    client_auth(
        rustls::ClientConfig::builder().with_root_certificates(roots),
        cert,
        key,
    )
}

/// TLS that accepts any broker certificate (the handshake signatures are still checked).
fn insecure_tls_config(
    cert: Option<&std::path::Path>,
    key: Option<&std::path::Path>,
) -> Result<rumqttc::TlsConfiguration, TunnelError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TunnelError::Config(format!("TLS: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServerCert(provider)));
    client_auth(builder, cert, key)
}

/// Accepts every server certificate; verifies handshake signatures with the provider.
#[derive(Debug)]
struct AnyServerCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn client_auth(
    builder: rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>,
    cert: Option<&std::path::Path>,
    key: Option<&std::path::Path>,
) -> Result<rumqttc::TlsConfiguration, TunnelError> {
    let read = read_file;
    let config = match (cert, key) {
        (Some(cert), Some(key)) => {
            let chain = rustls_pemfile::certs(&mut read(cert)?.as_slice())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| TunnelError::Config(format!("client cert {}: {e}", cert.display())))?;
            let key_der = rustls_pemfile::private_key(&mut read(key)?.as_slice())
                .map_err(|e| TunnelError::Config(format!("client key {}: {e}", key.display())))?
                .ok_or_else(|| {
                    TunnelError::Config(format!("no private key in {}", key.display()))
                })?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| TunnelError::Config(format!("client auth: {e}")))?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err(TunnelError::Config(
                "MQTT_CLIENT_CRT_PATH and MQTT_CLIENT_KEY_PATH must be set together".into(),
            ));
        }
    };
    Ok(rumqttc::TlsConfiguration::Rustls(Arc::new(config)))
}
