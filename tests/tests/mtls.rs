//! mTLS with SPIFFE identities against a real TLS peer: tonic's own rustls server requiring client
//! certificates, called through our balancer with the mesh's mTLS connector.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use mesh_core::Endpoint;
use mesh_core::policy::TlsPolicy;
use mesh_tests::certs::SpiffeCa;
use mesh_tests::echo::EchoServer;
use mesh_tower::balance::{Balancer, BalancerConfig};
use mesh_tower::connect::{PeerIdentity, TcpConnector};
use mesh_tower::discover;
use mesh_tower::tls::{Credentials, HandshakeCounts, HandshakeFailure, MtlsAcceptor, MtlsConnector};
use rcgen::{BasicConstraints, IsCa, date_time_ymd};
use rustls::pki_types::pem::PemObject;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tower::ServiceExt;

const GREETER: &str = "spiffe://mesh.test/ns/default/sa/greeter";
const FRONTEND: &str = "spiffe://mesh.test/ns/default/sa/frontend";

/// A tonic server speaking mTLS as `GREETER`, trusting `ca`'s clients.
async fn greeter(ca: &SpiffeCa) -> EchoServer {
    let (cert, key) = ca.issue(GREETER).unwrap();
    let tls = ServerTlsConfig::new().identity(Identity::from_pem(cert, key)).client_ca_root(Certificate::from_pem(&ca.ca));
    EchoServer::start_tls(tls).await.unwrap()
}

/// A balancer to `server` over mTLS as `client` (issued by `issuer`, trusting `trust`), accepting `allowed`.
fn balancer(
    server: std::net::SocketAddr,
    issuer: &SpiffeCa,
    trust: &SpiffeCa,
    client: &str,
    allowed: &[&str],
) -> Balancer<http_body_util::Full<bytes::Bytes>, MtlsConnector> {
    let (cert, key) = issuer.issue(client).unwrap();
    let credentials = Credentials::from_pem(cert.as_bytes(), key.as_bytes(), trust.ca.as_bytes()).unwrap();
    assert_eq!(credentials.identity(), Some(&PeerIdentity(client.into())), "the workload's own identity is read from its leaf");
    balancer_with(server, credentials, allowed, &Arc::default())
}

/// A balancer to `server` over mTLS with `credentials`, accepting `allowed`, counting handshakes in `counts`.
fn balancer_with(
    server: std::net::SocketAddr,
    credentials: impl Into<mesh_tower::tls::CredentialsSource>,
    allowed: &[&str],
    counts: &Arc<HandshakeCounts>,
) -> Balancer<http_body_util::Full<bytes::Bytes>, MtlsConnector> {
    let tls =
        TlsPolicy { server_name: None, allowed_identities: allowed.iter().map(|s| (*s).to_owned()).collect(), ..TlsPolicy::default() };
    let config = BalancerConfig { tls: Some(tls), ready_timeout: Duration::from_secs(2), ..BalancerConfig::default() };
    let connector = MtlsConnector::new(TcpConnector::new(), Some(credentials.into())).with_counts(counts.clone());
    Balancer::with_connector("greeter", discover::fixed(vec![Endpoint::new(server)]), config, connector)
}

/// A plaintext balancer to `server`.
fn plaintext(server: std::net::SocketAddr) -> Balancer<http_body_util::Full<bytes::Bytes>, TcpConnector> {
    let config = BalancerConfig { ready_timeout: Duration::from_secs(2), ..BalancerConfig::default() };
    Balancer::new("greeter", discover::fixed(vec![Endpoint::new(server)]), config)
}

/// `meshctl call --n 3 --json` to `target`'s `method` over mTLS with `files` (certificate, key, bundle), expecting
/// the server to be `expect`.
async fn meshctl_mtls(target: &str, method: &str, files: [String; 3], expect: Option<&str>) -> (i32, String, String) {
    let mut args: Vec<String> = ["call", "--target", target, "--method", method, "--n", "3", "--json"].map(str::to_owned).into();
    for (flag, file) in ["--cert", "--key", "--ca"].into_iter().zip(files) {
        args.extend([flag.to_owned(), file]);
    }
    if let Some(id) = expect {
        args.extend(["--expect-identity".to_owned(), id.to_owned()]);
    }
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        mesh_tests::peers::meshctl(&args).unwrap()
    })
    .await
    .unwrap()
}

/// The error's text with its sources.
fn chain(error: &mesh_tower::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        text.push_str(&format!(": {e}"));
        source = e.source();
    }
    text
}

/// Waits up to 5 s for `counts` to hold a failure for `reason`.
async fn failed_for(counts: &HandshakeCounts, reason: HandshakeFailure) -> u64 {
    for _ in 0..100 {
        if counts.failed(reason) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    counts.failed(reason)
}

fn request() -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let message = bytes::Bytes::from_static(&[0, 0, 0, 0, 2, b'h', b'i']);
    http::Request::post("http://greeter/mesh.test.Echo/Hello")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Full::new(message))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_speaks_mtls_to_a_tonic_server_and_learns_its_spiffe_id() {
    let ca = SpiffeCa::new("mesh CA").unwrap();
    let server = greeter(&ca).await;
    let response = balancer(server.addr, &ca, &ca, FRONTEND, &[GREETER]).oneshot(request()).await.expect("an mTLS call");
    assert_eq!(response.extensions().get::<PeerIdentity>(), Some(&PeerIdentity(GREETER.into())), "the server's proven identity");
    let body = response.into_body().collect().await.unwrap();
    assert_eq!(body.trailers().and_then(|t| t.get("grpc-status")).map(|v| v.as_bytes()), Some(&b"0"[..]));
    assert_eq!(server.calls(), 1);

    // Any identity in the bundle, when the cluster lists none.
    balancer(server.addr, &ca, &ca, FRONTEND, &[]).oneshot(request()).await.expect("no identity to match");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wrong_server_identity_or_an_untrusted_chain_fails_the_handshake_with_the_reason() {
    let ca = SpiffeCa::new("mesh CA").unwrap();
    let server = greeter(&ca).await;
    let error =
        balancer(server.addr, &ca, &ca, FRONTEND, &["spiffe://mesh.test/ns/default/sa/billing"]).oneshot(request()).await.unwrap_err();
    let text = format!("{error}: {:?}", std::error::Error::source(&error));
    assert!(text.contains("is not one the cluster accepts") && text.contains(GREETER), "{text}");

    // A client that trusts another CA refuses the server; a server refuses a client from another CA.
    let other = SpiffeCa::new("another CA").unwrap();
    let error = balancer(server.addr, &ca, &other, FRONTEND, &[GREETER]).oneshot(request()).await.unwrap_err();
    let text = format!("{error}: {:?}", std::error::Error::source(&error));
    assert!(text.contains("TLS handshake") && text.contains("unknown issuer"), "{text}");
    let error = balancer(server.addr, &other, &ca, FRONTEND, &[GREETER]).oneshot(request()).await.unwrap_err();
    let text = format!("{error}: {:?}", std::error::Error::source(&error));
    // In TLS 1.3 the client finishes first; the server's refusal arrives on the connection: its alert, or the
    // connection closed under the request, whichever the client reads first.
    assert!(text.contains("fatal alert: UnknownCA") || text.contains("connection lost"), "the server refused the client: {text}");
    assert_eq!(server.calls(), 0, "no call reached the server");
}

/// A hyper server behind the mesh's acceptor: each request carries the caller's proven identity as an
/// extension, which this one answers with in a header.
async fn identity_echo(ca: &SpiffeCa) -> std::net::SocketAddr {
    let (cert, key) = ca.issue(GREETER).unwrap();
    let credentials = Credentials::from_pem(cert.as_bytes(), key.as_bytes(), ca.ca.as_bytes()).unwrap();
    let acceptor = mesh_tower::tls::MtlsAcceptor::new(credentials).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(io) = acceptor.accept(stream).await else { return };
                let peer = mesh_tower::connect::Connection::peer_identity(&io);
                let service = hyper::service::service_fn(move |mut request: http::Request<hyper::body::Incoming>| {
                    if let Some(peer) = peer.clone() {
                        request.extensions_mut().insert(peer);
                    }
                    async move {
                        let caller = request.extensions().get::<PeerIdentity>().map_or_else(String::new, |p| p.0.to_string());
                        let response = http::Response::builder()
                            .header("content-type", "application/grpc")
                            .header("grpc-status", "0")
                            .header("x-caller", caller)
                            .body(http_body_util::Empty::<bytes::Bytes>::new())
                            .unwrap();
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new()).serve_connection(io, service).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_acceptor_hands_the_callers_identity_to_the_handler_and_refuses_plaintext() {
    let ca = SpiffeCa::new("mesh CA").unwrap();
    let addr = identity_echo(&ca).await;
    let response = balancer(addr, &ca, &ca, FRONTEND, &[GREETER]).oneshot(request()).await.expect("an mTLS call");
    assert_eq!(response.headers()["x-caller"], FRONTEND, "the handler saw the caller's SPIFFE ID");
    assert_eq!(response.extensions().get::<PeerIdentity>(), Some(&PeerIdentity(GREETER.into())));

    // Plaintext HTTP/2 to the mTLS port is refused: strict.
    let plain = Balancer::new(
        "greeter",
        discover::fixed(vec![Endpoint::new(addr)]),
        BalancerConfig { ready_timeout: Duration::from_secs(2), ..BalancerConfig::default() },
    );
    let error = plain.oneshot(request()).await.expect_err("plaintext is refused");
    assert!(
        matches!(
            error,
            mesh_tower::Error::Upstream { .. }
                | mesh_tower::Error::AllEndpointsFailed { .. }
                | mesh_tower::Error::Handshake { .. }
                | mesh_tower::Error::NoReadyEndpoint { .. }
        ),
        "{error}"
    );
}

/// `meshctl call --cert --key --ca [--expect-identity]` speaks mTLS to any target and checks the server's
/// SPIFFE ID (the operator contract of issue 16).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshctl_call_speaks_mtls_with_cert_key_and_ca_and_checks_the_expected_identity() {
    let ca = SpiffeCa::new("mesh CA").unwrap();
    let server = greeter(&ca).await;
    let dir = mesh_tests::peers::TempDir::new("meshctl-mtls").unwrap();
    let (cert, key) = ca.issue(FRONTEND).unwrap();
    let files = [("cert.pem", cert), ("key.pem", key), ("ca.pem", ca.ca.clone())];
    for (name, pem) in &files {
        std::fs::write(dir.0.join(name), pem).unwrap();
    }
    let path = |name: &str| dir.0.join(name).display().to_string();
    let target = format!("static:///{}", server.addr);
    let files = || ["cert.pem", "key.pem", "ca.pem"].map(path);
    let call = |expect| meshctl_mtls(&target, "/mesh.test.Echo/Hello", files(), expect);
    let (code, stdout, stderr) = call(Some(GREETER)).await;
    assert_eq!(code, 0, "{stdout} {stderr}");
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(summary["ok"], 3, "{summary}");
    assert_eq!(server.calls(), 3);

    let (code, stdout, stderr) = call(Some("spiffe://mesh.test/ns/default/sa/billing")).await;
    assert_eq!(code, 1, "{stdout} {stderr}");
    assert!(format!("{stdout}{stderr}").contains("is not one the cluster accepts"), "{stdout} {stderr}");
    assert_eq!(server.calls(), 3, "no call reached a server whose identity is not the expected one");

    // A bad file is named.
    std::fs::write(dir.0.join("key.pem"), "not a key").unwrap();
    let (code, _, stderr) = call(None).await;
    assert_eq!(code, 2);
    assert!(stderr.contains("key.pem") && stderr.contains("key"), "{stderr}");
}

const BILLING: &str = "spiffe://mesh.test/ns/default/sa/billing";

/// Every certificate a server must not be trusted with fails our client's handshake with its reason in the
/// error and in the counts, and no call is ever sent in plaintext instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_server_certificate_fails_our_handshake_with_its_reason_and_is_counted() {
    let ca = SpiffeCa::new("mesh CA").unwrap();
    let other = SpiffeCa::new("another CA").unwrap();
    // (case, the server's certificate and key, the identities the cluster accepts, the reason, its words)
    type Case<'a> = (&'a str, (String, String), &'a [&'a str], HandshakeFailure, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            "expired",
            ca.issue_with(&[GREETER], |p| (p.not_before, p.not_after) = (date_time_ymd(2020, 1, 1), date_time_ymd(2020, 1, 2))).unwrap(),
            &[GREETER],
            HandshakeFailure::Expired,
            "expired",
        ),
        (
            "not yet valid",
            ca.issue_with(&[GREETER], |p| (p.not_before, p.not_after) = (date_time_ymd(2099, 1, 1), date_time_ymd(2100, 1, 1))).unwrap(),
            &[GREETER],
            HandshakeFailure::NotYetValid,
            "not valid yet",
        ),
        ("wrong SPIFFE ID", ca.issue(BILLING).unwrap(), &[GREETER], HandshakeFailure::WrongIdentity, "is not one the cluster accepts"),
        ("two URI SANs", ca.issue_with(&[GREETER, BILLING], |_| {}).unwrap(), &[], HandshakeFailure::BadIdentity, "2 URI SANs"),
        ("no SPIFFE ID", ca.issue_with(&[], |_| {}).unwrap(), &[], HandshakeFailure::BadIdentity, "no SPIFFE ID"),
        (
            "unknown trust domain",
            ca.issue("spiffe://other.test/ns/default/sa/greeter").unwrap(),
            &[],
            HandshakeFailure::UnknownTrustDomain,
            "trust domain we hold no bundle for",
        ),
        ("untrusted CA", other.issue(GREETER).unwrap(), &[GREETER], HandshakeFailure::UnknownCa, "unknown issuer"),
        (
            "CA flag on a leaf",
            ca.issue_with(&[GREETER], |p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)).unwrap(),
            &[GREETER],
            HandshakeFailure::CaAsLeaf,
            "a CA certificate presented",
        ),
    ];
    for (case, (cert, key), allowed, reason, text) in cases {
        let tls = ServerTlsConfig::new().identity(Identity::from_pem(cert, key)).client_ca_root(Certificate::from_pem(&ca.ca));
        let server = EchoServer::start_tls(tls).await.unwrap();
        let counts = Arc::new(HandshakeCounts::default());
        let error = balancer_with(server.addr, ca.credentials(FRONTEND).unwrap(), allowed, &counts).oneshot(request()).await.unwrap_err();
        let error = chain(&error);
        assert!(error.contains(text) && error.contains(&format!("({})", reason.name())), "{case}: {error}");
        assert!(counts.failed(reason) >= 1, "{case}: counted as {}: {:?}", reason.name(), counts.failures());
        assert_eq!(counts.succeeded(), 0, "{case}");
        assert_eq!(server.calls(), 0, "{case}: nothing was served, in TLS or plaintext");
    }

    // A federated trust domain's bundle (SPIFFE bundle maps): the same certificate is trusted once its domain's
    // bundle is held.
    let federated = SpiffeCa::new("other.test CA").unwrap();
    let (cert, key) = federated.issue("spiffe://other.test/ns/default/sa/greeter").unwrap();
    let tls = ServerTlsConfig::new().identity(Identity::from_pem(cert, key)).client_ca_root(Certificate::from_pem(&ca.ca));
    let server = EchoServer::start_tls(tls).await.unwrap();
    let credentials = ca.credentials(FRONTEND).unwrap();
    let counts = Arc::new(HandshakeCounts::default());
    let error = balancer_with(server.addr, credentials, &[], &counts).oneshot(request()).await.unwrap_err();
    assert!(chain(&error).contains("unknown_trust_domain"), "{}", chain(&error));
    let credentials = ca.credentials(FRONTEND).unwrap().with_bundle("other.test", federated.ca.as_bytes()).unwrap();
    balancer_with(server.addr, credentials, &[], &counts).oneshot(request()).await.expect("trusted through the other.test bundle");
    assert_eq!((counts.succeeded(), server.calls()), (1, 1));
}

/// A SPIFFE trust bundle map as gRPC A87 reads it: `{"trust_domains": {domain: {"keys": [{"x5c": [DER]}]}}}`,
/// each domain's one root as the PEM's base64 body, plus a JWT key that is skipped.
fn bundle_map(domains: &[(&str, &SpiffeCa)]) -> String {
    let keys = |ca: &SpiffeCa| {
        let der: String = ca.ca.lines().filter(|l| !l.starts_with("-----")).collect();
        serde_json::json!({ "keys": [
            { "kty": "EC", "use": "x509-svid", "x5c": [der] },
            { "kty": "EC", "use": "jwt-svid", "kid": "jwt" },
        ], "spiffe_sequence": 1 })
    };
    let domains: serde_json::Map<String, serde_json::Value> = domains.iter().map(|(d, ca)| ((*d).to_owned(), keys(ca))).collect();
    serde_json::json!({ "trust_domains": domains }).to_string()
}

/// A87 and gRPC's `file_watcher` without a CA file: an instance whose trust is a SPIFFE bundle map verifies each
/// peer by the roots of the peer's own trust domain and refuses a domain the map lacks (its CA file, also given,
/// is ignored); a CA-only instance gives the roots for a cluster whose identity comes from another instance,
/// and cannot be an identity itself; a malformed map is refused naming the domain and key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spiffe_bundle_map_trusts_each_domain_by_its_own_roots_and_a_ca_only_instance_gives_roots() {
    use mesh_tower::tls::{FileWatcher, MakeMtls};
    let (ca, federated, stranger) =
        (SpiffeCa::new("mesh CA").unwrap(), SpiffeCa::new("other.test CA").unwrap(), SpiffeCa::new("third CA").unwrap());
    let dir = mesh_tests::peers::TempDir::new("bundle-map").unwrap();
    let file = |name: &str, text: &str| {
        let path = dir.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let (cert, key) = ca.issue(FRONTEND).unwrap();
    let (cert, key) = (file("cert.pem", &cert), file("key.pem", &key));
    let map = file("map.json", &bundle_map(&[("mesh.test", &ca), ("other.test", &federated)]));
    let watcher = |ca_file: Option<std::path::PathBuf>, map: Option<std::path::PathBuf>, identity: bool| FileWatcher {
        certificate_file: identity.then(|| cert.clone()),
        private_key_file: identity.then(|| key.clone()),
        ca_certificate_file: ca_file,
        spiffe_trust_bundle_map_file: map,
        refresh_interval: Duration::from_secs(60),
    };
    let server = |issuer: &SpiffeCa, id: &str| {
        let (cert, key) = issuer.issue(id).unwrap();
        let tls = ServerTlsConfig::new().identity(Identity::from_pem(cert, key)).client_ca_root(Certificate::from_pem(&ca.ca));
        EchoServer::start_tls(tls)
    };
    let ours = server(&ca, GREETER).await.unwrap();
    let theirs = server(&federated, "spiffe://other.test/ns/default/sa/greeter").await.unwrap();
    let unknown = server(&stranger, "spiffe://third.test/ns/default/sa/greeter").await.unwrap();

    // Identity and bundle map in one instance; the stranger's CA file beside the map is ignored.
    let mapped = watcher(Some(file("stranger.pem", &stranger.ca)), Some(map.clone()), true).start().unwrap();
    let counts = Arc::new(HandshakeCounts::default());
    for trusted in [&ours, &theirs] {
        balancer_with(trusted.addr, mapped.clone(), &[], &counts)
            .oneshot(request())
            .await
            .expect("trusted by its domain's roots in the map");
    }
    let error = balancer_with(unknown.addr, mapped.clone(), &[], &counts).oneshot(request()).await.unwrap_err();
    assert!(chain(&error).contains("unknown_trust_domain"), "a domain the map lacks is refused: {}", chain(&error));
    assert_eq!((counts.succeeded(), ours.calls(), theirs.calls(), unknown.calls()), (2, 1, 1, 0));

    // A CA-only instance as the cluster's roots, the identity from an identity-only instance (A29's two names).
    let providers = std::collections::BTreeMap::from([
        ("identity".to_owned(), watcher(None, None, true).start().unwrap()),
        ("roots".to_owned(), watcher(Some(file("ca.pem", &ca.ca)), None, false).start().unwrap()),
    ]);
    let make = MakeMtls::new(None).with_providers(providers);
    let cluster = |identity: &str| {
        let tls = TlsPolicy {
            certificate_provider: Some(identity.to_owned()),
            ca_certificate_provider: Some("roots".to_owned()),
            allowed_identities: vec![GREETER.to_owned()],
            ..TlsPolicy::default()
        };
        let balancer = BalancerConfig { tls: Some(tls), ready_timeout: Duration::from_secs(2), ..BalancerConfig::default() };
        let target = mesh_tower::cluster::ClusterTarget {
            name: "greeter".into(),
            balancer: balancer.clone(),
            source: mesh_tower::cluster::Source::Static(vec![Endpoint::new(ours.addr)]),
            breakers: Default::default(),
            adaptive: None,
        };
        let connector = mesh_tower::cluster::MakeConnect::make_connect(&make, &target);
        Balancer::with_connector("greeter", discover::fixed(vec![Endpoint::new(ours.addr)]), balancer, connector)
    };
    cluster("identity").oneshot(request()).await.expect("identity from one instance, roots from the CA-only one");
    assert_eq!(ours.calls(), 2);
    let error = cluster("roots").oneshot(request()).await.unwrap_err();
    assert!(chain(&error).contains("no certificate and key of its own"), "a CA-only instance is no identity: {}", chain(&error));

    // Malformed maps fail the instance with the domain and the key named.
    let bad = [
        (
            r#"{"trust_domains": {"mesh.test": {"keys": [{"kty": "EC", "use": "x509-svid", "x5c": ["not base64!"]}]}}}"#,
            "mesh.test: keys[0]",
        ),
        (r#"{"trust_domains": {"mesh.test": {"keys": [{"use": "x509-svid", "x5c": []}]}}}"#, "no \"kty\""),
        (r#"{"domains": {}}"#, "trust_domains"),
    ];
    for (text, named) in bad {
        let error = watcher(None, Some(file("bad.json", text)), true).start().unwrap_err().to_string();
        assert!(error.contains("bad.json") && error.contains(named), "{text}: {error}");
    }
}

/// Our acceptor refuses, with the reason counted: a client certificate from another CA or expired, no client
/// certificate (openssl s_client), plaintext, and a TLS 1.2-only client (openssl s_client -tls1_2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_acceptor_refuses_bad_or_missing_client_certificates_plaintext_and_tls12_with_the_reason_counted() {
    let ca = SpiffeCa::new("mesh CA").unwrap();
    let acceptor = MtlsAcceptor::new(ca.credentials(GREETER).unwrap()).unwrap();
    let counts = acceptor.counts().clone();
    let server = EchoServer::start_mesh(acceptor).await.unwrap();

    // A good client is served, and the handler sees who it is.
    let response = balancer(server.addr, &ca, &ca, FRONTEND, &[GREETER]).oneshot(request()).await.expect("an mTLS call");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(body.ends_with(FRONTEND.as_bytes()), "the server saw the caller's ID: {body:?}");
    assert_eq!(counts.succeeded(), 1);

    let other = SpiffeCa::new("another CA").unwrap();
    balancer(server.addr, &other, &ca, FRONTEND, &[GREETER]).oneshot(request()).await.unwrap_err();
    assert!(failed_for(&counts, HandshakeFailure::UnknownCa).await >= 1, "{:?}", counts.failures());
    let (cert, key) =
        ca.issue_with(&[FRONTEND], |p| (p.not_before, p.not_after) = (date_time_ymd(2020, 1, 1), date_time_ymd(2020, 1, 2))).unwrap();
    let expired = Credentials::from_pem(cert.as_bytes(), key.as_bytes(), ca.ca.as_bytes()).unwrap();
    balancer_with(server.addr, expired, &[GREETER], &Arc::default()).oneshot(request()).await.unwrap_err();
    assert!(failed_for(&counts, HandshakeFailure::Expired).await >= 1, "{:?}", counts.failures());

    let error = plaintext(server.addr).oneshot(request()).await.expect_err("plaintext is refused");
    assert!(failed_for(&counts, HandshakeFailure::Plaintext).await >= 1, "{error}: {:?}", counts.failures());

    // openssl as the client: without a certificate, then TLS 1.2 only.
    let connect = server.addr.to_string();
    let s_client = |extra: &[&str]| {
        let mut command = std::process::Command::new("openssl");
        command.args(["s_client", "-connect", &connect, "-alpn", "h2"]).args(extra).stdin(std::process::Stdio::null());
        let out = command.output().expect("openssl (Debian package openssl) runs");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    let said = s_client(&["-tls1_3"]);
    assert!(failed_for(&counts, HandshakeFailure::NoClientCertificate).await >= 1, "{said}: {:?}", counts.failures());
    let said = s_client(&["-tls1_2"]);
    assert!(failed_for(&counts, HandshakeFailure::ProtocolVersion).await >= 1, "{said}: {:?}", counts.failures());
    assert_eq!(server.calls(), 1, "only the good client was served");
    assert_eq!(counts.succeeded(), 1);
}

/// A TLS 1.2-only server (openssl s_server -tls1_2) fails our handshake: we require 1.3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls12_only_server_fails_our_handshake_as_protocol_version() {
    use std::io::BufRead;
    let ca = SpiffeCa::new("mesh CA").unwrap();
    let dir = mesh_tests::peers::TempDir::new("tls12").unwrap();
    let (cert, key) = ca.issue(GREETER).unwrap();
    std::fs::write(dir.0.join("cert.pem"), cert).unwrap();
    std::fs::write(dir.0.join("key.pem"), key).unwrap();
    std::fs::write(dir.0.join("ca.pem"), &ca.ca).unwrap();
    let port = mesh_tests::peers::free_port().unwrap().to_string();
    let mut child = std::process::Command::new("openssl")
        .args(["s_server", "-accept", &format!("127.0.0.1:{port}"), "-tls1_2", "-alpn", "h2", "-Verify", "1"])
        .args(["-cert", "cert.pem", "-key", "key.pem", "-CAfile", "ca.pem"])
        .current_dir(&dir.0)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("openssl (Debian package openssl) runs");
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(lines.by_ref().map_while(Result::ok).any(|line| line.starts_with("ACCEPT")), "openssl s_server started");
    let counts = Arc::new(HandshakeCounts::default());
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let error = balancer_with(addr, ca.credentials(FRONTEND).unwrap(), &[GREETER], &counts).oneshot(request()).await.unwrap_err();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(counts.failed(HandshakeFailure::ProtocolVersion), 1, "{}: {:?}", chain(&error), counts.failures());
    assert!(chain(&error).contains("protocol_version"), "{}", chain(&error));
}

/// Permissive mode: one port serves mTLS callers (with their identity) and plaintext callers (with none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permissive_acceptor_serves_mtls_and_plaintext_on_one_port_told_apart_by_the_first_byte() {
    let ca = SpiffeCa::new("mesh CA").unwrap();
    let acceptor = MtlsAcceptor::new(ca.credentials(GREETER).unwrap()).unwrap().permissive();
    let server = EchoServer::start_mesh(acceptor).await.unwrap();
    let body = |response: http::Response<_>| async move {
        let body: bytes::Bytes = http_body_util::BodyExt::collect(response.into_body()).await.unwrap().to_bytes();
        String::from_utf8_lossy(&body[5..]).into_owned()
    };
    let tls = balancer(server.addr, &ca, &ca, FRONTEND, &[GREETER]).oneshot(request()).await.expect("an mTLS call");
    assert_eq!(body(tls).await, FRONTEND);
    let plain = plaintext(server.addr).oneshot(request()).await.expect("a plaintext call");
    assert_eq!(body(plain).await, "plaintext");
    assert_eq!(server.calls(), 2);
}

/// `meshctl call` over mTLS against a grpcio server requiring client certificates, all made by openssl; and
/// the same server refused when its identity differs from `--expect-identity` (one line naming the reason,
/// exit 1, the calls UNAVAILABLE and the failure counted in the JSON).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshctl_call_speaks_mtls_to_a_grpcio_server_with_openssl_certificates_and_refuses_a_wrong_identity() {
    let dir = mesh_tests::peers::TempDir::new("openssl-pki").unwrap();
    mesh_tests::certs::openssl_pki(&dir.0, &[("server", GREETER), ("client", FRONTEND)]).unwrap();
    let path = |name: &str| dir.0.join(name).display().to_string();
    let server = mesh_tests::peers::python_grpc_server_tls(&path("server.pem"), &path("server-key.pem"), &path("ca.pem")).unwrap();
    let target = format!("static:///{}", server.addr);
    let files = || ["client.pem", "client-key.pem", "ca.pem"].map(path);
    let call = |expect| meshctl_mtls(&target, "/any.Service/Call", files(), Some(expect));
    let (code, stdout, stderr) = call(GREETER).await;
    assert_eq!(code, 0, "{stdout} {stderr}");
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(summary["ok"], 3, "{summary}");
    assert_eq!(summary["by_response"][format!("py:{}", server.addr.port())], 3, "{summary}");

    let (code, stdout, stderr) = call(BILLING).await;
    assert_eq!(code, 1, "{stdout} {stderr}");
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(summary["by_code"]["UNAVAILABLE"], 3, "{summary}");
    assert!(summary["tls_handshake_failures"]["wrong_identity"].as_u64() >= Some(1), "{summary}");
    // Besides the library's warnings (tracing), meshctl's own report is one line.
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("meshctl:") && l.contains("TLS handshake")).collect();
    assert_eq!(lines.len(), 1, "one line names the reason: {stderr}");
    assert!(lines[0].contains("wrong_identity") && lines[0].contains(GREETER), "{stderr}");
}

/// A grpcio client and a grpcio server, with certificates `meshctl ca issue` wrote, talk mTLS to ours both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_clients_and_servers_with_files_our_ca_wrote_talk_mtls_to_ours_both_ways() {
    let dir = mesh_tests::peers::TempDir::new("mesh-ca").unwrap();
    let ca_dir = dir.0.join("ca").display().to_string();
    for (name, id) in [("server", GREETER), ("client", FRONTEND)] {
        let out = dir.0.join(name).display().to_string();
        let args = ["ca", "issue", "--identity", id, "--out", &out, "--ca-dir", &ca_dir, "--dns", "localhost", "--lifetime", "1h"];
        let (code, stdout, stderr) = mesh_tests::peers::meshctl(&args).unwrap();
        assert_eq!(code, 0, "{stdout} {stderr}");
        assert!(stdout.contains(id) && stdout.contains("valid 3600 s"), "{stdout}");
    }
    let file = |who: &str, name: &str| dir.0.join(who).join(name).display().to_string();

    // Our client → a grpcio server.
    let py = mesh_tests::peers::python_grpc_server_tls(&file("server", "cert.pem"), &file("server", "key.pem"), &file("server", "ca.pem"))
        .unwrap();
    let files = ["cert.pem", "key.pem", "ca.pem"].map(|name| file("client", name));
    let (code, stdout, stderr) = meshctl_mtls(&format!("static:///{}", py.addr), "/any.Service/Call", files, Some(GREETER)).await;
    assert_eq!(code, 0, "{stdout} {stderr}");

    // A grpcio client → our acceptor, which sees the client's SPIFFE ID.
    let read = |who: &str, name: &str| std::fs::read(dir.0.join(who).join(name)).unwrap();
    let credentials = Credentials::from_pem(&read("server", "cert.pem"), &read("server", "key.pem"), &read("server", "ca.pem")).unwrap();
    let server = EchoServer::start_mesh(MtlsAcceptor::new(credentials).unwrap()).await.unwrap();
    let client = std::process::Command::new(mesh_tests::peers::python().unwrap())
        .arg(mesh_tests::peers::workspace_root().join("tests/peers/py_tls_client.py"))
        .args([&server.addr.to_string(), "/mesh.test.Echo/Hello", "3"])
        .args([file("client", "cert.pem"), file("client", "key.pem"), file("client", "ca.pem")])
        .arg("localhost")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&client.stdout);
    let summary: serde_json::Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout} {}", String::from_utf8_lossy(&client.stderr)));
    assert_eq!(summary["ok"], 3, "{summary}");
    assert_eq!(summary["replies"][FRONTEND], 3, "our server saw the grpcio client's identity: {summary}");
}

/// Calls through `channel` from `concurrency` workers for `duration`: how many succeeded, and each failure.
async fn load_for(channel: &mesh_tonic::Channel, duration: Duration, concurrency: usize) -> (u64, Vec<String>) {
    let until = tokio::time::Instant::now() + duration;
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let mut grpc = tonic::client::Grpc::new(channel.clone());
            tokio::spawn(async move {
                let (mut ok, mut failures) = (0, Vec::new());
                while tokio::time::Instant::now() < until {
                    let call = async {
                        grpc.ready().await?;
                        let request = tonic::Request::new(bytes::Bytes::from_static(b"hi"));
                        let path = http::uri::PathAndQuery::from_static(mesh_tests::echo::METHOD);
                        grpc.unary(request, path, mesh_tonic::codec::BytesCodec).await
                    };
                    match call.await {
                        Ok(_) => ok += 1,
                        Err(status) => failures.push(format!("{:?}: {}", status.code(), status.message())),
                    }
                }
                (ok, failures)
            })
        })
        .collect();
    let (mut ok, mut failures) = (0, Vec::new());
    for worker in workers {
        let (n, f) = worker.await.unwrap();
        ok += n;
        failures.extend(f);
    }
    (ok, failures)
}

/// No call failed: else how many did, and the first few reasons.
fn assert_none_failed(ok: u64, failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} of {} calls failed: {:?}",
        failures.len(),
        ok + failures.len() as u64,
        &failures[..failures.len().min(5)]
    );
}

/// A workload's files, as `meshctl ca issue` writes them, watched by a [`FileWatcher`] every 250 ms.
fn watched(dir: &std::path::Path) -> mesh_tower::tls::CredentialsSource {
    let watcher = mesh_tower::tls::FileWatcher {
        certificate_file: Some(dir.join("cert.pem")),
        private_key_file: Some(dir.join("key.pem")),
        ca_certificate_file: Some(dir.join("ca.pem")),
        spiffe_trust_bundle_map_file: None,
        refresh_interval: Duration::from_millis(250),
    };
    watcher.start().unwrap()
}

/// Counts the changes a source sees.
fn count_changes(mut source: mesh_tower::tls::CredentialsSource) -> Arc<std::sync::atomic::AtomicU64> {
    let changes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = changes.clone();
    tokio::spawn(async move {
        while source.changed().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    changes
}

/// Our channel to a server behind our acceptor, both with credentials from watched files; the server closes
/// every connection after a second, so handshakes keep happening with whatever the files hold.
async fn watched_pair(
    server_dir: &std::path::Path,
    client_dir: &std::path::Path,
) -> (EchoServer, mesh_tonic::Channel, Arc<HandshakeCounts>) {
    let acceptor = MtlsAcceptor::new(watched(server_dir)).unwrap();
    let accepted = acceptor.counts().clone();
    let server = EchoServer::start_mesh_aged(acceptor, Some(Duration::from_secs(1))).await.unwrap();
    let policy = TlsPolicy { server_name: None, allowed_identities: vec![GREETER.to_owned()], ..TlsPolicy::default() };
    let channel = mesh_tonic::Channel::builder(format!("static:///{}", server.addr)).mtls(watched(client_dir), policy).build().unwrap();
    (server, channel, accepted)
}

/// Certificates living 4 s, renewed at half life by rewriting the files, rotate through a 60-second run under
/// load with no failed call: every handshake (one a second at least, as the server ages connections out)
/// takes the current files, and connections made keep going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_living_seconds_rotate_through_a_minute_under_load_with_no_failed_call() {
    let dir = mesh_tests::peers::TempDir::new("rotation").unwrap();
    let ca = mesh_control::ca::Ca::generate("mesh.test").unwrap();
    let lifetime = Duration::from_secs(4);
    let (server_dir, client_dir) = (dir.0.join("server"), dir.0.join("client"));
    let issue = move |server_dir: &std::path::Path, client_dir: &std::path::Path| {
        for (dir, id) in [(server_dir, GREETER), (client_dir, FRONTEND)] {
            ca.issue(id, &[], lifetime, std::time::SystemTime::now()).unwrap().write_to(dir).unwrap();
        }
    };
    issue(&server_dir, &client_dir);
    let (server, channel, accepted) = watched_pair(&server_dir, &client_dir).await;
    let server_changes = count_changes(watched(&server_dir));
    let rotating = tokio::spawn(async move {
        let mut interval = tokio::time::interval(lifetime / 2);
        interval.tick().await;
        loop {
            interval.tick().await;
            issue(&server_dir, &client_dir);
        }
    });
    let (ok, failures) = load_for(&channel, Duration::from_secs(60), 4).await;
    rotating.abort();
    assert_none_failed(ok, &failures);
    assert!(ok > 1000, "calls went through: {ok}");
    let changes = server_changes.load(std::sync::atomic::Ordering::Relaxed);
    assert!(changes >= 20, "the server's files changed every 2 s and were reloaded: {changes}");
    assert!(accepted.succeeded() >= 30, "connections were made anew all along: {}", accepted.succeeded());
    assert_eq!(accepted.failures(), [], "no handshake failed");
    assert_eq!(channel.handshake_counts().failures(), [], "no handshake failed");
    assert_eq!(server.calls(), ok);
}

/// A root rotation with an overlap: both sides trust old and new roots, the server then the client move to
/// certificates from the new root, the old root is dropped; no call fails, and a certificate from the old
/// root is refused at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_rotation_with_an_overlap_fails_no_call() {
    let dir = mesh_tests::peers::TempDir::new("root-rotation").unwrap();
    let old = mesh_control::ca::Ca::generate("mesh.test").unwrap();
    let new = mesh_control::ca::Ca::generate("mesh.test").unwrap();
    let both = format!("{}{}", old.bundle(), new.bundle());
    let write = |who: &str, ca: &mesh_control::ca::Ca, id: &str, bundle: &str| {
        let mut issued = ca.issue(id, &[], Duration::from_secs(3600), std::time::SystemTime::now()).unwrap();
        issued.bundle = bundle.to_owned();
        issued.write_to(&dir.0.join(who)).unwrap();
    };
    write("server", &old, GREETER, old.bundle());
    write("client", &old, FRONTEND, old.bundle());
    let (server, channel, accepted) = watched_pair(&dir.0.join("server"), &dir.0.join("client")).await;
    let load = {
        let channel = channel.clone();
        tokio::spawn(async move { load_for(&channel, Duration::from_secs(20), 4).await })
    };
    let phase = Duration::from_secs(4);
    tokio::time::sleep(phase).await;
    // The overlap: everyone trusts both roots.
    write("server", &old, GREETER, &both);
    write("client", &old, FRONTEND, &both);
    tokio::time::sleep(phase).await;
    write("server", &new, GREETER, &both);
    tokio::time::sleep(phase).await;
    write("client", &new, FRONTEND, &both);
    tokio::time::sleep(phase).await;
    // The old root is gone.
    write("server", &new, GREETER, new.bundle());
    write("client", &new, FRONTEND, new.bundle());
    let (ok, failures) = load.await.unwrap();
    assert_none_failed(ok, &failures);
    assert!(ok > 500, "{ok}");
    assert_eq!(accepted.failures(), []);
    assert!(accepted.succeeded() >= 15, "{}", accepted.succeeded());

    // A client still holding a certificate from the old root is now refused.
    let (cert, key) = {
        let issued = old.issue(FRONTEND, &[], Duration::from_secs(3600), std::time::SystemTime::now()).unwrap();
        (issued.chain, issued.key.unwrap())
    };
    let stale = Credentials::from_pem(cert.as_bytes(), key.as_bytes(), both.as_bytes()).unwrap();
    balancer_with(server.addr, stale, &[GREETER], &Arc::default()).oneshot(request()).await.unwrap_err();
    assert!(failed_for(&accepted, HandshakeFailure::UnknownCa).await >= 1, "{:?}", accepted.failures());
}

/// A strict service works out of the box: the bootstrap mesh-control writes names a certificate provider holding
/// a certificate from its CA (renewed at half life), the service's clusters reference that provider, and our
/// `xds:///` client speaks mTLS to a server whose certificate `meshctl ca issue` made from the same CA. With a
/// bootstrap that lacks the provider, the calls fail with that reason and nothing goes out in plaintext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_service_is_reached_over_mtls_with_the_certificate_provider_mesh_controls_bootstrap_names() {
    let dir = mesh_tests::peers::TempDir::new("strict").unwrap();
    let (ca_dir, greeter_dir) = (dir.0.join("ca").display().to_string(), dir.0.join("greeter"));
    let greeter = "spiffe://mesh.local/ns/default/sa/greeter";
    let args = ["ca", "issue", "--identity", greeter, "--out", greeter_dir.to_str().unwrap(), "--ca-dir", &ca_dir];
    let (code, stdout, stderr) = mesh_tests::peers::meshctl(&args).unwrap();
    assert_eq!(code, 0, "{stdout} {stderr}");
    let server = EchoServer::start_mesh(MtlsAcceptor::new(watched(&greeter_dir)).unwrap()).await.unwrap();
    let mesh = dir.0.join("mesh.yaml");
    std::fs::write(&mesh, format!("services:\n  greeter:\n    endpoints:\n      - {{ address: {} }}\n    mtls: strict\n", server.addr))
        .unwrap();
    let cp = mesh_tests::peers::MeshControl::start(&mesh, &dir.0).unwrap();

    let summary =
        mesh_tests::peers::meshctl_xds_call(&dir.0.join("bootstrap-written.json"), "xds:///greeter", mesh_tests::echo::METHOD, 5).await;
    assert_eq!(
        summary["by_response"]["spiffe://mesh.local/ns/default/sa/mesh-client"], 5,
        "the server saw the bootstrap's identity: {summary}"
    );

    let (_plain_dir, plain) = mesh_tests::peers::write_bootstrap(cp.xds, &["xds_v3"]).unwrap();
    let plain = plain.display().to_string();
    let (code, stdout, stderr) = tokio::task::spawn_blocking(move || {
        let args =
            ["call", "--target", "xds:///greeter", "--method", mesh_tests::echo::METHOD, "--n", "2", "--timeout-ms", "3000", "--json"];
        mesh_tests::peers::meshctl_with_env(&args, &[("GRPC_XDS_BOOTSTRAP", &plain)]).unwrap()
    })
    .await
    .unwrap();
    assert_eq!(code, 1, "{stdout} {stderr}");
    assert!(stderr.contains("certificate provider instance \"default\""), "{stderr}");
    assert_eq!(server.calls(), 5, "nothing reached the server without mTLS");
}

/// A real Envoy with mTLS, its certificate and roots from our CA over SDS from mesh-control: our client calls it
/// over mTLS (and learns Envoy's SPIFFE ID), and it calls a server behind our strict acceptor over mTLS (which
/// sees Envoy's SPIFFE ID). A plaintext caller is refused by Envoy's strict listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_with_sds_certificates_from_our_ca_is_called_by_our_client_and_calls_our_acceptor_over_mtls() {
    let dir = mesh_tests::peers::TempDir::new("envoy-sds").unwrap();
    let ca_dir = dir.0.join("ca").display().to_string();
    let issue = |id: &str, who: &str| {
        let out = dir.0.join(who).display().to_string();
        let (code, stdout, stderr) =
            mesh_tests::peers::meshctl(&["ca", "issue", "--identity", id, "--out", &out, "--ca-dir", &ca_dir]).unwrap();
        assert_eq!(code, 0, "{stdout} {stderr}");
    };
    issue("spiffe://mesh.local/ns/default/sa/greeter", "greeter");
    issue(FRONTEND.replace("mesh.test", "mesh.local").as_str(), "frontend");
    let server = EchoServer::start_mesh(MtlsAcceptor::new(watched(&dir.0.join("greeter"))).unwrap()).await.unwrap();
    let port = mesh_tests::peers::free_port().unwrap();
    let mesh = dir.0.join("mesh.yaml");
    let text = format!(
        "services:\n  greeter:\n    endpoints:\n      - {{ address: {} }}\n    mtls: strict\n    sidecar: {{ port: {port} }}\n",
        server.addr
    );
    std::fs::write(&mesh, text).unwrap();
    let cp = mesh_tests::peers::MeshControl::start(&mesh, &dir.0).unwrap();
    let mut envoy = mesh_tests::peers::Envoy::start(cp.xds, false, "envoy-sds").unwrap();
    envoy.wait_for_listener(port, Duration::from_secs(15)).unwrap();

    let envoy_id = "spiffe://mesh.local/ns/default/sa/mesh-sidecar";
    let read = |name: &str| std::fs::read(dir.0.join("frontend").join(name)).unwrap();
    let counts = Arc::new(HandshakeCounts::default());
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut last = None;
    // Envoy opens its listener once its secrets arrived; give the first call a few tries.
    for _ in 0..20 {
        match balancer_with(
            addr,
            Credentials::from_pem(&read("cert.pem"), &read("key.pem"), &read("ca.pem")).unwrap(),
            &[envoy_id],
            &counts,
        )
        .oneshot(request())
        .await
        {
            Ok(response) => {
                last = Some(Ok(response));
                break;
            }
            Err(error) => last = Some(Err(chain(&error))),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let response = match last {
        Some(Ok(response)) => response,
        other => panic!("no call through Envoy: {other:?}; envoy clusters: {}", envoy.admin_get("/clusters").unwrap_or_default()),
    };
    assert_eq!(
        response.extensions().get::<PeerIdentity>(),
        Some(&PeerIdentity(envoy_id.into())),
        "our client verified Envoy's SDS certificate"
    );
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(body.ends_with(envoy_id.as_bytes()), "our acceptor saw Envoy's identity: {body:?}");
    assert!(server.calls() >= 1);

    // Envoy's listener is strict: a plaintext caller is not served.
    let calls = server.calls();
    plaintext(addr).oneshot(request()).await.expect_err("Envoy refuses plaintext");
    assert_eq!(server.calls(), calls);
}

/// Renewal over the Istio-shaped CSR API: `meshctl ca renew` presents the current certificate over mTLS and gets
/// a new one for the identity it proves, with a key that never left the workload; the renewed files serve an
/// mTLS call. A certificate from another CA is refused at the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshctl_ca_renew_gets_a_new_certificate_for_the_identity_the_current_one_proves() {
    let dir = mesh_tests::peers::TempDir::new("renew").unwrap();
    let ca_dir = dir.0.join("ca");
    let workload = dir.0.join("workload");
    let id = "spiffe://mesh.local/ns/default/sa/frontend";
    let (ca_path, out) = (ca_dir.display().to_string(), workload.display().to_string());
    let (code, stdout, stderr) =
        mesh_tests::peers::meshctl(&["ca", "issue", "--identity", id, "--out", &out, "--ca-dir", &ca_path, "--lifetime", "30s"]).unwrap();
    assert_eq!(code, 0, "{stdout} {stderr}");
    let ca = Arc::new(mesh_control::ca::Ca::open_or_generate(&ca_dir, "mesh.local").unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let service = listener.local_addr().unwrap().to_string();
    tokio::spawn(mesh_control::certificates::CertificateService::new(ca.clone()).serve(listener));

    let before = std::fs::read_to_string(workload.join("cert.pem")).unwrap();
    let key_before = std::fs::read_to_string(workload.join("key.pem")).unwrap();
    let renew = |dir: String| {
        let service = service.clone();
        tokio::task::spawn_blocking(move || {
            mesh_tests::peers::meshctl(&["ca", "renew", "--dir", &dir, "--ca-addr", &service, "--lifetime", "1h"]).unwrap()
        })
    };
    let (code, stdout, stderr) = renew(out.clone()).await.unwrap();
    assert_eq!(code, 0, "{stdout} {stderr}");
    assert!(stdout.contains(id), "{stdout}");
    let after = std::fs::read_to_string(workload.join("cert.pem")).unwrap();
    assert_ne!(before, after, "a new certificate");
    assert_ne!(key_before, std::fs::read_to_string(workload.join("key.pem")).unwrap(), "a new key");
    let leaf = rustls::pki_types::CertificateDer::from_pem_slice(after.as_bytes()).unwrap();
    assert_eq!(mesh_tower::tls::spiffe_id(&leaf).map(|i| i.to_string()).as_deref(), Some(id), "the identity the old one proved");
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).unwrap();
    let lifetime = parsed.validity().not_after.timestamp() - parsed.validity().not_before.timestamp();
    assert_eq!(lifetime, 3600 + 60, "the lifetime asked for");

    // The renewed files work: an mTLS call to a server holding a certificate of the same CA.
    let server_id = "spiffe://mesh.local/ns/default/sa/greeter";
    let issued = ca.issue(server_id, &[], Duration::from_secs(3600), std::time::SystemTime::now()).unwrap();
    let server_credentials =
        Credentials::from_pem(issued.chain.as_bytes(), issued.key.unwrap().as_bytes(), issued.bundle.as_bytes()).unwrap();
    let server = EchoServer::start_mesh(MtlsAcceptor::new(server_credentials).unwrap()).await.unwrap();
    let read = |name: &str| std::fs::read(workload.join(name)).unwrap();
    let renewed = Credentials::from_pem(&read("cert.pem"), &read("key.pem"), &read("ca.pem")).unwrap();
    let response = balancer_with(server.addr, renewed, &[server_id], &Arc::default()).oneshot(request()).await.expect("an mTLS call");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(body.ends_with(id.as_bytes()), "{body:?}");

    // A certificate from another CA does not get one.
    let stranger = dir.0.join("stranger");
    let other_ca = dir.0.join("other-ca").display().to_string();
    let args = ["ca", "issue", "--identity", id, "--out", stranger.to_str().unwrap(), "--ca-dir", &other_ca];
    assert_eq!(mesh_tests::peers::meshctl(&args).unwrap().0, 0);
    let (code, stdout, stderr) = renew(stranger.display().to_string()).await.unwrap();
    assert_eq!(code, 1, "{stdout} {stderr}");
    assert!(stderr.contains("renewal refused"), "{stderr}");
}

/// xDS SAN matchers (A29) beyond exact IDs: a prefix matcher on the SPIFFE ID accepts the servers it covers and
/// refuses the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_san_prefix_matcher_accepts_the_identities_it_covers_and_refuses_the_others() {
    let ca = SpiffeCa::new("mesh CA").unwrap();
    let server = greeter(&ca).await;
    for (prefix, accepted) in [("spiffe://mesh.test/ns/default/", true), ("spiffe://mesh.test/ns/prod/", false)] {
        let tls = TlsPolicy { san_matchers: vec![mesh_core::StringMatch::Prefix(prefix.into())], ..TlsPolicy::default() };
        let config = BalancerConfig { tls: Some(tls), ready_timeout: Duration::from_secs(2), ..BalancerConfig::default() };
        let connector = MtlsConnector::new(TcpConnector::new(), Some(Arc::new(ca.credentials(FRONTEND).unwrap())));
        let balancer = Balancer::with_connector("greeter", discover::fixed(vec![Endpoint::new(server.addr)]), config, connector);
        let result = balancer.oneshot(request()).await;
        assert_eq!(result.is_ok(), accepted, "{prefix}: {:?}", result.err().map(|e| chain(&e)));
    }
}
