//! Policy structs: plain data for every layer the mesh has or will have.
//!
//! Defaults follow Envoy's where Envoy has one, so a cluster configured by an
//! xDS control plane and one configured in code behave alike. Layers that are
//! not built yet still have their settings here, so the model does not change
//! shape when they arrive.

use crate::GrpcCode;
use std::str::FromStr;
use std::time::Duration;

use crate::lb::RingHashConfig;
use crate::{Error, Result};

/// Load-balancing policy of a cluster.
#[derive(Clone, Debug, PartialEq)]
pub enum LbPolicy {
    /// Plain round robin over ready endpoints.
    RoundRobin,
    /// Smooth weighted round robin (EDF) using endpoint weights.
    WeightedRoundRobin,
    /// Fewest in-flight requests among `choice_count` random candidates.
    LeastRequest {
        /// Candidates compared per pick (Envoy default 2).
        choice_count: u32,
    },
    /// Power of two choices over peak-EWMA latency times in-flight requests
    /// (Finagle/Linkerd semantics).
    P2cEwma {
        /// Latency assumed before the first response (Linkerd: 30 ms).
        default_rtt: Duration,
        /// Time constant of the moving average (Linkerd: 10 s).
        decay: Duration,
    },
    /// Consistent hashing on a request key (Envoy `RING_HASH`).
    RingHash {
        /// Ring size bounds.
        ring: RingHashConfig,
        /// What to hash.
        hash: HashPolicy,
    },
}

impl LbPolicy {
    /// P2C-EWMA with Linkerd's defaults.
    pub fn p2c_ewma() -> Self {
        Self::P2cEwma { default_rtt: Duration::from_millis(30), decay: Duration::from_secs(10) }
    }

    /// Ring hash on a request header, with Envoy's default ring bounds.
    pub fn ring_hash_header(header: impl Into<String>) -> Self {
        Self::RingHash { ring: RingHashConfig::default(), hash: HashPolicy::Header(header.into().to_ascii_lowercase()) }
    }

    /// Short name, as accepted by [`FromStr`].
    pub fn name(&self) -> &'static str {
        match self {
            Self::RoundRobin => "round_robin",
            Self::WeightedRoundRobin => "weighted_round_robin",
            Self::LeastRequest { .. } => "least_request",
            Self::P2cEwma { .. } => "p2c_ewma",
            Self::RingHash { .. } => "ring_hash",
        }
    }

    /// Checks ranges (ring bounds, non-zero durations).
    pub fn validate(&self) -> Result<()> {
        let invalid = |field, reason: &str| Error::InvalidPolicy { policy: "lb", field, reason: reason.to_owned() };
        match self {
            Self::P2cEwma { decay, .. } if decay.is_zero() => Err(invalid("decay", "must be greater than zero")),
            Self::LeastRequest { choice_count } if *choice_count < 2 => Err(invalid("choice_count", "must be at least 2")),
            Self::RingHash { ring, .. } => ring.validate().map_err(|e| invalid("ring", &e.to_string())),
            _ => Ok(()),
        }
    }
}

impl Default for LbPolicy {
    /// Round robin, the default of Envoy and gRPC.
    fn default() -> Self {
        Self::RoundRobin
    }
}

impl FromStr for LbPolicy {
    type Err = Error;

    /// Parses `round_robin`, `weighted_round_robin`, `least_request`,
    /// `p2c_ewma` or `ring_hash` (hashing the `x-mesh-hash-key` header), with
    /// default parameters.
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "round_robin" => Self::RoundRobin,
            "weighted_round_robin" => Self::WeightedRoundRobin,
            "least_request" => Self::LeastRequest { choice_count: 2 },
            "p2c_ewma" => Self::p2c_ewma(),
            "ring_hash" => Self::ring_hash_header(DEFAULT_HASH_HEADER),
            other => return Err(Error::UnknownLbPolicy(other.to_owned())),
        })
    }
}

/// Header hashed by `ring_hash` when no hash policy is configured.
pub const DEFAULT_HASH_HEADER: &str = "x-mesh-hash-key";

/// What a hashing load balancer hashes (Envoy `RouteAction.HashPolicy`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashPolicy {
    /// The value of a request header (lower-case name). Requests without it
    /// get a random hash, as in gRPC.
    Header(String),
    /// The channel (gRPC's `filter_state` key `io.grpc.channel_id`): every
    /// request of one channel hashes alike, so a client sticks to one endpoint.
    ChannelId,
}

/// One of a route's hash policies (Envoy `RouteAction.HashPolicy`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteHash {
    /// What to hash.
    pub policy: HashPolicy,
    /// When this policy yields a value, the later ones are not evaluated.
    pub terminal: bool,
}

/// Policies applied to every call to a cluster.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterPolicies {
    /// Connection establishment settings.
    pub connection: ConnectionPolicy,
    /// Limits on concurrent work (Envoy circuit breakers).
    pub circuit_breakers: CircuitBreakers,
    /// Ejection of misbehaving endpoints; `None` disables it.
    pub outlier_detection: Option<OutlierDetection>,
    /// An adaptive limit on calls in flight; `None` disables it.
    pub adaptive_concurrency: Option<AdaptiveConcurrency>,
    /// Upstream TLS; `None` means plaintext.
    pub tls: Option<TlsPolicy>,
}

/// How connections to endpoints are made and kept.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnectionPolicy {
    /// Time allowed for TCP (and TLS) connection setup.
    pub connect_timeout: Duration,
    /// TCP keepalive: idle time before the kernel probes the peer (probes
    /// then go every `idle / 2`, three of them). `None` disables it.
    pub tcp_keepalive: Option<Duration>,
    /// `TCP_USER_TIMEOUT`: a connection whose sent data stays unacknowledged
    /// this long is closed by the kernel (a dead peer under load). Linux only.
    pub tcp_user_timeout: Option<Duration>,
    /// Interval of HTTP/2 PINGs on a connection; `None` disables them.
    ///
    /// Off by default: hyper's PING keepalive costs about 9% of throughput
    /// at 64 concurrent calls (BENCHMARKS.md), while TCP keepalive and the
    /// user timeout above detect dead peers at no per-request cost. Turn it
    /// on where a proxy in the path answers TCP probes for a dead server.
    pub keepalive_interval: Option<Duration>,
    /// Time to wait for a PING ack before the connection is declared dead.
    pub keepalive_timeout: Duration,
    /// First reconnect backoff after a failure (gRPC: 1 s).
    pub reconnect_backoff_base: Duration,
    /// Largest reconnect backoff (gRPC: 120 s; ours is lower for a mesh).
    pub reconnect_backoff_max: Duration,
}

impl Default for ConnectionPolicy {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            tcp_keepalive: Some(Duration::from_secs(10)),
            tcp_user_timeout: Some(Duration::from_secs(20)),
            keepalive_interval: None,
            keepalive_timeout: Duration::from_secs(5),
            reconnect_backoff_base: Duration::from_millis(250),
            reconnect_backoff_max: Duration::from_secs(30),
        }
    }
}

/// Adaptive concurrency (Envoy's adaptive concurrency filter, its gradient controller): a cluster's limit on
/// calls in flight follows its latency, and calls over the limit are turned away at once. See
/// [`crate::adaptive`] for the arithmetic.
#[derive(Clone, Debug, PartialEq)]
pub struct AdaptiveConcurrency {
    /// The percentile of an interval's latencies the limit is computed from (0.5: the median).
    pub percentile: f64,
    /// How often the limit is recomputed.
    pub update_interval: Duration,
    /// The highest limit.
    pub max_limit: u32,
    /// The lowest limit.
    pub min_limit: u32,
    /// Where the no-load latency comes from.
    pub min_rtt: MinRtt,
    /// The limit while the no-load latency is measured.
    pub min_concurrency: u32,
    /// Share of the no-load latency added to it as tolerance (0.25: 25%).
    pub buffer: f64,
    /// The gRPC status of a call turned away.
    pub shed_code: GrpcCode,
}

impl Default for AdaptiveConcurrency {
    fn default() -> Self {
        Self {
            percentile: 0.5,
            update_interval: Duration::from_millis(100),
            max_limit: 1000,
            min_limit: 3,
            min_rtt: MinRtt::Sampled { interval: Duration::from_secs(60), requests: 50, jitter: 0.15 },
            min_concurrency: 3,
            buffer: 0.25,
            shed_code: GrpcCode::ResourceExhausted,
        }
    }
}

/// How the no-load latency of [`AdaptiveConcurrency`] is known.
#[derive(Clone, Debug, PartialEq)]
pub enum MinRtt {
    /// Measured every `interval` (plus up to `jitter` of it, drawn), from `requests` calls made at the minimum
    /// concurrency.
    Sampled {
        /// Time between measurements.
        interval: Duration,
        /// Calls a measurement takes.
        requests: u32,
        /// Share of `interval` the start of each measurement is delayed by, at most (drawn).
        jitter: f64,
    },
    /// A fixed value, never measured.
    Fixed(Duration),
}

/// Envoy circuit-breaker thresholds (defaults as Envoy's).
#[derive(Clone, Debug, PartialEq)]
pub struct CircuitBreakers {
    /// Maximum concurrent connections.
    pub max_connections: u32,
    /// Maximum queued requests waiting for a connection.
    pub max_pending_requests: u32,
    /// Maximum concurrent requests.
    pub max_requests: u32,
    /// Maximum concurrent retries.
    pub max_retries: u32,
    /// The cluster's retry budget (Envoy's `retry_budget` threshold); `None` gives [`RetryBudget::default`].
    pub retry_budget: Option<RetryBudget>,
}

impl Default for CircuitBreakers {
    fn default() -> Self {
        Self { max_connections: 1024, max_pending_requests: 1024, max_requests: 1024, max_retries: 3, retry_budget: None }
    }
}

/// A cluster's retry budget: retries stay within `ratio` of the calls of the last `window`, plus
/// `min_per_second` retries a second whatever the call rate (Linkerd's budget; the numbers come from Envoy's
/// `retry_budget`, whose defaults these are: 20%, and a floor of 3).
#[derive(Clone, Debug, PartialEq)]
pub struct RetryBudget {
    /// Retries allowed as a share of calls, 0 to 1 (Envoy's `budget_percent` / 100).
    pub ratio: f64,
    /// Retries allowed each second even when there were no calls (Envoy's `min_retry_concurrency`).
    pub min_per_second: u32,
    /// How long a call counts towards the budget (Envoy's `budget_interval`), 1 to 60 s.
    pub window: Duration,
}

impl RetryBudget {
    /// Shortest window.
    pub const MIN_WINDOW: Duration = Duration::from_secs(1);
    /// Longest window.
    pub const MAX_WINDOW: Duration = Duration::from_secs(60);

    /// Checks ranges: the ratio is 0 to 1, the window 1 to 60 s.
    pub fn validate(&self) -> Result<()> {
        let invalid = |field, reason: &str| Error::InvalidPolicy { policy: "retry_budget", field, reason: reason.to_owned() };
        if !(0.0..=1.0).contains(&self.ratio) {
            return Err(invalid("ratio", "must be 0 to 1 (0% to 100%)"));
        }
        if !(Self::MIN_WINDOW..=Self::MAX_WINDOW).contains(&self.window) {
            return Err(invalid("window", "must be 1 s to 60 s"));
        }
        Ok(())
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self { ratio: 0.2, min_per_second: 3, window: Duration::from_secs(10) }
    }
}

/// Outlier detection: endpoints that fail are ejected, taking no traffic for a while (Envoy's semantics and
/// defaults; gRPC A50's for success rate and failure percentage). An algorithm whose Envoy `enforcing_*`
/// percentage is 0 is `None` here. See [`crate::outlier`] for the decisions.
#[derive(Clone, Debug, PartialEq)]
pub struct OutlierDetection {
    /// How often success rate and failure percentage are evaluated, and ejections ended.
    pub interval: Duration,
    /// An ejection lasts this times the endpoint's ejection count.
    pub base_ejection_time: Duration,
    /// Longest ejection (or `base_ejection_time`, if longer).
    pub max_ejection_time: Duration,
    /// Most endpoints ejected at once, in percent of the cluster.
    pub max_ejection_percent: u32,
    /// One endpoint may be ejected whatever `max_ejection_percent` says (Envoy's `always_eject_one_host`).
    pub always_eject_one: bool,
    /// Consecutive server errors (5xx, or gRPC codes that map to 5xx, or transport failures) that eject at once.
    pub consecutive_5xx: Option<Consecutive>,
    /// Consecutive gateway errors (502, 503, 504, UNAVAILABLE, DEADLINE_EXCEEDED, transport failures).
    pub consecutive_gateway: Option<Consecutive>,
    /// Ejection of endpoints whose success rate is far below the cluster's mean.
    pub success_rate: Option<SuccessRate>,
    /// Ejection of endpoints whose failure percentage is over a threshold.
    pub failure_percentage: Option<FailurePercentage>,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
            always_eject_one: false,
            consecutive_5xx: Some(Consecutive { threshold: 5, enforcing: 100 }),
            consecutive_gateway: None,
            success_rate: Some(SuccessRate::default()),
            failure_percentage: None,
        }
    }
}

impl OutlierDetection {
    /// Longest consecutive-failure threshold: the per-endpoint counters are a byte each.
    pub const MAX_CONSECUTIVE: u32 = 255;

    /// Checks ranges: percentages 0 to 100, a non-zero interval, consecutive thresholds 1 to 255.
    pub fn validate(&self) -> Result<()> {
        let invalid = |field, reason: &str| Error::InvalidPolicy { policy: "outlier_detection", field, reason: reason.to_owned() };
        let percent = |field, value: u32| if value > 100 { Err(invalid(field, "a percentage is 0 to 100")) } else { Ok(()) };
        if self.interval.is_zero() {
            return Err(invalid("interval", "must be greater than zero"));
        }
        percent("max_ejection_percent", self.max_ejection_percent)?;
        for (field, consecutive) in [("consecutive_5xx", &self.consecutive_5xx), ("consecutive_gateway_failure", &self.consecutive_gateway)]
        {
            if let Some(c) = consecutive {
                if !(1..=Self::MAX_CONSECUTIVE).contains(&c.threshold) {
                    return Err(invalid(field, "must be 1 to 255"));
                }
                percent(field, c.enforcing)?;
            }
        }
        if let Some(s) = &self.success_rate {
            percent("enforcing_success_rate", s.enforcing)?;
        }
        if let Some(f) = &self.failure_percentage {
            percent("failure_percentage_threshold", f.threshold)?;
            percent("enforcing_failure_percentage", f.enforcing)?;
        }
        Ok(())
    }
}

/// Ejection after consecutive failures, checked as each call ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Consecutive {
    /// Failures in a row that eject (1 to 255).
    pub threshold: u32,
    /// Chance, in percent, that a tripped endpoint is ejected.
    pub enforcing: u32,
}

/// Success-rate ejection (Envoy's defaults): at each interval, among endpoints with at least `request_volume`
/// calls in it, and only when there are `minimum_hosts` of them, those whose success rate is below
/// `mean − stdev × stdev_factor / 1000` are ejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SuccessRate {
    /// Standard deviations below the mean, in thousandths (1900 = 1.9).
    pub stdev_factor: u32,
    /// Chance, in percent, that an outlier is ejected.
    pub enforcing: u32,
    /// Endpoints with enough calls needed for the algorithm to run.
    pub minimum_hosts: u32,
    /// Calls in the interval for an endpoint to count.
    pub request_volume: u32,
}

impl Default for SuccessRate {
    fn default() -> Self {
        Self { stdev_factor: 1900, enforcing: 100, minimum_hosts: 5, request_volume: 100 }
    }
}

/// Failure-percentage ejection (Envoy's defaults, save `enforcing`, which Envoy defaults to 0, turning it off):
/// at each interval, among endpoints with at least `request_volume` calls, and only when there are
/// `minimum_hosts` of them, those failing `threshold` percent of calls or more are ejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailurePercentage {
    /// Failure percentage that ejects.
    pub threshold: u32,
    /// Chance, in percent, that an outlier is ejected.
    pub enforcing: u32,
    /// Endpoints with enough calls needed for the algorithm to run.
    pub minimum_hosts: u32,
    /// Calls in the interval for an endpoint to count.
    pub request_volume: u32,
}

impl Default for FailurePercentage {
    fn default() -> Self {
        Self { threshold: 85, enforcing: 100, minimum_hosts: 5, request_volume: 50 }
    }
}

/// Token-bucket local rate limit (Envoy's `local_ratelimit` token bucket): up to `max_tokens` calls at once,
/// refilled by `tokens_per_fill` every `fill_interval`. Calls over it fail RESOURCE_EXHAUSTED.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RateLimit {
    /// Bucket capacity.
    pub max_tokens: u32,
    /// Tokens added per fill interval.
    pub tokens_per_fill: u32,
    /// Fill interval.
    pub fill_interval: Duration,
}

impl RateLimit {
    /// Checks ranges: at least one token, refilled by at least one, every 1 ms or more.
    pub fn validate(&self) -> Result<()> {
        let invalid = |field, reason: &str| Error::InvalidPolicy { policy: "rate_limit", field, reason: reason.to_owned() };
        if self.max_tokens == 0 {
            return Err(invalid("max_tokens", "must be at least 1"));
        }
        if self.tokens_per_fill == 0 {
            return Err(invalid("tokens_per_fill", "must be at least 1"));
        }
        if self.fill_interval < Duration::from_millis(1) {
            return Err(invalid("fill_interval", "must be at least 1 ms"));
        }
        Ok(())
    }
}

/// Upstream TLS settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsPolicy {
    /// SNI to send.
    pub server_name: Option<String>,
    /// Accepted peer identities (SPIFFE IDs); with `san_matchers` also empty, any valid chain is accepted.
    pub allowed_identities: Vec<String>,
    /// xDS subject alt name matchers other than exact SPIFFE IDs (gRFC A29): the peer is accepted when one of
    /// its SANs (URI, DNS name, IP address) matches one of them.
    pub san_matchers: Vec<crate::StringMatch>,
    /// The certificate provider instance (of the bootstrap's `certificate_providers`) whose certificate and key
    /// the client presents; `None`: the channel's own credentials.
    pub certificate_provider: Option<String>,
    /// The instance whose trust bundle checks the server; `None`: the identity's own bundle.
    pub ca_certificate_provider: Option<String>,
}

/// Policies that a route applies to its requests.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RoutePolicies {
    /// Overall deadline of a call, retries included.
    pub timeout: Option<Duration>,
    /// Retry policy; `None` means no retries.
    pub retry: Option<RetryPolicy>,
    /// Hash keys for ring hash, combined in order; empty uses the cluster default.
    pub hash: Vec<RouteHash>,
    /// Fault injection; `None` means none.
    pub fault: Option<FaultInjection>,
    /// Local rate limit; `None` means none. Routes with equal limits share one bucket (a listener's limit is
    /// every route's).
    pub rate_limit: Option<RateLimit>,
    /// Hedging; `None` means none. A route with hedging does not also retry (gRPC A6).
    pub hedge: Option<HedgePolicy>,
    /// Shadow clusters a share of the route's calls is copied to (Envoy's `request_mirror_policies`).
    pub mirrors: Vec<Mirror>,
}

/// Request mirroring: a copy of a share of a route's calls goes to another cluster, fire and forget; its
/// answer is dropped and never changes the call's own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mirror {
    /// The shadow cluster.
    pub cluster: String,
    /// The share of calls copied, in parts per million.
    pub per_million: u32,
    /// Whether the copy's authority gets `-shadow` appended to its host (Envoy's default), so the shadow can
    /// tell copies from calls.
    pub shadow_host: bool,
}

/// Hedging (gRPC A6's hedging policy): if a call's attempt has not answered after `delay`, another is sent,
/// up to `max_attempts` in all; the first final answer wins and the others are cancelled.
#[derive(Clone, Debug, PartialEq)]
pub struct HedgePolicy {
    /// Attempts in all, the first included (2 to 5).
    pub max_attempts: u32,
    /// Wait before each further attempt.
    pub delay: Duration,
    /// Statuses that do not end the call while other attempts may still answer; such an answer also sends
    /// the next attempt at once.
    pub non_fatal: Vec<GrpcCode>,
}

/// Retries (Envoy/gRPC semantics).
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Total attempts, first one included.
    pub max_attempts: u32,
    /// gRPC status codes that are retried (of [`GrpcCode::RETRYABLE`]).
    pub retry_on: Vec<GrpcCode>,
    /// HTTP conditions that are retried (Envoy's `x-envoy-retry-on` names), for plain HTTP calls and the
    /// failures of any call.
    pub http_retry_on: HttpRetryOn,
    /// Deadline of one attempt.
    pub per_try_timeout: Option<Duration>,
    /// First backoff.
    pub base_backoff: Duration,
    /// Largest backoff.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 2,
            retry_on: vec![GrpcCode::Unavailable],
            http_retry_on: HttpRetryOn::default(),
            per_try_timeout: None,
            base_backoff: Duration::from_millis(25),
            max_backoff: Duration::from_millis(250),
        }
    }
}

/// Envoy's HTTP retry conditions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpRetryOn {
    /// `5xx`: any 5xx answer, or none at all (a reset, a lost connection, a failed connect).
    pub five_xx: bool,
    /// `gateway-error`: a 502, 503 or 504 answer.
    pub gateway_error: bool,
    /// `reset`: no answer (a reset, a lost connection).
    pub reset: bool,
    /// `connect-failure`: the connection could not be made.
    pub connect_failure: bool,
    /// `retriable-status-codes`: these answers.
    pub retriable_status_codes: Vec<u16>,
}

impl HttpRetryOn {
    /// The conditions' names, as `x-envoy-retry-on` and xDS `retry_on` spell them.
    pub const NAMES: [&'static str; 5] = ["5xx", "gateway-error", "reset", "connect-failure", "retriable-status-codes"];

    /// Turns on the condition `name` (one of [`Self::NAMES`]); `false` when it is not one.
    pub fn set(&mut self, name: &str) -> bool {
        match name {
            "5xx" => self.five_xx = true,
            "gateway-error" => self.gateway_error = true,
            "reset" => self.reset = true,
            "connect-failure" => self.connect_failure = true,
            // The codes come with the policy's own list; the name alone adds none.
            "retriable-status-codes" => {}
            _ => return false,
        }
        true
    }

    /// The names of the conditions on, as xDS `retry_on` spells them.
    pub fn names(&self) -> Vec<&'static str> {
        let on = [self.five_xx, self.gateway_error, self.reset, self.connect_failure, !self.retriable_status_codes.is_empty()];
        Self::NAMES.iter().zip(on).filter(|(_, on)| *on).map(|(name, _)| *name).collect()
    }

    /// Whether any condition is on.
    pub fn any(&self) -> bool {
        !self.names().is_empty()
    }

    /// Whether an answer with HTTP `status` is retried.
    pub fn retries_status(&self, status: u16) -> bool {
        (self.five_xx && status >= 500)
            || (self.gateway_error && (502..=504).contains(&status))
            || self.retriable_status_codes.contains(&status)
    }
}

/// Fault injection (Envoy's HTTP fault filter; gRPC A33): a share of calls is delayed, then a share aborted,
/// before they leave. Shares are in parts per million (Envoy's `FractionalPercent` at its finest).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FaultInjection {
    /// The delay, and the share of calls it applies to.
    pub delay: Option<FaultDelay>,
    /// The abort, and the share of calls it applies to.
    pub abort: Option<FaultAbort>,
    /// Most calls under a fault at once; `None`: no limit.
    pub max_active_faults: Option<u32>,
    /// Only requests whose headers match every one of these are faulted.
    pub headers: Vec<crate::HeaderMatch>,
}

impl FaultInjection {
    /// Whether it can fault a call at all (it has a delay or an abort).
    pub fn injects(&self) -> bool {
        self.delay.is_some() || self.abort.is_some()
    }
}

/// A fault's delay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultDelay {
    /// The delay; `None` takes it from the request's `x-envoy-fault-delay-request` header (milliseconds).
    pub fixed: Option<Duration>,
    /// Share of calls delayed, in parts per million.
    pub per_million: u32,
}

/// A fault's abort.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultAbort {
    /// The status the call fails with; `None` takes it from the request's `x-envoy-fault-abort-grpc-request`
    /// header (a gRPC code) or `x-envoy-fault-abort-request` header (an HTTP status, by gRPC's HTTP table).
    pub code: Option<GrpcCode>,
    /// Share of calls aborted, in parts per million.
    pub per_million: u32,
}

/// Parts per million in a percent.
pub const PER_MILLION_PER_PERCENT: u32 = 10_000;

/// Mutual TLS between workloads (Istio's `PeerAuthentication` modes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MtlsMode {
    /// Plain text only.
    Disable,
    /// Servers accept both mTLS and plain text; clients use mTLS (the migration mode).
    #[default]
    Permissive,
    /// mTLS required on both sides.
    Strict,
}

impl MtlsMode {
    /// The mode's name in config files.
    pub fn name(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Permissive => "permissive",
            Self::Strict => "strict",
        }
    }
}

impl FromStr for MtlsMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "disable" => Ok(Self::Disable),
            "permissive" => Ok(Self::Permissive),
            "strict" => Ok(Self::Strict),
            other => Err(Error::InvalidPolicy {
                policy: "mtls",
                field: "mode",
                reason: format!("{other:?} is not one of disable, permissive, strict"),
            }),
        }
    }
}

/// What an authorization rule does to the calls it matches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AuthzAction {
    /// Let matching calls through (Istio's default action).
    #[default]
    Allow,
    /// Refuse matching calls with PERMISSION_DENIED.
    Deny,
}

/// One authorization rule, Istio `AuthorizationPolicy` semantics flattened to one level (one `from` source, one
/// `to` operation, `when` on headers): deny rules first, then, if any allow rule exists, a call must match one.
///
/// Within a rule every field given must match (AND) and the values of a field are alternatives (OR); a rule with
/// no conditions matches every call. Values are Istio's patterns ([`crate::authz::Glob`]): `*` (any), `x*`
/// (prefix), `*x` (suffix), anything else exact. [`crate::authz::Engine::from_rules`] turns rules into RBAC
/// filters; [`AuthzRule::validate`] checks them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthzRule {
    /// Allow or deny.
    pub action: AuthzAction,
    /// Caller identities (SPIFFE IDs: exact, `spiffe://td/ns/prod/*`, `*/sa/admin`); `*` is any caller, proven
    /// identity or not (the mesh file's meaning before the other keys came, kept). Empty: any caller.
    pub principals: Vec<String>,
    /// Caller identities excluded (Istio's `notPrincipals`), as `principals`; a caller without a proven identity
    /// is never one of them.
    pub not_principals: Vec<String>,
    /// Caller namespaces (`prod`, `prod-*`, `*-prod`, `*`), matched on the `/ns/<namespace>/` segment after the
    /// trust domain of the caller's SPIFFE ID, as Istio derives `source.namespace` from the principal. `*` is
    /// any caller whose identity has a namespace.
    pub namespaces: Vec<String>,
    /// Request paths (`/x`, `/admin/*`, `*.json`, `*`), matched on the normalized path
    /// ([`crate::authz::normalize_path`]).
    pub paths: Vec<String>,
    /// Request paths excluded (Istio's `notPaths`), as `paths`.
    pub not_paths: Vec<String>,
    /// gRPC methods (`/pkg.Service/Method`, or `/pkg.Service/*`), matched on the path; empty means any method.
    pub methods: Vec<String>,
    /// Request headers by lower-case name, each value a pattern (`*`: present); all must match (Istio's
    /// `when: request.headers[...]`).
    pub headers: std::collections::BTreeMap<String, String>,
}

impl AuthzRule {
    /// A rule with `action` and no conditions (it matches every call).
    pub fn new(action: AuthzAction) -> Self {
        Self { action, ..Self::default() }
    }

    /// Whether the rule has no conditions, and so matches every call.
    pub fn matches_everything(&self) -> bool {
        self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.namespaces.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty()
            && self.methods.is_empty()
            && self.headers.is_empty()
    }

    /// Checks every value has a shape that can match: the error's `field` is the struct field (`principals`,
    /// `namespaces`, `headers`, ...) and its reason quotes the value.
    pub fn validate(&self) -> Result<()> {
        use crate::authz::{Glob, normalize_path};
        let invalid = |field, reason: String| Err(Error::InvalidPolicy { policy: "authorization", field, reason });
        // Istio's patterns: one `*`, at the start or the end.
        let glob = |s: &str| {
            let stars = s.matches('*').count();
            stars == 0 || (s != "**" && stars == 1 && (s.starts_with('*') || s.ends_with('*')))
        };
        for (field, values) in [("principals", &self.principals), ("not_principals", &self.not_principals)] {
            for p in values {
                let ok = glob(p)
                    && match Glob::parse(p) {
                        Glob::Any => field == "principals",
                        Glob::Exact(id) | Glob::Prefix(id) => id.starts_with("spiffe://"),
                        Glob::Suffix(end) => !end.is_empty(),
                    };
                if !ok {
                    let any = if field == "principals" { " or *" } else { " (* would exclude every caller)" };
                    return invalid(
                        field,
                        format!("{p:?} is not a SPIFFE ID (spiffe://trust-domain/path), a prefix spiffe://...* or a suffix */...{any}"),
                    );
                }
            }
        }
        for ns in &self.namespaces {
            let literal = match Glob::parse(ns) {
                Glob::Any => "x",
                Glob::Exact(s) | Glob::Prefix(s) | Glob::Suffix(s) => s,
            };
            if !glob(ns) || literal.is_empty() || literal.contains(['/', '*']) || literal.chars().any(char::is_whitespace) {
                return invalid("namespaces", format!("{ns:?} is not a namespace, a prefix ns-*, a suffix *-ns or *"));
            }
        }
        for (field, values) in [("paths", &self.paths), ("not_paths", &self.not_paths)] {
            for path in values {
                let reason = match Glob::parse(path) {
                    _ if !glob(path) => Some("a * is only allowed at the start or the end".to_owned()),
                    Glob::Any if field == "not_paths" => Some("* would exclude every path: the rule would never match".to_owned()),
                    Glob::Any => None,
                    Glob::Suffix(end) if end.is_empty() || end.contains(['?', '#']) => {
                        Some("a suffix is a non-empty end of a path, without query or fragment".to_owned())
                    }
                    Glob::Suffix(_) => None,
                    Glob::Exact(p) | Glob::Prefix(p) => match normalize_path(p) {
                        Ok(normalized) if normalized == p => None,
                        Ok(normalized) => {
                            Some(format!("requests are matched on their normalized path, so this never matches: write {normalized:?}"))
                        }
                        Err(e) => Some(e.to_string()),
                    },
                };
                if let Some(reason) = reason {
                    return invalid(field, format!("{path:?} is not a path, a prefix /path/*, a suffix *.ext or *: {reason}"));
                }
            }
        }
        if let Some(m) = self.methods.iter().find(|m| !m.starts_with('/') || m.matches('*').count() > usize::from(m.ends_with('*'))) {
            return invalid("methods", format!("{m:?} is not a gRPC method path like /pkg.Service/Method or /pkg.Service/*"));
        }
        for (name, value) in &self.headers {
            let reason = if name.is_empty() || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
            {
                Some("a header name is lower-case letters, digits, '-' and '_'")
            } else if name.starts_with("grpc-") {
                Some("grpc- headers cannot be matched (gRFC A41)")
            } else if !glob(value) {
                Some("a value is exact, a prefix x*, a suffix *x or * (present)")
            } else {
                None
            };
            if let Some(reason) = reason {
                return invalid("headers", format!("{name:?}: {value:?}: {reason}"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lb_names_round_trip() {
        for name in ["round_robin", "weighted_round_robin", "least_request", "p2c_ewma", "ring_hash"] {
            let policy: LbPolicy = name.parse().unwrap();
            assert_eq!(policy.name(), name);
            policy.validate().unwrap();
        }
        let err = "random".parse::<LbPolicy>().unwrap_err();
        assert!(err.to_string().contains("\"random\""), "{err}");
    }

    #[test]
    fn invalid_policy_names_field() {
        let err = LbPolicy::LeastRequest { choice_count: 1 }.validate().unwrap_err();
        assert!(matches!(err, Error::InvalidPolicy { field: "choice_count", .. }), "{err}");
    }

    #[test]
    fn authz_rule_validation_names_the_field_and_quotes_the_value() {
        let v = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let ok = AuthzRule {
            principals: v(&["*", "spiffe://td/ns/a/sa/b", "spiffe://td/ns/prod/*", "*/sa/admin"]),
            not_principals: v(&["*/sa/root"]),
            namespaces: v(&["prod", "prod-*", "*-prod", "*"]),
            paths: v(&["/", "/admin/*", "*.json", "*", "/a/"]),
            not_paths: v(&["/internal/*"]),
            methods: v(&["/pkg.Svc/Method", "/pkg.Svc/*"]),
            headers: [("x-env".to_string(), "prod-*".to_string()), ("x-tag".to_string(), "*".to_string())].into(),
            ..AuthzRule::new(AuthzAction::Deny)
        };
        ok.validate().unwrap();
        let bad = |rule: AuthzRule| match rule.validate() {
            Err(Error::InvalidPolicy { policy: "authorization", field, reason }) => (field, reason),
            other => panic!("{rule:?}: {other:?}"),
        };
        let cases: Vec<(AuthzRule, &str, &str)> = vec![
            (AuthzRule { principals: v(&["frontend"]), ..ok.clone() }, "principals", "\"frontend\" is not a SPIFFE ID"),
            (AuthzRule { principals: v(&["spiffe://td/*/sa/x"]), ..ok.clone() }, "principals", "not a SPIFFE ID"),
            (AuthzRule { principals: v(&["*"]), not_principals: v(&["*"]), ..ok.clone() }, "not_principals", "exclude every caller"),
            (AuthzRule { namespaces: v(&["a/b"]), ..ok.clone() }, "namespaces", "\"a/b\" is not a namespace"),
            (AuthzRule { namespaces: v(&["*a*"]), ..ok.clone() }, "namespaces", "not a namespace"),
            (AuthzRule { namespaces: v(&[""]), ..ok.clone() }, "namespaces", "not a namespace"),
            (AuthzRule { paths: v(&["admin"]), ..ok.clone() }, "paths", "must start with /"),
            (AuthzRule { paths: v(&["/a//b"]), ..ok.clone() }, "paths", "write \"/a/b\""),
            (AuthzRule { paths: v(&["/a/*/b"]), ..ok.clone() }, "paths", "only allowed at the start or the end"),
            (AuthzRule { not_paths: v(&["*"]), ..ok.clone() }, "not_paths", "never match"),
            (AuthzRule { methods: v(&["Svc/Method"]), ..ok.clone() }, "methods", "not a gRPC method path"),
            (AuthzRule { headers: [("X-Env".to_string(), "a".to_string())].into(), ..ok.clone() }, "headers", "lower-case"),
            (AuthzRule { headers: [("grpc-timeout".to_string(), "1S".to_string())].into(), ..ok.clone() }, "headers", "grpc-"),
            (AuthzRule { headers: [("x-a".to_string(), "a*b".to_string())].into(), ..ok.clone() }, "headers", "\"x-a\": \"a*b\""),
        ];
        for (rule, field, reason) in cases {
            let (got_field, got_reason) = bad(rule);
            assert_eq!(got_field, field, "{got_reason}");
            assert!(got_reason.contains(reason), "{field}: {got_reason}");
        }
        assert!(AuthzRule::new(AuthzAction::Allow).matches_everything() && !ok.matches_everything());
    }
}
