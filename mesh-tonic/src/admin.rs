//! The admin endpoint of a process using the mesh (opt-in): `/live`, `/ready`, `/metrics` (Prometheus text),
//! `/clusters` and `/config_dump` (JSON), over HTTP/1.1 or HTTP/2; and on the same port, over HTTP/2, the CSDS
//! gRPC service (`envoy.service.status.v3.ClientStatusDiscoveryService`, [`xds_client::csds`]) for standard
//! xDS debugging tools.
//!
//! Metrics: [`Prometheus::install`] makes an OpenTelemetry SDK meter provider whose reader is the OpenTelemetry
//! Rust project's Prometheus exporter, and installs it as the global provider, so the channels and server
//! layers built after it ([`mesh_tower::telemetry::default_meter`]) record into it. The mesh's own counters (retries,
//! budget exhaustion, ejections, breaker and adaptive overflows, rate limits, faults, TLS handshake failures
//! by reason) are observable counters read from the channels given to [`Admin::channel`] at scrape time: they
//! cost the calls nothing. So are gRPC's outlier detection metrics (A91) and, for the client given to
//! [`Admin::xds`], its XdsClient metrics (A78).

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::{Channel, Error, Result};

/// The CSDS service's path prefix.
const CSDS_PATH: &str = "/envoy.service.status.v3.ClientStatusDiscoveryService/";

/// An OpenTelemetry meter provider exporting to a Prometheus registry.
#[derive(Clone, Debug)]
pub struct Prometheus {
    registry: prometheus::Registry,
    provider: SdkMeterProvider,
}

impl Prometheus {
    /// A provider exporting to a new registry, not installed anywhere.
    pub fn new() -> Result<Self> {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .without_target_info()
            .scope_info_enabled(false)
            .build()
            .map_err(|e| Error::Admin(format!("Prometheus exporter: {e}")))?;
        let provider = SdkMeterProvider::builder().with_reader(exporter).build();
        Ok(Self { registry, provider })
    }

    /// A provider as [`new`](Self::new), installed as the global meter provider.
    pub fn install() -> Result<Self> {
        let this = Self::new()?;
        opentelemetry::global::set_meter_provider(this.provider.clone());
        mesh_tower::telemetry::record_into_global_provider();
        Ok(this)
    }

    /// The mesh's meter of this provider.
    pub fn meter(&self) -> Meter {
        self.provider.meter(mesh_tower::telemetry::SCOPE)
    }

    /// Everything recorded so far, in Prometheus' text format.
    pub fn render(&self) -> String {
        use prometheus::Encoder as _;
        let mut out = Vec::new();
        if let Err(error) = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(%error, "encoding metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Reads or replaces the process's log filter: how `/logging` reaches the binary's `tracing` subscriber, which
/// a library does not own ([`mesh_core::logging`]).
pub type LogFilter = mesh_core::logging::LogFilter;

/// What the admin endpoint shows: the channels it was given and the xDS client behind them.
#[derive(Clone, Default)]
pub struct Admin {
    channels: Arc<Mutex<Vec<(String, Channel)>>>,
    xds: Option<xds_client::XdsClient>,
    metrics: Option<Prometheus>,
    logging: Option<LogFilter>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").field("channels", &self.channels().len()).field("logging", &self.logging.is_some()).finish_non_exhaustive()
    }
}

impl Admin {
    /// An admin endpoint showing nothing yet; `/metrics` renders `metrics`, which also gets the mesh's own
    /// counters of the channels added later.
    pub fn new(metrics: Option<Prometheus>) -> Self {
        let admin = Self { metrics, ..Self::default() };
        if let Some(metrics) = &admin.metrics {
            admin.register_counters(&metrics.meter());
        }
        admin
    }

    /// Shows `channel` under `name` in `/clusters` and `/ready`, and counts its layers' work in `/metrics`.
    pub fn channel(self, name: impl Into<String>, channel: &Channel) -> Self {
        self.channels.lock().unwrap_or_else(|e| e.into_inner()).push((name.into(), channel.clone()));
        self
    }

    /// Serves `/logging`: `GET` shows the log filter, `POST /logging?level=debug` (every target) or
    /// `POST /logging?filter=mesh_tower=debug,info` (directives) replaces it at runtime.
    pub fn logging(mut self, filter: LogFilter) -> Self {
        self.logging = Some(filter);
        self
    }

    /// Shows `client`'s resources in `/config_dump`, and its A78 counts in `/metrics`.
    pub fn xds(mut self, client: xds_client::XdsClient) -> Self {
        if let Some(metrics) = &self.metrics {
            self.register_xds(&metrics.meter(), &client);
        }
        self.xds = Some(client);
        self
    }

    /// Serves the endpoint on `listener` until the returned task is aborted.
    pub fn serve(self, listener: TcpListener) -> JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        tracing::warn!(%error, "admin accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let admin = self.clone();
                let csds = self.xds.clone().map(xds_client::csds::service);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                        let csds = csds.clone().filter(|_| request.uri().path().starts_with(CSDS_PATH));
                        let response = admin.respond(request.method(), request.uri());
                        async move {
                            let Some(mut csds) = csds else { return Ok::<_, Infallible>(response.map(tonic::body::Body::new)) };
                            tower::Service::call(&mut csds, request.map(tonic::body::Body::new)).await
                        }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                    let _ = builder.serve_connection(io, service).await;
                });
            }
        })
    }

    /// `/logging`: the filter, or a new one from `level=` or `filter=` on a POST.
    fn log_filter(&self, method: &http::Method, query: Option<&str>) -> (u16, &'static str, String) {
        let (status, text) = mesh_core::logging::answer(self.logging.as_ref(), method.as_str(), query);
        (status, "text/plain", text)
    }

    fn channels(&self) -> Vec<(String, Channel)> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Ready once every channel has a ready endpoint.
    fn is_ready(&self) -> bool {
        self.channels().iter().all(|(_, c)| c.endpoints().iter().any(|e| e.state == mesh_tower::balance::ConnState::Ready))
    }

    fn respond(&self, method: &http::Method, uri: &http::Uri) -> http::Response<Full<Bytes>> {
        let (status, content_type, body) = match uri.path() {
            "/logging" => self.log_filter(method, uri.query()),
            "/live" => (200, "text/plain", "ok\n".to_owned()),
            "/ready" if self.is_ready() => (200, "text/plain", "ok\n".to_owned()),
            "/ready" => (503, "text/plain", "a channel has no ready endpoint\n".to_owned()),
            "/metrics" => match &self.metrics {
                Some(metrics) => (200, "text/plain; version=0.0.4", metrics.render()),
                None => (404, "text/plain", "metrics are not exported by this process\n".to_owned()),
            },
            "/clusters" => (200, "application/json", pretty(&self.clusters())),
            "/config_dump" => (200, "application/json", pretty(&self.config_dump())),
            _ => (404, "text/plain", "not found: try /live, /ready, /metrics, /clusters, /config_dump, /logging\n".to_owned()),
        };
        let mut response = http::Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
        response
    }

    /// `/clusters`: each channel's clusters and endpoints, with health, ejection and load.
    pub fn clusters(&self) -> Value {
        let channels = self.channels().into_iter().map(|(name, channel)| {
            let clusters = channel.clusters().into_iter().map(|(cluster, endpoints)| {
                let endpoints = endpoints
                    .iter()
                    .map(|e| {
                        json!({
                            "address": e.endpoint.addr.to_string(),
                            "state": format!("{:?}", e.state),
                            "in_flight": e.in_flight,
                            "successes": e.successes,
                            "failures": e.failures,
                            "ejected": e.ejected,
                            "weight": e.endpoint.weight,
                            "locality": { "region": e.endpoint.locality.region, "zone": e.endpoint.locality.zone, "sub_zone": e.endpoint.locality.sub_zone },
                        })
                    })
                    .collect::<Vec<_>>();
                json!({ "name": cluster, "endpoints": endpoints })
            });
            json!({ "channel": name, "target": channel.target(), "clusters": clusters.collect::<Vec<_>>() })
        });
        json!({ "channels": channels.collect::<Vec<_>>() })
    }

    /// `/config_dump`: the xDS client's resources, with status and NACK reason.
    pub fn config_dump(&self) -> Value {
        let Some(client) = &self.xds else { return json!({ "resources": [] }) };
        let resources = xds_client::to_json(&client.dump());
        json!({ "node": client.bootstrap().node.id, "server": client.connected_server(), "resources": resources })
    }

    /// The mesh's own counters as observable instruments, read at collection time from the channels.
    fn register_counters(&self, meter: &Meter) {
        type Read = fn(&mesh_tower::stats::ClusterCounts) -> u64;
        use mesh_core::outlier::Reason;
        let cluster_counters: [(&'static str, &'static str, Read); 16] = [
            ("mesh.client.retries", "Attempts after a call's first.", |c| c.retries),
            ("mesh.client.retry_budget_exhausted", "Retries and hedges the retry budget refused.", |c| c.retry_budget_exhausted),
            ("mesh.client.hedges", "Hedged attempts sent.", |c| c.hedges),
            ("mesh.client.retry_overflows", "Retries not sent because max_retries were in flight.", |c| c.retry_overflows),
            ("mesh.client.breaker_overflows", "Calls the circuit breaker turned away.", |c| c.overflows),
            // A91's names; the consecutive methods, which gRPC does not have, under ours.
            ("grpc.lb.outlier_detection.ejections_enforced_total", "Endpoints outlier detection ejected.", |c| c.ejections),
            ("grpc.lb.outlier_detection.ejections_overflow", "Outliers not ejected because of max_ejection_percent.", |c| {
                c.outliers.overflows
            }),
            ("grpc.lb.outlier_detection.ejections_enforced_success_rate", "Endpoints ejected for their success rate.", |c| {
                c.outliers.ejected(Reason::SuccessRate)
            }),
            ("grpc.lb.outlier_detection.ejections_detected_success_rate", "Success-rate outliers, ejected or not.", |c| {
                c.outliers.detected(Reason::SuccessRate)
            }),
            ("grpc.lb.outlier_detection.ejections_enforced_failure_percentage", "Endpoints ejected for their failure percentage.", |c| {
                c.outliers.ejected(Reason::FailurePercentage)
            }),
            ("grpc.lb.outlier_detection.ejections_detected_failure_percentage", "Failure-percentage outliers, ejected or not.", |c| {
                c.outliers.detected(Reason::FailurePercentage)
            }),
            ("mesh.client.outlier_detection.ejections_enforced_consecutive_5xx", "Endpoints ejected for consecutive server errors.", |c| {
                c.outliers.ejected(Reason::Consecutive5xx)
            }),
            (
                "mesh.client.outlier_detection.ejections_detected_consecutive_5xx",
                "Consecutive server error outliers, ejected or not.",
                |c| c.outliers.detected(Reason::Consecutive5xx),
            ),
            (
                "mesh.client.outlier_detection.ejections_enforced_consecutive_gateway_failure",
                "Endpoints ejected for consecutive gateway errors.",
                |c| c.outliers.ejected(Reason::ConsecutiveGateway),
            ),
            (
                "mesh.client.outlier_detection.ejections_detected_consecutive_gateway_failure",
                "Consecutive gateway error outliers, ejected or not.",
                |c| c.outliers.detected(Reason::ConsecutiveGateway),
            ),
            ("mesh.client.adaptive_shed", "Calls the adaptive concurrency limit turned away.", |c| c.adaptive_shed),
        ];
        for (name, description, read) in cluster_counters {
            let channels = self.channels.clone();
            meter
                .u64_observable_counter(name)
                .with_description(description)
                .with_callback(move |observer| {
                    for (_, channel) in channels.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                        for (cluster, counts) in channel.counts() {
                            let attributes = [
                                KeyValue::new("grpc.target", channel.target().to_owned()),
                                KeyValue::new("grpc.lb.backend_service", cluster),
                            ];
                            observer.observe(read(&counts), &attributes);
                        }
                    }
                })
                .build();
        }
        type ReadTarget = fn(&mesh_tower::stats::TargetCounts) -> u64;
        let target_counters: [(&'static str, &'static str, ReadTarget); 4] = [
            ("mesh.client.rate_limited", "Calls the local rate limit turned away.", |c| c.rate_limited),
            ("mesh.client.fault_delays", "Calls fault injection delayed.", |c| c.fault_delays),
            ("mesh.client.fault_aborts", "Calls fault injection aborted.", |c| c.fault_aborts),
            ("mesh.client.mirrored", "Copies of calls sent to shadow clusters.", |c| c.mirrored),
        ];
        for (name, description, read) in target_counters {
            let channels = self.channels.clone();
            meter
                .u64_observable_counter(name)
                .with_description(description)
                .with_callback(move |observer| {
                    for (_, channel) in channels.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                        let attributes = [KeyValue::new("grpc.target", channel.target().to_owned())];
                        observer.observe(read(&channel.target_counts()), &attributes);
                    }
                })
                .build();
        }
        let channels = self.channels.clone();
        meter
            .u64_observable_counter("mesh.client.tls_handshake_failures")
            .with_description("TLS handshakes that failed, by reason.")
            .with_callback(move |observer| {
                for (_, channel) in channels.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                    for (reason, count) in channel.handshake_counts().failures() {
                        let attributes =
                            [KeyValue::new("grpc.target", channel.target().to_owned()), KeyValue::new("reason", reason.name())];
                        observer.observe(count, &attributes);
                    }
                }
            })
            .build();
    }
}

impl Admin {
    /// gRPC A78's XdsClient metrics of `client`, read at collection time. Their `grpc.target` is the xDS channel's
    /// target when the endpoint shows one, else `#shared`: one client serves every xDS target of a process
    /// (gRPC makes one per target, A71).
    fn register_xds(&self, meter: &Meter, client: &xds_client::XdsClient) {
        let target = {
            let channels = self.channels.clone();
            move || {
                let channels = channels.lock().unwrap_or_else(|e| e.into_inner());
                let mut xds = channels.iter().map(|(_, c)| c.target()).filter(|t| t.starts_with("xds:"));
                match (xds.next(), xds.next()) {
                    (Some(only), None) => KeyValue::new("grpc.target", only.to_owned()),
                    _ => KeyValue::new("grpc.target", "#shared"),
                }
            }
        };
        let server = |counts: &xds_client::ServerCounts| KeyValue::new("grpc.xds.server", counts.server.clone());
        let kind = |ty: xds_client::resource::ResourceType| {
            KeyValue::new("grpc.xds.resource_type", ty.type_url().trim_start_matches("type.googleapis.com/"))
        };
        let (c, t) = (client.clone(), target.clone());
        meter
            .u64_observable_gauge("grpc.xds_client.connected")
            .with_unit("{bool}")
            .with_description("Whether the xDS client has a working ADS stream to the server (A78).")
            .with_callback(move |observer| {
                for counts in c.server_counts() {
                    observer.observe(u64::from(counts.connected), &[t(), server(&counts)]);
                }
            })
            .build();
        let (c, t) = (client.clone(), target.clone());
        meter
            .u64_observable_counter("grpc.xds_client.server_failure")
            .with_unit("{failure}")
            .with_description("Times an xDS server went from working to failing (A78).")
            .with_callback(move |observer| {
                for counts in c.server_counts() {
                    observer.observe(counts.failures, &[t(), server(&counts)]);
                }
            })
            .build();
        type Read = fn(&xds_client::ServerCounts, xds_client::resource::ResourceType) -> u64;
        let updates: [(&'static str, &'static str, Read); 2] = [
            ("grpc.xds_client.resource_updates_valid", "Resources received that were valid, unchanged ones included (A78).", |c, ty| {
                c.valid(ty)
            }),
            ("grpc.xds_client.resource_updates_invalid", "Resources received that were invalid (A78).", |c, ty| c.invalid(ty)),
        ];
        for (name, description, read) in updates {
            let (c, t) = (client.clone(), target.clone());
            meter
                .u64_observable_counter(name)
                .with_unit("{resource}")
                .with_description(description)
                .with_callback(move |observer| {
                    for counts in c.server_counts() {
                        for ty in xds_client::resource::ResourceType::ALL {
                            observer.observe(read(&counts, ty), &[t(), server(&counts), kind(ty)]);
                        }
                    }
                })
                .build();
        }
        let c = client.clone();
        meter
            .u64_observable_gauge("grpc.xds_client.resources")
            .with_unit("{resource}")
            .with_description("xDS resources the client holds, by authority, cache state and type (A78).")
            .with_callback(move |observer| {
                for count in c.resource_counts() {
                    let attributes = [
                        target(),
                        KeyValue::new("grpc.xds.authority", count.authority),
                        KeyValue::new("grpc.xds.cache_state", count.cache_state),
                        kind(count.resource_type),
                    ];
                    observer.observe(count.count, &attributes);
                }
            })
            .build();
    }
}

fn pretty(value: &Value) -> String {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    text.push('\n');
    text
}
