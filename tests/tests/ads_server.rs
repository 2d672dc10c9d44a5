//! The scriptable ADS server (`mesh_tests::ads`) against a raw tonic ADS
//! client: SotW and delta protocol behaviour, recording, and stop/restart.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use mesh_tests::ads::{AdsServer, RequestKind, build, type_url};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;

const WAIT: Duration = Duration::from_secs(10);
/// How long "nothing is sent" is watched for.
const QUIET: Duration = Duration::from_millis(300);

async fn client(server: &AdsServer) -> AggregatedDiscoveryServiceClient<Channel> {
    AggregatedDiscoveryServiceClient::connect(server.uri()).await.expect("connect to the ADS server")
}

/// A raw SotW stream.
struct Sotw {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
}

impl Sotw {
    async fn open(server: &AdsServer) -> Self {
        let (tx, rx) = mpsc::channel(16);
        let rx = client(server).await.stream_aggregated_resources(ReceiverStream::new(rx)).await.expect("open SotW stream").into_inner();
        Self { tx, rx }
    }

    async fn send(&self, type_url: &str, version: &str, nonce: &str, names: &[&str], error: Option<&str>) {
        let request = DiscoveryRequest {
            node: Some(Node { id: "node-1".to_owned(), ..Default::default() }),
            type_url: type_url.to_owned(),
            version_info: version.to_owned(),
            response_nonce: nonce.to_owned(),
            resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
            error_detail: error.map(|message| RpcStatus { code: 3, message: message.to_owned(), details: Vec::new() }),
            ..Default::default()
        };
        self.tx.send(request).await.expect("request stream open");
    }

    async fn recv(&mut self) -> DiscoveryResponse {
        tokio::time::timeout(WAIT, self.rx.message()).await.expect("response in time").expect("stream ok").expect("stream not ended")
    }

    async fn quiet(&mut self) {
        if let Ok(message) = tokio::time::timeout(QUIET, self.rx.message()).await {
            panic!("expected no response, got {message:?}");
        }
    }
}

/// A raw delta stream.
struct Delta {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
}

impl Delta {
    async fn open(server: &AdsServer) -> Self {
        let (tx, rx) = mpsc::channel(16);
        let rx = client(server).await.delta_aggregated_resources(ReceiverStream::new(rx)).await.expect("open delta stream").into_inner();
        Self { tx, rx }
    }

    async fn send(&self, request: DeltaDiscoveryRequest) {
        self.tx.send(request).await.expect("request stream open");
    }

    async fn subscribe(&self, type_url: &str, subscribe: &[&str], unsubscribe: &[&str]) {
        self.send(DeltaDiscoveryRequest {
            type_url: type_url.to_owned(),
            resource_names_subscribe: subscribe.iter().map(|n| (*n).to_owned()).collect(),
            resource_names_unsubscribe: unsubscribe.iter().map(|n| (*n).to_owned()).collect(),
            ..Default::default()
        })
        .await;
    }

    async fn ack(&self, response: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            ..Default::default()
        })
        .await;
    }

    async fn recv(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(WAIT, self.rx.message()).await.expect("response in time").expect("stream ok").expect("stream not ended")
    }

    async fn quiet(&mut self) {
        if let Ok(message) = tokio::time::timeout(QUIET, self.rx.message()).await {
            panic!("expected no response, got {message:?}");
        }
    }
}

fn names<M: Message + Default>(resources: &[Any], name: impl Fn(M) -> String) -> Vec<String> {
    resources.iter().map(|any| name(M::decode(any.value.as_slice()).expect("decodes"))).collect()
}

fn listener_names(response: &DiscoveryResponse) -> Vec<String> {
    assert_eq!(response.type_url, type_url::LISTENER);
    names(&response.resources, |l: Listener| l.name)
}

fn delta_names(response: &DeltaDiscoveryResponse) -> Vec<(String, String)> {
    response.resources.iter().map(|r| (r.name.clone(), r.version.clone())).collect()
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[tokio::test]
async fn sotw_lds_wildcard_ack_nack_and_push() {
    let ads = AdsServer::start().await.unwrap();
    assert_eq!(ads.set(type_url::LISTENER, "l1", build::listener("l1", "r1")), "1");

    let mut stream = Sotw::open(&ads).await;
    stream.send(type_url::LISTENER, "", "", &[], None).await;
    let first = stream.recv().await;
    assert_eq!(first.version_info, "1");
    assert!(!first.nonce.is_empty());
    assert_eq!(listener_names(&first), ["l1"]);
    assert_eq!(ads.connections(), 1);

    // ACK.
    stream.send(type_url::LISTENER, "1", &first.nonce, &[], None).await;
    let ack = ads.wait_for_ack(type_url::LISTENER, "1", WAIT).await.unwrap();
    assert_eq!(ack.kind, RequestKind::Ack);
    let requests = ads.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].kind, RequestKind::Subscribe);
    assert_eq!(requests[0].node_id.as_deref(), Some("node-1"));
    assert!(!requests[0].delta);
    assert_eq!(requests[1].version_info, "1");
    assert_eq!(requests[1].response_nonce, first.nonce);
    assert!(ads.nacks().is_empty());
    assert_eq!(ads.acks().len(), 1);

    // A change is pushed with a new version and nonce, carrying everything.
    assert_eq!(ads.set(type_url::LISTENER, "l2", build::listener("l2", "r2")), "2");
    let second = stream.recv().await;
    assert_eq!(second.version_info, "2");
    assert_ne!(second.nonce, first.nonce);
    assert_eq!(listener_names(&second), ["l1", "l2"]);

    // NACK, recorded with its message.
    stream.send(type_url::LISTENER, "1", &second.nonce, &[], Some("listener l2 is bad")).await;
    let nack = ads.wait_for_nack(type_url::LISTENER, WAIT).await.unwrap();
    assert_eq!(nack.kind, RequestKind::Nack);
    assert_eq!(nack.error_detail.as_deref(), Some("listener l2 is bad"));
    assert_eq!(nack.version_info, "1");
    assert_eq!(ads.nacks().len(), 1);
    stream.quiet().await;

    // A deliberately invalid resource is pushed as is.
    let garbage = Any { type_url: type_url::LISTENER.to_owned(), value: vec![0xff, 0xff, 0xff] };
    assert_eq!(ads.set(type_url::LISTENER, "bad", garbage.clone()), "3");
    let third = stream.recv().await;
    assert_eq!(third.version_info, "3");
    assert_eq!(third.resources.len(), 3);
    assert!(third.resources.contains(&garbage));

    // A request naming an old nonce is stale.
    stream.send(type_url::LISTENER, "1", &first.nonce, &[], None).await;
    ads.wait_for(|r| r.last().is_some_and(|r| r.kind == RequestKind::Stale), WAIT).await.unwrap();
    stream.quiet().await;

    // Removal: SotW LDS omits it.
    assert!(ads.remove(type_url::LISTENER, "bad"));
    assert!(!ads.remove(type_url::LISTENER, "bad"));
    let fourth = stream.recv().await;
    assert_eq!(fourth.version_info, "4");
    assert_eq!(listener_names(&fourth), ["l1", "l2"]);

    let sent = ads.sent();
    assert_eq!(sent.len(), 4);
    assert_eq!(sent[0].version, "1");
    assert_eq!(sent[0].nonce, first.nonce);
    assert_eq!(sent[0].resources, ["l1"]);
    assert_eq!(sent[3].resources, ["l1", "l2"]);
    assert!(sent.iter().all(|s| s.stream_id == requests[0].stream_id && !s.delta));
}

#[tokio::test]
async fn sotw_eds_and_cds_by_name() {
    let ads = AdsServer::start().await.unwrap();
    ads.set_many(
        type_url::ENDPOINT,
        [("a", build::endpoints("a", &[addr(1001), addr(1002)])), ("b", build::endpoints("b", &[addr(2001)]))],
    );

    let mut stream = Sotw::open(&ads).await;
    stream.send(type_url::ENDPOINT, "", "", &["a"], None).await;
    let first = stream.recv().await;
    assert_eq!(first.version_info, "1");
    let assignments = names(&first.resources, |c: ClusterLoadAssignment| c.cluster_name);
    assert_eq!(assignments, ["a"]);
    let cla = ClusterLoadAssignment::decode(first.resources[0].value.as_slice()).unwrap();
    assert_eq!(cla.endpoints.len(), 1);
    assert_eq!(cla.endpoints[0].lb_endpoints.len(), 2);
    stream.send(type_url::ENDPOINT, "1", &first.nonce, &["a"], None).await;

    // An unknown name gets nothing (the client's does-not-exist timer decides).
    stream.send(type_url::ENDPOINT, "1", "", &["a", "c"], None).await;
    stream.quiet().await;
    // ...until it appears.
    ads.set(type_url::ENDPOINT, "c", build::endpoints_weighted("c", &[(addr(3001), 5)]));
    let second = stream.recv().await;
    assert_eq!(second.version_info, "2");
    assert_eq!(names(&second.resources, |c: ClusterLoadAssignment| c.cluster_name), ["a", "c"]);
    stream.send(type_url::ENDPOINT, "2", &second.nonce, &["a", "c"], None).await;

    // A change to an unsubscribed resource is not pushed.
    ads.set(type_url::ENDPOINT, "b", build::endpoints("b", &[addr(2002)]));
    stream.quiet().await;
    // A new subscription gets the current state at once.
    stream.send(type_url::ENDPOINT, "2", &second.nonce, &["a", "b", "c"], None).await;
    let third = stream.recv().await;
    assert_eq!(third.version_info, "3");
    assert_eq!(names(&third.resources, |c: ClusterLoadAssignment| c.cluster_name), ["a", "b", "c"]);
    // Dropping a name sends nothing.
    stream.send(type_url::ENDPOINT, "3", &third.nonce, &["a"], None).await;
    stream.quiet().await;

    // CDS by name for something unknown: an empty response says it does not exist.
    stream.send(type_url::CLUSTER, "", "", &["x"], None).await;
    let empty = stream.recv().await;
    assert_eq!(empty.type_url, type_url::CLUSTER);
    assert_eq!(empty.version_info, "0");
    assert!(empty.resources.is_empty());
    stream.send(type_url::CLUSTER, "0", &empty.nonce, &["x"], None).await;
    ads.set(type_url::CLUSTER, "y", build::cluster_eds("y", "ring_hash"));
    stream.quiet().await;
    ads.set(type_url::CLUSTER, "x", build::cluster_eds("x", "least_request"));
    let clusters = stream.recv().await;
    assert_eq!(clusters.version_info, "2");
    let cluster = Cluster::decode(clusters.resources[0].value.as_slice()).unwrap();
    assert_eq!(cluster.name, "x");
    assert_eq!(cluster.eds_cluster_config.unwrap().service_name, "x");

    // Requests are recorded in order, with their subscriptions.
    let requests = ads.requests();
    assert_eq!(requests[0].resource_names, ["a"]);
    assert_eq!(requests[2].kind, RequestKind::Subscribe);
    assert_eq!(requests[2].resource_names, ["a", "c"]);
}

#[tokio::test]
async fn delta_subscribe_update_remove() {
    let ads = AdsServer::start().await.unwrap();
    ads.set(type_url::ENDPOINT, "e1", build::endpoints("e1", &[addr(1001)]));

    let mut stream = Delta::open(&ads).await;
    stream
        .send(DeltaDiscoveryRequest {
            node: Some(Node { id: "delta-node".to_owned(), ..Default::default() }),
            type_url: type_url::ENDPOINT.to_owned(),
            resource_names_subscribe: vec!["e1".to_owned(), "e2".to_owned()],
            ..Default::default()
        })
        .await;
    let first = stream.recv().await;
    assert_eq!(delta_names(&first), [("e1".to_owned(), "1".to_owned())]);
    assert!(first.removed_resources.is_empty());
    assert_eq!(first.system_version_info, "1");
    stream.ack(&first).await;
    let requests = ads.wait_for(|r| r.iter().any(|r| r.is_ack()), WAIT).await.unwrap();
    assert!(requests.iter().all(|r| r.delta));
    assert_eq!(requests[0].node_id.as_deref(), Some("delta-node"));
    assert_eq!(requests[0].resource_names, ["e1", "e2"]);

    // An update carries only the changed resource.
    ads.set(type_url::ENDPOINT, "e1", build::endpoints("e1", &[addr(1002)]));
    let update = stream.recv().await;
    assert_eq!(delta_names(&update), [("e1".to_owned(), "2".to_owned())]);
    stream.ack(&update).await;
    let ack = ads.wait_for_ack(type_url::ENDPOINT, "2", WAIT).await.unwrap();
    assert_eq!(ack.response_nonce, update.nonce);
    ads.set(type_url::ENDPOINT, "e2", build::endpoints("e2", &[addr(2001)]));
    let added = stream.recv().await;
    assert_eq!(delta_names(&added), [("e2".to_owned(), "3".to_owned())]);
    // NACK.
    stream
        .send(DeltaDiscoveryRequest {
            type_url: type_url::ENDPOINT.to_owned(),
            response_nonce: added.nonce.clone(),
            error_detail: Some(RpcStatus { code: 3, message: "e2 rejected".to_owned(), details: Vec::new() }),
            ..Default::default()
        })
        .await;
    let nacks = ads.wait_for(|r| r.iter().any(|r| r.kind == RequestKind::Nack), WAIT).await.unwrap();
    assert_eq!(nacks.iter().find(|r| r.is_nack()).unwrap().error_detail.as_deref(), Some("e2 rejected"));

    // Unsubscribed resources are not pushed.
    ads.set(type_url::ENDPOINT, "other", build::endpoints("other", &[]));
    stream.quiet().await;

    // Removal.
    assert!(ads.remove(type_url::ENDPOINT, "e1"));
    let removed = stream.recv().await;
    assert!(removed.resources.is_empty());
    assert_eq!(removed.removed_resources, ["e1"]);
    stream.ack(&removed).await;

    // Unsubscribe: no more pushes for e2.
    stream.subscribe(type_url::ENDPOINT, &[], &["e2"]).await;
    ads.wait_for(|r| r.iter().any(|r| r.unsubscribe == ["e2"]), WAIT).await.unwrap();
    ads.set(type_url::ENDPOINT, "e2", build::endpoints("e2", &[addr(2002)]));
    stream.quiet().await;
    // Re-subscribing sends it again.
    stream.subscribe(type_url::ENDPOINT, &["e2"], &[]).await;
    let again = stream.recv().await;
    assert_eq!(delta_names(&again), [("e2".to_owned(), "6".to_owned())]);

    let sent = ads.sent();
    assert!(sent.iter().all(|s| s.delta));
    assert_eq!(sent.iter().find(|s| !s.removed.is_empty()).unwrap().removed, ["e1"]);
}

#[tokio::test]
async fn delta_wildcard_and_initial_versions() {
    let ads = AdsServer::start().await.unwrap();
    ads.set(type_url::CLUSTER, "c1", build::cluster_eds("c1", "round_robin"));
    ads.set(type_url::CLUSTER, "c2", build::cluster_eds("c2", "round_robin"));

    // Empty first subscribe list: wildcard.
    let mut stream = Delta::open(&ads).await;
    stream.subscribe(type_url::CLUSTER, &[], &[]).await;
    let first = stream.recv().await;
    assert_eq!(delta_names(&first), [("c1".to_owned(), "1".to_owned()), ("c2".to_owned(), "2".to_owned())]);
    stream.ack(&first).await;
    ads.set(type_url::CLUSTER, "c3", build::cluster_eds("c3", "round_robin"));
    assert_eq!(delta_names(&stream.recv().await), [("c3".to_owned(), "3".to_owned())]);
    drop(stream);

    // A reconnecting client that already has c1 (same version) and c2 (old
    // version) and a removed c9 gets c2, c3 and the removal of c9 only.
    ads.wait_for(|_| ads.connections() == 0, WAIT).await.unwrap();
    let mut stream = Delta::open(&ads).await;
    stream
        .send(DeltaDiscoveryRequest {
            type_url: type_url::CLUSTER.to_owned(),
            resource_names_subscribe: vec!["*".to_owned()],
            initial_resource_versions: HashMap::from([
                ("c1".to_owned(), "1".to_owned()),
                ("c2".to_owned(), "0".to_owned()),
                ("c9".to_owned(), "1".to_owned()),
            ]),
            ..Default::default()
        })
        .await;
    let resync = stream.recv().await;
    assert_eq!(delta_names(&resync), [("c2".to_owned(), "2".to_owned()), ("c3".to_owned(), "3".to_owned())]);
    assert_eq!(resync.removed_resources, ["c9"]);
    let recorded = ads.requests();
    assert_eq!(recorded.last().unwrap().initial_resource_versions.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_kills_streams_and_restart_serves_again() {
    let mut ads = AdsServer::start().await.unwrap();
    let address = ads.addr();
    ads.set(type_url::LISTENER, "l1", build::listener("l1", "r1"));

    let mut stream = Sotw::open(&ads).await;
    stream.send(type_url::LISTENER, "", "", &["l1"], None).await;
    assert_eq!(listener_names(&stream.recv().await), ["l1"]);
    let mut delta = Delta::open(&ads).await;
    delta.subscribe(type_url::LISTENER, &["l1"], &[]).await;
    assert_eq!(delta_names(&delta.recv().await), [("l1".to_owned(), "1".to_owned())]);
    assert_eq!(ads.connections(), 2);

    ads.stop().await;
    assert!(!ads.is_running());
    assert_eq!(ads.connections(), 0);
    // The stream ends: usually with a transport error, sometimes as a clean
    // end when the kill races the response framing; never with a message.
    let ended = tokio::time::timeout(WAIT, stream.rx.message()).await.expect("stream ends in time");
    assert!(!matches!(ended, Ok(Some(_))), "a dead control plane must end the stream, got {ended:?}");
    let ended = tokio::time::timeout(WAIT, delta.rx.message()).await.expect("stream ends in time");
    assert!(!matches!(ended, Ok(Some(_))), "a dead control plane must end the stream, got {ended:?}");
    assert!(AggregatedDiscoveryServiceClient::connect(ads.uri()).await.is_err(), "nothing listens after stop");

    // Changes while down are served after the restart, on the same address.
    ads.set(type_url::LISTENER, "l2", build::listener("l2", "r2"));
    ads.restart().await.unwrap();
    assert_eq!(ads.addr(), address);
    let mut stream = Sotw::open(&ads).await;
    stream.send(type_url::LISTENER, "1", "", &["l1", "l2"], None).await;
    let response = stream.recv().await;
    assert_eq!(response.version_info, "2");
    assert_eq!(listener_names(&response), ["l1", "l2"]);
    let streams: Vec<u64> = ads.requests().iter().map(|r| r.stream_id).collect();
    assert_eq!(streams.len(), 3);
    assert!(streams[2] > streams[1], "stream ids go on across restarts: {streams:?}");

    // A fresh server on the same address after the old one is gone.
    drop(stream);
    drop(ads);
    let ads = AdsServer::start_on(address).await.unwrap();
    assert_eq!(ads.addr(), address);
    ads.set(type_url::LISTENER, "fresh", build::listener("fresh", "r"));
    let mut stream = Sotw::open(&ads).await;
    stream.send(type_url::LISTENER, "", "", &[], None).await;
    let response = stream.recv().await;
    assert_eq!(response.version_info, "1");
    assert_eq!(listener_names(&response), ["fresh"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_reach_every_subscribed_stream() {
    let ads = AdsServer::start().await.unwrap();
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut stream = Sotw::open(&ads).await;
        stream.send(type_url::CLUSTER, "", "", &["*"], None).await;
        let empty = stream.recv().await;
        assert!(empty.resources.is_empty());
        stream.send(type_url::CLUSTER, "0", &empty.nonce, &["*"], None).await;
        streams.push(stream);
    }
    let mut delta = Delta::open(&ads).await;
    delta.subscribe(type_url::CLUSTER, &["c"], &[]).await;
    ads.wait_for(|r| r.len() == 7, WAIT).await.unwrap();
    assert_eq!(ads.connections(), 4);

    ads.set(type_url::CLUSTER, "c", build::cluster_eds("c", "round_robin"));
    for stream in &mut streams {
        let response = stream.recv().await;
        assert_eq!(response.version_info, "1");
        assert_eq!(names(&response.resources, |c: Cluster| c.name), ["c"]);
    }
    assert_eq!(delta_names(&delta.recv().await), [("c".to_owned(), "1".to_owned())]);
    let nonces: std::collections::HashSet<String> = ads.sent().into_iter().map(|s| s.nonce).collect();
    assert_eq!(nonces.len(), 7, "every response has its own nonce");

    drop(streams);
    ads.wait_for(|_| ads.connections() == 1, WAIT).await.unwrap();
}

#[tokio::test]
async fn misbehaving_client_gets_an_error_not_a_crash() {
    let ads = AdsServer::start().await.unwrap();
    let mut stream = Sotw::open(&ads).await;
    stream.send("", "", "", &[], None).await;
    let status = tokio::time::timeout(WAIT, stream.rx.message()).await.unwrap().expect_err("empty type_url is rejected");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    // The server still serves.
    let mut stream = Sotw::open(&ads).await;
    stream.send(type_url::LISTENER, "", "", &[], None).await;
    assert!(stream.recv().await.resources.is_empty());
    ads.wait_for(|_| ads.connections() == 1, WAIT).await.unwrap();
}

#[test]
fn builders_produce_expected_protos() {
    use envoy_types::pb::envoy::config::core::v3::config_source::ConfigSourceSpecifier;
    use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
    use envoy_types::pb::envoy::config::route::v3::route::Action;
    use envoy_types::pb::envoy::config::route::v3::route_action::ClusterSpecifier;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;

    let any = build::listener("l", "r");
    assert_eq!(any.type_url, type_url::LISTENER);
    let listener = Listener::decode(any.value.as_slice()).unwrap();
    let hcm_any = listener.api_listener.unwrap().api_listener.unwrap();
    let hcm = HttpConnectionManager::decode(hcm_any.value.as_slice()).unwrap();
    let Some(RouteSpecifier::Rds(rds)) = hcm.route_specifier else { panic!("RDS expected") };
    assert_eq!(rds.route_config_name, "r");
    assert!(matches!(rds.config_source.unwrap().config_source_specifier, Some(ConfigSourceSpecifier::Ads(_))));
    assert_eq!(hcm.http_filters.len(), 1);

    let route = build::route_config("r", &["*"], &[("a", 3), ("b", 1)]);
    assert_eq!(route.type_url, type_url::ROUTE);
    let route = RouteConfiguration::decode(route.value.as_slice()).unwrap();
    let Some(Action::Route(action)) = route.virtual_hosts[0].routes[0].action.clone() else { panic!("route action expected") };
    let Some(ClusterSpecifier::WeightedClusters(weighted)) = action.cluster_specifier else { panic!("weighted clusters expected") };
    assert_eq!(weighted.clusters.len(), 2);
    let single = build::route_config_proto("r", &["*"], &[("a", 1)]);
    let Some(Action::Route(action)) = single.virtual_hosts[0].routes[0].action.clone() else { panic!("route action expected") };
    assert_eq!(action.cluster_specifier, Some(ClusterSpecifier::Cluster("a".to_owned())));
    let inline = build::listener_inline("l", single);
    assert_eq!(inline.type_url, type_url::LISTENER);

    assert_eq!(build::cluster_eds("c", "round_robin").type_url, type_url::CLUSTER);
    let eps = build::endpoints("c", &[addr(1), addr(2)]);
    assert_eq!(eps.type_url, type_url::ENDPOINT);
    let cla = ClusterLoadAssignment::decode(eps.value.as_slice()).unwrap();
    assert_eq!(cla.endpoints[0].lb_endpoints.len(), 2);
}
