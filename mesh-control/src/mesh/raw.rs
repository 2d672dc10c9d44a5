//! The mesh file as written: serde types, validated into [`super::Mesh`].

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_saphyr::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMesh {
    #[serde(default)]
    pub(super) services: BTreeMap<String, Spanned<RawService>>,
    #[serde(default)]
    pub(super) views: BTreeMap<String, Spanned<RawView>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawView {
    pub(super) services: Vec<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawService {
    pub(super) lb: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) endpoints: Vec<Spanned<RawEndpoint>>,
    pub(super) kubernetes: Option<Spanned<RawKube>>,
    #[serde(default)]
    pub(super) subsets: BTreeMap<String, Spanned<RawSubset>>,
    #[serde(default)]
    pub(super) routes: Vec<Spanned<RawRoute>>,
    pub(super) timeout: Option<Spanned<String>>,
    pub(super) retries: Option<Spanned<RawRetries>>,
    pub(super) hedge: Option<Spanned<RawHedge>>,
    pub(super) circuit_breakers: Option<RawCircuitBreakers>,
    pub(super) outlier_detection: Option<RawOutlierDetection>,
    pub(super) rate_limit: Option<Spanned<RawRateLimit>>,
    pub(super) server_rate_limit: Option<Spanned<RawRateLimit>>,
    pub(super) adaptive_concurrency: Option<Spanned<RawAdaptive>>,
    pub(super) fault: Option<Spanned<RawFault>>,
    pub(super) mtls: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) authorization: Vec<Spanned<RawRule>>,
    pub(super) authorization_default: Option<Spanned<String>>,
    pub(super) sidecar: Option<RawSidecar>,
}

/// `127.0.0.1:50051` or `{ address: 127.0.0.1:50051, weight: 2, zone: a, labels: { version: v1 } }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawEndpoint {
    Address(String),
    Full(RawEndpointFull),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEndpointFull {
    pub(super) address: String,
    pub(super) weight: Option<u32>,
    pub(super) zone: Option<String>,
    pub(super) region: Option<String>,
    #[serde(default)]
    pub(super) labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKube {
    pub(super) service: String,
    #[serde(default = "default_namespace")]
    pub(super) namespace: String,
    pub(super) port: RawPort,
}

fn default_namespace() -> String {
    "default".to_owned()
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawPort {
    Number(u16),
    Name(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSubset {
    #[serde(default)]
    pub(super) labels: BTreeMap<String, String>,
    #[serde(default)]
    pub(super) endpoints: Vec<Spanned<RawEndpoint>>,
    pub(super) kubernetes: Option<Spanned<RawKube>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    #[serde(rename = "match")]
    pub(super) matches: Option<RawMatch>,
    pub(super) split: Spanned<BTreeMap<String, Spanned<u32>>>,
    pub(super) timeout: Option<Spanned<String>>,
    pub(super) retries: Option<Spanned<RawRetries>>,
    /// Subsets or services a share of the route's calls is copied to, each with its percent.
    pub(super) mirror: Option<BTreeMap<String, Spanned<u32>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMatch {
    pub(super) path_prefix: Option<Spanned<String>>,
    pub(super) path_exact: Option<Spanned<String>>,
    pub(super) path_regex: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) headers: BTreeMap<String, Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetries {
    pub(super) attempts: u32,
    #[serde(default)]
    pub(super) on: Vec<String>,
    pub(super) per_try_timeout: Option<Spanned<String>>,
    pub(super) backoff: Option<RawBackoff>,
    pub(super) budget_percent: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHedge {
    pub(super) attempts: u32,
    pub(super) delay: Spanned<String>,
    #[serde(default)]
    pub(super) on: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackoff {
    pub(super) base: Spanned<String>,
    pub(super) max: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCircuitBreakers {
    pub(super) max_connections: Option<u32>,
    pub(super) max_pending_requests: Option<u32>,
    pub(super) max_requests: Option<u32>,
    pub(super) max_retries: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOutlierDetection {
    pub(super) consecutive_errors: Option<Spanned<u32>>,
    pub(super) consecutive_gateway_errors: Option<Spanned<u32>>,
    pub(super) interval: Option<Spanned<String>>,
    pub(super) base_ejection_time: Option<Spanned<String>>,
    pub(super) max_ejection_time: Option<Spanned<String>>,
    pub(super) max_ejection_percent: Option<Spanned<u32>>,
    pub(super) success_rate: Option<RawSuccessRate>,
    pub(super) failure_percentage: Option<RawFailurePercentage>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSuccessRate {
    pub(super) stdev_factor: Option<f64>,
    pub(super) minimum_hosts: Option<u32>,
    pub(super) request_volume: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFailurePercentage {
    pub(super) threshold: Spanned<u32>,
    pub(super) minimum_hosts: Option<u32>,
    pub(super) request_volume: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdaptive {
    pub(super) update_interval: Option<Spanned<String>>,
    pub(super) min_rtt_interval: Option<Spanned<String>>,
    pub(super) min_rtt: Option<Spanned<String>>,
    pub(super) min_limit: Option<u32>,
    pub(super) max_limit: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateLimit {
    pub(super) requests_per_second: u32,
    pub(super) burst: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFault {
    pub(super) delay: Option<RawDelay>,
    pub(super) abort: Option<RawAbort>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDelay {
    pub(super) percent: Spanned<u32>,
    pub(super) duration: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAbort {
    pub(super) percent: Spanned<u32>,
    pub(super) grpc_status: Spanned<RawCode>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawCode {
    Number(i32),
    Name(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    pub(super) action: String,
    pub(super) from: Option<Spanned<Vec<String>>>,
    pub(super) not_from: Option<Spanned<Vec<String>>>,
    pub(super) namespaces: Option<Spanned<Vec<String>>>,
    pub(super) paths: Option<Spanned<Vec<String>>>,
    pub(super) not_paths: Option<Spanned<Vec<String>>>,
    pub(super) methods: Option<Spanned<Vec<String>>>,
    pub(super) headers: Option<Spanned<BTreeMap<String, String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSidecar {
    pub(super) port: Spanned<u16>,
}
