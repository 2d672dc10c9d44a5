//! `meshctl call`.
//!
//! Contract:
//! `meshctl call --target <uri> --method /pkg.Service/Method [--data-hex HEX]
//! [--n N] [--concurrency C] [--timeout-ms T]
//! [--lb round_robin|least_request|p2c_ewma|ring_hash] [--json]
//! [--cert F --key F --ca F [--expect-identity <spiffe-id>]]`
//!
//! With `--cert`, `--key` and `--ca` (PEM files: the chain with the leaf first, its key, the trust bundle)
//! every call speaks mTLS and checks the server's SPIFFE ID: against `--expect-identity` when given, else
//! any ID the bundle vouches for. An `xds:///` target's clusters keep the TLS policy CDS gives them.
//!
//! With `--json`, stdout holds one JSON object:
//! `{"sent":N,"ok":K,"by_code":{"OK":K,...},"by_endpoint":{"ip:port":n,...},
//! "by_response":{"<utf8 or hex of response bytes>":n,...},
//! "latency_us":{"p50":..,"p90":..,"p99":..,"max":..},
//! "tls_handshake_failures":{"<reason: expired, wrong_identity, unknown_ca, ...>":n,...}}`.
//! Exit status: 0 when every call returned OK, 1 when some failed, 2 for a bad
//! target, method or flag (one error line on stderr).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mesh_core::{GrpcCode, LbPolicy};
use mesh_tonic::codec::BytesCodec;
use mesh_tonic::{Channel, ServedBy};
use serde_json::json;
use tonic::Code;
use tonic::codegen::http::uri::PathAndQuery;

/// Arguments of `meshctl call`.
#[derive(Debug, clap::Args)]
pub(crate) struct CallArgs {
    /// Target URI: static:///ip:port,..., dns:///host:port, dns://server/_srv._tcp.name.
    #[arg(long)]
    target: String,
    /// Full method path, /package.Service/Method.
    #[arg(long)]
    method: String,
    /// Request message as hex (protobuf bytes); empty by default.
    #[arg(long, default_value = "")]
    data_hex: String,
    /// Number of calls.
    #[arg(long, default_value_t = 1)]
    n: u64,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 1)]
    concurrency: u32,
    /// Deadline of each call in milliseconds.
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Load-balancing policy.
    #[arg(long, default_value = "round_robin", value_parser = ["round_robin", "weighted_round_robin", "least_request", "p2c_ewma", "ring_hash"])]
    lb: String,
    /// Extra request metadata, `name=value` (repeatable); `x-mesh-hash-key` feeds ring_hash.
    #[arg(long = "header", value_name = "NAME=VALUE")]
    headers: Vec<String>,
    /// Print one JSON summary object on stdout.
    #[arg(long)]
    json: bool,
    /// mTLS: this workload's certificate chain (PEM, the leaf first).
    #[arg(long, requires_all = ["key", "ca"])]
    cert: Option<std::path::PathBuf>,
    /// mTLS: the certificate's private key (PEM).
    #[arg(long, requires_all = ["cert", "ca"])]
    key: Option<std::path::PathBuf>,
    /// mTLS: the trust bundle the server's chain must lead to (PEM).
    #[arg(long, requires_all = ["cert", "key"])]
    ca: Option<std::path::PathBuf>,
    /// mTLS: the server's SPIFFE ID that is accepted (any in the bundle when absent).
    #[arg(long, requires = "cert")]
    expect_identity: Option<String>,
    /// Serve the admin endpoint (`/metrics`, `/clusters`, `/config_dump`, `/ready`, `/live`) on this address
    /// while the calls run.
    #[arg(long, value_name = "ADDR")]
    admin: Option<std::net::SocketAddr>,
    /// Keep serving the admin endpoint this many seconds after the calls end (for a scraper).
    #[arg(long, requires = "admin", default_value_t = 0)]
    linger_s: u64,
    /// Write an access line (on stderr, target `mesh::access`, JSON with `--log-format json`) for this share of
    /// the calls, 0 to 1.
    #[arg(long, value_name = "SHARE")]
    access_log: Option<f64>,
    /// Trace the calls and export the spans over OTLP/gRPC to this collector (`http://host:4317`).
    #[arg(long, value_name = "ENDPOINT")]
    otlp: Option<String>,
    /// With --otlp: the share of calls traced, 0 to 1.
    #[arg(long, requires = "otlp", default_value_t = 1.0)]
    trace_ratio: f64,
    /// With --otlp: how calls carry their trace context (comma-separated).
    #[arg(long, requires = "otlp", value_delimiter = ',', default_value = "tracecontext", value_parser = ["tracecontext", "b3", "b3multi"])]
    propagation: Vec<String>,
}

/// Installs the OTLP trace pipeline of `--otlp`, before the channel is built so that it traces.
fn start_tracing(args: &CallArgs) -> Result<Option<mesh_tonic::telemetry::Tracing>, String> {
    use mesh_tonic::telemetry::{Propagation, Tracing};
    let Some(endpoint) = &args.otlp else { return Ok(None) };
    let propagation: Vec<Propagation> = args
        .propagation
        .iter()
        .map(|p| match p.as_str() {
            "b3" => Propagation::B3Single,
            "b3multi" => Propagation::B3Multi,
            _ => Propagation::TraceContext,
        })
        .collect();
    let tracing = Tracing::otlp(endpoint, args.trace_ratio).propagation(&propagation).service_name("meshctl").install();
    tracing.map(Some).map_err(|e| format!("--otlp {endpoint}: {e}"))
}

/// The channel's mTLS credentials from the flags' files, each error naming its file.
fn credentials(args: &CallArgs) -> Result<Option<mesh_tower::tls::Credentials>, String> {
    let (Some(cert), Some(key), Some(ca)) = (&args.cert, &args.key, &args.ca) else { return Ok(None) };
    let read = |flag: &str, path: &std::path::Path| std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()));
    let (chain, key_pem, bundle) = (read("--cert", cert)?, read("--key", key)?, read("--ca", ca)?);
    mesh_tower::tls::Credentials::from_pem(&chain, &key_pem, &bundle).map(Some).map_err(|e| {
        let file = match e.what {
            "key" => key,
            "trust bundle" => ca,
            _ => cert,
        };
        format!("{}: {e}", file.display())
    })
}

/// Per-worker tallies, merged at the end.
#[derive(Default)]
struct Tally {
    by_code: BTreeMap<&'static str, u64>,
    by_endpoint: BTreeMap<String, u64>,
    by_response: BTreeMap<String, u64>,
    latencies_us: Vec<u64>,
    errors: BTreeMap<String, u64>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        for (k, v) in other.by_code {
            *self.by_code.entry(k).or_default() += v;
        }
        for (k, v) in other.by_endpoint {
            *self.by_endpoint.entry(k).or_default() += v;
        }
        for (k, v) in other.by_response {
            *self.by_response.entry(k).or_default() += v;
        }
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.latencies_us.extend(other.latencies_us);
    }
}

fn usage_error(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(2)
}

pub(crate) async fn run(args: CallArgs) -> ExitCode {
    let method = match parse_method(&args.method) {
        Ok(m) => m,
        Err(e) => return usage_error(e),
    };
    let data = match decode_hex(&args.data_hex) {
        Ok(d) => Bytes::from(d),
        Err(e) => return usage_error(format!("--data-hex: {e}")),
    };
    let metadata = match parse_headers(&args.headers) {
        Ok(m) => m,
        Err(e) => return usage_error(e),
    };
    let lb = match LbPolicy::from_str(&args.lb) {
        Ok(lb) => lb,
        Err(e) => return usage_error(e),
    };
    // The metrics provider is installed before the channel is built, so the channel records into it.
    let admin = match &args.admin {
        Some(addr) => match start_admin(*addr).await {
            Ok(admin) => Some(admin),
            Err(e) => return usage_error(e),
        },
        None => None,
    };
    let tracing = match start_tracing(&args) {
        Ok(tracing) => tracing,
        Err(e) => return usage_error(e),
    };
    let mut builder = Channel::builder(&args.target).lb(lb);
    if let Some(share) = args.access_log {
        builder = builder.access_log(share);
    }
    match credentials(&args) {
        Ok(Some(credentials)) => {
            let policy = mesh_core::policy::TlsPolicy {
                server_name: None,
                allowed_identities: args.expect_identity.iter().cloned().collect(),
                ..Default::default()
            };
            builder = builder.mtls(Arc::new(credentials), policy);
        }
        Ok(None) => {}
        Err(e) => return usage_error(e),
    }
    if let Some(ms) = args.timeout_ms {
        builder = builder.timeout(Duration::from_millis(ms));
    }
    let channel = match builder.build() {
        Ok(c) => c,
        Err(e) => return usage_error(e),
    };
    let _admin = admin.map(|(admin, listener)| {
        let mut admin = admin.channel("call", &channel);
        if args.target.starts_with("xds:")
            && let Ok(client) = mesh_tonic::shared_client()
        {
            admin = admin.xds(client);
        }
        AbortOnDrop(admin.serve(listener))
    });

    let remaining = Arc::new(AtomicU64::new(args.n));
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let (channel, method, data, metadata) = (channel.clone(), method.clone(), data.clone(), metadata.clone());
        let (remaining, done) = (remaining.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            let mut grpc = tonic::client::Grpc::new(channel);
            let mut tally = Tally::default();
            while remaining.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| r.checked_sub(1)).is_ok() {
                let mut request = tonic::Request::new(data.clone());
                for (name, value) in &metadata {
                    request.metadata_mut().insert(name.clone(), value.clone());
                }
                let start = Instant::now();
                let result = match grpc.ready().await {
                    Ok(()) => grpc.unary(request, method.clone(), BytesCodec).await,
                    Err(e) => Err(tonic::Status::unavailable(e.to_string())),
                };
                tally.latencies_us.push(start.elapsed().as_micros() as u64);
                match result {
                    Ok(response) => {
                        *tally.by_code.entry(code_name(Code::Ok)).or_default() += 1;
                        if let Some(ServedBy(addr)) = response.extensions().get::<ServedBy>() {
                            *tally.by_endpoint.entry(addr.to_string()).or_default() += 1;
                        }
                        *tally.by_response.entry(render(response.get_ref())).or_default() += 1;
                    }
                    Err(status) => {
                        *tally.by_code.entry(code_name(status.code())).or_default() += 1;
                        *tally.errors.entry(format!("{}: {}", code_name(status.code()), status.message())).or_default() += 1;
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            tally
        }));
    }

    let progress = tokio::spawn({
        let done = done.clone();
        let n = args.n;
        async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                eprintln!("meshctl: {}/{} calls done", done.load(Ordering::Relaxed), n);
            }
        }
    });
    let mut tally = Tally::default();
    for worker in workers {
        match worker.await {
            Ok(t) => tally.merge(t),
            Err(e) => eprintln!("meshctl: worker failed: {e}"),
        }
    }
    progress.abort();
    let elapsed = started.elapsed();

    let ok = tally.by_code.get("OK").copied().unwrap_or(0);
    let sent = tally.latencies_us.len() as u64;
    tally.latencies_us.sort_unstable();
    let pct = |p: f64| -> u64 {
        if tally.latencies_us.is_empty() {
            return 0;
        }
        let idx = ((p / 100.0) * tally.latencies_us.len() as f64).ceil() as usize;
        tally.latencies_us[idx.saturating_sub(1).min(tally.latencies_us.len() - 1)]
    };
    let failures: BTreeMap<&str, u64> = channel.handshake_counts().failures().into_iter().map(|(reason, n)| (reason.name(), n)).collect();
    if args.json {
        let summary = json!({
            "sent": sent,
            "ok": ok,
            "by_code": tally.by_code,
            "by_endpoint": tally.by_endpoint,
            "by_response": tally.by_response,
            "latency_us": {"p50": pct(50.0), "p90": pct(90.0), "p99": pct(99.0), "max": tally.latencies_us.last().copied().unwrap_or(0)},
            "tls_handshake_failures": failures,
        });
        println!("{summary}");
    } else {
        println!("sent {sent}, ok {ok} in {elapsed:.2?}");
        for (code, n) in &tally.by_code {
            println!("  {code:<20} {n}");
        }
        for (endpoint, n) in &tally.by_endpoint {
            println!("  endpoint {endpoint:<22} {n}");
        }
        for (response, n) in &tally.by_response {
            println!("  response {response:?}: {n}");
        }
        println!("  latency p50 {}us p90 {}us p99 {}us", pct(50.0), pct(90.0), pct(99.0));
    }
    for (error, n) in &tally.errors {
        eprintln!("meshctl: {n} × {error}");
    }
    if let Some(tracing) = tracing {
        // The export blocks: off the runtime's threads, whose tasks carry the exporter's connection.
        let flushed = tokio::task::spawn_blocking(move || tracing.shutdown()).await;
        if let Ok(Err(error)) = flushed {
            eprintln!("meshctl: {error}");
        }
    }
    if args.linger_s > 0 {
        tokio::time::sleep(Duration::from_secs(args.linger_s)).await;
    }
    if ok == sent { ExitCode::SUCCESS } else { ExitCode::from(1) }
}

/// Installs the Prometheus metrics provider and binds the admin listener, saying where it listens.
pub(crate) async fn start_admin(addr: std::net::SocketAddr) -> Result<(mesh_tonic::admin::Admin, tokio::net::TcpListener), String> {
    let metrics = mesh_tonic::admin::Prometheus::install().map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("--admin {addr}: {e}"))?;
    let bound = listener.local_addr().map_err(|e| format!("--admin {addr}: {e}"))?;
    eprintln!("meshctl: admin endpoint on http://{bound}");
    let mut admin = mesh_tonic::admin::Admin::new(Some(metrics));
    if let Some(filter) = crate::LOG_FILTER.get() {
        admin = admin.logging(filter.clone());
    }
    Ok((admin, listener))
}

/// Aborts the admin task when the command ends.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn parse_method(method: &str) -> Result<PathAndQuery, String> {
    let valid = method
        .strip_prefix('/')
        .and_then(|m| m.split_once('/'))
        .is_some_and(|(svc, m)| !svc.is_empty() && !m.is_empty() && !m.contains('/'));
    if !valid {
        return Err(format!("invalid method {method:?}: expected /package.Service/Method"));
    }
    PathAndQuery::from_str(method).map_err(|e| format!("invalid method {method:?}: {e}"))
}

/// One `--header` as gRPC metadata.
type Header = (tonic::metadata::MetadataKey<tonic::metadata::Ascii>, tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

fn parse_headers(headers: &[String]) -> Result<Vec<Header>, String> {
    headers
        .iter()
        .map(|h| {
            let (k, v) = h.split_once('=').ok_or_else(|| format!("--header {h:?}: expected NAME=VALUE"))?;
            let key = k.parse().map_err(|_| format!("--header {h:?}: invalid name"))?;
            let value = v.parse().map_err(|_| format!("--header {h:?}: invalid value"))?;
            Ok((key, value))
        })
        .collect()
}

fn decode_hex(hex: &str) -> Result<Vec<u8>, String> {
    if !hex.len().is_multiple_of(2) {
        return Err("odd number of hex digits".into());
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).map_err(|_| format!("{:?} is not hex", &hex[i..i + 2])))
        .collect()
}

/// Response bytes as text when they are UTF-8, else as hex.
fn render(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_owned(),
        Err(_) => bytes.iter().map(|b| format!("{b:02x}")).collect(),
    }
}

/// gRPC's canonical code name of a tonic code.
fn code_name(code: Code) -> &'static str {
    GrpcCode::from_i32(code as i32).map_or("UNKNOWN", GrpcCode::name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_and_hex_validation() {
        assert!(parse_method("/pkg.Svc/Method").is_ok());
        for bad in ["pkg.Svc/Method", "/pkg.Svc", "/pkg.Svc/", "//M", "/a/b/c"] {
            assert!(parse_method(bad).unwrap_err().contains(bad), "{bad}");
        }
        assert_eq!(decode_hex("0a03616263").unwrap(), b"\x0a\x03abc");
        assert!(decode_hex("abc").is_err());
        assert!(decode_hex("zz").is_err());
        assert_eq!(render(b"hi"), "hi");
        assert_eq!(render(&[0xff, 0x01]), "ff01");
    }
}
