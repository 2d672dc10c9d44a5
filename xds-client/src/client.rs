//! The ADS client: one stream to the control plane carrying every
//! subscription, SotW or delta, with reconnects, fallback and timers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{Locality as PbLocality, Node as PbNode};
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::bootstrap::{Bootstrap, ChannelCreds, FEATURE_DELTA, FEATURE_IGNORE_RESOURCE_DELETION, XdsServer};
use crate::cache::{Cache, DataErrorPolicy, Decoded};
use crate::dump::ResourceDump;
use crate::resource::ResourceType;
use crate::stats::{ResourceCount, ServerCounts, ServerStats};
use crate::watch::{ResourceStatus, Unsubscribe, Watch, XdsResource};
use crate::wire::{DeltaResponse, SotwResponse};

/// Settings of an [`XdsClient`]: plain data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdsClientConfig {
    /// Time a subscribed resource may take to arrive before it is reported
    /// as not existing (gRPC: 15 s). Runs only while the stream is up.
    pub does_not_exist_timeout: Duration,
    /// Drop cached resources that are NACKed or deleted instead of keeping
    /// them (A88's `fail_on_data_errors`).
    pub fail_on_data_errors: bool,
    /// Connect timeout to a control plane.
    pub connect_timeout: Duration,
    /// First reconnect backoff (doubles, ±20% jitter, up to `backoff_max`).
    pub backoff_base: Duration,
    /// Largest reconnect backoff.
    pub backoff_max: Duration,
    /// While on a fallback server, how often the primary is retried (A71).
    pub primary_retry: Duration,
}

impl Default for XdsClientConfig {
    fn default() -> Self {
        Self {
            does_not_exist_timeout: Duration::from_secs(15),
            fail_on_data_errors: false,
            connect_timeout: Duration::from_secs(5),
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            primary_retry: Duration::from_secs(5),
        }
    }
}

/// Messages to the stream task.
#[derive(Debug)]
pub(crate) enum Command {
    Subscribe(ResourceType, String),
    Unsubscribe(ResourceType, String),
    DoesNotExist(ResourceType, String),
}

/// The xDS client. Cheap to clone; the stream task stops when the last
/// clone is dropped.
#[derive(Clone, Debug)]
pub struct XdsClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    bootstrap: Bootstrap,
    config: XdsClientConfig,
    cache: Mutex<Cache>,
    commands: mpsc::UnboundedSender<Command>,
    /// Server currently connected (index into bootstrap servers), if any.
    connected: Mutex<Option<usize>>,
    /// Each bootstrap server's counters, in the bootstrap's order.
    stats: Vec<ServerStats>,
    task: OnceLock<tokio::task::AbortHandle>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = self.task.get() {
            task.abort();
        }
    }
}

impl XdsClient {
    /// Starts a client; the stream opens at once. Needs a tokio runtime.
    pub fn new(bootstrap: Bootstrap, config: XdsClientConfig) -> Self {
        let (commands, rx) = mpsc::unbounded_channel();
        let policy = DataErrorPolicy {
            fail_on_data_errors: config.fail_on_data_errors,
            ignore_resource_deletion: bootstrap.servers.first().is_some_and(|s| s.has_feature(FEATURE_IGNORE_RESOURCE_DELETION)),
        };
        let stats = bootstrap.servers.iter().map(|_| ServerStats::default()).collect();
        let inner = Arc::new(Inner {
            bootstrap,
            config,
            cache: Mutex::new(Cache { policy, ..Cache::default() }),
            commands,
            connected: Mutex::new(None),
            stats,
            task: OnceLock::new(),
        });
        // Spawned only once `inner` exists, so the task can always upgrade.
        let task = tokio::spawn(run(Arc::downgrade(&inner), rx)).abort_handle();
        let _ = inner.task.set(task);
        Self { inner }
    }

    /// The bootstrap in use.
    pub fn bootstrap(&self) -> &Bootstrap {
        &self.inner.bootstrap
    }

    /// Watches resource `name` of type `T`; the subscription lasts while any
    /// watch of it is alive.
    pub fn watch<T: XdsResource>(&self, name: &str) -> Watch<T> {
        let (rx, new) = lock(&self.inner.cache).subscribe(T::TYPE, name);
        if new {
            let _ = self.inner.commands.send(Command::Subscribe(T::TYPE, name.to_owned()));
        }
        let unsubscribe = Arc::new(Unsubscribe { ty: T::TYPE, name: name.to_owned(), commands: self.inner.commands.clone() });
        Watch::new(rx, unsubscribe)
    }

    /// The server currently connected, if any.
    pub fn connected_server(&self) -> Option<String> {
        lock(&self.inner.connected).map(|i| self.inner.bootstrap.servers[i].server_uri.clone())
    }

    /// Every subscribed resource with its version, status and error.
    pub fn dump(&self) -> Vec<ResourceDump> {
        crate::dump::dump(&lock(&self.inner.cache))
    }

    /// Each server the client has tried, with its connection state and the resources it sent (A78).
    pub fn server_counts(&self) -> Vec<ServerCounts> {
        let servers = self.inner.bootstrap.servers.iter();
        servers.zip(&self.inner.stats).filter_map(|(server, stats)| stats.counts(&server.server_uri)).collect()
    }

    /// The resources the client holds, by authority, cache state and type (A78).
    pub fn resource_counts(&self) -> Vec<ResourceCount> {
        crate::stats::resource_counts(&self.dump())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sending half of an open ADS stream.
enum Sender {
    Sotw(mpsc::UnboundedSender<DiscoveryRequest>),
    Delta(mpsc::UnboundedSender<DeltaDiscoveryRequest>),
}

/// Receiving half of an open ADS stream.
enum Receiver {
    Sotw(tonic::Streaming<SotwResponse>),
    Delta(tonic::Streaming<DeltaResponse>),
}

enum Response {
    Sotw(SotwResponse),
    Delta(DeltaResponse),
}

impl Receiver {
    async fn next(&mut self) -> Result<Option<Response>, tonic::Status> {
        match self {
            Self::Sotw(rx) => Ok(rx.message().await?.map(Response::Sotw)),
            Self::Delta(rx) => Ok(rx.message().await?.map(Response::Delta)),
        }
    }
}

type Stream = (Sender, Receiver);

/// Why a stream ended.
enum Ended {
    /// The stream failed; `received` tells whether it ever got a response.
    Failed { received: bool, reason: String },
    /// The primary came back while on a fallback.
    PrimaryBack(Box<Stream>),
    /// The client is gone.
    Shutdown,
}

async fn run(client: Weak<Inner>, mut commands: mpsc::UnboundedReceiver<Command>) {
    let mut failures = 0u32;
    let mut next: Option<(Stream, usize)> = None;
    loop {
        let Some(inner) = client.upgrade() else { return };
        let opened = match next.take() {
            Some(opened) => Some(opened),
            None => open_any(&inner).await,
        };
        let Some((stream, index)) = opened else {
            failures += 1;
            let wait = backoff(&inner.config, failures);
            drop(inner);
            // Unsubscriptions still reach the cache while disconnected.
            if drain_while(&mut commands, &client, wait).await {
                return;
            }
            continue;
        };
        *lock(&inner.connected) = Some(index);
        // One span per stream: every event of the stream names its server and node.
        let span = tracing::info_span!("xds_stream", server = %inner.bootstrap.servers[index].server_uri, node = %inner.bootstrap.node.id);
        span.in_scope(|| tracing::info!("xDS stream open"));
        let ended = tracing::Instrument::instrument(serve(&inner, stream, index, &mut commands), span).await;
        *lock(&inner.connected) = None;
        cancel_timers(&inner);
        match ended {
            Ended::Shutdown => return,
            Ended::PrimaryBack(stream) => {
                tracing::info!("xDS primary server is back; leaving the fallback");
                failures = 0;
                next = Some((*stream, 0));
            }
            Ended::Failed { received, reason } => {
                if !received {
                    inner.stats[index].failed();
                }
                tracing::warn!(server = %inner.bootstrap.servers[index].server_uri, %reason, "xDS stream ended; keeping the last accepted config");
                failures = if received { 1 } else { failures + 1 };
                let wait = backoff(&inner.config, failures);
                drop(inner);
                if drain_while(&mut commands, &client, wait).await {
                    return;
                }
            }
        }
    }
}

/// Tries the servers in order (primary first); the first that opens wins.
async fn open_any(inner: &Inner) -> Option<(Stream, usize)> {
    for (index, server) in inner.bootstrap.servers.iter().enumerate() {
        match open(inner, server).await {
            Ok(stream) => {
                inner.stats[index].opened();
                return Some((stream, index));
            }
            Err(reason) => {
                inner.stats[index].failed();
                tracing::warn!(server = %server.server_uri, %reason, "cannot reach xDS server");
            }
        }
    }
    None
}

async fn open(inner: &Inner, server: &XdsServer) -> Result<Stream, String> {
    let channel = connect(inner, server).await?;
    let mut client = tonic::client::Grpc::new(channel);
    client.ready().await.map_err(|e| e.to_string())?;
    let node = node(&inner.bootstrap);
    if server.has_feature(FEATURE_DELTA) {
        let requests = initial_delta_requests(&mut lock(&inner.cache), node);
        let (tx, rx) = call(&mut client, "DeltaAggregatedResources", requests).await?;
        Ok((Sender::Delta(tx), Receiver::Delta(rx)))
    } else {
        let requests = initial_sotw_requests(&mut lock(&inner.cache), node);
        let (tx, rx) = call(&mut client, "StreamAggregatedResources", requests).await?;
        Ok((Sender::Sotw(tx), Receiver::Sotw(rx)))
    }
}

/// Opens the ADS `method` stream with `initial` requests queued. Responses decode into the client's own
/// message types (`wire`), which keep large resources in the received buffer instead of copying them as the
/// generated client's would.
async fn call<Req, Resp>(
    client: &mut tonic::client::Grpc<Channel>,
    method: &str,
    initial: Vec<Req>,
) -> Result<(mpsc::UnboundedSender<Req>, tonic::Streaming<Resp>), String>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    for request in initial {
        let _ = tx.send(request);
    }
    let path = format!("/envoy.service.discovery.v3.AggregatedDiscoveryService/{method}");
    let path = http::uri::PathAndQuery::try_from(path).map_err(|e| e.to_string())?;
    let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
    let stream = client.streaming(tonic::Request::new(UnboundedReceiverStream::new(rx)), path, codec).await;
    Ok((tx, stream.map_err(|s| s.message().to_owned())?.into_inner()))
}

/// Connects to a control plane over TCP or, for `unix:` URIs, a Unix socket.
async fn connect(inner: &Inner, server: &XdsServer) -> Result<Channel, String> {
    let tls = tls_config(&server.channel_creds)?;
    let uri = match (server.unix_path(), &tls) {
        // Only the `:authority` (and the TLS server name): the connector below decides where to connect.
        (Some(_), Some(_)) => "https://localhost".to_owned(),
        (Some(_), None) => "http://localhost".to_owned(),
        (None, _) => server.endpoint_uri(),
    };
    // tonic runs TLS only for https URIs: TLS credentials with an explicit http:// URI would go out in plaintext.
    if tls.is_some() && !uri.starts_with("https://") {
        return Err(format!("server_uri {}: TLS channel_creds need an https:// (or scheme-less) URI", server.server_uri));
    }
    let mut endpoint = Endpoint::from_shared(uri).map_err(|e| e.to_string())?.connect_timeout(inner.config.connect_timeout);
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).map_err(|e| format!("channel_creds: {e}"))?;
    }
    let connected = match server.unix_path() {
        Some(path) => {
            let path = path.to_owned();
            let connector = tower::service_fn(move |_: http::Uri| {
                let path = path.clone();
                async move { tokio::net::UnixStream::connect(path).await.map(hyper_util::rt::TokioIo::new) }
            });
            endpoint.connect_with_connector(connector).await
        }
        None => endpoint.connect().await,
    };
    connected.map_err(|e| format!("connect: {e}"))
}

/// TLS settings for a server's channel credentials, read from their files on every connection attempt (so
/// rotated files are picked up on reconnect). `tls` without a CA file trusts the system roots; a client
/// certificate and key make it mutual TLS (A65). `google_default` connects over TLS with the system roots and
/// no call credentials.
fn tls_config(creds: &ChannelCreds) -> Result<Option<ClientTlsConfig>, String> {
    let read = |field: &str, path: &str| std::fs::read(path).map_err(|e| format!("channel_creds {field} {path}: {e}"));
    match creds {
        ChannelCreds::Insecure => Ok(None),
        ChannelCreds::GoogleDefault => Ok(Some(ClientTlsConfig::new().with_native_roots())),
        ChannelCreds::Tls { ca_certificate_file, certificate_file, private_key_file } => {
            let mut tls = ClientTlsConfig::new();
            tls = match ca_certificate_file {
                Some(path) => tls.ca_certificate(Certificate::from_pem(read("ca_certificate_file", path)?)),
                None => tls.with_native_roots(),
            };
            match (certificate_file, private_key_file) {
                (Some(cert), Some(key)) => {
                    tls = tls.identity(Identity::from_pem(read("certificate_file", cert)?, read("private_key_file", key)?));
                }
                (None, None) => {}
                _ => return Err("channel_creds: certificate_file and private_key_file must be given together".into()),
            }
            Ok(Some(tls))
        }
    }
}

/// The first requests of a SotW stream: every subscribed type, node on the first.
fn initial_sotw_requests(cache: &mut Cache, node: PbNode) -> Vec<DiscoveryRequest> {
    let mut requests: Vec<DiscoveryRequest> = cache.subscribed_types().into_iter().map(|ty| cache.sotw_request(ty, None, None)).collect();
    if let Some(first) = requests.first_mut() {
        first.node = Some(node);
    }
    requests
}

/// The first requests of a delta stream; a bare request carries the node
/// when nothing is subscribed yet.
fn initial_delta_requests(cache: &mut Cache, node: PbNode) -> Vec<DeltaDiscoveryRequest> {
    let mut requests: Vec<DeltaDiscoveryRequest> = cache.subscribed_types().into_iter().map(|ty| cache.delta_initial_request(ty)).collect();
    match requests.first_mut() {
        Some(first) => first.node = Some(node),
        None => requests.push(DeltaDiscoveryRequest { node: Some(node), ..Default::default() }),
    }
    requests
}

fn node(bootstrap: &Bootstrap) -> PbNode {
    let n = &bootstrap.node;
    PbNode {
        id: n.id.clone(),
        cluster: n.cluster.clone(),
        locality: Some(PbLocality {
            region: n.locality.region.clone(),
            zone: n.locality.zone.clone(),
            sub_zone: n.locality.sub_zone.clone(),
        }),
        user_agent_name: "mesh-xds-client".into(),
        client_features: vec!["envoy.lb.does_not_support_overprovisioning".into(), "xds.config.resource-in-sotw".into()],
        metadata: crate::dump::json_to_struct(&n.metadata),
        ..Default::default()
    }
}

/// Runs one stream until it ends.
async fn serve(inner: &Arc<Inner>, (sender, mut receiver): Stream, index: usize, commands: &mut mpsc::UnboundedReceiver<Command>) -> Ended {
    let mut received = false;
    {
        let mut cache = lock(&inner.cache);
        for ty in ResourceType::ALL {
            let names: Vec<String> = cache.state(ty).entries.keys().cloned().collect();
            for name in names {
                start_timer(inner, &mut cache, ty, &name);
            }
        }
    }
    let mut primary_retry = (index > 0).then(|| {
        let period = inner.config.primary_retry;
        tokio::time::interval_at(tokio::time::Instant::now() + period, period)
    });
    loop {
        tokio::select! {
            message = receiver.next() => match message {
                Ok(Some(response)) => {
                    received = true;
                    let stats = &inner.stats[index];
                    stats.answered();
                    handle_response(inner, &sender, response, stats);
                }
                Ok(None) => return Ended::Failed { received, reason: "stream closed by the server".into() },
                Err(status) => return Ended::Failed { received, reason: format!("{:?}: {}", status.code(), status.message()) },
            },
            command = commands.recv() => match command {
                None => return Ended::Shutdown,
                Some(command) => handle_command(inner, &sender, command),
            },
            _ = async { if let Some(i) = primary_retry.as_mut() { i.tick().await; } }, if primary_retry.is_some() => {
                if let Ok(primary) = open(inner, &inner.bootstrap.servers[0]).await {
                    return Ended::PrimaryBack(Box::new(primary));
                }
            }
        }
    }
}

/// Decodes a response (outside the cache lock), answers it (ACK or NACK), then updates the cache and its
/// watchers. Answering first means the control plane hears back without waiting for watchers, and the
/// watchers' tasks, woken last, run next instead of queueing behind the answer's send.
fn handle_response(inner: &Arc<Inner>, sender: &Sender, response: Response, stats: &ServerStats) {
    let received = std::time::SystemTime::now();
    match (response, sender) {
        (Response::Sotw(mut response), Sender::Sotw(tx)) => {
            let Some(ty) = ResourceType::from_type_url(&response.type_url) else {
                tracing::warn!(type_url = %response.type_url, "ignoring response of an unknown type");
                return;
            };
            let decoded = Decoded::decode(ty, std::mem::take(&mut response.resources));
            let (valid, invalid) = decoded.sizes();
            stats.received(ty, valid, invalid);
            let error = log_outcome(ty, &response.version_info, &decoded.errors());
            let mut cache = lock(&inner.cache);
            let _ = tx.send(cache.sotw_ack(ty, &response, error));
            cache.apply_sotw(ty, &response.version_info, decoded, received);
        }
        (Response::Delta(mut response), Sender::Delta(tx)) => {
            let Some(ty) = ResourceType::from_type_url(&response.type_url) else {
                tracing::warn!(type_url = %response.type_url, "ignoring response of an unknown type");
                return;
            };
            let resources = std::mem::take(&mut response.resources);
            let versions: HashMap<String, String> = resources.iter().map(|r| (r.name.clone(), r.version.clone())).collect();
            let decoded = Decoded::decode(ty, resources.into_iter().filter_map(|r| r.resource));
            let (valid, invalid) = decoded.sizes();
            stats.received(ty, valid, invalid);
            let error = log_outcome(ty, &response.system_version_info, &decoded.errors());
            let _ = tx.send(DeltaDiscoveryRequest {
                type_url: ty.type_url().to_owned(),
                response_nonce: response.nonce.clone(),
                error_detail: error.map(|message| envoy_types::pb::google::rpc::Status { code: 3, message, details: vec![] }),
                ..Default::default()
            });
            lock(&inner.cache).apply_delta(ty, &response, &versions, decoded, received);
        }
        _ => {}
    }
}

fn log_outcome(ty: ResourceType, version: &str, errors: &[String]) -> Option<String> {
    if errors.is_empty() {
        tracing::debug!(r#type = ty.short_name(), version, "ACK");
        return None;
    }
    let detail = errors.join("; ");
    tracing::warn!(r#type = ty.short_name(), version, error = %detail, "NACK: rejected resources keep their last accepted value");
    Some(detail)
}

fn handle_command(inner: &Arc<Inner>, sender: &Sender, command: Command) {
    let mut cache = lock(&inner.cache);
    let ty = match &command {
        Command::Subscribe(ty, name) => {
            start_timer(inner, &mut cache, *ty, name);
            *ty
        }
        Command::Unsubscribe(ty, name) => {
            if !cache.unsubscribe(*ty, name) {
                return;
            }
            *ty
        }
        Command::DoesNotExist(ty, name) => {
            tracing::warn!(r#type = ty.short_name(), name, "resource does not exist (timer fired)");
            cache.does_not_exist(*ty, name);
            return;
        }
    };
    match sender {
        Sender::Sotw(tx) => {
            let nonce = cache.state(ty).nonce.clone();
            let _ = tx.send(cache.sotw_request(ty, Some(&nonce), None));
        }
        Sender::Delta(tx) => {
            if let Some(request) = cache.delta_change_request(ty) {
                let _ = tx.send(request);
            }
        }
    }
}

/// Starts the does-not-exist timer of a subscribed resource without a value.
fn start_timer(inner: &Arc<Inner>, cache: &mut Cache, ty: ResourceType, name: &str) {
    let Some(entry) = cache.state(ty).entries.get_mut(name) else { return };
    // Only for a resource never received: one that arrived (valid or NACKed) or was found missing has its
    // answer.
    if entry.tx.borrow().status != ResourceStatus::Requested || entry.dne_timer.is_some() {
        return;
    }
    let (commands, timeout, name) = (inner.commands.clone(), inner.config.does_not_exist_timeout, name.to_owned());
    entry.dne_timer = Some(
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let _ = commands.send(Command::DoesNotExist(ty, name));
        })
        .abort_handle(),
    );
}

fn cancel_timers(inner: &Inner) {
    let mut cache = lock(&inner.cache);
    for state in cache.types.values_mut() {
        for entry in state.entries.values_mut() {
            if let Some(t) = entry.dne_timer.take() {
                t.abort();
            }
        }
    }
}

/// Waits `wait` while keeping the cache in sync with commands; `true` when
/// the client is gone.
async fn drain_while(commands: &mut mpsc::UnboundedReceiver<Command>, client: &Weak<Inner>, wait: Duration) -> bool {
    let deadline = tokio::time::sleep(wait);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => return client.strong_count() == 0,
            command = commands.recv() => match command {
                None => return true,
                Some(Command::Unsubscribe(ty, name)) => {
                    if let Some(inner) = client.upgrade() {
                        lock(&inner.cache).unsubscribe(ty, &name);
                    }
                }
                // Subscriptions are sent on the next stream; timers only run on a live stream.
                Some(Command::Subscribe(..) | Command::DoesNotExist(..)) => {}
            }
        }
    }
}

fn backoff(config: &XdsClientConfig, failures: u32) -> Duration {
    let base = config.backoff_base.saturating_mul(1u32 << failures.saturating_sub(1).min(16)).min(config.backoff_max);
    let jitter = 0.8
        + 0.4 * (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos()) % 1000) as f64 / 1000.0;
    base.mul_f64(jitter)
}
