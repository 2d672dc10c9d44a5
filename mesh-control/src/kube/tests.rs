//! [`KubeSource`] against a mock API server answering with recorded API-server JSON (`testdata/`).
//!
//! The mock answers LIST requests from fixture files and WATCH requests with a streaming body that the test feeds
//! one newline-delimited watch event at a time, then waits (with a timeout against hangs, never a timing assert)
//! for the published state to be exactly what that event implies.
//!
//! Fixtures (namespace `default`):
//! - `services-list.json`: ServiceList at resourceVersion 48213, Services `greeter` (port `grpc` 50051) and
//!   `kubernetes` (port `https` 443 → 8443).
//! - `endpointslices-list.json`: EndpointSliceList at 48213 with the API server's slice only.
//! - `endpointslices-watch.jsonl`: greeter's slice ADDED (two ready endpoints, zones us-east-1a and us-east-1b),
//!   a BOOKMARK, MODIFIED (the second endpoint not ready), DELETED.
//! - `services-watch.jsonl`: Service greeter DELETED.
//! - `watch-expired.jsonl`: an ERROR event, 410 Expired.
//! - `endpointslices-relist.json`: the list after that, at 51870, without greeter's slice.
//! - `forbidden.json`: a 403 Status, as for a missing RBAC rule.

use super::{KubeEndpoint, KubeSource, KubeState, PortRef, ServiceKey};
use ::kube::client::Body;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::StreamBody;
use hyper::body::Frame;
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

/// Against hangs only: every wait normally ends in milliseconds (or a backoff of about a second).
const TIMEOUT: Duration = Duration::from_secs(20);

type Chunks = mpsc::Sender<Result<Frame<Bytes>, Infallible>>;
type MockBody = StreamBody<ReceiverStream<Result<Frame<Bytes>, Infallible>>>;
type Handle = tower_test::mock::Handle<Request<Body>, Response<MockBody>>;

fn fixture(name: &str) -> String {
    let path = format!("{}/src/kube/testdata/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The watch events of a `.jsonl` fixture, one per line.
fn events(name: &str) -> VecDeque<String> {
    fixture(name).lines().filter(|l| !l.is_empty()).map(|l| format!("{l}\n")).collect()
}

fn body(status: StatusCode, chunk: Option<String>) -> (Response<MockBody>, Chunks) {
    let (tx, rx) = mpsc::channel(16);
    if let Some(chunk) = chunk {
        tx.try_send(Ok(Frame::data(Bytes::from(chunk)))).expect("room for one chunk");
    }
    let mut response = Response::new(StreamBody::new(ReceiverStream::new(rx)));
    *response.status_mut() = status;
    (response, tx)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Resource {
    Services,
    Slices,
}

/// The API server's side: LIST answers in order (the last one repeats), WATCH bodies handed to the test.
struct MockApiServer {
    /// Every request's path and query, in order.
    requests: Arc<Mutex<Vec<String>>>,
    /// One sender per opened WATCH, to stream its events.
    watches: HashMap<Resource, mpsc::UnboundedReceiver<Chunks>>,
}

/// A LIST answer: status and fixture file.
type ListAnswer = (StatusCode, &'static str);

impl MockApiServer {
    /// Starts a mock for `namespace` (`None`: all namespaces) and a [`KubeSource`] on it.
    fn start(
        namespace: Option<&str>,
        service_lists: Vec<ListAnswer>,
        slice_lists: Vec<ListAnswer>,
    ) -> (Self, watch::Receiver<Arc<KubeState>>) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<MockBody>>();
        let client = ::kube::Client::new(service, "default");
        let prefix = namespace.map_or(String::new(), |ns| format!("/namespaces/{ns}"));
        let paths = HashMap::from([
            (format!("/api/v1{prefix}/services"), Resource::Services),
            (format!("/apis/discovery.k8s.io/v1{prefix}/endpointslices"), Resource::Slices),
        ]);
        let lists = HashMap::from([(Resource::Services, VecDeque::from(service_lists)), (Resource::Slices, VecDeque::from(slice_lists))]);
        let (services_tx, services_rx) = mpsc::unbounded_channel();
        let (slices_tx, slices_rx) = mpsc::unbounded_channel();
        let watch_txs = HashMap::from([(Resource::Services, services_tx), (Resource::Slices, slices_tx)]);
        let requests = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn(serve(handle, paths, lists, watch_txs, requests.clone()));
        let source = KubeSource::new(client, namespace.map(str::to_owned)).with_debounce(Duration::from_millis(10));
        let server = MockApiServer { requests, watches: HashMap::from([(Resource::Services, services_rx), (Resource::Slices, slices_rx)]) };
        (server, source.start())
    }

    /// The next WATCH the source opens on `resource`.
    async fn watch(&mut self, resource: Resource) -> Chunks {
        let opened = self.watches.get_mut(&resource).expect("both resources").recv();
        tokio::time::timeout(TIMEOUT, opened).await.unwrap_or_else(|_| panic!("no WATCH on {resource:?}")).expect("mock server alive")
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("not poisoned").clone()
    }
}

async fn serve(
    mut handle: Handle,
    paths: HashMap<String, Resource>,
    mut lists: HashMap<Resource, VecDeque<ListAnswer>>,
    watches: HashMap<Resource, mpsc::UnboundedSender<Chunks>>,
    requests: Arc<Mutex<Vec<String>>>,
) {
    while let Some((request, send)) = handle.next_request().await {
        let uri = request.uri();
        requests.lock().expect("not poisoned").push(uri.to_string());
        let Some(&resource) = paths.get(uri.path()) else {
            send.send_response(body(StatusCode::NOT_FOUND, Some(fixture("forbidden.json"))).0);
            continue;
        };
        if uri.query().unwrap_or_default().split('&').any(|p| p == "watch=true") {
            let (response, chunks) = body(StatusCode::OK, None);
            send.send_response(response);
            // The test may have stopped listening; the source then sees an idle watch.
            let _ = watches[&resource].send(chunks);
        } else {
            let answers = lists.get_mut(&resource).expect("both resources");
            let (status, file) = if answers.len() > 1 {
                answers.pop_front().expect("not empty")
            } else {
                *answers.front().expect("a LIST answer per resource")
            };
            send.send_response(body(status, Some(fixture(file))).0);
        }
    }
}

/// Streams one watch event.
async fn send(chunks: &Chunks, event: String) {
    chunks.send(Ok(Frame::data(Bytes::from(event)))).await.expect("the source reads its watch");
}

/// Waits until the published state satisfies `expected`; returns it.
async fn wait_for(states: &mut watch::Receiver<Arc<KubeState>>, what: &str, expected: impl Fn(&KubeState) -> bool) -> Arc<KubeState> {
    let wait = async {
        loop {
            let state = states.borrow_and_update().clone();
            if expected(&state) {
                return state;
            }
            states.changed().await.expect("the source runs");
        }
    };
    match tokio::time::timeout(TIMEOUT, wait).await {
        Ok(state) => state,
        Err(_) => panic!("timed out waiting for {what}; last state: {:?}", states.borrow()),
    }
}

/// The first state published after the receiver's initial one.
async fn first_published(states: &mut watch::Receiver<Arc<KubeState>>) -> Arc<KubeState> {
    tokio::time::timeout(TIMEOUT, states.changed()).await.expect("a state is published").expect("the source runs");
    states.borrow_and_update().clone()
}

fn greeter() -> ServiceKey {
    ServiceKey::new("default", "greeter")
}

fn grpc() -> PortRef {
    PortRef::Name("grpc".into())
}

fn endpoint(addr: &str, ready: bool, zone: &str, node: &str, pod: &str) -> KubeEndpoint {
    KubeEndpoint {
        addr: addr.parse().expect("socket address"),
        ready,
        serving: ready,
        terminating: false,
        zone: Some(zone.into()),
        node_name: Some(node.into()),
        pod: Some(pod.into()),
    }
}

fn endpoint_a() -> KubeEndpoint {
    endpoint("10.244.1.12:50051", true, "us-east-1a", "worker-a", "greeter-5d8f7c9b6-k2x4q")
}

fn endpoint_b(ready: bool) -> KubeEndpoint {
    endpoint("10.244.2.7:50051", ready, "us-east-1b", "worker-b", "greeter-5d8f7c9b6-p9m3z")
}

fn apiserver_endpoint() -> Vec<KubeEndpoint> {
    vec![KubeEndpoint {
        addr: "192.168.49.2:8443".parse().expect("socket address"),
        ready: true,
        serving: true,
        terminating: false,
        zone: None,
        node_name: None,
        pod: None,
    }]
}

/// The LIST answers of most tests: Services greeter and kubernetes, and the API server's slice.
fn lists() -> (Vec<ListAnswer>, Vec<ListAnswer>) {
    (vec![(StatusCode::OK, "services-list.json")], vec![(StatusCode::OK, "endpointslices-list.json")])
}

/// Scenarios 1–3: a slice ADDED with two ready endpoints, MODIFIED to make one not ready, DELETED; a BOOKMARK
/// in between changes nothing.
#[tokio::test]
async fn slice_added_modified_deleted() {
    let (services, slices) = lists();
    let (mut server, mut states) = MockApiServer::start(Some("default"), services, slices);
    let slice_watch = server.watch(Resource::Slices).await;
    let _service_watch = server.watch(Resource::Services).await;

    // The first state published is the complete initial list: both Services, the API server's slice, and none
    // for greeter yet.
    let state = first_published(&mut states).await;
    assert!(state.is_synced());
    assert_eq!(state.services().cloned().collect::<Vec<_>>(), vec![greeter(), ServiceKey::new("default", "kubernetes")]);
    assert_eq!(state.endpoints(&greeter(), &grpc()), vec![]);
    let apiserver = ServiceKey::new("default", "kubernetes");
    assert_eq!(state.endpoints(&apiserver, &PortRef::Name("https".into())), apiserver_endpoint());
    assert_eq!(state.endpoints(&apiserver, &PortRef::Number(443)), apiserver_endpoint());

    // The watches start from the lists' resource version; slices are selected by their Service label.
    let requests = server.requests();
    assert!(requests.contains(&"/api/v1/namespaces/default/services?&limit=500".to_owned()), "{requests:?}");
    let slice_watch_request = requests
        .iter()
        .find(|r| r.starts_with("/apis/discovery.k8s.io/v1/namespaces/default/endpointslices?") && r.contains("watch=true"))
        .expect("a slice WATCH");
    assert!(slice_watch_request.contains("resourceVersion=48213"), "{slice_watch_request}");
    assert!(slice_watch_request.contains("labelSelector=kubernetes.io%2Fservice-name"), "{slice_watch_request}");
    assert!(slice_watch_request.contains("allowWatchBookmarks=true"), "{slice_watch_request}");

    let mut events = events("endpointslices-watch.jsonl");
    // ADDED: both endpoints, ready, with their zones.
    send(&slice_watch, events.pop_front().expect("ADDED")).await;
    let added = vec![endpoint_a(), endpoint_b(true)];
    let state = wait_for(&mut states, "ADDED", |s| s.endpoints(&greeter(), &grpc()) == added).await;
    assert_eq!(state.endpoints(&greeter(), &PortRef::Number(50051)), added);

    // BOOKMARK, then MODIFIED: the second endpoint is no longer ready.
    send(&slice_watch, events.pop_front().expect("BOOKMARK")).await;
    send(&slice_watch, events.pop_front().expect("MODIFIED")).await;
    let modified = vec![endpoint_a(), endpoint_b(false)];
    wait_for(&mut states, "MODIFIED", |s| s.endpoints(&greeter(), &grpc()) == modified).await;

    // DELETED: no endpoints; the Service is still there.
    send(&slice_watch, events.pop_front().expect("DELETED")).await;
    let state = wait_for(&mut states, "DELETED", |s| s.endpoints(&greeter(), &grpc()).is_empty()).await;
    assert!(state.contains_service(&greeter()));
    assert_eq!(state.endpoints(&apiserver, &PortRef::Name("https".into())), apiserver_endpoint());
}

/// Scenario 3, the Service side: a DELETED Service has no endpoints, even while its slice is still there.
#[tokio::test]
async fn service_deleted() {
    let (services, slices) = lists();
    let (mut server, mut states) = MockApiServer::start(Some("default"), services, slices);
    let slice_watch = server.watch(Resource::Slices).await;
    let service_watch = server.watch(Resource::Services).await;
    let mut slice_events = events("endpointslices-watch.jsonl");
    send(&slice_watch, slice_events.pop_front().expect("ADDED")).await;
    let added = vec![endpoint_a(), endpoint_b(true)];
    wait_for(&mut states, "ADDED", |s| s.endpoints(&greeter(), &grpc()) == added).await;

    let mut service_events = events("services-watch.jsonl");
    send(&service_watch, service_events.pop_front().expect("DELETED")).await;
    let state = wait_for(&mut states, "the Service DELETED", |s| !s.contains_service(&greeter())).await;
    assert_eq!(state.endpoints(&greeter(), &grpc()), vec![]);
    assert_eq!(state.services().cloned().collect::<Vec<_>>(), vec![ServiceKey::new("default", "kubernetes")]);
}

/// A watch that expires (410 Gone) is relisted, and the relist replaces the set: a slice deleted while the watch was
/// down disappears.
#[tokio::test]
async fn relist_after_expired_watch_drops_deleted_objects() {
    let (services, _) = lists();
    let slices = vec![(StatusCode::OK, "endpointslices-list.json"), (StatusCode::OK, "endpointslices-relist.json")];
    let (mut server, mut states) = MockApiServer::start(Some("default"), services, slices);
    let slice_watch = server.watch(Resource::Slices).await;
    let _service_watch = server.watch(Resource::Services).await;
    send(&slice_watch, events("endpointslices-watch.jsonl").pop_front().expect("ADDED")).await;
    let added = vec![endpoint_a(), endpoint_b(true)];
    wait_for(&mut states, "ADDED", |s| s.endpoints(&greeter(), &grpc()) == added).await;

    send(&slice_watch, events("watch-expired.jsonl").pop_front().expect("ERROR")).await;
    // A new WATCH opens only after the relist, from the relist's resource version.
    let _new_watch = server.watch(Resource::Slices).await;
    let state = wait_for(&mut states, "the relist", |s| s.endpoints(&greeter(), &grpc()).is_empty()).await;
    assert!(state.contains_service(&greeter()));
    let requests = server.requests();
    let slice_lists = requests
        .iter()
        .filter(|r| r.starts_with("/apis/discovery.k8s.io/v1/namespaces/default/endpointslices?") && !r.contains("watch=true"))
        .count();
    assert_eq!(slice_lists, 2, "{requests:?}");
    assert!(requests.iter().any(|r| r.contains("watch=true") && r.contains("resourceVersion=51870")), "{requests:?}");
}

/// A failing LIST (403 Forbidden) is retried with backoff; nothing is published until both lists succeeded.
#[tokio::test]
async fn list_error_is_retried() {
    let (services, _) = lists();
    let slices = vec![(StatusCode::FORBIDDEN, "forbidden.json"), (StatusCode::OK, "endpointslices-list.json")];
    let (mut server, mut states) = MockApiServer::start(Some("default"), services, slices);
    let _slice_watch = server.watch(Resource::Slices).await;
    let state = first_published(&mut states).await;
    assert!(state.is_synced());
    let apiserver = ServiceKey::new("default", "kubernetes");
    assert_eq!(state.endpoints(&apiserver, &PortRef::Name("https".into())), apiserver_endpoint());
    let requests = server.requests();
    let slice_lists = requests.iter().filter(|r| r.contains("endpointslices?") && !r.contains("watch=true")).count();
    assert_eq!(slice_lists, 2, "{requests:?}");
}

/// Without a namespace the source watches cluster-wide paths.
#[tokio::test]
async fn all_namespaces() {
    let (services, slices) = lists();
    let (mut server, mut states) = MockApiServer::start(None, services, slices);
    let slice_watch = server.watch(Resource::Slices).await;
    let _service_watch = server.watch(Resource::Services).await;
    send(&slice_watch, events("endpointslices-watch.jsonl").pop_front().expect("ADDED")).await;
    let added = vec![endpoint_a(), endpoint_b(true)];
    wait_for(&mut states, "ADDED", |s| s.endpoints(&greeter(), &grpc()) == added).await;
    let requests = server.requests();
    assert!(requests.iter().any(|r| r.starts_with("/api/v1/services?")), "{requests:?}");
    assert!(requests.iter().any(|r| r.starts_with("/apis/discovery.k8s.io/v1/endpointslices?")), "{requests:?}");
    assert!(!requests.iter().any(|r| r.contains("/namespaces/")), "{requests:?}");
}

/// The source's task ends when every receiver is gone.
#[tokio::test]
async fn stops_when_receivers_are_dropped() {
    let (services, slices) = lists();
    let (mut server, states) = MockApiServer::start(Some("default"), services, slices);
    let slice_watch = server.watch(Resource::Slices).await;
    drop(states);
    // The task drops its watch streams, closing the body the mock streams.
    tokio::time::timeout(TIMEOUT, slice_watch.closed()).await.expect("the source stops");
}

/// The whole path: recorded watch events (slice ADDED, MODIFIED to not ready, DELETED) → the control plane → ADS
/// → an xDS client, which sees the cluster and exactly the endpoints each event implies.
#[tokio::test]
async fn recorded_events_become_clusters_and_endpoints_on_an_xds_client() {
    use crate::ControlPlane;
    use mesh_core::model::HealthStatus;
    use xds_client::resource::{ClusterResource, EndpointsResource};
    use xds_client::{Bootstrap, Watch, XdsClient, XdsClientConfig};

    async fn until<T: xds_client::XdsResource>(w: &mut Watch<T>, what: &str, ok: impl Fn(&T) -> bool) {
        let wait = async {
            loop {
                if w.value().is_some_and(|v| ok(&v)) {
                    return;
                }
                assert!(w.changed().await, "the xDS client is gone");
            }
        };
        tokio::time::timeout(TIMEOUT, wait).await.unwrap_or_else(|_| panic!("timed out waiting for {what}"));
    }
    fn endpoints(r: &EndpointsResource) -> Vec<(String, HealthStatus, String)> {
        let mut all: Vec<_> = r.endpoints.endpoints.iter().map(|e| (e.addr.to_string(), e.health, e.locality.zone.clone())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    let (services, slices) = lists();
    let (mut server, states) = MockApiServer::start(Some("default"), services, slices);
    let slice_watch = server.watch(Resource::Slices).await;
    let _service_watch = server.watch(Resource::Services).await;
    let text = "services:\n  greeter:\n    lb: least_request\n    kubernetes: { service: greeter, port: grpc }\n";
    let cp = ControlPlane::new(crate::mesh::parse("mesh.yaml", text).expect("valid mesh"), "mesh.yaml");
    let _follow = crate::control::follow(&cp, states);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("loopback");
    let xds = listener.local_addr().expect("bound");
    let serving = cp.clone();
    tokio::spawn(async move { serving.serve_ads(listener).await });

    let client = XdsClient::new(Bootstrap::for_server(xds.to_string(), "kube-test"), XdsClientConfig::default());
    let mut cluster = client.watch::<ClusterResource>("greeter");
    let mut eds = client.watch::<EndpointsResource>("greeter");
    until(&mut cluster, "the greeter cluster", |c| c.cluster.lb.name() == "least_request").await;
    until(&mut eds, "greeter's endpoints (none yet)", |r| r.endpoints.endpoints.is_empty()).await;

    let healthy = |addr: &str, zone: &str| (addr.to_owned(), HealthStatus::Healthy, zone.to_owned());
    let mut events = events("endpointslices-watch.jsonl");
    send(&slice_watch, events.pop_front().expect("ADDED")).await;
    let added = vec![healthy("10.244.1.12:50051", "us-east-1a"), healthy("10.244.2.7:50051", "us-east-1b")];
    until(&mut eds, "ADDED", |r| endpoints(r) == added).await;

    send(&slice_watch, events.pop_front().expect("BOOKMARK")).await;
    send(&slice_watch, events.pop_front().expect("MODIFIED")).await;
    let modified =
        vec![healthy("10.244.1.12:50051", "us-east-1a"), ("10.244.2.7:50051".to_owned(), HealthStatus::Unhealthy, "us-east-1b".to_owned())];
    until(&mut eds, "MODIFIED", |r| endpoints(r) == modified).await;

    // Every Service port is also served under its Kubernetes name with default policies, merged with nothing
    // from the file: greeter's port and the API server's.
    let fqdn = "greeter.default.svc.cluster.local:50051";
    let mut discovered = client.watch::<EndpointsResource>(fqdn);
    until(&mut discovered, fqdn, |r| endpoints(r) == modified).await;
    let mut listener = client.watch::<xds_client::resource::ListenerResource>(fqdn);
    until(&mut listener, "the discovered listener", |_| true).await;
    let mut apiserver = client.watch::<EndpointsResource>("kubernetes.default.svc.cluster.local:443");
    until(&mut apiserver, "the API server's endpoints", |r| {
        endpoints(r) == [("192.168.49.2:8443".to_owned(), HealthStatus::Healthy, String::new())]
    })
    .await;

    send(&slice_watch, events.pop_front().expect("DELETED")).await;
    until(&mut eds, "DELETED", |r| r.endpoints.endpoints.is_empty()).await;
    until(&mut discovered, "DELETED (discovered)", |r| r.endpoints.endpoints.is_empty()).await;
    // The cluster stays: the Service still exists, it just has no endpoints.
    assert!(cluster.value().is_some(), "the greeter cluster is still served");
}

/// `/ready` (ControlPlane::is_ready) waits for the first complete lists of a Kubernetes source, and nothing is
/// published from Kubernetes before them.
#[tokio::test]
async fn not_ready_until_the_first_complete_lists() {
    let text = "services:\n  greeter:\n    kubernetes: { service: greeter, port: grpc }\n";
    let cp = crate::ControlPlane::new(crate::mesh::parse("mesh.yaml", text).expect("valid mesh"), "mesh.yaml");
    assert!(cp.is_ready(), "without Kubernetes the file is the whole config");
    let (tx, rx) = watch::channel(Arc::new(KubeState::default()));
    let _follow = crate::control::follow(&cp, rx);
    assert!(!cp.is_ready(), "a Kubernetes source that has not listed yet");
    // Services listed, slices not yet: still not ready.
    let mut half = KubeState::default();
    half.replace_services(std::iter::empty());
    tx.send_replace(Arc::new(half.clone()));
    tokio::task::yield_now().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!cp.is_ready(), "slices not listed yet");
    half.replace_slices(std::iter::empty());
    tx.send_replace(Arc::new(half));
    let wait = async {
        while !cp.is_ready() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(TIMEOUT, wait).await.expect("ready once both lists are in");
}
