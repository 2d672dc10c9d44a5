//! Telemetry as operators see it: a real Prometheus server (Debian's `prometheus`) scrapes the admin endpoints of
//! two services talking over the mesh, and its HTTP API returns the per-call series under gRPC's OpenTelemetry
//! names (A66). A real OTLP receiver gets the spans of calls across two services, linked into one trace.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use mesh_tests::echo::{EchoServer, METHOD};
use mesh_tests::otlp::{OtlpReceiver, Received};
use mesh_tests::peers::{self, MeshControl, Prometheus, TempDir};
use mesh_tonic::codec::BytesCodec;
use mesh_tonic::telemetry::{Propagation, Tracing};
use opentelemetry::trace::{FutureExt as _, TraceContextExt as _, Tracer as _};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use serde_json::Value;
use tonic::codegen::http::uri::PathAndQuery;

/// `sum by (<by>) (<metric>{<selector>})` as a map from the `by` label's value to the sum.
fn sums(prometheus: &Prometheus, metric: &str, selector: &str, by: &str) -> BTreeMap<String, u64> {
    let query = format!("sum by ({by}) ({metric}{{{selector}}})");
    let result = prometheus.query(&query).unwrap();
    result
        .iter()
        .map(|series| {
            let key = series["metric"][by].as_str().unwrap_or_default().to_owned();
            let value = series["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
            (key, value as u64)
        })
        .collect()
}

/// `meshctl call <args> --json --admin <admin>` with one environment variable set: the running process (its
/// admin endpoint lingers as `args` say) and the summary it printed when its calls were done.
fn meshctl_call_with_admin(args: &[&str], admin: SocketAddr, env: (&str, &str)) -> (std::process::Child, Value) {
    let mut meshctl = Command::new(peers::workspace_bin("meshctl").unwrap())
        .arg("call")
        .args(args)
        .args(["--json", "--admin", &admin.to_string()])
        .env(env.0, env.1)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(meshctl.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let summary = serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("meshctl summary {line:?}: {e}"));
    (meshctl, summary)
}

fn curl(addr: SocketAddr, path: &str) -> Value {
    let output = Command::new("curl").args(["-sf", &format!("http://{addr}{path}")]).output().unwrap();
    assert!(output.status.success(), "GET {path} on {addr} failed");
    serde_json::from_slice(&output.stdout).unwrap()
}

/// A meshctl client calls two backends (one failing 30% of its calls) through mesh-control's route, and serves
/// its admin endpoint; the backends' process serves its own. Prometheus scrapes both. Its answers match what
/// the client saw call by call: calls by status on the named route, attempts by endpoint and status, histogram
/// buckets that add up, and the servers' calls by status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrape_counts_calls_by_route_endpoint_and_status() {
    // The server side: this process's global meter provider, which the echo servers' metrics layer records in.
    let server_metrics = mesh_tonic::admin::Prometheus::install().unwrap();
    let flaky = EchoServer::start_failing(30).await.unwrap();
    let healthy = EchoServer::start(Duration::ZERO).await.unwrap();
    let server_admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_admin = server_admin_listener.local_addr().unwrap();
    let _server_admin = mesh_tonic::admin::Admin::new(Some(server_metrics)).serve(server_admin_listener);

    let dir = TempDir::new("telemetry").unwrap();
    let file = dir.0.join("mesh.yaml");
    let mesh =
        format!("services:\n  greeter:\n    endpoints:\n      - {{ address: {} }}\n      - {{ address: {} }}\n", flaky.addr, healthy.addr);
    std::fs::write(&file, mesh).unwrap();
    let cp = MeshControl::start(&file, &dir.0).unwrap();
    let (_bootstrap_dir, bootstrap) = peers::write_bootstrap(cp.xds, &["xds_v3"]).unwrap();

    let client_admin: SocketAddr = format!("127.0.0.1:{}", peers::free_port().unwrap()).parse().unwrap();
    let prometheus = Prometheus::start(&[("client", client_admin), ("server", server_admin)]).unwrap();

    let calls = 600;
    let calls_arg = calls.to_string();
    let args = ["--target", "xds:///greeter", "--method", METHOD, "--n", &calls_arg, "--concurrency", "4", "--linger-s", "60"];
    let bootstrap = bootstrap.display().to_string();
    let (mut meshctl, summary) = meshctl_call_with_admin(&args, client_admin, ("GRPC_XDS_BOOTSTRAP", &bootstrap));
    let by_code: BTreeMap<String, u64> =
        summary["by_code"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap())).collect();
    assert_eq!(by_code.values().sum::<u64>(), calls, "{summary}");
    assert!(by_code.get("OK").copied().unwrap_or(0) > 300 && by_code.get("UNAVAILABLE").copied().unwrap_or(0) > 30, "{summary}");

    // The admin endpoint's own views, while it lingers.
    let clusters = curl(client_admin, "/clusters");
    let endpoints: Vec<&str> = clusters["channels"][0]["clusters"][0]["endpoints"]
        .as_array()
        .map(|e| e.iter().filter_map(|e| e["address"].as_str()).collect())
        .unwrap_or_default();
    assert!(endpoints.contains(&flaky.addr.to_string().as_str()) && endpoints.contains(&healthy.addr.to_string().as_str()), "{clusters}");
    let dump = curl(client_admin, "/config_dump");
    let resources = dump["resources"].as_array().cloned().unwrap_or_default();
    assert!(resources.len() >= 4 && resources.iter().all(|r| r["status"] == "ACKED"), "LDS, RDS, CDS and EDS acked: {dump}");

    // Prometheus has scraped what the client did once its counts match the summary.
    let route = "job=\"client\",mesh_route=\"greeter/0\",grpc_method=\"mesh.test.Echo/Hello\",grpc_target=\"xds:///greeter\"";
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let by_status = sums(&prometheus, "grpc_client_call_duration_seconds_count", route, "grpc_status");
        if by_status == by_code {
            break;
        }
        assert!(Instant::now() < deadline, "Prometheus never saw the client's calls: {by_status:?}, meshctl saw {by_code:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Attempts by endpoint (no retries: one per call): the healthy one served only OKs, the flaky one the rest.
    let port = |addr: SocketAddr| addr.port().to_string();
    let ok_by_port =
        sums(&prometheus, "grpc_client_attempt_duration_seconds_count", "job=\"client\",grpc_status=\"OK\"", "network_peer_port");
    let by_endpoint: BTreeMap<String, u64> =
        summary["by_endpoint"].as_object().unwrap().iter().map(|(addr, n)| (port(addr.parse().unwrap()), n.as_u64().unwrap())).collect();
    assert_eq!(ok_by_port, by_endpoint, "OK attempts per endpoint");
    let failed_by_port =
        sums(&prometheus, "grpc_client_attempt_duration_seconds_count", "job=\"client\",grpc_status=\"UNAVAILABLE\"", "network_peer_port");
    assert_eq!(failed_by_port, BTreeMap::from([(port(flaky.addr), by_code["UNAVAILABLE"])]), "failed attempts per endpoint");
    let started = sums(&prometheus, "grpc_client_attempt_started_total", "job=\"client\"", "grpc_method");
    assert_eq!(started, BTreeMap::from([("mesh.test.Echo/Hello".to_owned(), calls)]));
    let backends = sums(&prometheus, "grpc_client_attempt_duration_seconds_count", "job=\"client\"", "grpc_lb_backend_service");
    assert!(backends.len() == 1 && backends.keys().all(|k| !k.is_empty()), "one cluster named: {backends:?}");

    // The call-duration histogram: cumulative buckets from 0 (nothing takes no time) to +Inf (every call).
    let buckets = prometheus.query(&format!("sum by (le) (grpc_client_call_duration_seconds_bucket{{{route}}})")).unwrap();
    let mut buckets: Vec<(f64, u64)> = buckets
        .iter()
        .map(|b| {
            let le = b["metric"]["le"].as_str().unwrap();
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap() };
            (le, b["value"][1].as_str().unwrap().parse::<f64>().unwrap() as u64)
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert_eq!(buckets.len(), mesh_tower::telemetry::LATENCY_BUCKETS.len() + 1, "A66's boundaries and +Inf: {buckets:?}");
    assert_eq!(buckets.first().map(|b| b.1), Some(0), "{buckets:?}");
    assert_eq!(buckets.last().map(|b| b.1), Some(calls), "{buckets:?}");
    assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "cumulative: {buckets:?}");
    assert!(buckets.iter().any(|(le, n)| *le <= 1.0 && *n > 0), "calls on loopback end within a second: {buckets:?}");

    // The servers' side of the same calls.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let server = sums(
            &prometheus,
            "grpc_server_call_duration_seconds_count",
            "job=\"server\",grpc_method=\"mesh.test.Echo/Hello\"",
            "grpc_status",
        );
        if server == by_code {
            break;
        }
        assert!(Instant::now() < deadline, "the servers' calls by status: {server:?}, meshctl saw {by_code:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let started = sums(&prometheus, "grpc_server_call_started_total", "job=\"server\"", "grpc_method");
    assert_eq!(started, BTreeMap::from([("mesh.test.Echo/Hello".to_owned(), calls)]));

    let _ = meshctl.kill();
    let _ = meshctl.wait();
}

/// A process with an xDS channel and the admin endpoint: after a bad push (endpoints with port 0), `meshctl
/// status` prints its cluster's endpoints as a table, `meshctl config-dump` and `/config_dump` show the NACKed
/// resource with its reason while the last good one keeps serving, and a standard CSDS client (grpcio with the
/// xds-protos stubs) reads the same dump from the same port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoint_shows_clusters_and_a_nacked_resource_to_meshctl_and_a_csds_client() {
    use mesh_tests::ads::{AdsServer, build, type_url};
    let ads = AdsServer::start().await.unwrap();
    let server = EchoServer::start(Duration::ZERO).await.unwrap();
    ads.set(type_url::CLUSTER, "greeter-a", build::cluster_eds("greeter-a", "round_robin"));
    ads.set(type_url::ENDPOINT, "greeter-a", build::endpoints("greeter-a", &[server.addr]));
    ads.set(type_url::ROUTE, "greeter-routes", build::route_config("greeter-routes", &["greeter"], &[("greeter-a", 1)]));
    ads.set(type_url::LISTENER, "greeter", build::listener("greeter", "greeter-routes"));
    let client = xds_client::XdsClient::new(xds_client::Bootstrap::for_server(ads.addr().to_string(), "admin-test"), Default::default());
    let channel = mesh_tonic::Channel::builder("xds:///greeter").build_xds(client.clone(), "greeter").unwrap();
    let run = mesh_tests::load::drive(&channel, 20, 2, |_| {}).await;
    assert!(run.failures.is_empty(), "{:?}", run.failures.first());

    // A bad push: the same endpoints with port 0, NACKed; the good ones keep serving.
    let mut bad = build::endpoints_proto("greeter-a", &[(server.addr, 1)]);
    if let Some(envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier::Endpoint(e)) =
        bad.endpoints[0].lb_endpoints[0].host_identifier.as_mut()
        && let Some(envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(sa)) =
            e.address.as_mut().and_then(|a| a.address.as_mut())
    {
        sa.port_specifier = Some(envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(0));
    }
    ads.set(type_url::ENDPOINT, "greeter-a", build::pack(bad));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = listener.local_addr().unwrap();
    let metrics = mesh_tonic::admin::Prometheus::new().unwrap();
    let _admin = mesh_tonic::admin::Admin::new(Some(metrics.clone())).channel("greeter", &channel).xds(client.clone()).serve(listener);
    let nacked = |dump: &Value| {
        dump["resources"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["type"] == "EDS" && r["name"] == "greeter-a")
            .cloned()
            .unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let dump = loop {
        let dump = curl(admin, "/config_dump");
        if nacked(&dump)["status"] == "NACKED" {
            break dump;
        }
        assert!(Instant::now() < deadline, "the bad push was never NACKed: {dump}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(nacked(&dump)["error"].as_str().unwrap_or_default().contains("port"), "the NACK names the field: {dump}");

    // A78's XdsClient metrics: one working server; the bad push counted invalid and the first one valid; the
    // EDS resource NACKed with its last good value cached.
    let text = metrics.render();
    let (target, xds_server) = ("grpc_target=\"xds:///greeter\"", format!("grpc_xds_server=\"{}\"", ads.addr()));
    let eds = "grpc_xds_resource_type=\"envoy.config.endpoint.v3.ClusterLoadAssignment\"";
    assert_eq!(labelled(&text, "grpc_xds_client_connected{", &[target, &xds_server]), 1.0, "{text}");
    assert_eq!(labelled(&text, "grpc_xds_client_server_failure_total{", &[target, &xds_server]), 0.0, "{text}");
    assert!(labelled(&text, "grpc_xds_client_resource_updates_valid_total{", &[&xds_server, eds]) >= 1.0, "{text}");
    assert!(labelled(&text, "grpc_xds_client_resource_updates_invalid_total{", &[&xds_server, eds]) >= 1.0, "{text}");
    let listeners = "grpc_xds_resource_type=\"envoy.config.listener.v3.Listener\"";
    assert_eq!(labelled(&text, "grpc_xds_client_resource_updates_invalid_total{", &[&xds_server, listeners]), 0.0, "{text}");
    let cached = ["grpc_xds_authority=\"#old\"", "grpc_xds_cache_state=\"nacked_but_cached\"", eds];
    assert_eq!(labelled(&text, "grpc_xds_client_resources{", &cached), 1.0, "{text}");
    let acked = ["grpc_xds_cache_state=\"acked\"", listeners, target];
    assert_eq!(labelled(&text, "grpc_xds_client_resources{", &acked), 1.0, "{text}");
    let run = mesh_tests::load::drive(&channel, 20, 2, |_| {}).await;
    assert!(run.failures.is_empty(), "the last good endpoints keep serving: {:?}", run.failures.first());

    let admin_arg = admin.to_string();
    let meshctl = move |command: &'static str| {
        let admin_arg = admin_arg.clone();
        tokio::task::spawn_blocking(move || peers::meshctl(&[command, "--admin", &admin_arg]).unwrap())
    };
    let (code, status, stderr) = meshctl("status").await.unwrap();
    assert_eq!(code, 0, "{stderr}");
    let lines: Vec<&str> = status.lines().collect();
    assert!(
        lines[0].split_whitespace().eq([
            "TARGET",
            "CLUSTER",
            "ENDPOINT",
            "STATE",
            "EJECTED",
            "IN_FLIGHT",
            "OK",
            "FAILED",
            "WEIGHT",
            "ZONE"
        ]),
        "{status}"
    );
    let row: Vec<&str> = lines.get(1).map(|l| l.split_whitespace().collect()).unwrap_or_default();
    assert_eq!(&row[..5], ["xds:///greeter", "greeter-a", &server.addr.to_string(), "Ready", "no"], "{status}");
    assert_eq!(row[6], "40", "40 calls succeeded on it: {status}");

    let (code, table, stderr) = meshctl("config-dump").await.unwrap();
    assert_eq!(code, 0, "{stderr}");
    let eds = table.lines().find(|l| l.starts_with("EDS")).unwrap_or_default();
    assert!(eds.contains("greeter-a") && eds.contains("NACKED") && eds.contains("port"), "{table}");

    // The same dump over CSDS, from a standard client.
    let output = Command::new(peers::python().unwrap())
        .arg(peers::workspace_root().join("tests/peers/py_csds_client.py"))
        .arg(admin.to_string())
        .output()
        .unwrap();
    assert!(output.status.success(), "CSDS client: {}", String::from_utf8_lossy(&output.stderr));
    let csds: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(csds["node"], "admin-test", "{csds}");
    let eds = csds["resources"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["type_url"].as_str().is_some_and(|t| t.ends_with("ClusterLoadAssignment")) && r["name"] == "greeter-a")
        .cloned()
        .unwrap_or_default();
    assert_eq!(eds["status"], "NACKED", "{csds}");
    assert!(eds["error"].as_str().unwrap_or_default().contains("port"), "{csds}");
    let listener = csds["resources"].as_array().into_iter().flatten().find(|r| r["name"] == "greeter").cloned().unwrap_or_default();
    assert_eq!(listener["status"], "ACKED", "{csds}");
}

/// mesh-control's `/metrics`: a client that connects and takes its config shows up as pushes, as many ACKs with
/// their latency, no NACK, and a connected client. Its `/logging` reads and replaces its log filter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_control_metrics_count_pushes_acks_and_connected_clients() {
    let server = EchoServer::start(Duration::ZERO).await.unwrap();
    let dir = TempDir::new("control-metrics").unwrap();
    let file = dir.0.join("mesh.yaml");
    std::fs::write(&file, format!("services:\n  greeter:\n    endpoints:\n      - {{ address: {} }}\n", server.addr)).unwrap();
    let cp = MeshControl::start(&file, &dir.0).unwrap();
    let client = xds_client::XdsClient::new(xds_client::Bootstrap::for_server(cp.xds.to_string(), "metrics-test"), Default::default());
    let channel = mesh_tonic::Channel::builder("xds:///greeter").build_xds(client, "greeter").unwrap();
    let run = mesh_tests::load::drive(&channel, 10, 1, |_| {}).await;
    assert!(run.failures.is_empty(), "{:?}", run.failures.first());
    let value = |text: &str, name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("{name} missing: {text}"))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let output = Command::new("curl").args(["-sf", &format!("http://{}/metrics", cp.admin)]).output().unwrap();
        let text = String::from_utf8(output.stdout).unwrap();
        let (pushes, acks) = (value(&text, "mesh_control_xds_pushes_total "), value(&text, "mesh_control_xds_acks_total "));
        // LDS, RDS, CDS and EDS, each pushed and acknowledged.
        if pushes >= 4.0 && acks >= 4.0 {
            assert_eq!(value(&text, "mesh_control_xds_nacks_total "), 0.0, "{text}");
            assert!(value(&text, "mesh_control_xds_connected_clients ") >= 1.0, "{text}");
            assert!(value(&text, "mesh_control_xds_push_to_ack_seconds_sum ") > 0.0, "{text}");
            assert!(acks <= pushes, "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "pushes and ACKs never counted: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its log filter, read and changed at runtime on the same port, as on a library's admin endpoint.
    let logging = |method: &str, query: &str| {
        let url = format!("http://{}/logging{query}", cp.admin);
        let output = Command::new("curl").args(["-s", "-X", method, "-w", "\n%{http_code}", &url]).output().unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or_default();
        (code.to_owned(), body.trim().to_owned())
    };
    let before = logging("GET", "");
    assert!(before.0 == "200" && !before.1.is_empty(), "{before:?}");
    assert_eq!(logging("POST", "?level=debug"), ("200".to_owned(), "debug".to_owned()));
    let invalid = logging("POST", "?filter=mesh_control%3Dloud");
    assert!(invalid.0 == "400" && invalid.1.contains("invalid log filter"), "{invalid:?}");
    assert_eq!(logging("GET", ""), ("200".to_owned(), "debug".to_owned()), "a refused filter changes nothing");
}

/// Service A of the trace tests: every call to `/mesh.test.Relay/<any>` is forwarded, from inside its
/// handler, to B's echo method through a mesh channel (to the failing B when the request says `fail`), and
/// answered with B's answer. It keeps the trace headers each call arrived with.
#[derive(Clone)]
struct Relay {
    ok: mesh_tonic::Channel,
    failing: mesh_tonic::Channel,
    headers: Arc<Mutex<Vec<Vec<String>>>>,
}

const RELAY: &str = "/mesh.test.Relay/Forward";

/// The trace headers of every propagator the tests use.
const TRACE_HEADERS: [&str; 5] = ["traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid"];

impl tonic::server::NamedService for Relay {
    const NAME: &'static str = "mesh.test.Relay";
}

impl tower::Service<http::Request<tonic::body::Body>> for Relay {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let seen = TRACE_HEADERS.iter().filter(|h| request.headers().contains_key(**h)).map(|h| (*h).to_owned()).collect();
        self.headers.lock().unwrap().push(seen);
        let relay = self.clone();
        Box::pin(async move { Ok(tonic::server::Grpc::new(BytesCodec).unary(relay, request).await) })
    }
}

impl tonic::server::UnaryService<Bytes> for Relay {
    type Response = Bytes;
    type Future = Pin<Box<dyn Future<Output = Result<tonic::Response<Bytes>, tonic::Status>> + Send>>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        let channel = if request.get_ref().as_ref() == b"fail" { self.failing.clone() } else { self.ok.clone() };
        Box::pin(async move {
            let mut client = tonic::client::Grpc::new(channel);
            client.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            client.unary(tonic::Request::new(request.into_inner()), PathAndQuery::from_static(METHOD), BytesCodec).await
        })
    }
}

/// Serves A on `127.0.0.1:0` with the mesh's server layers.
async fn serve_relay(relay: Relay) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(
        tonic::transport::Server::builder().layer(mesh_tonic::telemetry::server_layer()).add_service(relay).serve_with_incoming(incoming),
    );
    addr
}

/// What the trace tests saw: every span exported, and the trace headers each of A's calls arrived with.
struct Traced {
    spans: Vec<Received>,
    headers: Vec<Vec<String>>,
    relay: SocketAddr,
    ok: SocketAddr,
    failing: SocketAddr,
}

/// A client calls service A twice over the mesh (once OK, once failing), inside a span of its own; A's handler
/// calls B through a mesh channel each time. Tracing is installed as an application would, with
/// `propagation`, exporting to a real OTLP receiver; every span is sampled.
async fn trace_two_services(propagation: &[Propagation]) -> Traced {
    let receiver = OtlpReceiver::start().await.unwrap();
    let tracing = Tracing::otlp(receiver.endpoint(), 1.0).propagation(propagation).service_name("mesh-tests").install().unwrap();
    // Built after the install: the channels and servers trace by default from then on.
    let ok = EchoServer::start(Duration::ZERO).await.unwrap();
    let failing = EchoServer::start_failing(100).await.unwrap();
    let relay = Relay {
        ok: mesh_tonic::Channel::from_target(format!("static:///{}", ok.addr)).unwrap(),
        failing: mesh_tonic::Channel::from_target(format!("static:///{}", failing.addr)).unwrap(),
        headers: Arc::default(),
    };
    let headers = relay.headers.clone();
    let relay_addr = serve_relay(relay).await;
    let channel = mesh_tonic::Channel::from_target(format!("static:///{relay_addr}")).unwrap();

    let root = opentelemetry::global::tracer("mesh-tests").start("test");
    let root = opentelemetry::Context::current_with_span(root);
    for body in [&b"hello"[..], b"fail"] {
        let mut client = tonic::client::Grpc::new(channel.clone());
        let call = async {
            client.ready().await.unwrap();
            client.unary(tonic::Request::new(Bytes::from_static(body)), PathAndQuery::from_static(RELAY), BytesCodec).await
        };
        let answer = call.with_context(root.clone()).await;
        assert_eq!(answer.is_ok(), body == b"hello", "{answer:?}");
    }
    root.span().end();
    drop(root);

    // The client span, A's server and client spans and B's server span per call, and the test's own.
    let spans = loop {
        let flushing = tracing.clone();
        tokio::task::spawn_blocking(move || flushing.force_flush()).await.unwrap().unwrap();
        let spans = receiver.wait_for(9, Duration::from_secs(1)).await;
        if spans.len() >= 9 {
            break spans;
        }
    };
    let headers = headers.lock().unwrap().clone();
    Traced { spans, headers, relay: relay_addr, ok: ok.addr, failing: failing.addr }
}

/// The one span of `kind` named `name` whose parent is `parent`: fails naming what there is instead.
fn child<'a>(spans: &'a [Received], parent: &Received, kind: SpanKind, name: &str) -> &'a Received {
    let found = children(spans, parent, name);
    let [span] = found.as_slice() else {
        let all: Vec<(String, i32, String, String)> =
            spans.iter().map(|s| (s.span.name.clone(), s.span.kind, hex(&s.span.span_id), hex(&s.span.parent_span_id))).collect();
        panic!(
            "one {name:?} span is the child of {:?} ({}); spans (name, kind, id, parent): {all:?}",
            parent.span.name,
            hex(&parent.span.span_id)
        );
    };
    assert_eq!(span.span.kind, kind as i32, "{name}: {:?}", span.span);
    span
}

fn children<'a>(spans: &'a [Received], parent: &Received, name: &str) -> Vec<&'a Received> {
    spans.iter().filter(|s| s.span.parent_span_id == parent.span.span_id && s.span.name == name).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Asserts the trace of one call from the test's client through A to B (or the failing B): the chain of
/// client and server spans, their RPC attributes, and their statuses.
fn assert_call_chain(traced: &Traced, root: &Received, b: SocketAddr, code: i64) {
    let spans = &traced.spans;
    let failed = code != 0;
    let status = |span: &Received| span.span.status.as_ref().map_or(0, |s| s.code);
    let error = 2;

    // The root has a client span per call: this call's is the one whose chain reaches `b`.
    let reaches_b = |client: &Received| {
        let servers = children(spans, client, "mesh.test.Relay/Forward");
        let a_clients = servers.iter().flat_map(|server| children(spans, server, "mesh.test.Echo/Hello"));
        a_clients.into_iter().any(|c| c.int("network.peer.port") == Some(i64::from(b.port())))
    };
    let clients = children(spans, root, "mesh.test.Relay/Forward");
    let [client] = clients.into_iter().filter(|c| reaches_b(c)).collect::<Vec<_>>()[..] else {
        panic!("one client span of the root leads to {b}: {spans:?}")
    };
    assert_eq!(client.span.kind, SpanKind::Client as i32);
    assert_eq!(client.string("rpc.system"), Some("grpc"));
    assert_eq!(client.string("rpc.service"), Some("mesh.test.Relay"));
    assert_eq!(client.string("rpc.method"), Some("Forward"));
    assert_eq!(client.int("rpc.grpc.status_code"), Some(code), "{:?}", client.span);
    assert_eq!(client.string("network.peer.address"), Some("127.0.0.1"));
    assert_eq!(client.int("network.peer.port"), Some(i64::from(traced.relay.port())));
    let cluster = format!("static:///{}", traced.relay);
    assert_eq!(client.string("grpc.lb.backend_service"), Some(cluster.as_str()));
    assert_eq!(client.string("mesh.route"), Some(cluster.as_str()));
    assert_eq!(status(client), if failed { error } else { 0 }, "a client span fails on any status but OK: {:?}", client.span);

    let a_server = child(spans, client, SpanKind::Server, "mesh.test.Relay/Forward");
    assert_eq!(a_server.string("rpc.method"), Some("Forward"));
    assert_eq!(a_server.int("rpc.grpc.status_code"), Some(code));
    assert_eq!(a_server.string("network.peer.address"), Some("127.0.0.1"), "{:?}", a_server.span);
    assert_eq!(status(a_server), if failed { error } else { 0 }, "UNAVAILABLE is a server's failure: {:?}", a_server.span);

    let a_client = child(spans, a_server, SpanKind::Client, "mesh.test.Echo/Hello");
    assert_eq!(a_client.string("rpc.service"), Some("mesh.test.Echo"));
    assert_eq!(a_client.string("rpc.method"), Some("Hello"));
    assert_eq!(a_client.int("rpc.grpc.status_code"), Some(code));
    assert_eq!(a_client.int("network.peer.port"), Some(i64::from(b.port())));

    let b_server = child(spans, a_client, SpanKind::Server, "mesh.test.Echo/Hello");
    assert_eq!(b_server.string("rpc.method"), Some("Hello"));
    assert_eq!(b_server.int("rpc.grpc.status_code"), Some(code));
    assert_eq!(status(b_server), if failed { error } else { 0 });
    for span in [client, a_server, a_client, b_server] {
        assert_eq!(span.service, "mesh-tests");
    }
}

/// The trace test of issue 18: spans received by a real OTLP receiver make one trace per call of the test's
/// root span, with the server span of A the child of the client's span, A's client span (made in A's handler)
/// the child of A's server span, and B's server span the child of that, each with its RPC attributes and
/// status. W3C Trace Context carries the context.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_links_client_and_server_spans_across_two_services_over_w3c_trace_context() {
    let traced = trace_two_services(&[Propagation::TraceContext]).await;
    let roots: Vec<&Received> = traced.spans.iter().filter(|s| s.span.name == "test").collect();
    let [root] = roots.as_slice() else { panic!("one root span: {roots:?}") };
    assert!(root.span.parent_span_id.is_empty());
    assert!(traced.spans.iter().all(|s| s.span.trace_id == root.span.trace_id), "one trace id across every span");
    assert_call_chain(&traced, root, traced.ok, 0);
    assert_call_chain(&traced, root, traced.failing, 14);
    assert_eq!(traced.spans.len(), 9, "no other spans");
    for headers in &traced.headers {
        assert!(headers.contains(&"traceparent".to_owned()) && !headers.iter().any(|h| h.contains("b3")), "{headers:?}");
    }
}

/// The same over B3 multi-header propagation (Zipkin's, which Istio's sidecars forward): A's calls arrive
/// with `x-b3-*` headers and no `traceparent`, and the spans still link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_links_client_and_server_spans_across_two_services_over_b3() {
    let traced = trace_two_services(&[Propagation::B3Multi]).await;
    let [root] = traced.spans.iter().filter(|s| s.span.name == "test").collect::<Vec<_>>()[..] else { panic!("one root span") };
    assert!(traced.spans.iter().all(|s| s.span.trace_id == root.span.trace_id), "one trace id across every span");
    assert_call_chain(&traced, root, traced.ok, 0);
    assert_call_chain(&traced, root, traced.failing, 14);
    for headers in &traced.headers {
        assert!(headers.contains(&"x-b3-traceid".to_owned()) && !headers.contains(&"traceparent".to_owned()), "{headers:?}");
    }
}

/// `meshctl call --otlp` traces its calls in a process of its own: its client spans reach the receiver under
/// `service.name=meshctl`, and the echo server's spans (this process's) are their children, carried across the
/// processes by `traceparent`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshctl_call_otlp_exports_client_spans_that_the_servers_spans_are_children_of() {
    let receiver = OtlpReceiver::start().await.unwrap();
    let tracing = Tracing::otlp(receiver.endpoint(), 1.0).service_name("mesh-tests").install().unwrap();
    let echo = EchoServer::start(Duration::ZERO).await.unwrap();
    let status = tokio::process::Command::new(peers::workspace_bin("meshctl").unwrap())
        .args(["call", "--target", &format!("static:///{}", echo.addr), "--method", METHOD, "--n", "2"])
        .args(["--otlp", &receiver.endpoint()])
        .stdout(Stdio::null())
        .status()
        .await
        .unwrap();
    assert!(status.success());
    tokio::task::spawn_blocking(move || tracing.force_flush()).await.unwrap().unwrap();
    let spans = receiver.wait_for(4, Duration::from_secs(10)).await;
    let clients: Vec<&Received> = spans.iter().filter(|s| s.service == "meshctl").collect();
    assert_eq!(clients.len(), 2, "{spans:?}");
    for client in clients {
        assert_eq!(client.span.kind, SpanKind::Client as i32);
        assert_eq!(client.string("rpc.method"), Some("Hello"));
        let server = child(&spans, client, SpanKind::Server, "mesh.test.Echo/Hello");
        assert_eq!((server.service.as_str(), &server.span.trace_id), ("mesh-tests", &client.span.trace_id));
    }
}

/// Where a call's time went (A121): the first call on a channel whose endpoint's TLS handshake is slow (a relay
/// holds each connection 300 ms before passing it on) waits for the connecting endpoint. The response says so
/// (`mesh_tonic::Delay`), and the metrics record it as `grpc.client.call.delay.duration` and
/// `grpc.client.attempt.delay.duration` with `grpc.delay_type="connecting"`; a later call on the ready
/// connection records no delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_waiting_for_a_connecting_endpoint_records_a_connecting_delay() {
    const GREETER: &str = "spiffe://mesh.local/ns/default/sa/greeter";
    let ca = mesh_tests::certs::SpiffeCa::new("delay CA").unwrap();
    let acceptor = mesh_tower::tls::MtlsAcceptor::new(ca.credentials(GREETER).unwrap()).unwrap();
    let server = EchoServer::start_mesh(acceptor).await.unwrap();
    let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = relay.accept().await {
            let upstream = server.addr;
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    let metrics = mesh_tonic::admin::Prometheus::new().unwrap();
    let policy = mesh_core::policy::TlsPolicy { allowed_identities: vec![GREETER.to_owned()], ..Default::default() };
    let channel = mesh_tonic::Channel::builder(format!("static:///{relay_addr}"))
        .mtls(Arc::new(ca.credentials("spiffe://mesh.local/ns/default/sa/web").unwrap()), policy)
        .meter(Some(metrics.meter()))
        .build()
        .unwrap();
    async fn delayed(channel: &mesh_tonic::Channel) -> Option<mesh_tonic::Delay> {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let response =
            grpc.unary(tonic::Request::new(Bytes::from_static(b"hi")), PathAndQuery::from_static(METHOD), BytesCodec).await.unwrap();
        response.extensions().get::<mesh_tonic::Delay>().copied()
    }
    let first = delayed(&channel).await.expect("the first call waited");
    assert_eq!(first.kind, mesh_tonic::DelayKind::Connecting, "{first:?}");
    assert!(first.waited >= Duration::from_millis(250), "{first:?}");
    assert_eq!(delayed(&channel).await, None, "a call on a ready connection does not wait");

    let text = metrics.render();
    let count = |metric: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{metric}_count{{")) && l.contains("grpc_delay_type=\"connecting\""))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    assert_eq!(count("grpc_client_call_delay_duration_seconds"), Some(1.0), "{text}");
    assert_eq!(count("grpc_client_attempt_delay_duration_seconds"), Some(1.0), "{text}");
    let sum = text
        .lines()
        .find(|l| l.starts_with("grpc_client_call_delay_duration_seconds_sum{") && l.contains("connecting"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_default();
    assert!(sum >= 0.25, "the recorded delay is the wait: {sum} s\n{text}");
}

/// `/logging` on `meshctl call --admin`: GET shows the log filter in force, `POST ?level=` and `POST ?filter=`
/// replace it at runtime, and an invalid filter is refused with the reason, leaving the last one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoint_changes_the_log_filter_at_runtime() {
    let server = EchoServer::start(Duration::ZERO).await.unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", peers::free_port().unwrap()).parse().unwrap();
    let target = format!("static:///{}", server.addr);
    let args = ["--target", &target, "--method", METHOD, "--n", "3", "--linger-s", "30"];
    let (mut meshctl, _) = meshctl_call_with_admin(&args, admin, ("MESH_LOG", "warn"));
    let request = |method: &str, query: &str| {
        let output = Command::new("curl")
            .args(["-s", "-X", method, "-w", "\n%{http_code}", &format!("http://{admin}/logging{query}")])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or_default();
        (code.to_owned(), body.trim().to_owned())
    };
    let before = request("GET", "");
    let raised = request("POST", "?level=debug");
    let targeted = request("POST", "?filter=mesh_tower%3Dtrace%2Cinfo");
    let after = request("GET", "");
    let invalid = request("POST", "?filter=mesh_tower%3Dloud");
    let kept = request("GET", "");
    let _ = meshctl.kill();
    let _ = meshctl.wait();
    assert_eq!(before, ("200".to_owned(), "warn".to_owned()));
    assert_eq!(raised, ("200".to_owned(), "debug".to_owned()));
    assert_eq!(targeted.0, "200", "{targeted:?}");
    assert!(after.1.contains("mesh_tower=trace") && after.1.contains("info"), "{after:?}");
    assert_eq!(invalid.0, "400", "{invalid:?}");
    assert!(invalid.1.contains("invalid log filter"), "{invalid:?}");
    assert_eq!(kept, after, "a refused filter changes nothing");
}

/// Access logs: `meshctl call --access-log 1 --log-format json` writes one JSON line per call on target
/// `mesh::access` with the target, method, route, endpoint, status and duration; without the flag, none.
#[test]
fn access_logs_write_one_json_line_per_call_only_when_asked() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime.block_on(EchoServer::start(Duration::ZERO)).unwrap();
    let target = format!("static:///{}", server.addr);
    let run = |extra: &[&str]| {
        let output = Command::new(peers::workspace_bin("meshctl").unwrap())
            .args(["--log-format", "json", "call", "--target", &target, "--method", METHOD, "--n", "5", "--json"])
            .args(extra)
            .env("MESH_LOG", "warn,mesh::access=info")
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let lines: Vec<Value> = String::from_utf8_lossy(&output.stderr)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| l["target"] == "mesh::access")
            .collect();
        lines
    };
    let logged = run(&["--access-log", "1"]);
    assert_eq!(logged.len(), 5, "{logged:?}");
    for line in &logged {
        let fields = &line["fields"];
        assert_eq!(fields["grpc_target"], target.as_str(), "{line}");
        assert_eq!(fields["method"], "mesh.test.Echo/Hello", "{line}");
        assert_eq!(fields["endpoint"], server.addr.to_string(), "{line}");
        assert_eq!(fields["cluster"], target.as_str(), "a static target's one cluster is named for it: {line}");
        assert_eq!(fields["grpc_status"], "OK", "{line}");
        assert!(fields["duration_us"].as_u64().is_some_and(|d| d > 0), "{line}");
    }
    assert!(run(&[]).is_empty(), "no access lines by default");
}

/// The value of the first sample in Prometheus text `text` whose line starts with `prefix`.
fn rendered(text: &str, prefix: &str) -> f64 {
    labelled(text, prefix, &[])
}

/// The value of the first sample in Prometheus text `text` whose line starts with `prefix` and has every one of
/// `labels` (`name="value"`).
fn labelled(text: &str, prefix: &str, labels: &[&str]) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix) && labels.iter().all(|label| l.contains(label)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no {prefix} with {labels:?} in\n{text}"))
}

/// One unary call of `METHOD` on `channel`, which must succeed.
async fn hello(channel: &mesh_tonic::Channel) {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    grpc.unary(tonic::Request::new(Bytes::from_static(b"hi")), PathAndQuery::from_static(METHOD), BytesCodec).await.unwrap();
}

/// A96's other two counts: a server that refuses every stream unprocessed beside one that answers, and each
/// refusal the channel resent is one of `grpc.client.call.transparent_retries` (as many as the refuser saw,
/// none in `grpc.client.call.retries`); a hedging policy against a slow server, and every call records one
/// `grpc.client.call.hedges`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparent_retries_and_hedges_are_counted_per_call_under_a96_names() {
    use mesh_tests::h2script::{Act, ScriptedServer};
    let refuser = ScriptedServer::start(|_| Act::Refuse).await.unwrap();
    let echo = EchoServer::start(Duration::ZERO).await.unwrap();
    let slow = EchoServer::start(Duration::from_millis(100)).await.unwrap();
    let metrics = mesh_tonic::admin::Prometheus::new().unwrap();
    let resending = mesh_tonic::Channel::builder(format!("static:///{},{}", refuser.addr, echo.addr))
        .lb("round_robin".parse().unwrap())
        .meter(Some(metrics.meter()))
        .build()
        .unwrap();
    for _ in 0..20 {
        hello(&resending).await;
    }
    let hedge = mesh_core::policy::HedgePolicy { max_attempts: 2, delay: Duration::from_millis(10), non_fatal: vec![] };
    let hedging =
        mesh_tonic::Channel::builder(format!("static:///{}", slow.addr)).hedge(hedge).meter(Some(metrics.meter())).build().unwrap();
    for _ in 0..5 {
        hello(&hedging).await;
    }
    let text = metrics.render();
    let resent = rendered(&text, "grpc_client_call_transparent_retries_sum{");
    assert!(refuser.requests() >= 5, "round robin sends about half the first attempts to the refuser: {}", refuser.requests());
    assert_eq!(resent as u64, refuser.requests(), "every refused request was resent once, and counted\n{text}");
    assert!(
        text.contains(&format!(
            "grpc_client_call_transparent_retries_count{{grpc_method=\"{}\",grpc_target=\"static:///{},{}\"",
            &METHOD[1..],
            refuser.addr,
            echo.addr
        )),
        "{text}"
    );
    assert!(!text.contains("grpc_client_call_retries_count{"), "a transparent retry is not a retry\n{text}");
    assert_eq!(rendered(&text, "grpc_client_call_hedges_sum{"), 5.0, "one hedge per call\n{text}");
    assert_eq!(rendered(&text, "grpc_client_call_hedges_count{"), 5.0, "{text}");
    assert!(
        text.contains(&format!("grpc_client_call_hedges_count{{grpc_method=\"{}\",grpc_target=\"static:///{}\"", &METHOD[1..], slow.addr)),
        "{text}"
    );
}

/// A96: a channel retrying a backend that fails 30% of its calls records `grpc.client.call.retries` for the
/// calls it retried, and the retries it counts are exactly the calls the server saw beyond the client's;
/// `grpc.client.call.retry_delay` has the backoff of the same calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_counted_per_call_under_a96_names() {
    let server = EchoServer::start_failing(30).await.unwrap();
    let metrics = mesh_tonic::admin::Prometheus::new().unwrap();
    let policy = mesh_core::policy::RetryPolicy {
        max_attempts: 3,
        retry_on: vec![mesh_core::GrpcCode::Unavailable],
        base_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
        ..Default::default()
    };
    let channel =
        mesh_tonic::Channel::builder(format!("static:///{}", server.addr)).retry(policy).meter(Some(metrics.meter())).build().unwrap();
    let calls = 40;
    for _ in 0..calls {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        grpc.unary(tonic::Request::new(Bytes::from_static(b"hi")), PathAndQuery::from_static(METHOD), BytesCodec).await.unwrap();
    }
    let text = metrics.render();
    let value = |prefix: &str| rendered(&text, prefix);
    let retries = value("grpc_client_call_retries_sum{");
    assert_eq!(retries as u64, server.calls() - calls, "every retry reached the server\n{text}");
    assert!(retries >= 8.0, "30% of the attempts fail, so there are retries: {retries}");
    let retried_calls = value("grpc_client_call_retries_count{");
    assert!(retried_calls >= 1.0 && retried_calls <= retries, "{text}");
    assert_eq!(value("grpc_client_call_retry_delay_seconds_count{"), retried_calls, "{text}");
    assert!(value("grpc_client_call_retry_delay_seconds_sum{") > 0.0, "{text}");
}

/// A121's `config` delay: a call made before the control plane has sent the target's config waits for it, and
/// records `grpc.client.call.delay.duration` with `grpc.delay_type="config"` for that wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_waiting_for_its_first_config_records_a_config_delay() {
    use mesh_tests::ads::{AdsServer, build, type_url};
    let server = EchoServer::start(Duration::ZERO).await.unwrap();
    let ads = AdsServer::start().await.unwrap();
    let metrics = mesh_tonic::admin::Prometheus::new().unwrap();
    let client =
        xds_client::XdsClient::new(xds_client::Bootstrap::for_server(ads.uri(), "delay-test"), xds_client::XdsClientConfig::default());
    let channel = mesh_tonic::Channel::builder("xds:///greeter").meter(Some(metrics.meter())).build_xds(client, "greeter").unwrap();
    let call = tokio::spawn(async move {
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.unwrap();
        grpc.unary(tonic::Request::new(Bytes::from_static(b"hi")), PathAndQuery::from_static(METHOD), BytesCodec).await.map(|_| ())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    ads.set(type_url::ENDPOINT, "greeter", build::endpoints("greeter", &[server.addr]));
    ads.set(type_url::CLUSTER, "greeter", build::cluster_eds("greeter", "round_robin"));
    ads.set(type_url::ROUTE, "greeter-routes", build::route_config("greeter-routes", &["greeter"], &[("greeter", 1)]));
    ads.set(type_url::LISTENER, "greeter", build::listener("greeter", "greeter-routes"));
    call.await.unwrap().unwrap();
    let text = metrics.render();
    let line = |prefix: &str| {
        text.lines()
            .find(|l| l.starts_with(prefix) && l.contains("grpc_delay_type=\"config\""))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    assert_eq!(line("grpc_client_call_delay_duration_seconds_count{"), Some(1.0), "{text}");
    assert!(line("grpc_client_call_delay_duration_seconds_sum{").is_some_and(|s| s >= 0.25), "the wait for the config: {text}");
}
