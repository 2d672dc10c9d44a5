//! The ADS server and its snapshot cache.
//!
//! [`SnapshotCache`] holds one [`Snapshot`] (type URL → name → `Any`) per node key plus a default; a function of
//! the client's `Node` picks the key ([`SnapshotCache::by_cluster`] uses `node.cluster`). [`AdsServer`] serves it
//! over both ADS variants, State of the World ([`stream_aggregated_resources`]) and incremental
//! ([`delta_aggregated_resources`]):
//!
//! ```no_run
//! # async fn serve() -> Result<(), Box<dyn std::error::Error>> {
//! use mesh_control::ads::{AdsServer, Snapshot, SnapshotCache};
//!
//! let cache = SnapshotCache::by_cluster();
//! cache.set_default(Snapshot::new());
//! tonic::transport::Server::builder()
//!     .add_service(AdsServer::new(cache.clone()).into_service())
//!     .serve("0.0.0.0:18000".parse()?)
//!     .await?;
//! # Ok(())
//! # }
//! ```
//!
//! Protocol behaviour (Envoy's xDS protocol document, as go-control-plane implements it):
//!
//! - **Versions.** A resource's version is a hash of its encoded `Any`, so replacing a snapshot with one where a
//!   resource has the same bytes changes nothing for it. A type's version (SotW `version_info`, delta
//!   `system_version_info`) is a hash over the type's names and resource versions in the snapshot.
//! - **Streams.** The first request's `node` picks the stream's key (later requests need no node). Each stream is
//!   one task waiting on its requests and on its key's snapshot: [`SnapshotCache::set`] wakes only the streams of
//!   that key, [`SnapshotCache::set_default`] only the streams whose key has no snapshot of its own. A stream starts
//!   from nothing: a client reconnecting with a `version_info` still gets everything.
//! - **Subscriptions.** An empty name list on the first request for listeners or clusters, or the name `*` for any
//!   type, is a wildcard subscription (every resource of the type); routes and endpoints are never wildcard without
//!   `*`. Subscriptions to types the snapshot lacks are tracked; nothing is sent for them until it has them.
//! - **SotW.** Each request carries the whole subscription. A request whose `response_nonce` is not the last nonce
//!   sent for its type is stale and ignored altogether (a later request carries the subscription again). Listener
//!   and cluster responses hold every subscribed resource that exists, so an absent one is deleted; they are sent
//!   when that set or a version in it changes, on the first request and whenever names are added, even when none
//!   exists (so clients learn what does not exist). Route and endpoint responses hold the subscribed resources that
//!   exist and are sent only when one of them is new or changed: never empty, since for those types absence means
//!   nothing and clients rely on their own does-not-exist timers. Newly requested names are always sent again.
//! - **Delta.** `resource_names_subscribe`/`resource_names_unsubscribe` edit the subscription; the first request's
//!   `initial_resource_versions` say what the client has, so those are not resent (and `removed_resources` names
//!   those that are gone). Responses carry only new and changed resources, and `removed_resources` for ones the
//!   client has that are gone. Unsubscribing is not a removal (within a wildcard the resource is sent again, to
//!   settle whether the client keeps it); subscribing again to a name always sends it.
//! - **ACK/NACK.** A request naming the last response's nonce (delta: any recent one) with no `error_detail` is an
//!   ACK, with `error_detail` a NACK: both go into [`SnapshotCache::status`], a NACK also to a `warn` event with the
//!   node, type and error. Nothing is resent after a NACK; the next change is.
//! - **Order.** On a snapshot change a stream sends clusters, then endpoints, listeners and routes (make before
//!   break).
//! - **Errors.** A request without `type_url` ends its stream with `INVALID_ARGUMENT`; a broken stream just ends.
//!
//! Events: `info` for streams opening and closing (with node id), `debug` for each response, `warn` for NACKs.
//!
//! [`stream_aggregated_resources`]: AggregatedDiscoveryService::stream_aggregated_resources
//! [`delta_aggregated_resources`]: AggregatedDiscoveryService::delta_aggregated_resources

mod delta;
mod snapshot;
mod sotw;
mod status;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use self::snapshot::{Entry, Published};
pub use self::snapshot::{Snapshot, SnapshotCache};
use self::status::StatusHandle;
pub use self::status::{AdsCounters, CacheStatus, Nack, Protocol, SnapshotStatus, StreamStatus, TypeStatus, TypeSummary};

/// Type URLs of the core resource types.
pub mod type_url {
    /// `envoy.config.listener.v3.Listener` (LDS).
    pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    /// `envoy.config.route.v3.RouteConfiguration` (RDS).
    pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
    /// `envoy.config.cluster.v3.Cluster` (CDS).
    pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    /// `envoy.config.endpoint.v3.ClusterLoadAssignment` (EDS).
    pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
}

/// Whether SotW responses of `type_url` carry the full state (listeners and clusters), which is also whether an
/// empty first subscription is a wildcard.
fn is_full_state(type_url: &str) -> bool {
    type_url == type_url::LISTENER || type_url == type_url::CLUSTER
}

/// Rank of `type_url` when a snapshot change sends several types: clusters, endpoints, listeners, routes, others.
fn send_rank(type_url: &str) -> u8 {
    match type_url {
        type_url::CLUSTER => 0,
        type_url::ENDPOINT => 1,
        type_url::LISTENER => 2,
        type_url::ROUTE => 3,
        _ => 4,
    }
}

/// Finds the state of `type_url` in `types` (kept in [`send_rank`] order), adding `new()` if missing; the bool says
/// whether it was added.
fn type_state<'a, T>(types: &'a mut Vec<T>, type_url: &str, url_of: fn(&T) -> &str, new: impl FnOnce() -> T) -> (&'a mut T, bool) {
    if let Some(index) = types.iter().position(|state| url_of(state) == type_url) {
        return (&mut types[index], false);
    }
    let index = types.partition_point(|state| send_rank(url_of(state)) <= send_rank(type_url));
    types.insert(index, new());
    (&mut types[index], true)
}

/// The resources of `type_url` a subscription covers: all of them for a wildcard, else those of `names` that exist.
fn view<'a>(snapshot: &'a Published, type_url: &str, wildcard: bool, names: &'a BTreeSet<String>) -> Vec<(&'a String, &'a Arc<Entry>)> {
    match snapshot.resources(type_url) {
        None => Vec::new(),
        Some(resources) if wildcard => resources.iter().collect(),
        Some(resources) => names.iter().filter_map(|name| resources.get_key_value(name)).collect(),
    }
}

/// The ADS gRPC service over a [`SnapshotCache`].
#[derive(Clone, Debug)]
pub struct AdsServer {
    cache: SnapshotCache,
}

impl AdsServer {
    /// A server of `cache`.
    pub fn new(cache: SnapshotCache) -> Self {
        Self { cache }
    }

    /// The tonic service, for `tonic::transport::Server::add_service`.
    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<Self> {
        AggregatedDiscoveryServiceServer::new(self)
    }

    /// Starts a stream task for `handler`'s protocol.
    fn spawn<H: Handler>(&self, request: Request<Streaming<H::Request>>) -> ReceiverStream<Result<H::Response, Status>> {
        let peer = request.remote_addr();
        let (tx, rx) = mpsc::channel(RESPONSE_BUFFER);
        tokio::spawn(serve::<H>(self.cache.clone(), request.into_inner(), tx, peer));
        ReceiverStream::new(rx)
    }
}

/// Responses queued per stream before its task waits for the client to read.
const RESPONSE_BUFFER: usize = 8;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Ok(Response::new(self.spawn::<sotw::Sotw>(request)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Ok(Response::new(self.spawn::<delta::Delta>(request)))
    }
}

/// One protocol's per-stream state: requests and snapshot changes in, responses out. Synchronous; [`serve`] does
/// the I/O.
trait Handler: Send + 'static {
    type Request: Send + 'static;
    type Response: Send + 'static;
    const PROTOCOL: Protocol;

    fn new(stream: StreamInfo) -> Self;

    /// The request's node, if it carries one.
    fn node(request: &Self::Request) -> Option<&Node>;

    /// Handles a request; an error ends the stream with that status.
    fn on_request(&mut self, request: Self::Request, snapshot: &Published, out: &mut Vec<Self::Response>) -> Result<(), Status>;

    /// Handles a new snapshot.
    fn on_snapshot(&mut self, snapshot: &Published, out: &mut Vec<Self::Response>);
}

/// What a handler knows of its stream.
#[derive(Debug)]
struct StreamInfo {
    node_id: String,
    status: StatusHandle,
    last_nonce: u64,
}

impl StreamInfo {
    /// A nonce new on this stream.
    fn nonce(&mut self) -> String {
        self.last_nonce += 1;
        self.last_nonce.to_string()
    }
}

/// Runs one stream until the client goes away.
async fn serve<H: Handler>(
    cache: SnapshotCache,
    mut requests: Streaming<H::Request>,
    tx: mpsc::Sender<Result<H::Response, Status>>,
    peer: Option<SocketAddr>,
) {
    let first = match requests.message().await {
        Ok(Some(request)) => request,
        Ok(None) => return,
        Err(status) => {
            tracing::debug!(?peer, %status, "ADS stream failed before its first request");
            return;
        }
    };
    let node = H::node(&first).cloned().unwrap_or_default();
    let mut registration = cache.register(&node, H::PROTOCOL);
    let node_id = node.id;
    tracing::info!(node = %node_id, key = %registration.key, protocol = ?H::PROTOCOL, ?peer, "ADS stream opened");
    let mut handler = H::new(StreamInfo { node_id: node_id.clone(), status: registration.status.clone(), last_nonce: 0 });
    let mut snapshot = registration.current();
    let mut out = Vec::new();
    let mut request = Some(first);
    let end = loop {
        if let Some(request) = request.take()
            && let Err(status) = handler.on_request(request, &snapshot, &mut out)
        {
            let end = format!("bad request: {}", status.message());
            let _ = tx.send(Err(status)).await;
            break end;
        }
        if !send_all(&tx, &mut out).await {
            break "client gone".to_owned();
        }
        tokio::select! {
            message = requests.message() => match message {
                Ok(Some(next)) => request = Some(next),
                Ok(None) => break "client closed the stream".to_owned(),
                Err(status) => break format!("stream failed: {status}"),
            },
            changed = registration.changed() => match changed {
                Some(next) => {
                    snapshot = next;
                    handler.on_snapshot(&snapshot, &mut out);
                }
                None => break "cache dropped".to_owned(),
            },
            () = tx.closed() => break "client gone".to_owned(),
        }
    };
    tracing::info!(node = %node_id, key = %registration.key, protocol = ?H::PROTOCOL, ?peer, reason = %end, "ADS stream closed");
}

/// Sends and empties `out`; false once the client is gone.
async fn send_all<T>(tx: &mpsc::Sender<Result<T, Status>>, out: &mut Vec<T>) -> bool {
    for response in out.drain(..) {
        if tx.send(Ok(response)).await.is_err() {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod testing;
