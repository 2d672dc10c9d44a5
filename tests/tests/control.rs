//! mesh-control end to end: one mesh file feeds a real Envoy 1.40 (sidecar shape, SotW and delta), a real grpcio
//! proxyless client, `meshctl call` and our channel (proxyless shape); edits to the file move all of them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mesh_tests::echo::{EchoServer, METHOD};
use mesh_tests::load::{Run, drive, drive_via_proxy};
use mesh_tests::peers::{self, Envoy, MeshControl, TempDir};
use mesh_tonic::Channel;
use serde_json::Value;
use xds_client::{Bootstrap, XdsClient, XdsClientConfig};

/// Three echo backends (two v1, one v2) and a mesh file splitting `greeter` v1/v2 by `weights`, with a sidecar
/// listener on `sidecar_port`.
struct Mesh {
    _backends: Vec<EchoServer>,
    v1: [SocketAddr; 2],
    v2: [SocketAddr; 1],
    sidecar_port: u16,
    file: PathBuf,
    dir: TempDir,
}

impl Mesh {
    async fn start(weights: (u32, u32)) -> Self {
        let mut backends = Vec::new();
        for _ in 0..3 {
            backends.push(EchoServer::start(Duration::ZERO).await.unwrap());
        }
        let dir = TempDir::new("control").unwrap();
        let mesh = Self {
            v1: [backends[0].addr, backends[1].addr],
            v2: [backends[2].addr],
            _backends: backends,
            sidecar_port: peers::free_port().unwrap(),
            file: dir.0.join("mesh.yaml"),
            dir,
        };
        mesh.write(weights);
        mesh
    }

    fn text(&self, weights: (u32, u32)) -> String {
        format!(
            "services:
  greeter:
    endpoints:
      - {{ address: {a}, labels: {{ version: v1 }} }}
      - {{ address: {b}, labels: {{ version: v1 }} }}
      - {{ address: {c}, labels: {{ version: v2 }} }}
    subsets:
      v1: {{ labels: {{ version: v1 }} }}
      v2: {{ labels: {{ version: v2 }} }}
    routes:
      - split: {{ v1: {w1}, v2: {w2} }}
    timeout: 5s
    sidecar: {{ port: {port} }}
",
            a = self.v1[0],
            b = self.v1[1],
            c = self.v2[0],
            w1 = weights.0,
            w2 = weights.1,
            port = self.sidecar_port
        )
    }

    /// Rewrites the file atomically (write + rename), as editors and ConfigMap updates do.
    fn write_text(&self, text: &str) {
        let tmp = self.dir.0.join("mesh.yaml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.file).unwrap();
    }

    fn write(&self, weights: (u32, u32)) {
        self.write_text(&self.text(weights));
    }

    fn control(&self) -> MeshControl {
        MeshControl::start(&self.file, &self.dir.0).unwrap()
    }

    fn bootstrap(&self, cp: &MeshControl, features: &[&str]) -> (TempDir, PathBuf) {
        let mut all = vec!["xds_v3"];
        all.extend_from_slice(features);
        peers::write_bootstrap(cp.xds, &all).unwrap()
    }

    fn v2_share(&self, by: &std::collections::BTreeMap<SocketAddr, u64>) -> f64 {
        let total: u64 = by.values().sum();
        by.get(&self.v2[0]).copied().unwrap_or(0) as f64 / total.max(1) as f64
    }
}

fn xds_channel(cp: &MeshControl, features: &[&str]) -> Channel {
    let mut bootstrap = Bootstrap::for_server(cp.xds.to_string(), "mesh-test");
    bootstrap.servers[0].server_features.extend(features.iter().map(|f| f.to_string()));
    let client = XdsClient::new(bootstrap, XdsClientConfig::default());
    Channel::builder("xds:///greeter").timeout(Duration::from_secs(10)).build_xds(client, "greeter").unwrap()
}

/// mesh-control serving a mesh file of one service, `greeter`, with `endpoints` and the service-level `policies`
/// (one YAML line each).
fn greeter_mesh(name: &str, endpoints: &[SocketAddr], policies: &[&str]) -> (TempDir, MeshControl) {
    let dir = TempDir::new(name).unwrap();
    let file = dir.0.join("mesh.yaml");
    let mut text = String::from("services:\n  greeter:\n    endpoints:\n");
    for addr in endpoints {
        text.push_str(&format!("      - {{ address: {addr} }}\n"));
    }
    for policy in policies {
        text.push_str(&format!("    {policy}\n"));
    }
    std::fs::write(&file, text).unwrap();
    let cp = MeshControl::start(&file, &dir.0).unwrap();
    (dir, cp)
}

fn envoy_channel(port: u16) -> Channel {
    Channel::builder(format!("static:///127.0.0.1:{port}")).timeout(Duration::from_secs(10)).build().unwrap()
}

async fn meshctl_v2_share(mesh: &Mesh, bootstrap: &Path) -> f64 {
    let summary = peers::meshctl_xds_call(bootstrap, "xds:///greeter", METHOD, 1000).await;
    summary["by_endpoint"][mesh.v2[0].to_string()].as_u64().unwrap_or(0) as f64 / 1000.0
}

async fn grpcio_v2_share(mesh: &Mesh, bootstrap: &Path) -> f64 {
    let bootstrap = bootstrap.to_owned();
    let out =
        tokio::task::spawn_blocking(move || peers::python_xds_client(&bootstrap, "xds:///greeter", METHOD, 1000)).await.unwrap().unwrap();
    assert_eq!(out["ok"], 1000, "{out}");
    out["by_response"][mesh.v2[0].to_string()].as_u64().unwrap_or(0) as f64 / 1000.0
}

async fn envoy_run(port: u16, n: u64) -> Run {
    tokio::time::timeout(Duration::from_secs(60), drive_via_proxy(&envoy_channel(port), n, 4)).await.expect("calls through envoy finish")
}

/// A run with no failed call whose v2 share is `want` ± 0.05.
fn assert_run(who: &str, mesh: &Mesh, run: &Run, want: f64) {
    assert!(run.failures.is_empty(), "{who}: {:?}", run.failures);
    assert_share(who, mesh.v2_share(&run.by_endpoint), want);
}

/// The `/status` entry of the ADS stream of node `node`.
fn stream<'a>(status: &'a Value, node: &str) -> &'a Value {
    let streams = status["ads"]["streams"].as_array().unwrap_or_else(|| panic!("no streams in {status:#}"));
    streams.iter().find(|s| s["node_id"] == node).unwrap_or_else(|| panic!("no stream of {node} in {status:#}"))
}

fn assert_share(who: &str, share: f64, want: f64) {
    assert!((share - want).abs() <= 0.05, "{who}: v2 got {share:.3} of calls, want {want:.2} ± 0.05");
}

/// Plain HTTP/2 (h2load, not a gRPC client) through the Envoy sidecar: every request gets a response from a backend.
fn h2load_through(port: u16) {
    let output = std::process::Command::new("h2load")
        .args(["-n", "100", "-c", "2", "-H", "content-type: application/grpc", "-H", "te: trailers"])
        .arg(format!("http://127.0.0.1:{port}{METHOD}"))
        .output()
        .expect("h2load is installed by the README's test command");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("100 succeeded, 0 failed, 0 errored"), "h2load through envoy: {stdout}");
    assert!(stdout.contains("status codes: 100 2xx"), "h2load through envoy: {stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_grpcio_and_meshctl_get_the_split_from_the_mesh_file() {
    let mesh = Mesh::start((80, 20)).await;
    let cp = mesh.control();
    let (_b, bootstrap) = mesh.bootstrap(&cp, &[]);

    let mut envoy = Envoy::start(cp.xds, false, "envoy-sotw").unwrap();
    envoy.wait_for_listener(mesh.sidecar_port, Duration::from_secs(60)).unwrap();
    assert_run("envoy (ADS SotW)", &mesh, &envoy_run(mesh.sidecar_port, 1000).await, 0.2);
    h2load_through(mesh.sidecar_port);
    let clusters = envoy.admin_get("/clusters").unwrap();
    assert!(clusters.contains("greeter|v1::") && clusters.contains("greeter|v2::"), "envoy clusters: {clusters}");

    assert_share("grpcio", grpcio_v2_share(&mesh, &bootstrap).await, 0.2);
    assert_share("meshctl", meshctl_v2_share(&mesh, &bootstrap).await, 0.2);

    // Envoy's stream is listed as SotW and acknowledged every type it got; no stream has a NACK.
    let status = cp.status().unwrap();
    let envoy_stream = stream(&status, "envoy-sotw");
    assert_eq!(envoy_stream["protocol"], "sotw", "{envoy_stream:#}");
    let types = envoy_stream["types"].as_object().unwrap();
    assert_eq!(types.len(), 4, "LDS, RDS, CDS and EDS: {envoy_stream:#}");
    for (type_url, t) in types {
        assert_eq!(t["acked_version"], t["sent_version"], "{type_url}: {envoy_stream:#}");
    }
    for s in status["ads"]["streams"].as_array().unwrap() {
        for (type_url, t) in s["types"].as_object().unwrap() {
            assert!(t["last_nack"].is_null(), "{} rejected {type_url}: {s:#}", s["node_id"]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_xds_feeds_envoy_and_our_client() {
    let mesh = Mesh::start((80, 20)).await;
    let cp = mesh.control();

    let mut envoy = Envoy::start(cp.xds, true, "envoy-delta").unwrap();
    envoy.wait_for_listener(mesh.sidecar_port, Duration::from_secs(60)).unwrap();
    assert_run("envoy (DELTA_GRPC)", &mesh, &envoy_run(mesh.sidecar_port, 1000).await, 0.2);

    let (_b, bootstrap) = mesh.bootstrap(&cp, &["delta_ads"]);
    assert_share("meshctl (delta)", meshctl_v2_share(&mesh, &bootstrap).await, 0.2);
    let ours = xds_channel(&cp, &["delta_ads"]);
    assert_run("our channel (delta)", &mesh, &drive(&ours, 1000, 4, |_| {}).await, 0.2);

    // Both spoke delta: the status endpoint lists their streams as such.
    let status = cp.status().unwrap();
    assert_eq!(stream(&status, "envoy-delta")["protocol"], "delta", "{status:#}");
    assert_eq!(stream(&status, "mesh-test")["protocol"], "delta", "{status:#}");
    drop(ours);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_edits_move_every_client_within_two_seconds_and_bad_edits_change_nothing() {
    let mesh = Mesh::start((90, 10)).await;
    let cp = mesh.control();
    let (_b, bootstrap) = mesh.bootstrap(&cp, &[]);
    let mut envoy = Envoy::start(cp.xds, false, "envoy-edit").unwrap();
    envoy.wait_for_listener(mesh.sidecar_port, Duration::from_secs(60)).unwrap();
    let ours = xds_channel(&cp, &[]);
    let warm = drive(&ours, 200, 2, |_| {}).await;
    assert!(warm.failures.is_empty(), "{:?}", warm.failures);

    // Traffic runs through our channel, through Envoy and from grpcio while the file changes: no call may fail.
    let (ours_bg, envoy_bg) = (ours.clone(), envoy_channel(mesh.sidecar_port));
    let background = tokio::spawn(async move {
        let until = Instant::now() + Duration::from_secs(5);
        let mut failures = Vec::new();
        while Instant::now() < until {
            let (a, b) = tokio::join!(drive(&ours_bg, 50, 2, |_| {}), drive_via_proxy(&envoy_bg, 50, 2));
            failures.extend(a.failures);
            failures.extend(b.failures);
        }
        failures
    });
    let grpcio_bootstrap = bootstrap.clone();
    let grpcio = tokio::task::spawn_blocking(move || {
        peers::python_xds_client_for(&grpcio_bootstrap, "xds:///greeter", METHOD, Duration::from_secs(5))
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    mesh.write((50, 50));
    let edited = Instant::now();
    let edited_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let failures = background.await.unwrap();
    assert!(failures.is_empty(), "calls failed during the edit: {failures:?}");
    let grpcio = grpcio.await.unwrap().unwrap();
    assert_eq!(grpcio["errors"], serde_json::json!({}), "grpcio calls failed during the edit");
    // grpcio's calls from two seconds after the edit on follow the new split. The window holds a few hundred
    // calls, too few for ±5%: the check is that the split moved (0.10 → 0.50, the bound 0.30 is more than five
    // standard deviations from either); the ±5% check with 1,000 calls follows.
    let v2 = mesh.v2[0].to_string();
    let late: Vec<bool> = grpcio["calls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c[0].as_f64().unwrap() >= edited_at + 2.0)
        .map(|c| c[1].as_str().unwrap() == v2)
        .collect();
    assert!(late.len() >= 100, "grpcio made only {} calls from 2 s after the edit on", late.len());
    let late_share = late.iter().filter(|v| **v).count() as f64 / late.len() as f64;
    assert!(late_share > 0.3, "grpcio from 2 s after the edit: v2 got {late_share:.3} of {} calls, want about 0.5", late.len());

    // Two seconds after the edit, every client follows the new split.
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(edited.elapsed())).await;
    assert_run("our channel after the edit", &mesh, &drive(&ours, 1000, 4, |_| {}).await, 0.5);
    assert_run("envoy after the edit", &mesh, &envoy_run(mesh.sidecar_port, 1000).await, 0.5);
    assert_share("meshctl after the edit", meshctl_v2_share(&mesh, &bootstrap).await, 0.5);
    assert_share("grpcio after the edit", grpcio_v2_share(&mesh, &bootstrap).await, 0.5);

    // An invalid edit is rejected precisely and changes nothing.
    let bad = mesh.text((50, 50)).replace("v2: 50 }", "v3: 50 }");
    mesh.write_text(&bad);
    let deadline = Instant::now() + Duration::from_secs(5);
    let error = loop {
        let status = cp.status().unwrap();
        if !status["last_error"].is_null() {
            break status["last_error"].clone();
        }
        assert!(Instant::now() < deadline, "the bad edit was never reported: {status:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(error["line"], 11, "{error:#}");
    assert_eq!(error["field"], "services.greeter.routes[0].split.v3", "{error:#}");
    assert!(error["reason"].as_str().unwrap().contains("neither a subset of greeter"), "{error:#}");
    assert_eq!(error["file"], mesh.file.display().to_string());
    let log = std::fs::read_to_string(&cp.log).unwrap();
    assert!(log.contains("mesh file rejected") && log.contains("services.greeter.routes[0].split.v3"), "log: {log}");
    assert_run("our channel after the bad edit", &mesh, &drive(&ours, 1000, 4, |_| {}).await, 0.5);
    assert_run("envoy after the bad edit", &mesh, &envoy_run(mesh.sidecar_port, 1000).await, 0.5);
}

#[test]
fn embedded_default_serves_the_example_and_says_how_to_connect() {
    let ca = TempDir::new("embedded-ca").unwrap();
    let mut child = std::process::Command::new(peers::workspace_bin("mesh-control").unwrap())
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .env("MESH_CA_DIR", &ca.0)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let mut text = String::new();
    // The banner ends with an example command.
    for line in lines.by_ref() {
        let line = line.unwrap();
        text.push_str(&line);
        text.push('\n');
        if line.contains("meshctl call") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(text.contains("listening xds=127.0.0.1:"), "{text}");
    assert!(text.contains("GRPC_XDS_BOOTSTRAP="), "{text}");
    assert!(text.contains("GRPC_XDS_BOOTSTRAP_CONFIG="), "{text}");
    let path = text.lines().find_map(|l| l.trim().strip_prefix("bootstrap: ")).unwrap();
    let bootstrap: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let xds = text.split_whitespace().find_map(|w| w.strip_prefix("xds=")).unwrap();
    assert_eq!(bootstrap["xds_servers"][0]["server_uri"], xds);
    let inline = text.split("GRPC_XDS_BOOTSTRAP_CONFIG='").nth(1).and_then(|rest| rest.split('\'').next()).unwrap();
    let inline: Value = serde_json::from_str(inline).unwrap_or_else(|e| panic!("inline bootstrap is not JSON: {e}: {inline}"));
    assert_eq!(inline, bootstrap);
    assert_eq!(bootstrap["certificate_providers"]["default"]["plugin_name"], "file_watcher", "strict services work out of the box");
    assert!(ca.0.join("ca-cert.pem").exists(), "the CA is kept where MESH_CA_DIR says");
}

/// `meshctl demo`: the README's first command shows the 90/10 canary, then follows two edits of the mesh file
/// with no failed call, then a deny rule its xDS-enabled servers enforce.
#[test]
fn meshctl_demo_runs_the_canary_and_follows_the_edits() {
    let (code, stdout, stderr) = peers::meshctl(&["demo", "--phase-secs", "3", "--json"]).unwrap();
    assert_eq!(code, 0, "stderr: {stderr}");
    // The live view and the table go to stderr with --json.
    assert!(stderr.contains("phase 1: canary, v1 90 / v2 10") && stderr.contains("v2 share"), "{stderr}");
    let summary: Value = serde_json::from_str(stdout.trim()).unwrap();
    let phases = summary["phases"].as_array().unwrap();
    let labels: Vec<&str> = phases.iter().map(|p| p["phase"].as_str().unwrap()).collect();
    assert_eq!(labels, ["canary 90/10", "switching", "shift 50/50", "switching", "promote 0/100"]);
    for phase in phases {
        assert_eq!(phase["failed"], 0, "{phase}");
    }
    // About 1,200 calls a phase: ±5% is more than three standard deviations.
    assert!(phases[0]["calls"].as_u64().unwrap() >= 600, "{}", phases[0]);
    assert_share("demo canary", phases[0]["v2_share"].as_f64().unwrap(), 0.1);
    assert_share("demo shift", phases[2]["v2_share"].as_f64().unwrap(), 0.5);
    assert_eq!(phases[4]["by_version"]["v1"], Value::Null, "promote sends nothing to v1: {}", phases[4]);
    assert_eq!(summary["edit_to_client_ms"].as_array().unwrap().len(), 2, "{summary}");
    let backends = summary["backends"].as_object().unwrap();
    assert_eq!(backends.values().filter(|v| *v == "v1").count(), 2, "{summary}");
    // Strict mTLS throughout: every call's server proved the greeter's identity to the client.
    let calls: u64 = phases.iter().map(|p| p["calls"].as_u64().unwrap()).sum();
    assert_eq!(summary["mtls"]["mode"], "strict", "{summary}");
    assert_eq!(summary["mtls"]["server_identities"]["spiffe://demo.mesh/ns/default/sa/greeter"], calls, "{summary}");
    assert!(stderr.contains("verified the server identity spiffe://demo.mesh/ns/default/sa/greeter"), "{stderr}");
    assert_eq!(backends.values().filter(|v| *v == "v2").count(), 1, "{summary}");
    // The servers are xDS-enabled: a deny rule for the client in the mesh file makes them refuse its calls.
    assert_eq!(summary["denied"]["code"], "PERMISSION_DENIED", "{summary}");
    assert_eq!(summary["denied"]["message"], "RBAC: access denied", "{summary}");
    assert!(stderr.contains("the server refused the next call"), "{stderr}");
}

/// `meshctl demo --admin ADDR --linger-s N` serves the demo client's admin endpoint while it runs and after:
/// once the summary is printed, `/metrics` has the demo's calls and `/clusters` the greeter's endpoints.
#[test]
fn meshctl_demo_serves_its_admin_endpoint() {
    use std::io::{BufRead, BufReader};
    let admin = format!("127.0.0.1:{}", peers::free_port().unwrap());
    let mut demo = std::process::Command::new(peers::workspace_bin("meshctl").unwrap())
        .args(["demo", "--phase-secs", "1", "--json", "--admin", &admin, "--linger-s", "20"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(demo.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let summary: Value = serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("demo summary {line:?}: {e}"));
    let get = |path: &str| {
        let output = std::process::Command::new("curl").args(["-sf", &format!("http://{admin}{path}")]).output().unwrap();
        assert!(output.status.success(), "GET {path} failed");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let (metrics, clusters) = (get("/metrics"), get("/clusters"));
    let _ = demo.kill();
    let _ = demo.wait();
    assert!(
        metrics.contains("grpc_client_call_duration_seconds_count{") && metrics.contains("grpc_target=\"xds:///greeter\""),
        "{metrics}"
    );
    let backends = summary["backends"].as_object().unwrap();
    // The demo ends on the promote phase: its route's cluster holds the v2 greeter.
    let v2 = backends.iter().find(|(_, version)| *version == "v2").map(|(addr, _)| addr.as_str()).unwrap();
    assert!(clusters.contains(v2), "the v2 greeter in /clusters: {clusters}");
}

/// A mesh file's retry policy reaches our client through mesh-control and is enforced: a backend failing 30% of
/// its calls with UNAVAILABLE costs `meshctl call` and our channel no failed call, where without the policy
/// about 15% fail (half the calls reach that backend).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_files_retry_policy_hides_a_backend_failing_30_percent() {
    let flaky = EchoServer::start_failing(30).await.unwrap();
    let healthy = EchoServer::start(Duration::ZERO).await.unwrap();
    let dir = TempDir::new("retries").unwrap();
    let file = dir.0.join("mesh.yaml");
    let text = |retries: &str| {
        format!(
            "services:
  greeter:
    lb: round_robin
    endpoints:
      - {{ address: {a} }}
      - {{ address: {b} }}
{retries}",
            a = flaky.addr,
            b = healthy.addr,
        )
    };
    std::fs::write(&file, text("")).unwrap();
    let cp = MeshControl::start(&file, &dir.0).unwrap();
    let channel = xds_channel(&cp, &[]);
    let without = drive(&channel, 2000, 8, |_| {}).await;
    let failed = without.failures.len() as f64 / 2000.0;
    assert!((0.10..0.20).contains(&failed), "without retries about 15% fail: {failed:.3} ({} failures)", without.failures.len());

    let tmp = dir.0.join("mesh.yaml.tmp");
    std::fs::write(&tmp, text("    retries: { attempts: 3, on: [unavailable] }\n")).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    // The new route config reaches the channel: wait until a run of calls sees no failure.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let run = drive(&channel, 200, 8, |_| {}).await;
        if run.failures.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the retry policy never arrived: {:?}", run.failures.first());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let with = drive(&channel, 2000, 8, |_| {}).await;
    assert!(with.failures.len() < 20, "with retries under 1% fail: {} of 2000: {:?}", with.failures.len(), with.failures.first());
    assert!(with.by_endpoint.get(&flaky.addr).copied().unwrap_or(0) > 500, "the flaky backend still serves: {:?}", with.by_endpoint);

    let (_bootstrap_dir, bootstrap) = peers::write_bootstrap(cp.xds, &["xds_v3"]).unwrap();
    // meshctl_xds_call asserts every one of its calls succeeded.
    let summary = peers::meshctl_xds_call(&bootstrap, "xds:///greeter", METHOD, 2000).await;
    assert_eq!(summary["ok"], 2000, "{summary}");
}

/// A mesh file's retry budget reaches our client as the cluster's CDS `retry_budget` and bounds the retries to
/// a backend failing every call: attempts stay within (1 + budget) × calls, plus the budget's floor of 3
/// retries a second over its 10 s window. The budget here is 50%, above the default 20%, so the count also
/// shows which budget was applied. The cluster's counts say the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_failing_every_call_gets_no_more_retries_than_the_cds_retry_budget() {
    let failing = EchoServer::start_failing(100).await.unwrap();
    let retries = "retries: { attempts: 5, on: [unavailable], backoff: { base: 1ms, max: 5ms }, budget_percent: 50 }";
    let (_dir, cp) = greeter_mesh("budget", &[failing.addr], &[retries]);
    let channel = xds_channel(&cp, &[]);
    let calls = 400;
    let run = drive(&channel, calls, 8, |_| {}).await;
    assert_eq!(run.failures.len() as u64, calls, "every call fails: {:?}", run.by_endpoint);
    for failure in run.failures.iter().take(5) {
        assert!(failure.contains("Unavailable"), "{failure}");
    }
    let attempts = failing.calls();
    let (share, floor) = (calls / 2, 3 * 10);
    // Without a budget: 5 attempts a call. With the default 20%, at most 1.2 × calls + the floor.
    assert!(attempts >= calls + calls * 3 / 10, "the 50% budget was applied, not the default 20%: {attempts} attempts");
    // Retries decided at the same moment may each take the budget's last place: at most one per call in flight.
    let racing = 8;
    assert!(attempts <= calls + share + floor + racing, "attempts stay within (1 + 50%) × {calls} + {floor}: {attempts}");
    let counts = channel.counts();
    let (_, greeter) = counts.iter().find(|(name, _)| name == "greeter").unwrap_or_else(|| panic!("{counts:?}"));
    assert_eq!(greeter.retries, attempts - calls, "each retry is counted: {greeter:?}");
    assert!(greeter.retry_budget_exhausted > 0, "the budget refused retries: {greeter:?}");
}

/// A mesh file's outlier detection reaches our client and a real Envoy through mesh-control (CDS
/// `outlier_detection`), and both treat an endpoint failing every call alike: ejected after 3 failures in a row,
/// back after the 1 s ejection time, and ejected again after 3 more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erroring_endpoint_is_ejected_at_its_consecutive_failures_and_returns_after_the_ejection_time() {
    let failing = EchoServer::start_failing(100).await.unwrap();
    let (a, b) = (EchoServer::start(Duration::ZERO).await.unwrap(), EchoServer::start(Duration::ZERO).await.unwrap());
    let port = peers::free_port().unwrap();
    let outlier = "outlier_detection: { consecutive_errors: 3, interval: 100ms, base_ejection_time: 1s, max_ejection_percent: 50 }";
    let sidecar = format!("sidecar: {{ port: {port} }}");
    let (_dir, cp) = greeter_mesh("outlier", &[failing.addr, a.addr, b.addr], &["lb: round_robin", outlier, &sidecar]);

    let channel = xds_channel(&cp, &[]);
    // Our client's third failure takes the endpoint out of the picks at once, on the call path, so it gets
    // exactly three (Envoy ejects on its main thread, after the worker that saw the failure posts it there).
    let second = ejects_and_returns("our client", &failing, 3, || drive(&channel, 60, 1, |_| {})).await;
    assert_eq!(second, 3, "our client ejects it again after 3 more failures");
    let counts = channel.counts();
    assert!(counts.iter().any(|(name, c)| name == "greeter" && c.ejections >= 2), "both ejections counted: {counts:?}");
    // And exported under gRPC A91's names, with the consecutive method under ours.
    let metrics = mesh_tonic::admin::Prometheus::new().unwrap();
    let _admin = mesh_tonic::admin::Admin::new(Some(metrics.clone())).channel("greeter", &channel);
    let text = metrics.render();
    let exported = |name: &str| {
        let prefix = format!("{name}{{");
        let line = text.lines().find(|l| l.starts_with(&prefix) && l.contains("grpc_lb_backend_service=\"greeter\""));
        line.and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).unwrap_or_else(|| panic!("no {name} in\n{text}"))
    };
    // A91's name ends in `_total` already; the OpenTelemetry Rust Prometheus exporter adds another to every counter.
    assert!(exported("grpc_lb_outlier_detection_ejections_enforced_total_total") >= 2.0, "{text}");
    assert!(exported("mesh_client_outlier_detection_ejections_enforced_consecutive_5xx_total") >= 2.0, "{text}");
    assert!(exported("mesh_client_outlier_detection_ejections_detected_consecutive_5xx_total") >= 2.0, "{text}");
    assert_eq!(exported("grpc_lb_outlier_detection_ejections_enforced_success_rate_total"), 0.0, "{text}");
    assert_eq!(exported("grpc_lb_outlier_detection_ejections_overflow_total"), 0.0, "one of three is under 50%: {text}");

    let mut envoy = Envoy::start(cp.xds, false, "envoy-outlier").unwrap();
    envoy.wait_for_listener(port, Duration::from_secs(60)).unwrap();
    let through = envoy_channel(port);
    // Envoy ejects on its main thread, after the worker that saw the failure posts it there. (Envoy 1.40 marks
    // the endpoint ejected again after it returns, but keeps sending it every third call: the second ejection is
    // checked only as the endpoint's return.)
    ejects_and_returns("envoy", &failing, 5, || drive_via_proxy(&through, 60, 1)).await;
}

/// Runs 60 calls one at a time: the failing endpoint gets 3 to `most` of them (ejected), and the rest succeed;
/// then, past the ejection time, 60 more: it gets traffic again. Returns how many of those it got.
async fn ejects_and_returns<F: std::future::Future<Output = Run>>(who: &str, failing: &EchoServer, most: u64, run: impl Fn() -> F) -> u64 {
    let before = failing.calls();
    let first = run().await;
    let hit = failing.calls() - before;
    assert!((3..=most).contains(&hit), "{who}: the failing endpoint got {hit} of 60 calls: {:?}", first.failures);
    assert_eq!(first.failures.len() as u64, hit, "{who}: every other call succeeds: {:?}", first.failures);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = failing.calls();
    let again = run().await;
    let hit = failing.calls() - before;
    assert!(hit >= 1, "{who}: after the ejection time the endpoint gets traffic again: {:?}", again.by_endpoint);
    assert_eq!(again.failures.len() as u64, hit, "{who}: {:?}", again.failures);
    hit
}

/// A mesh file's fault injection reaches our client through mesh-control (the listener's HTTP fault filter)
/// and is enforced: every call is delayed 100 ms, and half are aborted with the file's status without reaching
/// the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_files_fault_injection_delays_and_aborts_its_share_of_calls() {
    let backend = EchoServer::start(Duration::ZERO).await.unwrap();
    let fault = "fault: { delay: { percent: 100, duration: 100ms }, abort: { percent: 50, grpc_status: resource_exhausted } }";
    let (_dir, cp) = greeter_mesh("fault", &[backend.addr], &[fault]);
    let channel = xds_channel(&cp, &[]);
    let started = Instant::now();
    let calls = 400;
    let run = drive(&channel, calls, 40, |_| {}).await;
    // 400 calls, 40 at a time, each delayed 100 ms: at least ten rounds of 100 ms.
    assert!(started.elapsed() >= Duration::from_secs(1), "every call was delayed: {:?}", started.elapsed());
    let aborted = run.failures.len() as u64;
    assert!((150..250).contains(&aborted), "half the calls are aborted: {aborted} of {calls}");
    for failure in &run.failures {
        assert!(failure.contains("ResourceExhausted") && failure.contains("fault injected"), "{failure}");
    }
    assert_eq!(backend.calls(), calls - aborted, "an aborted call never reaches the backend");
    let counts = channel.target_counts();
    assert_eq!((counts.fault_delays, counts.fault_aborts), (calls, aborted), "the faults are counted: {counts:?}");
}

/// A mesh file's rate limit reaches our client through mesh-control (the listener's local rate limit filter)
/// and is enforced as one bucket: calls over it fail RESOURCE_EXHAUSTED at once and never reach the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_files_rate_limit_turns_away_calls_over_the_bucket() {
    let backend = EchoServer::start(Duration::ZERO).await.unwrap();
    let (_dir, cp) = greeter_mesh("ratelimit", &[backend.addr], &["rate_limit: { requests_per_second: 5, burst: 20 }"]);
    let channel = xds_channel(&cp, &[]);
    let started = Instant::now();
    let run = drive(&channel, 100, 10, |_| {}).await;
    let ok = 100 - run.failures.len() as u64;
    // A burst of 20, and 5 more a second while the run lasts.
    let most = 20 + (started.elapsed().as_secs_f64() * 5.0).ceil() as u64;
    assert!((20..=most).contains(&ok), "the bucket lets 20 through, then 5 a second: {ok} in {:?}", started.elapsed());
    for failure in &run.failures {
        assert!(failure.contains("ResourceExhausted") && failure.contains("rate limited"), "{failure}");
    }
    assert_eq!(backend.calls(), ok, "a call over the limit never reaches the backend");
    assert_eq!(channel.target_counts().rate_limited, 100 - ok, "each call turned away is counted");
}

/// A mesh file's hedging reaches our client through mesh-control (Envoy's hedge_on_per_try_timeout form) and
/// hides a backend's tail: one of three backends answers 5% of its calls 500 ms late, and hedging at 50 ms
/// cuts the client's p99 by at least half against the same backends without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedging_cuts_the_p99_of_a_backend_with_a_slow_tail_by_half() {
    let tail = EchoServer::start_with_tail(5, Duration::from_millis(500)).await.unwrap();
    let (a, b) = (EchoServer::start(Duration::ZERO).await.unwrap(), EchoServer::start(Duration::ZERO).await.unwrap());
    let endpoints = [tail.addr, a.addr, b.addr];
    let p99 = |policies: &'static [&'static str]| async move {
        let (_dir, cp) = greeter_mesh("hedge", &endpoints, policies);
        let channel = xds_channel(&cp, &[]);
        mesh_tests::load::call(&channel, &[]).await.expect("a first call");
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let channel = channel.clone();
            tasks.push(tokio::spawn(async move {
                let mut took = Vec::new();
                for _ in 0..150 {
                    let started = Instant::now();
                    mesh_tests::load::call(&channel, &[]).await.expect("every call succeeds");
                    took.push(started.elapsed());
                }
                took
            }));
        }
        let mut took = Vec::new();
        for task in tasks {
            took.extend(task.await.unwrap());
        }
        took.sort();
        let hedges = channel.counts().iter().map(|(_, c)| c.hedges).sum::<u64>();
        (took[took.len() * 99 / 100], hedges)
    };
    let (without, none) = p99(&[]).await;
    let (with, hedges) = p99(&["hedge: { attempts: 2, delay: 50ms }"]).await;
    assert_eq!(none, 0);
    assert!(hedges >= 5, "the slow calls were hedged: {hedges} hedges");
    assert!(with * 2 <= without, "hedging cuts p99 by half: {with:?} with, {without:?} without");
}

/// The same retry policy, from one mesh-control, given to our client and to a real Envoy sidecar, against a
/// backend failing 30% of its calls: both retry, and ours hides the failures (under 1% of calls fail). Envoy
/// reads the same `retry_budget` (20%, minimum 3) as a cap on *concurrent* retries, and retries waiting out
/// their backoff count against it, so at 8 calls in flight it turns retries away: every call Envoy fails is
/// one its budget refused to retry (`upstream_rq_retry_overflow`). That difference is the budget's meaning
/// (DESIGN.md), and this test keeps it visible.
/// The mesh's typed hedging extension on a route (optional, A6's delay-based policy) is skipped by the clients
/// that do not know it: a real Envoy and a grpcio proxyless client fed the hedging service by mesh-control ACK
/// every resource and their calls succeed; our client hedges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_and_grpcio_accept_the_typed_hedging_extension_that_our_client_reads() {
    let slow = EchoServer::start(Duration::from_millis(100)).await.unwrap();
    let port = peers::free_port().unwrap();
    let sidecar = format!("sidecar: {{ port: {port} }}");
    let (_dir, cp) = greeter_mesh("hedge-peers", &[slow.addr], &["hedge: { attempts: 2, delay: 20ms }", &sidecar]);
    let ours = xds_channel(&cp, &[]);
    let run = drive(&ours, 10, 1, |_| {}).await;
    assert!(run.failures.is_empty(), "{:?}", run.failures);
    let hedges: u64 = ours.counts().iter().map(|(_, c)| c.hedges).sum();
    assert_eq!(hedges, 10, "our client hedged every call that was still out after 20 ms");

    let mut envoy = Envoy::start(cp.xds, false, "envoy-hedging").unwrap();
    envoy.wait_for_listener(port, Duration::from_secs(60)).unwrap();
    let through = drive_via_proxy(&envoy_channel(port), 10, 1).await;
    assert!(through.failures.is_empty(), "envoy: {:?}", through.failures);
    let (_b, bootstrap) = peers::write_bootstrap(cp.xds, &["xds_v3"]).unwrap();
    let out =
        tokio::task::spawn_blocking(move || peers::python_xds_client(&bootstrap, "xds:///greeter", METHOD, 5)).await.unwrap().unwrap();
    assert_eq!(out["ok"], 5, "grpcio: {out}");
    let status = cp.status().unwrap();
    for s in status["ads"]["streams"].as_array().unwrap() {
        for (type_url, t) in s["types"].as_object().unwrap() {
            assert!(t["last_nack"].is_null(), "{} rejected {type_url}: {s:#}", s["node_id"]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_and_envoy_fed_the_same_retry_policy_both_retry_and_differ_only_by_the_budgets_meaning() {
    let flaky = EchoServer::start_failing(30).await.unwrap();
    let healthy = EchoServer::start(Duration::ZERO).await.unwrap();
    let port = peers::free_port().unwrap();
    let sidecar = format!("sidecar: {{ port: {port} }}");
    let policies = ["lb: round_robin", "retries: { attempts: 3, on: [unavailable] }", &sidecar];
    let (_dir, cp) = greeter_mesh("retry-parity", &[flaky.addr, healthy.addr], &policies);

    let ours = drive(&xds_channel(&cp, &[]), 2000, 8, |_| {}).await;
    assert!(ours.failures.len() < 20, "our client: under 1% of 2000 calls fail: {} ({:?})", ours.failures.len(), ours.failures.first());
    assert!(ours.by_endpoint.get(&flaky.addr).copied().unwrap_or(0) > 500, "the flaky backend still serves: {:?}", ours.by_endpoint);

    let mut envoy = Envoy::start(cp.xds, false, "envoy-retries").unwrap();
    envoy.wait_for_listener(port, Duration::from_secs(60)).unwrap();
    let through_envoy = drive_via_proxy(&envoy_channel(port), 2000, 8).await;
    let stats = envoy.admin_get("/stats?filter=cluster.greeter.upstream_rq_retry").unwrap();
    let stat = |name: &str| -> u64 {
        let line =
            stats.lines().find(|l| l.starts_with(&format!("cluster.greeter.{name}:"))).unwrap_or_else(|| panic!("{name} in {stats}"));
        line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{line}"))
    };
    assert!(stat("upstream_rq_retry_success") > 50, "envoy retries the same failures: {stats}");
    let failed = through_envoy.failures.len() as u64;
    assert!(
        failed <= stat("upstream_rq_retry_overflow") + stat("upstream_rq_retry_limit_exceeded"),
        "each call envoy failed was one its budget or attempts refused: {failed} failed, {stats}"
    );
}

/// The caller's deadline, through a mesh file's retry policy: the first attempt reaches the server with the
/// caller's `grpc-timeout`, each retry with the time left (less than the attempt before); a call the server
/// cannot answer in time ends DEADLINE_EXCEEDED, long before the server would have answered, and the server
/// saw that deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_deadline_ends_the_call_and_each_retry_sends_the_server_what_is_left() {
    // Fails calls 0 and 3 of every 100 ((n × 37) mod 100 < 10): the first call fails once, then succeeds.
    let flaky = EchoServer::start_failing(10).await.unwrap();
    let policies = ["retries: { attempts: 3, on: [unavailable], backoff: { base: 50ms, max: 50ms } }"];
    let (_dir, cp) = greeter_mesh("deadline", &[flaky.addr], &policies);
    let channel = xds_channel(&cp, &[]);
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    let mut request = tonic::Request::new(bytes::Bytes::from_static(b"hi"));
    request.set_timeout(Duration::from_secs(2));
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static(METHOD);
    grpc.unary(request, path.clone(), mesh_tonic::codec::BytesCodec).await.expect("the retry succeeds");
    let seen = flaky.timeouts();
    assert_eq!(seen.len(), 2, "one failed attempt and its retry: {seen:?}");
    assert_eq!(seen[0], Some(Duration::from_secs(2)), "the first attempt carries the caller's deadline: {seen:?}");
    let left = seen[1].expect("the retry carries a deadline");
    assert!(left < Duration::from_secs(2), "the retry carries the time left, not the original: {seen:?}");

    let slow = EchoServer::start(Duration::from_secs(10)).await.unwrap();
    let (_dir, cp) = greeter_mesh("deadline-slow", &[slow.addr], &[]);
    let channel = xds_channel(&cp, &[]);
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    // The first call waits for config and a connection; the second meets a ready channel.
    for _ in 0..2 {
        let mut request = tonic::Request::new(bytes::Bytes::from_static(b"hi"));
        request.set_timeout(Duration::from_millis(300));
        let started = Instant::now();
        let status = grpc.unary(request, path.clone(), mesh_tonic::codec::BytesCodec).await.expect_err("the server is too slow");
        // Our client ends it DEADLINE_EXCEEDED; a tonic server enforces the same deadline from the header it
        // got and answers CANCELLED "Timeout expired", and the two race by microseconds.
        let servers = status.code() == tonic::Code::Cancelled && status.message() == "Timeout expired";
        assert!(status.code() == tonic::Code::DeadlineExceeded || servers, "{status:?}");
        assert!(started.elapsed() < Duration::from_secs(10), "the call ended at its deadline, not at the answer");
    }
    assert_eq!(slow.timeouts(), [Some(Duration::from_millis(300)); 2], "the server saw the caller's deadline");
}

/// A mesh file's `adaptive_concurrency` reaches our client through mesh-control (the listener's adaptive
/// concurrency filter) and limits each cluster by its latency: at first the limit is its floor and a burst is
/// mostly turned away with RESOURCE_EXHAUSTED; after calls answered well within the no-load latency it has
/// grown, and the same burst passes whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_files_adaptive_concurrency_sheds_a_burst_at_its_floor_and_takes_it_once_grown() {
    let backend = EchoServer::start(Duration::from_millis(20)).await.unwrap();
    let adaptive = "adaptive_concurrency: { min_rtt: 100ms, min_limit: 2, max_limit: 100, update_interval: 50ms }";
    let (_dir, cp) = greeter_mesh("adaptive", &[backend.addr], &[adaptive]);
    let channel = xds_channel(&cp, &[]);
    // One call first, so the channel has its config and a connection.
    drive(&channel, 1, 1, |_| {}).await;
    let burst = drive(&channel, 16, 16, |_| {}).await;
    let shed = burst.failures.len() as u64;
    assert!(shed >= 8, "a limit of 2 turns most of 16 calls away: {:?}", burst.failures);
    for failure in &burst.failures {
        assert!(failure.contains("ResourceExhausted") && failure.contains("adaptive limit"), "{failure}");
    }
    // Answers at a fifth of the no-load latency: the limit at least doubles every update interval.
    for _ in 0..8 {
        drive(&channel, 1, 1, |_| {}).await;
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    let burst = drive(&channel, 16, 16, |_| {}).await;
    assert!(burst.failures.is_empty(), "the grown limit takes the burst: {:?}", burst.failures);
    let counts: u64 = channel.counts().iter().map(|(_, c)| c.adaptive_shed).sum();
    assert_eq!(counts, shed, "each call turned away is counted");
}

/// A mesh file's `mirror` reaches our client and an Envoy sidecar through mesh-control (the route's
/// request_mirror_policies): both answer every call from the split's subset and copy each to the mirror's, which
/// sees the copies; the copies change no answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_files_mirror_copies_calls_to_the_shadow_for_our_client_and_envoy() {
    let primary = EchoServer::start(Duration::ZERO).await.unwrap();
    let shadow = EchoServer::start(Duration::from_millis(50)).await.unwrap();
    let port = peers::free_port().unwrap();
    let dir = TempDir::new("mirror").unwrap();
    let file = dir.0.join("mesh.yaml");
    let text = format!(
        "services:\n  greeter:\n    endpoints:\n      - {{ address: {}, labels: {{ version: v1 }} }}\n      \
         - {{ address: {}, labels: {{ version: v2 }} }}\n    subsets:\n      v1: {{ labels: {{ version: v1 }} }}\n      \
         v2: {{ labels: {{ version: v2 }} }}\n    routes:\n      - split: {{ v1: 100 }}\n        mirror: {{ v2: 100 }}\n    \
         sidecar: {{ port: {port} }}\n",
        primary.addr, shadow.addr
    );
    std::fs::write(&file, text).unwrap();
    let cp = MeshControl::start(&file, &dir.0).unwrap();
    let copies_reach = async |want: u64| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while shadow.calls() < want && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(shadow.calls(), want, "the shadow got a copy of every call");
    };

    let channel = xds_channel(&cp, &[]);
    let ours = drive(&channel, 200, 8, |_| {}).await;
    assert!(ours.failures.is_empty(), "{:?}", ours.failures);
    assert_eq!(ours.by_endpoint.get(&primary.addr).copied(), Some(200), "every answer is the split's: {:?}", ours.by_endpoint);
    copies_reach(200).await;
    assert_eq!(channel.target_counts().mirrored, 200, "each copy is counted");

    let mut envoy = Envoy::start(cp.xds, false, "envoy-mirror").unwrap();
    envoy.wait_for_listener(port, Duration::from_secs(60)).unwrap();
    let through_envoy = drive_via_proxy(&envoy_channel(port), 200, 8).await;
    assert!(through_envoy.failures.is_empty(), "{:?}", through_envoy.failures);
    assert_eq!(primary.calls(), 400, "envoy answers from the split's subset too");
    copies_reach(400).await;
}

/// A mesh file's `circuit_breakers.max_requests` reaches our client through mesh-control (CDS thresholds) and
/// is enforced: calls over the limit fail at once with UNAVAILABLE naming the cluster, and never reach the
/// backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_files_max_requests_fails_the_overflow_at_once() {
    let slow = EchoServer::start(Duration::from_millis(500)).await.unwrap();
    let (_dir, cp) = greeter_mesh("breaker", &[slow.addr], &["circuit_breakers: { max_requests: 4 }"]);
    let channel = xds_channel(&cp, &[]);
    // One call first, so the channel has its config and a connection.
    drive(&channel, 1, 1, |_| {}).await;
    let started = Instant::now();
    let run = drive(&channel, 16, 16, |_| {}).await;
    assert!(started.elapsed() < Duration::from_millis(1500), "the overflow did not wait: {:?}", started.elapsed());
    assert!(run.failures.len() >= 10, "16 calls at once against a limit of 4: {:?}", run.failures);
    for failure in &run.failures {
        assert!(failure.contains("Unavailable") && failure.contains("circuit breaker") && failure.contains("greeter"), "{failure}");
    }
    let served: u64 = run.by_endpoint.values().sum();
    assert!((4..=6).contains(&served), "about the limit got through: {served}");
    assert_eq!(slow.calls(), 1 + served, "the overflow never reached the backend");
}
