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
        certificate_file: dir.join("cert.pem"),
        private_key_file: dir.join("key.pem"),
        ca_certificate_file: dir.join("ca.pem"),
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
