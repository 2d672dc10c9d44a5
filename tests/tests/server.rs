//! xDS-enabled servers (gRFC A36): a tonic server built with `mesh_tonic::Server` takes its inbound policy (mTLS
//! mode, authorization, rate limit) from mesh-control, and changes it without a restart.

use std::path::Path;
use std::time::Duration;

use mesh_core::policy::TlsPolicy;
use mesh_tests::echo::{EchoServer, METHOD};
use mesh_tests::peers::{MeshControl, TempDir};
use mesh_tower::inbound::Serving;
use tokio::net::TcpListener;
use tokio::time::Instant;

/// The identity of the certificate in the bootstrap mesh-control writes: what the server presents.
const SERVER_ID: &str = "spiffe://mesh.local/ns/default/sa/mesh-client";
const WEB: &str = "spiffe://mesh.local/ns/default/sa/web";
const API: &str = "spiffe://mesh.local/ns/default/sa/api";

/// One call: the server's reply (the caller's identity as the server saw it), or the status.
async fn call(channel: &mesh_tonic::Channel) -> Result<String, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let request = tonic::Request::new(bytes::Bytes::from_static(b"hi"));
    let reply = grpc.unary(request, http::uri::PathAndQuery::from_static(METHOD), mesh_tonic::codec::BytesCodec).await?;
    Ok(String::from_utf8_lossy(reply.get_ref()).into_owned())
}

/// Calls until `done` holds for a call's outcome, for at most `within`: how long it took.
async fn until(channel: &mesh_tonic::Channel, within: Duration, done: impl Fn(&Result<String, tonic::Status>) -> bool) -> Duration {
    let start = Instant::now();
    loop {
        let outcome = call(channel).await;
        if done(&outcome) {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "still {outcome:?} after {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn plaintext(addr: std::net::SocketAddr) -> mesh_tonic::Channel {
    mesh_tonic::Channel::builder(format!("static:///{addr}")).ready_timeout(Duration::from_millis(500)).build().unwrap()
}

/// A channel presenting the certificate `meshctl ca issue` wrote in `dir`, expecting the server's identity.
fn mtls(addr: std::net::SocketAddr, dir: &Path) -> mesh_tonic::Channel {
    let watcher = mesh_tower::tls::FileWatcher {
        certificate_file: Some(dir.join("cert.pem")),
        private_key_file: Some(dir.join("key.pem")),
        ca_certificate_file: Some(dir.join("ca.pem")),
        spiffe_trust_bundle_map_file: None,
        refresh_interval: Duration::from_secs(60),
    };
    let policy = TlsPolicy { allowed_identities: vec![SERVER_ID.to_owned()], ..TlsPolicy::default() };
    mesh_tonic::Channel::builder(format!("static:///{addr}"))
        .ready_timeout(Duration::from_millis(500))
        .mtls(watcher.start().unwrap(), policy)
        .build()
        .unwrap()
}

fn issue(dir: &Path, name: &str, identity: &str) -> std::path::PathBuf {
    let out = dir.join(name);
    let ca = dir.join("ca");
    let args = ["ca", "issue", "--identity", identity, "--out", out.to_str().unwrap(), "--ca-dir", ca.to_str().unwrap()];
    let (code, stdout, stderr) = mesh_tests::peers::meshctl(&args).unwrap();
    assert_eq!(code, 0, "{stdout} {stderr}");
    out
}

async fn serving(status: &mut tokio::sync::watch::Receiver<Serving>, within: Duration) {
    let waited = tokio::time::timeout(within, status.wait_for(|s| matches!(s, Serving::Serving(_)))).await.is_ok();
    let current = format!("{:?}", *status.borrow());
    assert!(waited, "not serving after {within:?}: {current}");
}

/// The end-to-end test of issue 17: the server gets its inbound listener from mesh-control; permissive serves
/// plaintext and mTLS callers, strict only mTLS ones (no restart); a deny rule by identity applies within 2 s
/// (other callers still served); a server rate limit answers RESOURCE_EXHAUSTED above it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_xds_server_takes_its_mtls_mode_authorization_and_rate_limit_from_the_mesh_file() {
    let dir = TempDir::new("xds-server").unwrap();
    let (web, api) = (issue(&dir.0, "web", WEB), issue(&dir.0, "api", API));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mesh = dir.0.join("mesh.yaml");
    let write = |policy: &str| {
        let text = format!("services:\n  greeter:\n    endpoints:\n      - {{ address: {addr} }}\n{policy}");
        std::fs::write(&mesh, text).unwrap();
    };
    write("    mtls: permissive\n");
    let cp = MeshControl::start(&mesh, &dir.0).unwrap();
    let bootstrap = xds_client::Bootstrap::from_file(&dir.0.join("bootstrap-written.json")).unwrap();
    let client = xds_client::XdsClient::new(bootstrap, xds_client::XdsClientConfig::default());
    let (_server, running) = EchoServer::start_xds(listener, mesh_tonic::Server::builder().xds(client)).unwrap();
    let mut status = running.status();
    serving(&mut status, Duration::from_secs(10)).await;

    // Permissive: both kinds of caller are served, each seen as what it is.
    let (plain, web, api) = (plaintext(addr), mtls(addr, &web), mtls(addr, &api));
    assert_eq!(call(&plain).await.unwrap(), "plaintext");
    assert_eq!(call(&web).await.unwrap(), WEB);

    // Strict, without a restart: the plaintext connection is drained and a new one refused; mTLS still works.
    write("    mtls: strict\n");
    until(&plain, Duration::from_secs(10), Result::is_err).await;
    for _ in 0..3 {
        assert!(call(&plain).await.is_err(), "plaintext is refused once strict");
    }
    assert_eq!(call(&web).await.unwrap(), WEB);
    assert!(running.stats().handshakes.failed(mesh_tower::tls::HandshakeFailure::Plaintext) >= 1);

    // A deny rule by identity: web is denied within 2 seconds, api still served.
    write(&format!("    mtls: strict\n    authorization:\n      - {{ action: deny, from: [\"{WEB}\"] }}\n"));
    let took = until(&web, Duration::from_secs(10), |r| r.as_ref().is_err_and(|s| s.code() == tonic::Code::PermissionDenied)).await;
    assert!(took < Duration::from_secs(2), "the deny rule took {took:?}");
    assert_eq!(call(&api).await.unwrap(), API);

    // A server rate limit: above it, RESOURCE_EXHAUSTED.
    write(&format!(
        "    mtls: strict\n    authorization:\n      - {{ action: deny, from: [\"{WEB}\"] }}\n    server_rate_limit: {{ requests_per_second: 1, burst: 3 }}\n"
    ));
    until(&api, Duration::from_secs(10), |r| r.as_ref().is_err_and(|s| s.code() == tonic::Code::ResourceExhausted)).await;
    let exhausted = call(&api).await.unwrap_err();
    assert_eq!(exhausted.code(), tonic::Code::ResourceExhausted, "{exhausted:?}");
    drop(cp);
}

/// A server listener for 127.0.0.1:`port` with one plaintext chain: its routes over RDS (`inbound-routes`), a
/// deny rule for `/mesh.test.Echo/Denied`, then `extra` HTTP filters, then the router.
fn server_listener(
    name: &str,
    port: u16,
    extra: Vec<envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpFilter>,
) -> envoy_types::pb::google::protobuf::Any {
    use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
    use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address};
    use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter};
    use envoy_types::pb::envoy::config::rbac::v3::{Permission, Policy, Principal, Rbac as Rules, permission, principal, rbac};
    use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
        HttpConnectionManager, HttpFilter, Rds, http_filter,
    };
    use envoy_types::pb::envoy::r#type::matcher::v3::{PathMatcher, StringMatcher, path_matcher, string_matcher};
    use mesh_tests::ads::build::{ads_config_source, pack, router_filter};
    let denied =
        StringMatcher { match_pattern: Some(string_matcher::MatchPattern::Exact("/mesh.test.Echo/Denied".into())), ..Default::default() };
    let policy = Policy {
        permissions: vec![Permission {
            rule: Some(permission::Rule::UrlPath(PathMatcher { rule: Some(path_matcher::Rule::Path(denied)) })),
        }],
        principals: vec![Principal { identifier: Some(principal::Identifier::Any(true)) }],
        ..Default::default()
    };
    let rules = Rules { action: rbac::Action::Deny as i32, policies: [("deny-denied".to_owned(), policy)].into(), ..Default::default() };
    let rbac = HttpFilter {
        name: "rbac".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack(Rbac { rules: Some(rules), ..Default::default() }))),
        ..Default::default()
    };
    let mut http_filters = vec![rbac];
    http_filters.extend(extra);
    http_filters.push(router_filter());
    let hcm = HttpConnectionManager {
        stat_prefix: "inbound".into(),
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: Some(ads_config_source()),
            route_config_name: "inbound-routes".into(),
        })),
        http_filters,
        ..Default::default()
    };
    let listener = Listener {
        name: name.to_owned(),
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: "127.0.0.1".into(),
                port_specifier: Some(PortSpecifier::PortValue(u32::from(port))),
                ..Default::default()
            })),
        }),
        filter_chains: vec![FilterChain {
            filters: vec![Filter { name: "hcm".into(), config_type: Some(filter::ConfigType::TypedConfig(pack(hcm))) }],
            ..Default::default()
        }],
        ..Default::default()
    };
    pack(listener)
}

/// The route table of [`server_listener`]: one non-forwarding route for every path.
fn inbound_routes() -> envoy_types::pb::google::protobuf::Any {
    use envoy_types::pb::envoy::config::route::v3::{
        NonForwardingAction, Route, RouteConfiguration, RouteMatch, VirtualHost, route, route_match,
    };
    mesh_tests::ads::build::pack(RouteConfiguration {
        name: "inbound-routes".into(),
        virtual_hosts: vec![VirtualHost {
            name: "all".into(),
            domains: vec!["*".into()],
            routes: vec![Route {
                r#match: Some(RouteMatch { path_specifier: Some(route_match::PathSpecifier::Prefix(String::new())), ..Default::default() }),
                action: Some(route::Action::NonForwardingAction(NonForwardingAction {})),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    })
}

async fn call_method(channel: &mesh_tonic::Channel, method: &'static str) -> Result<String, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let request = tonic::Request::new(bytes::Bytes::from_static(b"hi"));
    let reply = grpc.unary(request, http::uri::PathAndQuery::from_static(method), mesh_tonic::codec::BytesCodec).await?;
    Ok(String::from_utf8_lossy(reply.get_ref()).into_owned())
}

/// Invalid inbound config is NACKed with a reason naming the field, and the server keeps serving with the
/// last good listener (its RBAC rule still enforced): an unknown required HTTP filter, then a malformed RBAC
/// filter. The route table comes over RDS, and a server does not serve before it arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_inbound_config_is_nacked_and_the_server_keeps_its_last_good_listener() {
    use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{HttpFilter, http_filter};
    use mesh_tests::ads::build::pack;
    const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
    let ads = mesh_tests::ads::AdsServer::start().await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let name = format!("grpc/server?xds.resource.listening_address={addr}");
    let bootstrap = serde_json::json!({
        "xds_servers": [{ "server_uri": ads.addr().to_string(), "channel_creds": [{ "type": "insecure" }], "server_features": ["xds_v3"] }],
        "node": { "id": "server" },
        "server_listener_resource_name_template": "grpc/server?xds.resource.listening_address=%s",
    });
    let bootstrap = xds_client::Bootstrap::from_json(&bootstrap.to_string(), "test bootstrap").unwrap();
    let client = xds_client::XdsClient::new(bootstrap, xds_client::XdsClientConfig::default());
    ads.set(LDS, &name, server_listener(&name, addr.port(), Vec::new()));
    let (_server, running) = EchoServer::start_xds(listener, mesh_tonic::Server::builder().xds(client)).unwrap();
    let mut status = running.status();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(matches!(*status.borrow(), Serving::NotServing(_)), "serving before its route table arrived: {:?}", *status.borrow());
    ads.set(RDS, "inbound-routes", inbound_routes());
    serving(&mut status, Duration::from_secs(5)).await;
    let channel = plaintext(addr);
    assert_eq!(call_method(&channel, METHOD).await.unwrap(), "plaintext");
    let denied = call_method(&channel, "/mesh.test.Echo/Denied").await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");

    // An HTTP filter of an unknown type, not optional.
    let unknown = HttpFilter {
        name: "mystery".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack(envoy_types::pb::google::protobuf::UInt32Value { value: 1 }))),
        is_optional: false,
        ..Default::default()
    };
    ads.set(LDS, &name, server_listener(&name, addr.port(), vec![unknown]));
    let nack = ads.wait_for_nack(LDS, Duration::from_secs(5)).await.unwrap();
    let reason = format!("{nack:?}");
    assert!(reason.contains("mystery"), "the NACK names the filter: {reason}");
    assert_eq!(call_method(&channel, METHOD).await.unwrap(), "plaintext", "still serving");
    assert_eq!(
        call_method(&channel, "/mesh.test.Echo/Denied").await.unwrap_err().code(),
        tonic::Code::PermissionDenied,
        "with the last good RBAC"
    );

    // A malformed RBAC filter: a policy with no permissions.
    ads.clear_log();
    let malformed = HttpFilter {
        name: "bad-rbac".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack(Rbac {
            rules: Some(envoy_types::pb::envoy::config::rbac::v3::Rbac {
                policies: [("empty".to_owned(), Default::default())].into(),
                ..Default::default()
            }),
            ..Default::default()
        }))),
        ..Default::default()
    };
    ads.set(LDS, &name, server_listener(&name, addr.port(), vec![malformed]));
    let nack = ads.wait_for_nack(LDS, Duration::from_secs(5)).await.unwrap();
    let reason = format!("{nack:?}");
    assert!(reason.contains("permissions: empty"), "the NACK says what is wrong: {reason}");
    let fresh = plaintext(addr);
    assert_eq!(call_method(&fresh, METHOD).await.unwrap(), "plaintext", "new connections are served too");
    assert_eq!(call_method(&fresh, "/mesh.test.Echo/Denied").await.unwrap_err().code(), tonic::Code::PermissionDenied);
    assert!(matches!(*status.borrow(), Serving::Serving(_)));
}

/// `meshctl call --target xds:///<name>` (our xDS client) with the bootstrap at `bootstrap`: its JSON summary,
/// whatever the calls' outcome.
async fn meshctl_calls(bootstrap: &Path, name: &str, n: u32) -> serde_json::Value {
    let (bootstrap, target) = (bootstrap.display().to_string(), format!("xds:///{name}"));
    tokio::task::spawn_blocking(move || {
        let n = n.to_string();
        let args = ["call", "--target", &target, "--method", METHOD, "--n", &n, "--timeout-ms", "5000", "--json"];
        let (_, stdout, stderr) = mesh_tests::peers::meshctl_with_env(&args, &[("GRPC_XDS_BOOTSTRAP", &bootstrap)]).unwrap();
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout} {stderr}"))
    })
    .await
    .unwrap()
}

/// The grpcio xDS client (mTLS with xDS credentials): its JSON summary.
async fn grpcio_calls(bootstrap: &Path, name: &str, n: u32) -> serde_json::Value {
    let (bootstrap, target) = (bootstrap.to_owned(), format!("xds:///{name}"));
    tokio::task::spawn_blocking(move || mesh_tests::peers::python_xds_client_mtls(&bootstrap, &target, METHOD, n).unwrap()).await.unwrap()
}

/// Real gRPC C-core on the other side of each of our halves, all fed by mesh-control with strict mTLS: a grpcio
/// xDS client calls our xDS-enabled server, and our xDS client calls a grpcio xDS-enabled server, both over
/// mTLS (each server sees the caller's SPIFFE ID). Then one deny rule in the mesh file is enforced by both
/// servers alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_clients_and_servers_meet_ours_over_mtls_and_both_servers_enforce_the_same_rule() {
    let dir = TempDir::new("xds-interop").unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ours = listener.local_addr().unwrap();
    let theirs = mesh_tests::peers::free_port().unwrap();
    let mesh = dir.0.join("mesh.yaml");
    let write = |policy: &str| {
        let service =
            |name: &str, addr: &str| format!("  {name}:\n    endpoints:\n      - {{ address: {addr} }}\n    mtls: strict\n{policy}");
        let text = format!("services:\n{}{}", service("ours", &ours.to_string()), service("theirs", &format!("127.0.0.1:{theirs}")));
        std::fs::write(&mesh, text).unwrap();
    };
    write("");
    let _cp = MeshControl::start(&mesh, &dir.0).unwrap();
    let path = dir.0.join("bootstrap-written.json");
    let client = xds_client::XdsClient::new(xds_client::Bootstrap::from_file(&path).unwrap(), xds_client::XdsClientConfig::default());
    let (_server, running) = EchoServer::start_xds(listener, mesh_tonic::Server::builder().xds(client)).unwrap();
    let _grpcio_server = mesh_tests::peers::python_xds_server(&path, theirs).unwrap();
    serving(&mut running.status(), Duration::from_secs(10)).await;

    let grpcio = grpcio_calls(&path, "ours", 3).await;
    assert_eq!(grpcio["by_response"][SERVER_ID], 3, "our server saw grpcio's SPIFFE ID over mTLS: {grpcio}");
    let summary = meshctl_calls(&path, "theirs", 3).await;
    assert_eq!(summary["by_response"][SERVER_ID], 3, "grpcio's server saw our client's SPIFFE ID over mTLS: {summary}");

    write(&format!("    authorization:\n      - {{ action: deny, from: [\"{SERVER_ID}\"] }}\n"));
    let start = Instant::now();
    loop {
        let (grpcio, summary) = (grpcio_calls(&path, "ours", 2).await, meshctl_calls(&path, "theirs", 2).await);
        // grpcio counts errors by "CODE: message"; meshctl by code.
        let grpcio_denied =
            grpcio["ok"] == 0 && grpcio["errors"].as_object().is_some_and(|e| e.keys().all(|k| k.starts_with("PERMISSION_DENIED")));
        if grpcio_denied && summary["ok"] == 0 && summary["by_code"]["PERMISSION_DENIED"] == 2 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "the deny rule is not enforced by both: ours {grpcio}, theirs {summary}");
    }
}

/// Without xDS, a server serves its local fallback listener from the start, and keeps serving it (its
/// connections are not drained for want of a control plane).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_xds_serves_its_fallback_listener() {
    use mesh_core::inbound::{FilterChain, FilterChainMatch, InboundHttp, InboundListener};
    use mesh_core::{Route, RouteAction, RouteConfig, RouteMatch, RouteSource, VirtualHost};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let route = Route { name: "all".into(), matcher: RouteMatch::any(), action: RouteAction::NonForwarding, policies: Default::default() };
    let table = RouteConfig {
        name: "local".into(),
        virtual_hosts: vec![VirtualHost { name: "all".into(), domains: vec!["*".into()], routes: vec![route] }],
    };
    let chain = FilterChain {
        name: "plain".into(),
        matcher: FilterChainMatch::default(),
        tls: None,
        http: InboundHttp::new(RouteSource::Inline(table)),
    };
    let fallback = InboundListener { name: "local".into(), address: addr, filter_chains: vec![chain], default_filter_chain: None };
    let (_server, running) = EchoServer::start_xds(listener, mesh_tonic::Server::builder().fallback(fallback)).unwrap();
    assert!(matches!(*running.status().borrow(), Serving::Serving(_)));
    let channel = plaintext(addr);
    for _ in 0..3 {
        assert_eq!(call(&channel).await.unwrap(), "plaintext");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
