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
use mesh_tower::tls::{Credentials, MtlsConnector};
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
    let tls = TlsPolicy { server_name: None, allowed_identities: allowed.iter().map(|s| (*s).to_owned()).collect() };
    let config = BalancerConfig { tls: Some(tls), ready_timeout: Duration::from_secs(2), ..BalancerConfig::default() };
    let connector = MtlsConnector::new(TcpConnector::new(), Some(Arc::new(credentials)));
    Balancer::with_connector("greeter", discover::fixed(vec![Endpoint::new(server)]), config, connector)
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
    let acceptor = mesh_tower::tls::MtlsAcceptor::new(&credentials).unwrap();
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
            mesh_tower::Error::Upstream { .. } | mesh_tower::Error::AllEndpointsFailed { .. } | mesh_tower::Error::Handshake { .. }
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
    let call = |expect: Option<&'static str>| {
        let mut args: Vec<String> = ["call", "--target", &target, "--method", "/mesh.test.Echo/Hello", "--n", "3", "--json"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        for (flag, name) in [("--cert", "cert.pem"), ("--key", "key.pem"), ("--ca", "ca.pem")] {
            args.extend([flag.to_owned(), path(name)]);
        }
        if let Some(id) = expect {
            args.extend(["--expect-identity".to_owned(), id.to_owned()]);
        }
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            mesh_tests::peers::meshctl(&args).unwrap()
        })
    };
    let (code, stdout, stderr) = call(Some(GREETER)).await.unwrap();
    assert_eq!(code, 0, "{stdout} {stderr}");
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(summary["ok"], 3, "{summary}");
    assert_eq!(server.calls(), 3);

    let (code, stdout, stderr) = call(Some("spiffe://mesh.test/ns/default/sa/billing")).await.unwrap();
    assert_eq!(code, 1, "{stdout} {stderr}");
    assert!(format!("{stdout}{stderr}").contains("is not one the cluster accepts"), "{stdout} {stderr}");
    assert_eq!(server.calls(), 3, "no call reached a server whose identity is not the expected one");

    // A bad file is named.
    std::fs::write(dir.0.join("key.pem"), "not a key").unwrap();
    let (code, _, stderr) = call(None).await.unwrap();
    assert_eq!(code, 2);
    assert!(stderr.contains("key.pem") && stderr.contains("key"), "{stderr}");
}
