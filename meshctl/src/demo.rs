//! `meshctl demo`: the mesh's main job in one command.
//!
//! Starts, all in this process and on 127.0.0.1: the control plane (`mesh-control`'s library) serving a demo
//! mesh file, three greeter backends (two v1, one v2) and a mesh client (`xds:///greeter` on our channel). Traffic
//! runs the whole time; the mesh file is edited twice (90/10 canary → 50/50 → all on v2), each edit travelling
//! file → control plane → ADS → client like any operator's edit. Live per-endpoint counts are printed every
//! second, and a summary table at the end. `--json` prints the summary as one JSON object on stdout (the live
//! view then goes to stderr).
//!
//! Everything speaks strict mTLS with certificates from an embedded mesh CA (trust domain `demo.mesh`): the
//! backends are xDS-enabled servers (`mesh_tonic::Server`) that take their inbound listener (mTLS mode,
//! authorization) from the control plane, as `spiffe://demo.mesh/ns/default/sa/greeter`; the client is
//! `.../sa/meshctl-demo`, through its bootstrap's `file_watcher` certificate provider, which the strict
//! service's clusters name. The demo shows the server identity the client verified. Last, the mesh file gets a
//! deny rule for the client, and the demo shows the servers refusing its next call (PERMISSION_DENIED).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use greeter_example::{GreeterClient, GreeterServer, HelloRequest};
use mesh_control::ControlPlane;
use mesh_control::ca::{Ca, DEFAULT_WORKLOAD_LIFETIME};
use mesh_core::{RouteAction, RouteConfig};
use mesh_tonic::{Channel, ServedBy};
use mesh_tower::connect::PeerIdentity;
use serde_json::json;
use xds_client::{Bootstrap, XdsClient, XdsClientConfig};

/// Arguments of `meshctl demo`.
#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// Seconds of traffic in each phase.
    #[arg(long, default_value_t = 4)]
    phase_secs: u64,
    /// Calls per second, over all workers.
    #[arg(long, default_value_t = 400)]
    rate: u32,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: u32,
    /// Print the summary as one JSON object on stdout; the live view goes to stderr.
    #[arg(long)]
    json: bool,
    /// Serve the client's admin endpoint (`/metrics`, `/clusters`, `/config_dump`, `/ready`, `/live`, CSDS) on
    /// this address while the demo runs, as `meshctl call --admin` does.
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Keep serving the admin endpoint this many seconds after the demo ends (for a scraper).
    #[arg(long, requires = "admin", default_value_t = 0)]
    linger_s: u64,
}

/// How long the switch between two phases lasts after the client's route changed.
const SETTLE: Duration = Duration::from_millis(250);

/// The phases: a label and the split (v1, v2) the mesh file sets.
const PHASES: [(&str, u32, u32); 3] = [("canary", 90, 10), ("shift", 50, 50), ("promote", 0, 100)];

/// Runs the demo; exit 0 when every call succeeded.
pub(crate) async fn run(args: DemoArgs) -> ExitCode {
    match demo(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// What calls did while one bucket (a phase, or the switch between two) was current.
#[derive(Debug, Default)]
struct Bucket {
    /// `canary 90/10`, `switching`, ...
    label: String,
    by_endpoint: BTreeMap<SocketAddr, u64>,
    failed: u64,
    latencies_us: Vec<u64>,
}

impl Bucket {
    fn calls(&self) -> u64 {
        self.by_endpoint.values().sum::<u64>() + self.failed
    }

    fn percentile(&self, p: f64) -> u64 {
        let mut sorted = self.latencies_us.clone();
        sorted.sort_unstable();
        match sorted.len() {
            0 => 0,
            n => sorted[((n - 1) as f64 * p).round() as usize],
        }
    }
}

/// Buckets in order; calls land in the one current when they started.
#[derive(Debug, Default)]
struct Tally {
    buckets: Mutex<Vec<Bucket>>,
    current: AtomicUsize,
    /// The server identities the client verified, with how many calls each served.
    identities: Mutex<BTreeMap<String, u64>>,
}

impl Tally {
    /// Makes a new bucket, labelled `label`, the current one.
    fn open(&self, label: String) {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        buckets.push(Bucket { label, ..Bucket::default() });
        self.current.store(buckets.len() - 1, Ordering::SeqCst);
    }

    fn record(&self, bucket: usize, result: Result<SocketAddr, ()>, latency: Duration) {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let b = &mut buckets[bucket];
        match result {
            Ok(addr) => *b.by_endpoint.entry(addr).or_default() += 1,
            Err(()) => b.failed += 1,
        }
        b.latencies_us.push(latency.as_micros() as u64);
    }
}

/// The trust domain of the demo's embedded CA.
const TRUST_DOMAIN: &str = "demo.mesh";
/// The backends' identity.
const SERVER_ID: &str = "spiffe://demo.mesh/ns/default/sa/greeter";
/// The client's identity.
const CLIENT_ID: &str = "spiffe://demo.mesh/ns/default/sa/meshctl-demo";

/// The demo's backends: address → version, and the running servers.
struct Backends(Vec<(SocketAddr, &'static str)>, Vec<mesh_tonic::RunningServer>);

impl Backends {
    /// Three greeter listeners, not serving yet.
    async fn bind() -> anyhow::Result<(Self, Vec<tokio::net::TcpListener>)> {
        let (mut backends, mut listeners) = (Vec::new(), Vec::new());
        for version in ["v1", "v1", "v2"] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            backends.push((listener.local_addr()?, version));
            listeners.push(listener);
        }
        Ok((Self(backends, Vec::new()), listeners))
    }

    /// Serves the greeters on `listeners` as xDS-enabled servers fed by the control plane at `xds`, with a
    /// certificate from `ca` in `dir`; returns once each serves its inbound listener.
    async fn serve(&mut self, listeners: Vec<tokio::net::TcpListener>, ca: &Ca, xds: SocketAddr, dir: &Path) -> anyhow::Result<()> {
        let certs = dir.join("server-certs");
        ca.issue(SERVER_ID, &[], DEFAULT_WORKLOAD_LIFETIME, std::time::SystemTime::now())?.write_to(&certs)?;
        for (listener, (addr, version)) in listeners.into_iter().zip(&self.0) {
            let mut bootstrap = Bootstrap::for_server(xds.to_string(), format!("greeter-{addr}"));
            bootstrap.certificate_providers.insert(mesh_control::control::CERTIFICATE_PROVIDER.to_owned(), file_watcher(&certs));
            bootstrap.server_listener_resource_name_template = Some(mesh_control::translate::SERVER_LISTENER_TEMPLATE.to_owned());
            let client = XdsClient::new(bootstrap, XdsClientConfig::default());
            let server = GreeterServer::new(format!("{addr} ({version})"));
            let running = mesh_tonic::Server::builder().xds(client).serve(listener, server)?;
            let mut status = running.status();
            let serving = status.wait_for(|s| matches!(s, mesh_tower::inbound::Serving::Serving(_)));
            if tokio::time::timeout(Duration::from_secs(10), serving).await.is_err() {
                anyhow::bail!("the greeter at {addr} got no inbound listener within 10 s: {:?}", *status.borrow());
            }
            self.1.push(running);
        }
        Ok(())
    }

    fn version(&self, addr: &SocketAddr) -> &'static str {
        self.0.iter().find(|(a, _)| a == addr).map_or("?", |(_, v)| v)
    }

    fn mesh_file(&self, v1: u32, v2: u32, deny: bool) -> String {
        let mut text = String::from(
            "# meshctl demo: one service, two versions, a weighted split between them.\nservices:\n  greeter:\n    endpoints:\n",
        );
        for (addr, version) in &self.0 {
            let _ = writeln!(text, "      - {{ address: \"{addr}\", labels: {{ version: {version} }} }}");
        }
        text.push_str("    subsets:\n      v1: { labels: { version: v1 } }\n      v2: { labels: { version: v2 } }\n");
        text.push_str("    routes:\n");
        match (v1, v2) {
            (0, _) => text.push_str("      - split: { v2: 100 }\n"),
            _ => {
                let _ = writeln!(text, "      - split: {{ v1: {v1}, v2: {v2} }}");
            }
        }
        text.push_str("    timeout: 2s\n    mtls: strict\n");
        if deny {
            let _ = writeln!(text, "    authorization:\n      - {{ action: deny, from: [\"{CLIENT_ID}\"] }}");
        }
        text
    }
}

/// A `file_watcher` certificate provider instance reading `dir`'s `cert.pem`, `key.pem` and `ca.pem`.
fn file_watcher(dir: &Path) -> xds_client::bootstrap::CertificateProvider {
    let file = |name: &str| Some(dir.join(name).display().to_string());
    let config = xds_client::bootstrap::FileWatcherConfig {
        certificate_file: file("cert.pem"),
        private_key_file: file("key.pem"),
        ca_certificate_file: file("ca.pem"),
        spiffe_trust_bundle_map_file: None,
        refresh_interval: Duration::from_secs(60),
    };
    xds_client::bootstrap::CertificateProvider {
        plugin_name: "file_watcher".to_owned(),
        config: serde_json::Value::Null,
        file_watcher: Some(config),
    }
}

/// Writes `text` to `path` atomically (temp file + rename), as editors and ConfigMap mounts do.
fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// The (v1, v2) weights of the client's current route for `greeter`, if it has one.
fn client_split(route: &RouteConfig) -> Option<(u64, u64)> {
    let vh = route.virtual_host_for("greeter")?;
    let RouteAction::Clusters(clusters) = &vh.routes.last()?.action else { return None };
    let weight = |name: &str| clusters.iter().filter(|c| c.cluster == name).map(|c| u64::from(c.weight)).sum::<u64>();
    Some((weight("greeter|v1"), weight("greeter|v2")))
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn demo(args: DemoArgs) -> anyhow::Result<bool> {
    let mut out: Box<dyn std::io::Write + Send> = if args.json { Box::new(std::io::stderr()) } else { Box::new(std::io::stdout()) };
    let ca = Ca::generate(TRUST_DOMAIN)?;
    let (mut backends, listeners) = Backends::bind().await?;
    let dir = TempDir(std::env::temp_dir().join(format!("meshctl-demo-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).with_context(|| format!("creating {}", dir.0.display()))?;
    let certs = dir.0.join("client-certs");
    ca.issue(CLIENT_ID, &[], DEFAULT_WORKLOAD_LIFETIME, std::time::SystemTime::now())?.write_to(&certs)?;
    let file = dir.0.join("mesh.yaml");
    let (_, v1, v2) = PHASES[0];
    write_atomically(&file, &backends.mesh_file(v1, v2, false))?;

    // The control plane, exactly as the mesh-control binary runs it: file → validated mesh → ADS.
    let cp = ControlPlane::from_file(&file)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let xds = listener.local_addr()?;
    let serving = cp.clone();
    tokio::spawn(async move { serving.serve_ads(listener).await });
    cp.watch_file(file.clone());
    backends.serve(listeners, &ca, xds, &dir.0).await?;

    // The metrics provider is installed before the channel is built, so the channel records into it.
    let admin = match args.admin {
        Some(addr) => Some(crate::call::start_admin(addr).await.map_err(anyhow::Error::msg)?),
        None => None,
    };
    // The client: our channel on an xDS client, as a service would build it.
    let mut bootstrap = Bootstrap::for_server(xds.to_string(), "meshctl-demo");
    bootstrap.certificate_providers.insert(mesh_control::control::CERTIFICATE_PROVIDER.to_owned(), file_watcher(&certs));
    let client = XdsClient::new(bootstrap, XdsClientConfig::default());
    let mut route = client.watch::<RouteConfig>("greeter");
    let channel = Channel::builder("xds:///greeter").timeout(Duration::from_secs(5)).build_xds(client.clone(), "greeter")?;
    let _admin = admin.map(|(admin, listener)| crate::call::AbortOnDrop(admin.channel("greeter", &channel).xds(client).serve(listener)));

    writeln!(out, "meshctl demo: a control plane, three greeter backends and a mesh client, all in this process")?;
    writeln!(out, "  control plane  xds={xds}  mesh file {}", file.display())?;
    for (addr, version) in &backends.0 {
        writeln!(out, "  greeter {version}     {addr}")?;
    }
    writeln!(out, "  client         xds:///greeter on mesh_tonic::Channel, {} calls/s, {} in flight", args.rate, args.concurrency)?;
    writeln!(out, "  mTLS           strict; client {CLIENT_ID}, certificates from an embedded CA ({TRUST_DOMAIN})")?;
    writeln!(out, "  servers        xDS-enabled (mesh_tonic::Server): mTLS and authorization from their inbound listeners")?;

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    tally.open(format!("{} {v1}/{v2}", PHASES[0].0));
    let workers = spawn_workers(&args, &channel, &tally, &stop);

    let mut switches = Vec::new();
    for (i, (label, v1, v2)) in PHASES.iter().enumerate() {
        if i > 0 {
            tally.open("switching".to_owned());
            writeln!(out, "\nediting {}: greeter split → v1 {v1} / v2 {v2}", file.display())?;
            out.flush()?;
            let edited = Instant::now();
            write_atomically(&file, &backends.mesh_file(*v1, *v2, false))?;
            let arrived = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    // Same proportions (a single-cluster route carries no weights of its own).
                    if route.value().and_then(|r| client_split(&r)).is_some_and(|(a, b)| a * u64::from(*v2) == b * u64::from(*v1)) {
                        return true;
                    }
                    if !route.changed().await {
                        return false;
                    }
                }
            })
            .await
            .unwrap_or(false);
            let took = edited.elapsed();
            if !arrived {
                anyhow::bail!("the client did not get the new split within 10 s of the edit");
            }
            writeln!(out, "  control plane pushed it; the client's route changed {} ms after the edit", took.as_millis())?;
            switches.push(took);
            // The channel's router swaps its table just after the xDS client holds the new route, and calls in
            // flight at the switch still end on the old split: they belong to the switch, not the new phase.
            tokio::time::sleep(SETTLE).await;
            tally.open(format!("{label} {v1}/{v2}"));
        }
        writeln!(out, "\nphase {}: {label}, v1 {v1} / v2 {v2}", i + 1)?;
        live(&mut *out, &backends, &tally, Duration::from_secs(args.phase_secs)).await?;
    }
    stop.store(true, Ordering::SeqCst);
    for worker in workers {
        let _ = worker.await;
    }

    let buckets = std::mem::take(&mut *tally.buckets.lock().unwrap_or_else(|e| e.into_inner()));
    let failed: u64 = buckets.iter().map(|b| b.failed).sum();
    let table = summary_table(&backends, &buckets);
    writeln!(out, "\n{table}")?;
    writeln!(out, "{} calls, {failed} failed", buckets.iter().map(Bucket::calls).sum::<u64>())?;
    let identities = std::mem::take(&mut *tally.identities.lock().unwrap_or_else(|e| e.into_inner()));
    for (id, n) in &identities {
        writeln!(out, "the client verified the server identity {id} on {n} calls")?;
    }

    // Authorization: a deny rule for the client, enforced by the servers themselves.
    writeln!(out, "\nediting {}: deny calls from {CLIENT_ID}", file.display())?;
    let (_, v1, v2) = PHASES[PHASES.len() - 1];
    let edited = Instant::now();
    write_atomically(&file, &backends.mesh_file(v1, v2, true))?;
    let mut greeter = GreeterClient::new(channel.clone());
    let denied = loop {
        match greeter.say_hello(HelloRequest { name: "demo".into() }).await {
            Err(status) if status.code() == tonic::Code::PermissionDenied => break Some(status),
            _ if edited.elapsed() > Duration::from_secs(10) => break None,
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let Some(denied) = denied else { anyhow::bail!("the servers did not deny the client within 10 s of the deny rule") };
    let denied_after = edited.elapsed();
    writeln!(
        out,
        "  the server refused the next call {} ms after the edit: {:?}: {}",
        denied_after.as_millis(),
        denied.code(),
        denied.message()
    )?;
    if args.json {
        let mut summary = summary_json(&backends, &buckets, &switches);
        summary["mtls"] = json!({ "mode": "strict", "client_identity": CLIENT_ID, "server_identities": identities });
        summary["denied"] =
            json!({ "code": "PERMISSION_DENIED", "message": denied.message(), "after_ms": denied_after.as_millis() as u64 });
        println!("{summary}");
    }
    if args.linger_s > 0 {
        tokio::time::sleep(Duration::from_secs(args.linger_s)).await;
    }
    Ok(failed == 0)
}

fn spawn_workers(args: &DemoArgs, channel: &Channel, tally: &Arc<Tally>, stop: &Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<()>> {
    let concurrency = args.concurrency.max(1);
    let period = Duration::from_secs_f64(f64::from(concurrency) / f64::from(args.rate.max(1))).max(Duration::from_micros(1));
    (0..concurrency)
        .map(|w| {
            let (tally, stop) = (tally.clone(), stop.clone());
            let mut client = GreeterClient::new(channel.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    tick.tick().await;
                    let bucket = tally.current.load(Ordering::SeqCst);
                    let started = Instant::now();
                    let result = client.say_hello(HelloRequest { name: format!("demo-{w}-{n}") }).await;
                    if let Some(PeerIdentity(id)) = result.as_ref().ok().and_then(|r| r.extensions().get::<PeerIdentity>()) {
                        *tally.identities.lock().unwrap_or_else(|e| e.into_inner()).entry(id.to_string()).or_default() += 1;
                    }
                    let served = result.ok().and_then(|r| r.extensions().get::<ServedBy>().map(|s| s.0)).ok_or(());
                    tally.record(bucket, served, started.elapsed());
                    n += 1;
                }
            })
        })
        .collect()
}

/// Prints the current bucket's per-endpoint counts every second for `secs`.
async fn live(out: &mut (dyn std::io::Write + Send), backends: &Backends, tally: &Tally, secs: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut header = String::from("   time");
    for (addr, version) in &backends.0 {
        let _ = write!(header, " {:>22}", format!("{addr} {version}"));
    }
    writeln!(out, "{header}   v2 share  failed")?;
    while started.elapsed() < secs {
        tokio::time::sleep(Duration::from_secs(1).min(secs)).await;
        let index = tally.current.load(Ordering::SeqCst);
        let buckets = tally.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let b = &buckets[index];
        let mut row = format!("  {:>4.1}s", started.elapsed().as_secs_f64());
        for (addr, _) in &backends.0 {
            let _ = write!(row, " {:>22}", b.by_endpoint.get(addr).copied().unwrap_or(0));
        }
        let _ = write!(row, "   {:>7.1}%  {:>6}", v2_share(backends, b) * 100.0, b.failed);
        writeln!(out, "{row}")?;
    }
    Ok(())
}

fn v2_share(backends: &Backends, b: &Bucket) -> f64 {
    let ok: u64 = b.by_endpoint.values().sum();
    let v2: u64 = b.by_endpoint.iter().filter(|(a, _)| backends.version(a) == "v2").map(|(_, n)| n).sum();
    v2 as f64 / ok.max(1) as f64
}

fn summary_table(backends: &Backends, buckets: &[Bucket]) -> String {
    let mut table = format!("{:<16} {:>6}", "phase", "calls");
    for (addr, version) in &backends.0 {
        let _ = write!(table, " {:>22}", format!("{addr} {version}"));
    }
    let _ = writeln!(table, " {:>9} {:>7} {:>8} {:>8}", "v2 share", "failed", "p50 ms", "p99 ms");
    for b in buckets {
        let label = &b.label;
        let _ = write!(table, "{label:<16} {:>6}", b.calls());
        for (addr, _) in &backends.0 {
            let _ = write!(table, " {:>22}", b.by_endpoint.get(addr).copied().unwrap_or(0));
        }
        let ms = |us: u64| us as f64 / 1000.0;
        let _ = writeln!(
            table,
            " {:>8.1}% {:>7} {:>8.2} {:>8.2}",
            v2_share(backends, b) * 100.0,
            b.failed,
            ms(b.percentile(0.5)),
            ms(b.percentile(0.99))
        );
    }
    table
}

fn summary_json(backends: &Backends, buckets: &[Bucket], switches: &[Duration]) -> serde_json::Value {
    let phases: Vec<serde_json::Value> = buckets
        .iter()
        .map(|b| {
            let by_endpoint: BTreeMap<String, u64> = b.by_endpoint.iter().map(|(a, n)| (a.to_string(), *n)).collect();
            let mut by_version: BTreeMap<&str, u64> = BTreeMap::new();
            for (addr, n) in &b.by_endpoint {
                *by_version.entry(backends.version(addr)).or_default() += n;
            }
            json!({
                "phase": b.label,
                "calls": b.calls(),
                "failed": b.failed,
                "by_endpoint": by_endpoint,
                "by_version": by_version,
                "v2_share": v2_share(backends, b),
                "latency_us": { "p50": b.percentile(0.5), "p99": b.percentile(0.99) },
            })
        })
        .collect();
    let backends: BTreeMap<String, &str> = backends.0.iter().map(|(a, v)| (a.to_string(), *v)).collect();
    let switches: Vec<u128> = switches.iter().map(Duration::as_millis).collect();
    json!({ "backends": backends, "phases": phases, "edit_to_client_ms": switches })
}
