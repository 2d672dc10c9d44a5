//! Test helpers: a real server on 127.0.0.1, raw ADS client streams driven by hand, sample resources.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use envoy_types::pb::envoy::config::core::v3::{Address, Node, SocketAddress, address};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc;
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::Streaming;
use tonic::transport::Channel;

use super::type_url::{CLUSTER, ENDPOINT};
use super::{AdsServer, CacheStatus, Snapshot, SnapshotCache};

/// Generous bound on every wait, only so that a bug fails instead of hanging.
pub(crate) const WAIT: Duration = Duration::from_secs(20);

pub(crate) type Client = AggregatedDiscoveryServiceClient<Channel>;

/// Serves `cache` on 127.0.0.1 (until the runtime ends); returns the address.
pub(crate) async fn serve(cache: &SnapshotCache) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Without TCP_NODELAY each small message may wait for a delayed ACK.
    let incoming = TcpListenerStream::new(listener).map(|stream| stream.and_then(|stream| stream.set_nodelay(true).map(|()| stream)));
    let server = tonic::transport::Server::builder().add_service(AdsServer::new(cache.clone()).into_service());
    tokio::spawn(server.serve_with_incoming(incoming));
    addr
}

/// A new HTTP/2 connection to `addr`.
pub(crate) async fn connect(addr: SocketAddr) -> Client {
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    AggregatedDiscoveryServiceClient::new(channel)
}

/// Awaits `future`, failing the test after [`WAIT`].
pub(crate) async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future).await.unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Waits until `predicate` holds over the cache status; returns that status.
pub(crate) async fn wait_status(cache: &SnapshotCache, what: &str, predicate: impl Fn(&CacheStatus) -> bool) -> CacheStatus {
    within(what, async {
        loop {
            let status = cache.status();
            if predicate(&status) {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

/// A node with `id` and `cluster`.
pub(crate) fn node(id: &str, cluster: &str) -> Node {
    Node { id: id.to_owned(), cluster: cluster.to_owned(), ..Default::default() }
}

/// A cluster; `tag` (its alt stat name) varies its bytes.
pub(crate) fn cluster(name: &str, tag: &str) -> Any {
    let cluster = Cluster { name: name.to_owned(), alt_stat_name: tag.to_owned(), ..Default::default() };
    Any { type_url: CLUSTER.to_owned(), value: cluster.encode_to_vec() }
}

/// Endpoints of `name`: one at 127.0.0.1:`port`.
pub(crate) fn endpoints(name: &str, port: u16) -> Any {
    let endpoint = LbEndpoint {
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: "127.0.0.1".to_owned(),
                    port_specifier: Some(PortSpecifier::PortValue(u32::from(port))),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        })),
        ..Default::default()
    };
    let assignment = ClusterLoadAssignment {
        cluster_name: name.to_owned(),
        endpoints: vec![LocalityLbEndpoints { lb_endpoints: vec![endpoint], ..Default::default() }],
        ..Default::default()
    };
    Any { type_url: ENDPOINT.to_owned(), value: assignment.encode_to_vec() }
}

/// A snapshot of clusters (`(name, tag)`) and endpoints (`(name, port)`).
pub(crate) fn snapshot(clusters: &[(&str, &str)], assignments: &[(&str, u16)]) -> Snapshot {
    let mut snapshot = Snapshot::new();
    for (name, tag) in clusters {
        snapshot.insert(CLUSTER, *name, cluster(name, tag));
    }
    for (name, port) in assignments {
        snapshot.insert(ENDPOINT, *name, endpoints(name, *port));
    }
    snapshot
}

/// The name inside a cluster or endpoints resource.
pub(crate) fn resource_name(any: &Any) -> String {
    match any.type_url.as_str() {
        CLUSTER => Cluster::decode(any.value.as_slice()).unwrap().name,
        ENDPOINT => ClusterLoadAssignment::decode(any.value.as_slice()).unwrap().cluster_name,
        other => panic!("unexpected resource type {other}"),
    }
}

/// An `error_detail` with `message`.
pub(crate) fn error(message: &str) -> Option<rpc::Status> {
    Some(rpc::Status { code: 3, message: message.to_owned(), ..Default::default() })
}

/// A SotW stream driven by hand.
pub(crate) struct SotwStream {
    tx: mpsc::UnboundedSender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
}

impl SotwStream {
    pub(crate) async fn open(client: &mut Client) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let rx = within("the stream to open", client.stream_aggregated_resources(UnboundedReceiverStream::new(rx))).await.unwrap();
        Self { tx, rx: rx.into_inner() }
    }

    pub(crate) fn send(&self, request: DiscoveryRequest) {
        self.tx.send(request).unwrap();
    }

    /// Subscribes to `names` of `type_url`, acknowledging `last` (the last response of that type, if any).
    pub(crate) fn request(&self, node: Option<&Node>, type_url: &str, names: &[&str], last: Option<&DiscoveryResponse>) {
        self.send(DiscoveryRequest {
            node: node.cloned(),
            type_url: type_url.to_owned(),
            resource_names: names.iter().map(|name| (*name).to_owned()).collect(),
            version_info: last.map(|response| response.version_info.clone()).unwrap_or_default(),
            response_nonce: last.map(|response| response.nonce.clone()).unwrap_or_default(),
            ..Default::default()
        });
    }

    /// Rejects `response`, keeping subscription `names`.
    pub(crate) fn nack(&self, response: &DiscoveryResponse, names: &[&str], message: &str) {
        self.send(DiscoveryRequest {
            type_url: response.type_url.clone(),
            resource_names: names.iter().map(|name| (*name).to_owned()).collect(),
            response_nonce: response.nonce.clone(),
            error_detail: error(message),
            ..Default::default()
        });
    }

    pub(crate) async fn recv(&mut self) -> DiscoveryResponse {
        within("a SotW response", self.rx.message()).await.unwrap().expect("the stream ended")
    }

    /// Ends with a gRPC error: its status.
    pub(crate) async fn recv_error(&mut self) -> tonic::Status {
        within("a SotW stream error", self.rx.message()).await.expect_err("expected the stream to fail")
    }
}

/// A delta stream driven by hand.
pub(crate) struct DeltaStream {
    tx: mpsc::UnboundedSender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
}

impl DeltaStream {
    pub(crate) async fn open(client: &mut Client) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let rx = within("the stream to open", client.delta_aggregated_resources(UnboundedReceiverStream::new(rx))).await.unwrap();
        Self { tx, rx: rx.into_inner() }
    }

    pub(crate) fn send(&self, request: DeltaDiscoveryRequest) {
        self.tx.send(request).unwrap();
    }

    /// Subscribes to `names` of `type_url`.
    pub(crate) fn subscribe(&self, node: Option<&Node>, type_url: &str, names: &[&str]) {
        self.send(DeltaDiscoveryRequest {
            node: node.cloned(),
            type_url: type_url.to_owned(),
            resource_names_subscribe: names.iter().map(|name| (*name).to_owned()).collect(),
            ..Default::default()
        });
    }

    pub(crate) fn ack(&self, response: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            ..Default::default()
        });
    }

    pub(crate) async fn recv(&mut self) -> DeltaDiscoveryResponse {
        within("a delta response", self.rx.message()).await.unwrap().expect("the stream ended")
    }
}

/// Names of the resources in a SotW response, in order.
pub(crate) fn names(response: &DiscoveryResponse) -> Vec<String> {
    response.resources.iter().map(resource_name).collect()
}

/// Names of the resources in a delta response, in order (checking each against the name inside).
pub(crate) fn delta_names(response: &DeltaDiscoveryResponse) -> Vec<String> {
    response
        .resources
        .iter()
        .map(|resource| {
            let any = resource.resource.as_ref().expect("a resource without value");
            assert_eq!(resource_name(any), resource.name);
            resource.name.clone()
        })
        .collect()
}
