//! The mesh file: one YAML document that describes the mesh.
//!
//! It lists services, their endpoints (static addresses, or a Kubernetes Service) and subsets (by endpoint label,
//! or with endpoints of their own), routes (path and header matches with weighted splits), and per-service
//! policies: load balancing, timeout, retries, circuit breakers, outlier detection, local rate limit, fault
//! injection, mTLS mode and authorization rules (Istio `AuthorizationPolicy`'s keys, flattened: `from`, `not_from`,
//! `namespaces`, `paths`, `not_paths`, `methods`, `headers`, and the service's `authorization_default`). `views` restrict what some clients see. The fully commented
//! example is `mesh-control/examples/mesh.yaml`; [`EXAMPLE`] is the embedded default.
//!
//! [`parse`] validates everything at once and turns the text into a [`Mesh`]; any problem is a [`FileError`] that
//! names the file, the line, the field (as a path such as `services.greeter.routes[0].split.v3`) and the reason.

mod raw;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use mesh_core::GrpcCode;
use mesh_core::model::{Endpoint, HeaderMatch, Locality, PathMatch, Regex, RouteMatch, StringMatch};
use mesh_core::policy::{
    AdaptiveConcurrency, AuthzAction, AuthzRule, CircuitBreakers, Consecutive, FailurePercentage, FaultAbort, FaultDelay, FaultInjection,
    HedgePolicy, HttpRetryOn, LbPolicy, MinRtt, MtlsMode, OutlierDetection, PER_MILLION_PER_PERCENT, RateLimit, RetryBudget, RetryPolicy,
    SuccessRate,
};
use serde_saphyr::Spanned;

use raw::{RawAdaptive, RawEndpoint, RawKube, RawMesh, RawOutlierDetection, RawPort, RawRetries, RawService};

/// The embedded example mesh: `greeter` with subsets v1 (two endpoints) and v2 (one), split 90/10.
pub const EXAMPLE: &str = include_str!("../../examples/mesh.yaml");

/// An invalid mesh file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {field}: {reason}")]
pub struct FileError {
    /// The file.
    pub file: String,
    /// 1-based line (0 when unknown).
    pub line: usize,
    /// The field, as a path like `services.greeter.routes[0].split`.
    pub field: String,
    /// Why it is invalid.
    pub reason: String,
}

/// A validated mesh.
#[derive(Clone, Debug, Default)]
pub struct Mesh {
    /// Services by name.
    pub services: BTreeMap<String, Service>,
    /// Views by node cluster: a client whose node `cluster` names a view sees only the listed services; other
    /// clients see every service.
    pub views: BTreeMap<String, BTreeSet<String>>,
}

/// One service and its policies.
#[derive(Clone, Debug)]
pub struct Service {
    /// The name clients use (`xds:///greeter`).
    pub name: String,
    /// Load-balancing policy of its clusters.
    pub lb: LbPolicy,
    /// Where its endpoints come from (subsets with their own endpoints add to these).
    pub endpoints: EndpointSource,
    /// Subsets by name.
    pub subsets: BTreeMap<String, Subset>,
    /// Routes, first match wins; never empty (a default route sends everything to the whole service).
    pub routes: Vec<Route>,
    /// Default deadline of a call.
    pub timeout: Option<Duration>,
    /// Default retry policy.
    pub retry: Option<RetryPolicy>,
    /// Hedging (sent to clients as a retry policy whose per-try timeout hedges); excludes `retry`.
    pub hedge: Option<HedgePolicy>,
    /// Circuit-breaker thresholds.
    pub circuit_breakers: CircuitBreakers,
    /// Outlier detection.
    pub outlier_detection: Option<OutlierDetection>,
    /// Local rate limit (per client instance, token bucket).
    pub rate_limit: Option<RateLimit>,
    /// Local rate limit of each server instance (token bucket), enforced by xDS-enabled servers.
    pub server_rate_limit: Option<RateLimit>,
    /// Adaptive concurrency (per client instance and cluster, Envoy's gradient controller).
    pub adaptive_concurrency: Option<AdaptiveConcurrency>,
    /// Fault injection.
    pub fault: Option<FaultInjection>,
    /// mTLS mode.
    pub mtls: MtlsMode,
    /// Authorization rules.
    pub authorization: Vec<AuthzRule>,
    /// What happens to calls when there are no allow rules (`authorization_default`): allowed (the default), or
    /// denied, by an ALLOW filter without policies (Istio's allow-nothing policy).
    pub authorization_default: AuthzAction,
    /// Port of the sidecar (Envoy) listener for this service, if it has one.
    pub sidecar_port: Option<u16>,
}

impl Service {
    /// A service with every policy at its default (round robin, one route to the whole service, no timeout or
    /// retries, default circuit breakers, permissive mTLS, no sidecar listener), its endpoints from `endpoints`:
    /// what a Kubernetes Service the mesh file does not mention gets.
    pub fn with_defaults(name: impl Into<String>, endpoints: EndpointSource) -> Self {
        let name = name.into();
        Self {
            routes: vec![Route::to_whole(&name)],
            name,
            lb: LbPolicy::RoundRobin,
            endpoints,
            subsets: BTreeMap::new(),
            timeout: None,
            retry: None,
            hedge: None,
            circuit_breakers: CircuitBreakers::default(),
            outlier_detection: None,
            rate_limit: None,
            server_rate_limit: None,
            adaptive_concurrency: None,
            fault: None,
            mtls: MtlsMode::default(),
            authorization: Vec::new(),
            authorization_default: AuthzAction::Allow,
            sidecar_port: None,
        }
    }
}

/// Where endpoints come from.
#[derive(Clone, Debug)]
pub enum EndpointSource {
    /// Addresses written in the file.
    Static(Vec<Endpoint>),
    /// A Kubernetes Service's EndpointSlices.
    Kubernetes(KubeRef),
}

/// A Kubernetes Service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeRef {
    /// Namespace.
    pub namespace: String,
    /// Service name.
    pub service: String,
    /// Port name (e.g. `grpc`) or number.
    pub port: KubePort,
}

/// A Service port by name or number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KubePort {
    /// By name.
    Name(String),
    /// By number.
    Number(u16),
}

/// A subset of a service's endpoints.
#[derive(Clone, Debug)]
pub enum Subset {
    /// The service's endpoints whose labels include all of these.
    Labels(BTreeMap<String, String>),
    /// Endpoints of its own.
    Endpoints(EndpointSource),
}

/// One route.
#[derive(Clone, Debug)]
pub struct Route {
    /// Which calls it takes.
    pub matches: RouteMatch,
    /// Weighted clusters (names from [`cluster_name`]).
    pub split: Vec<(String, u32)>,
    /// Deadline (overrides the service's).
    pub timeout: Option<Duration>,
    /// Retries (override the service's).
    pub retry: Option<RetryPolicy>,
    /// Shadow clusters (names from [`cluster_name`]) and the percent of calls copied to each.
    pub mirror: Vec<(String, u32)>,
}

impl Route {
    /// The default route: every call to the whole service, no policies of its own.
    fn to_whole(service: &str) -> Self {
        Self { matches: RouteMatch::any(), split: vec![(cluster_name(service, None), 1)], timeout: None, retry: None, mirror: Vec::new() }
    }
}

/// The cluster name of a service (`greeter`) or one of its subsets (`greeter|v1`).
pub fn cluster_name(service: &str, subset: Option<&str>) -> String {
    match subset {
        Some(subset) => format!("{service}|{subset}"),
        None => service.to_owned(),
    }
}

/// Reads and validates a mesh file.
pub fn load(path: &Path) -> crate::Result<Mesh> {
    let text = std::fs::read_to_string(path).map_err(|source| crate::Error::Io { path: path.to_owned(), source })?;
    Ok(parse(&path.display().to_string(), &text)?)
}

/// Validates mesh-file text; `file` names it in errors.
pub fn parse(file: &str, text: &str) -> Result<Mesh, FileError> {
    let raw: RawMesh = serde_saphyr::from_str(text).map_err(|e| syntax_error(file, text, &e))?;
    Validator { file, text }.mesh(raw)
}

fn syntax_error(file: &str, text: &str, e: &serde_saphyr::Error) -> FileError {
    let line = e.location().map_or(0, |l| l.line() as usize);
    let reason = match e {
        serde_saphyr::Error::Message { msg, .. } => msg.clone(),
        other => other.to_string().lines().next().unwrap_or_default().to_owned(),
    };
    let reason =
        reason.replace("data did not match any variant of untagged enum RawEndpoint", "expected an address or a mapping with `address`");
    let reason = reason.replace("data did not match any variant of untagged enum RawPort", "expected a port name or number");
    let reason = reason.replace("data did not match any variant of untagged enum RawCode", "expected a gRPC status name or number");
    FileError { file: file.to_owned(), line, field: path_at_line(text, line), reason }
}

/// The key path of `line` in block-style YAML (best effort: flow mappings stop at their key).
fn path_at_line(text: &str, line: usize) -> String {
    struct Seg {
        indent: usize,
        name: String,
        item: bool,
    }
    let mut stack: Vec<Seg> = Vec::new();
    let mut counters: BTreeMap<String, usize> = BTreeMap::new();
    let join = |stack: &[Seg]| {
        stack.iter().fold(String::new(), |mut out, s| {
            if !s.item && !out.is_empty() {
                out.push('.');
            }
            out.push_str(&s.name);
            out
        })
    };
    for l in text.lines().take(line) {
        let content = l.trim_start();
        if content.is_empty() || content.starts_with('#') || content == "---" {
            continue;
        }
        let mut indent = l.len() - content.len();
        let mut content = content;
        let item = content == "-" || content.starts_with("- ");
        while let Some(top) = stack.last() {
            if top.indent > indent || (top.indent == indent && (top.item || !item)) {
                stack.pop();
            } else {
                break;
            }
        }
        if item {
            let parent = join(&stack);
            let index = counters.entry(parent).or_insert(0);
            stack.push(Seg { indent, name: format!("[{index}]"), item: true });
            *index += 1;
            content = content[1..].trim_start();
            indent = l.len() - content.len();
        }
        if let Some((key, _)) = content.split_once(':').filter(|(k, _)| !k.starts_with(['{', '[', '"', '\'']) || k.ends_with(['"', '\''])) {
            let key = key.trim().trim_matches(['"', '\'']);
            stack.push(Seg { indent, name: key.to_owned(), item: false });
        }
    }
    join(&stack)
}

struct Validator<'a> {
    file: &'a str,
    text: &'a str,
}

type Checked<T> = Result<T, FileError>;

impl Validator<'_> {
    fn error<T>(&self, at: &serde_saphyr::Location, field: impl Into<String>, reason: impl Into<String>) -> Checked<T> {
        let field = field.into();
        let line = self.key_line(at.line() as usize, &field);
        Err(FileError { file: self.file.to_owned(), line, field, reason: reason.into() })
    }

    /// The line of the field's own key near `line` (where the parser put the value): the value's line when the key
    /// is on it (flow style, scalars), else the line before (a block mapping under its key), else the first of the
    /// next lines holding it (a field inside a block mapping the error points at).
    fn key_line(&self, line: usize, field: &str) -> usize {
        let Some(key) = field.rsplit('.').next().filter(|k| !k.is_empty() && !k.ends_with(']')) else { return line };
        let lines: Vec<&str> = self.text.lines().collect();
        let has = |n: usize| n >= 1 && lines.get(n - 1).is_some_and(|l| has_key(l, key));
        if line == 0 || has(line) {
            return line;
        }
        if has(line - 1) {
            return line - 1;
        }
        (line + 1..=line + 20).find(|&n| has(n)).unwrap_or(line)
    }

    fn mesh(&self, raw: RawMesh) -> Checked<Mesh> {
        let mut services = BTreeMap::new();
        for (name, svc) in &raw.services {
            let field = format!("services.{name}");
            if !valid_name(name) {
                return self.error(
                    &svc.referenced,
                    field,
                    "a service name is lower-case letters, digits, '-' and '.', optionally followed by :<port>",
                );
            }
            services.insert(name.clone(), self.service(&field, name, svc)?);
        }
        // Routes may split and mirror to other services: check every backend exists now that all are known.
        for (name, svc) in &raw.services {
            for (i, route) in svc.value.routes.iter().enumerate() {
                let mirror = route.value.mirror.iter().flatten().map(|(key, percent)| ("mirror", key, percent));
                for (field, key, value) in route.value.split.value.iter().map(|(key, weight)| ("split", key, weight)).chain(mirror) {
                    let own = svc.value.subsets.contains_key(key) || key == name;
                    if !own && !raw.services.contains_key(key) {
                        let subsets: Vec<&str> = svc.value.subsets.keys().map(String::as_str).collect();
                        return self.error(
                            &value.referenced,
                            format!("services.{name}.routes[{i}].{field}.{key}"),
                            format!("{key:?} is neither a subset of {name} ({}) nor a service", subsets.join(", ")),
                        );
                    }
                }
            }
        }
        let mut ports = BTreeMap::new();
        for (name, svc) in &raw.services {
            if let Some(sidecar) = &svc.value.sidecar
                && sidecar.port.value == 0
            {
                return self.error(&sidecar.port.referenced, format!("services.{name}.sidecar.port"), "port 0 is not a port");
            }
            if let Some(sidecar) = &svc.value.sidecar
                && let Some(other) = ports.insert(sidecar.port.value, name)
            {
                return self.error(
                    &sidecar.port.referenced,
                    format!("services.{name}.sidecar.port"),
                    format!("port {} is already the sidecar port of {other}", sidecar.port.value),
                );
            }
        }
        let mut views = BTreeMap::new();
        for (view, spec) in &raw.views {
            let mut names = BTreeSet::new();
            for (i, svc) in spec.value.services.iter().enumerate() {
                if !raw.services.contains_key(&svc.value) {
                    return self.error(&svc.referenced, format!("views.{view}.services[{i}]"), format!("no service named {:?}", svc.value));
                }
                names.insert(svc.value.clone());
            }
            views.insert(view.clone(), names);
        }
        Ok(Mesh { services, views })
    }

    fn service(&self, field: &str, name: &str, svc: &Spanned<RawService>) -> Checked<Service> {
        let raw = &svc.value;
        let lb = match &raw.lb {
            None => LbPolicy::RoundRobin,
            Some(lb) => match lb.value.parse::<LbPolicy>() {
                Ok(p) => p,
                Err(_) => {
                    return self.error(
                        &lb.referenced,
                        format!("{field}.lb"),
                        format!("{:?} is not one of round_robin, weighted_round_robin, least_request, p2c_ewma, ring_hash", lb.value),
                    );
                }
            },
        };
        let endpoints = self.source(field, &raw.endpoints, raw.kubernetes.as_ref())?;
        let mut subsets = BTreeMap::new();
        for (subset, spec) in &raw.subsets {
            let sfield = format!("{field}.subsets.{subset}");
            if !valid_host(subset) {
                return self.error(&spec.referenced, sfield, "a subset name is lower-case letters, digits, '-' and '.'");
            }
            let s = &spec.value;
            let has_own = !s.endpoints.is_empty() || s.kubernetes.is_some();
            let subset_value = match (s.labels.is_empty(), has_own) {
                (false, false) => {
                    let matched = match &endpoints {
                        EndpointSource::Static(list) => list.iter().any(|e| s.labels.iter().all(|(k, v)| e.metadata.get(k) == Some(v))),
                        EndpointSource::Kubernetes(_) => {
                            return self.error(
                                &spec.referenced,
                                format!("{sfield}.labels"),
                                "Kubernetes endpoints carry no labels here: give the subset a `kubernetes:` Service of its own",
                            );
                        }
                    };
                    if !matched {
                        return self.error(&spec.referenced, format!("{sfield}.labels"), format!("no endpoint of {name} has these labels"));
                    }
                    Subset::Labels(s.labels.clone())
                }
                (true, true) => Subset::Endpoints(self.source(&sfield, &s.endpoints, s.kubernetes.as_ref())?),
                (false, true) => {
                    return self.error(&spec.referenced, sfield, "a subset has either labels or endpoints of its own, not both");
                }
                (true, false) => return self.error(&spec.referenced, sfield, "a subset needs labels, endpoints or kubernetes"),
            };
            subsets.insert(subset.clone(), subset_value);
        }
        let mut routes = Vec::new();
        for (i, route) in raw.routes.iter().enumerate() {
            let rfield = format!("{field}.routes[{i}]");
            let r = &route.value;
            let matches = match &r.matches {
                None => RouteMatch::any(),
                Some(m) => self.route_match(&rfield, m, &route.referenced)?,
            };
            let cluster =
                |key: &String| if raw.subsets.contains_key(key) { cluster_name(name, Some(key)) } else { cluster_name(key, None) };
            let split: Vec<(String, u32)> = r.split.value.iter().map(|(key, weight)| (cluster(key), weight.value)).collect();
            let mut mirror = Vec::new();
            for (key, percent) in r.mirror.iter().flatten() {
                if percent.value == 0 || percent.value > 100 {
                    return self.error(
                        &percent.referenced,
                        format!("{rfield}.mirror.{key}"),
                        "a mirror's share is a percent from 1 to 100",
                    );
                }
                mirror.push((cluster(key), percent.value));
            }
            let total: u64 = split.iter().map(|(_, w)| u64::from(*w)).sum();
            if total == 0 {
                return self.error(&r.split.referenced, format!("{rfield}.split"), "the weights must add up to more than 0");
            }
            if total > u64::from(u32::MAX) {
                return self.error(&r.split.referenced, format!("{rfield}.split"), "the weights add up to more than 4294967295");
            }
            let timeout = self.opt_duration(&format!("{rfield}.timeout"), r.timeout.as_ref())?;
            let retry = r.retries.as_ref().map(|x| self.retries(&format!("{rfield}.retries"), x)).transpose()?;
            if let Some(x) = r.retries.as_ref().filter(|x| x.value.budget_percent.is_some()) {
                let reason = "the retry budget is the cluster's, shared by its routes: set it in the service's retries";
                return self.error(&x.referenced, format!("{rfield}.retries.budget_percent"), reason);
            }
            routes.push(Route { matches, split, timeout, retry, mirror });
        }
        if routes.is_empty() {
            routes.push(Route::to_whole(name));
        }
        let timeout = self.opt_duration(&format!("{field}.timeout"), raw.timeout.as_ref())?;
        let retry = raw.retries.as_ref().map(|r| self.retries(&format!("{field}.retries"), r)).transpose()?;
        let hedge = match &raw.hedge {
            None => None,
            Some(h) => {
                let hfield = format!("{field}.hedge");
                if raw.retries.is_some() {
                    return self.error(&h.referenced, hfield, "a service hedges or retries, not both (gRPC A6): drop one");
                }
                if !(2..=5).contains(&h.value.attempts) {
                    return self.error(&h.referenced, format!("{hfield}.attempts"), "2 to 5 (the first attempt and its hedges)");
                }
                let delay = self.duration(&format!("{hfield}.delay"), &h.value.delay)?;
                let mut non_fatal = Vec::new();
                for code in &h.value.on {
                    let Some(parsed) = GrpcCode::from_name(code).filter(|c| GrpcCode::RETRYABLE.contains(c)) else {
                        let names: Vec<String> = GrpcCode::RETRYABLE.iter().map(|c| c.name().to_ascii_lowercase()).collect();
                        return self.error(&h.referenced, format!("{hfield}.on"), format!("{code:?} is not one of {}", names.join(", ")));
                    };
                    non_fatal.push(parsed);
                }
                // Sent as a retry policy's retry_on, which must name a status for clients to read it.
                if non_fatal.is_empty() {
                    non_fatal.push(GrpcCode::Unavailable);
                }
                Some(HedgePolicy { max_attempts: h.value.attempts, delay, non_fatal })
            }
        };
        // A service with retries gets a retry budget, `budget_percent` of its calls (20% by default).
        let retry_budget = match &raw.retries {
            None => None,
            Some(r) => Some(match r.value.budget_percent {
                None => RetryBudget::default(),
                Some(p) if (0.0..=100.0).contains(&p) => RetryBudget { ratio: p / 100.0, ..RetryBudget::default() },
                Some(_) => return self.error(&r.referenced, format!("{field}.retries.budget_percent"), "a percentage is 0 to 100"),
            }),
        };
        let defaults = CircuitBreakers::default();
        let circuit_breakers = raw.circuit_breakers.as_ref().map_or(defaults.clone(), |c| CircuitBreakers {
            max_connections: c.max_connections.unwrap_or(defaults.max_connections),
            max_pending_requests: c.max_pending_requests.unwrap_or(defaults.max_pending_requests),
            max_requests: c.max_requests.unwrap_or(defaults.max_requests),
            max_retries: c.max_retries.unwrap_or(defaults.max_retries),
            retry_budget: None,
        });
        let circuit_breakers = CircuitBreakers { retry_budget, ..circuit_breakers };
        let outlier_detection =
            raw.outlier_detection.as_ref().map(|o| self.outlier_detection(&format!("{field}.outlier_detection"), o)).transpose()?;
        let rate_limit = |key: &str, raw: &Option<Spanned<raw::RawRateLimit>>| match raw {
            None => Ok(None),
            Some(r) if r.value.requests_per_second == 0 => {
                self.error(&r.referenced, format!("{field}.{key}.requests_per_second"), "must be at least 1")
            }
            Some(r) => Ok(Some(RateLimit {
                max_tokens: r.value.burst.unwrap_or(r.value.requests_per_second).max(1),
                tokens_per_fill: r.value.requests_per_second,
                fill_interval: Duration::from_secs(1),
            })),
        };
        let server_rate_limit = rate_limit("server_rate_limit", &raw.server_rate_limit)?;
        let rate_limit = rate_limit("rate_limit", &raw.rate_limit)?;
        let adaptive_concurrency =
            raw.adaptive_concurrency.as_ref().map(|a| self.adaptive(&format!("{field}.adaptive_concurrency"), a)).transpose()?;
        let fault = match &raw.fault {
            None => None,
            Some(f) => {
                let ffield = format!("{field}.fault");
                let delay = match &f.value.delay {
                    None => None,
                    Some(d) => {
                        let pct = self.percent(&format!("{ffield}.delay.percent"), &d.percent)?;
                        let fixed = Some(self.duration(&format!("{ffield}.delay.duration"), &d.duration)?);
                        Some(FaultDelay { fixed, per_million: pct * PER_MILLION_PER_PERCENT })
                    }
                };
                let abort = match &f.value.abort {
                    None => None,
                    Some(a) => {
                        let pct = self.percent(&format!("{ffield}.abort.percent"), &a.percent)?;
                        let (parsed, shown) = match &a.grpc_status.value {
                            raw::RawCode::Number(n) => (GrpcCode::from_i32(*n), n.to_string()),
                            raw::RawCode::Name(n) => (GrpcCode::from_name(n), format!("\"{n}\"")),
                        };
                        let code = match parsed.filter(|c| *c != GrpcCode::Ok) {
                            Some(code) => code,
                            None => {
                                return self.error(
                                    &a.grpc_status.referenced,
                                    format!("{ffield}.abort.grpc_status"),
                                    format!("{shown} is not a gRPC status other than OK (1..16 or a name like UNAVAILABLE)"),
                                );
                            }
                        };
                        Some(FaultAbort { code: Some(code), per_million: pct * PER_MILLION_PER_PERCENT })
                    }
                };
                Some(FaultInjection { delay, abort, ..FaultInjection::default() })
            }
        };
        let mtls = match &raw.mtls {
            None => MtlsMode::default(),
            Some(m) => match m.value.parse() {
                Ok(mode) => mode,
                Err(_) => {
                    return self.error(
                        &m.referenced,
                        format!("{field}.mtls"),
                        format!("{:?} is not one of disable, permissive, strict", m.value),
                    );
                }
            },
        };
        let authorization_default = match &raw.authorization_default {
            None => AuthzAction::Allow,
            Some(d) => match d.value.as_str() {
                "allow" => AuthzAction::Allow,
                "deny" => AuthzAction::Deny,
                other => {
                    return self.error(&d.referenced, format!("{field}.authorization_default"), format!("{other:?} is not allow or deny"));
                }
            },
        };
        let mut authorization = Vec::new();
        for (i, rule) in raw.authorization.iter().enumerate() {
            let afield = format!("{field}.authorization[{i}]");
            let r = &rule.value;
            let action = match r.action.as_str() {
                "allow" => AuthzAction::Allow,
                "deny" => AuthzAction::Deny,
                other => return self.error(&rule.referenced, format!("{afield}.action"), format!("{other:?} is not allow or deny")),
            };
            let list = |values: &Option<Spanned<Vec<String>>>| values.as_ref().map(|v| v.value.clone()).unwrap_or_default();
            let headers = r.headers.as_ref().map(|h| h.value.iter().map(|(name, value)| (name.to_ascii_lowercase(), value.clone())));
            let parsed = AuthzRule {
                action,
                principals: list(&r.from),
                not_principals: list(&r.not_from),
                namespaces: list(&r.namespaces),
                paths: list(&r.paths),
                not_paths: list(&r.not_paths),
                methods: list(&r.methods),
                headers: headers.map(Iterator::collect).unwrap_or_default(),
            };
            if let Err(mesh_core::Error::InvalidPolicy { field: rule_field, reason, .. }) = parsed.validate() {
                // The rule's field by its key in the file, and where that key's value is.
                let (key, at) = match rule_field {
                    "principals" => ("from", r.from.as_ref().map(|v| &v.referenced)),
                    "not_principals" => ("not_from", r.not_from.as_ref().map(|v| &v.referenced)),
                    "namespaces" => ("namespaces", r.namespaces.as_ref().map(|v| &v.referenced)),
                    "paths" => ("paths", r.paths.as_ref().map(|v| &v.referenced)),
                    "not_paths" => ("not_paths", r.not_paths.as_ref().map(|v| &v.referenced)),
                    "methods" => ("methods", r.methods.as_ref().map(|v| &v.referenced)),
                    other => (other, r.headers.as_ref().map(|v| &v.referenced)),
                };
                return self.error(at.unwrap_or(&rule.referenced), format!("{afield}.{key}"), reason);
            }
            authorization.push(parsed);
        }
        Ok(Service {
            name: name.to_owned(),
            lb,
            endpoints,
            subsets,
            routes,
            timeout,
            retry,
            hedge,
            circuit_breakers,
            outlier_detection,
            rate_limit,
            server_rate_limit,
            adaptive_concurrency,
            fault,
            mtls,
            authorization,
            authorization_default,
            sidecar_port: raw.sidecar.as_ref().map(|s| s.port.value),
        })
    }

    fn source(&self, field: &str, endpoints: &[Spanned<RawEndpoint>], kube: Option<&Spanned<RawKube>>) -> Checked<EndpointSource> {
        if let Some(k) = kube {
            if !endpoints.is_empty() {
                return self.error(
                    &k.referenced,
                    format!("{field}.kubernetes"),
                    "endpoints come from either `endpoints` or `kubernetes`, not both",
                );
            }
            let port = match &k.value.port {
                RawPort::Number(0) => return self.error(&k.referenced, format!("{field}.kubernetes.port"), "port 0 is not a port"),
                RawPort::Number(n) => KubePort::Number(*n),
                RawPort::Name(n) => KubePort::Name(n.clone()),
            };
            for (what, value) in [("service", &k.value.service), ("namespace", &k.value.namespace)] {
                if !dns_label(value) {
                    return self.error(
                        &k.referenced,
                        format!("{field}.kubernetes.{what}"),
                        format!("{value:?} is not a Kubernetes name (lower-case letters, digits and '-', at most 63)"),
                    );
                }
            }
            return Ok(EndpointSource::Kubernetes(KubeRef {
                namespace: k.value.namespace.clone(),
                service: k.value.service.clone(),
                port,
            }));
        }
        let mut out = Vec::with_capacity(endpoints.len());
        let mut total_weight = 0u64;
        for (i, e) in endpoints.iter().enumerate() {
            let efield = format!("{field}.endpoints[{i}]");
            let (address, weight, locality, labels) = match &e.value {
                RawEndpoint::Address(a) => (a, None, Locality::default(), BTreeMap::new()),
                RawEndpoint::Full(f) => {
                    let locality = Locality {
                        region: f.region.clone().unwrap_or_default(),
                        zone: f.zone.clone().unwrap_or_default(),
                        sub_zone: String::new(),
                    };
                    (&f.address, f.weight, locality, f.labels.clone())
                }
            };
            let Ok(addr) = address.parse::<SocketAddr>() else {
                return self.error(
                    &e.referenced,
                    efield,
                    format!("{address:?} is not an IP:port address (host names are not supported here)"),
                );
            };
            if weight == Some(0) {
                return self.error(&e.referenced, format!("{efield}.weight"), "an endpoint weight is at least 1");
            }
            if addr.port() == 0 || addr.ip().is_unspecified() {
                return self.error(&e.referenced, efield, format!("{addr} cannot be dialled (port 0 or an unspecified address)"));
            }
            if out.iter().any(|o: &Endpoint| o.addr == addr) {
                return self.error(&e.referenced, efield, format!("{addr} is listed twice"));
            }
            total_weight += u64::from(weight.unwrap_or(1));
            if total_weight > u64::from(u32::MAX) {
                return self.error(
                    &e.referenced,
                    format!("{efield}.weight"),
                    format!("the weights of {field}.endpoints add up to more than {}", u32::MAX),
                );
            }
            let mut endpoint = Endpoint::new(addr).with_weight(weight.unwrap_or(1));
            endpoint.locality = locality.into();
            endpoint.metadata = labels.into();
            out.push(endpoint);
        }
        Ok(EndpointSource::Static(out))
    }

    fn route_match(&self, field: &str, m: &raw::RawMatch, at: &serde_saphyr::Location) -> Checked<RouteMatch> {
        let paths = [&m.path_prefix, &m.path_exact, &m.path_regex].into_iter().filter(|p| p.is_some()).count();
        if paths > 1 {
            return self.error(at, format!("{field}.match"), "use one of path_prefix, path_exact, path_regex");
        }
        let path = if let Some(p) = &m.path_prefix {
            PathMatch::Prefix(p.value.clone())
        } else if let Some(p) = &m.path_exact {
            PathMatch::Exact(p.value.clone())
        } else if let Some(p) = &m.path_regex {
            match Regex::new(&p.value) {
                Ok(r) => PathMatch::Regex(r),
                Err(e) => return self.error(&p.referenced, format!("{field}.match.path_regex"), e.to_string()),
            }
        } else {
            PathMatch::Prefix(String::new())
        };
        let mut headers = Vec::new();
        for (name, value) in &m.headers {
            if name.is_empty() || name.bytes().any(|b| !(b.is_ascii_alphanumeric() || b == b'-' || b == b'_')) {
                return self.error(&value.referenced, format!("{field}.match.headers.{name}"), "not a valid header name");
            }
            headers.push(HeaderMatch { name: name.to_ascii_lowercase(), matcher: StringMatch::Exact(value.value.clone()), invert: false });
        }
        Ok(RouteMatch { path, case_sensitive: true, headers, fraction: None })
    }

    fn retries(&self, field: &str, r: &Spanned<RawRetries>) -> Checked<RetryPolicy> {
        let d = RetryPolicy::default();
        let raw = &r.value;
        if raw.attempts == 0 {
            return self.error(&r.referenced, format!("{field}.attempts"), "attempts counts the first try: at least 1");
        }
        let mut retry_on = Vec::new();
        let mut http_retry_on = HttpRetryOn::default();
        for code in &raw.on {
            // Envoy's HTTP conditions, for plain HTTP calls through the sidecar and any call's failures.
            if code != "retriable-status-codes" && http_retry_on.set(code) {
                continue;
            }
            let Some(parsed) = GrpcCode::from_name(code).filter(|c| GrpcCode::RETRYABLE.contains(c)) else {
                let mut names: Vec<String> = GrpcCode::RETRYABLE.iter().map(|c| c.name().to_ascii_lowercase()).collect();
                names.extend(HttpRetryOn::NAMES[..4].iter().map(|n| n.to_string()));
                let reason = format!("{code:?} is not one of {}", names.join(", "));
                return self.error(&r.referenced, format!("{field}.on"), reason);
            };
            retry_on.push(parsed);
        }
        if retry_on.is_empty() && !http_retry_on.any() {
            retry_on = d.retry_on.clone();
        }
        let per_try_timeout = self.opt_duration(&format!("{field}.per_try_timeout"), raw.per_try_timeout.as_ref())?;
        let (base_backoff, max_backoff) = match &raw.backoff {
            None => (d.base_backoff, d.max_backoff),
            Some(b) => {
                let base = self.duration(&format!("{field}.backoff.base"), &b.base)?;
                let max = self
                    .opt_duration(&format!("{field}.backoff.max"), b.max.as_ref())?
                    .unwrap_or(base.saturating_mul(10).min(MAX_DURATION));
                if max < base {
                    return self.error(&b.base.referenced, format!("{field}.backoff"), "max is smaller than base");
                }
                (base, max)
            }
        };
        Ok(RetryPolicy { max_attempts: raw.attempts, retry_on, http_retry_on, per_try_timeout, base_backoff, max_backoff })
    }

    /// Consecutive errors eject (5 by default); gateway errors, success rate and failure percentage only when
    /// given (so Envoy and our client, which both get explicit `enforcing_*` values, agree).
    fn outlier_detection(&self, field: &str, o: &RawOutlierDetection) -> Checked<OutlierDetection> {
        let d = OutlierDetection::default();
        let consecutive = |name: &str, threshold: Option<&Spanned<u32>>, default: Option<u32>| -> Checked<Option<Consecutive>> {
            match (threshold, default) {
                (Some(t), _) if !(1..=OutlierDetection::MAX_CONSECUTIVE).contains(&t.value) => {
                    self.error(&t.referenced, format!("{field}.{name}"), "must be 1 to 255")
                }
                (Some(t), _) => Ok(Some(Consecutive { threshold: t.value, enforcing: 100 })),
                (None, default) => Ok(default.map(|threshold| Consecutive { threshold, enforcing: 100 })),
            }
        };
        let max_ejection_percent =
            o.max_ejection_percent.as_ref().map(|p| self.percent(&format!("{field}.max_ejection_percent"), p)).transpose()?;
        let success_rate = o.success_rate.as_ref().map(|s| {
            let r = SuccessRate::default();
            SuccessRate {
                stdev_factor: s.stdev_factor.map_or(r.stdev_factor, |f| (f.clamp(0.0, 1_000_000.0) * 1000.0).round() as u32),
                enforcing: 100,
                minimum_hosts: s.minimum_hosts.unwrap_or(r.minimum_hosts),
                request_volume: s.request_volume.unwrap_or(r.request_volume),
            }
        });
        let failure_percentage = match &o.failure_percentage {
            None => None,
            Some(f) => {
                let p = FailurePercentage::default();
                Some(FailurePercentage {
                    threshold: self.percent(&format!("{field}.failure_percentage.threshold"), &f.threshold)?,
                    enforcing: 100,
                    minimum_hosts: f.minimum_hosts.unwrap_or(p.minimum_hosts),
                    request_volume: f.request_volume.unwrap_or(p.request_volume),
                })
            }
        };
        Ok(OutlierDetection {
            interval: self.opt_duration(&format!("{field}.interval"), o.interval.as_ref())?.unwrap_or(d.interval),
            base_ejection_time: self
                .opt_duration(&format!("{field}.base_ejection_time"), o.base_ejection_time.as_ref())?
                .unwrap_or(d.base_ejection_time),
            max_ejection_time: self
                .opt_duration(&format!("{field}.max_ejection_time"), o.max_ejection_time.as_ref())?
                .unwrap_or(d.max_ejection_time),
            max_ejection_percent: max_ejection_percent.unwrap_or(d.max_ejection_percent),
            always_eject_one: false,
            consecutive_5xx: consecutive("consecutive_errors", o.consecutive_errors.as_ref(), Some(5))?,
            consecutive_gateway: consecutive("consecutive_gateway_errors", o.consecutive_gateway_errors.as_ref(), None)?,
            success_rate,
            failure_percentage,
        })
    }

    fn percent(&self, field: &str, p: &Spanned<u32>) -> Checked<u32> {
        if p.value > 100 {
            return self.error(&p.referenced, field, "a percentage is 0 to 100");
        }
        Ok(p.value)
    }

    fn adaptive(&self, field: &str, a: &Spanned<RawAdaptive>) -> Checked<AdaptiveConcurrency> {
        let defaults = AdaptiveConcurrency::default();
        let raw = &a.value;
        let update_interval = self.opt_duration(&format!("{field}.update_interval"), raw.update_interval.as_ref())?;
        let min_rtt = match (&raw.min_rtt, &raw.min_rtt_interval) {
            (Some(_), Some(_)) => {
                return self.error(&a.referenced, field, "either min_rtt (fixed) or min_rtt_interval (measured), not both");
            }
            (Some(fixed), None) => MinRtt::Fixed(self.duration(&format!("{field}.min_rtt"), fixed)?),
            (None, interval) => match (self.opt_duration(&format!("{field}.min_rtt_interval"), interval.as_ref())?, defaults.min_rtt) {
                (Some(interval), MinRtt::Sampled { requests, jitter, .. }) => MinRtt::Sampled { interval, requests, jitter },
                (_, default) => default,
            },
        };
        let (min_limit, max_limit) = (raw.min_limit.unwrap_or(defaults.min_limit), raw.max_limit.unwrap_or(defaults.max_limit));
        if min_limit == 0 || min_limit > max_limit {
            let reason = format!("min_limit {min_limit} must be at least 1 and at most max_limit {max_limit}");
            return self.error(&a.referenced, format!("{field}.min_limit"), reason);
        }
        Ok(AdaptiveConcurrency {
            update_interval: update_interval.unwrap_or(defaults.update_interval),
            min_rtt,
            min_limit,
            max_limit,
            min_concurrency: min_limit,
            ..defaults
        })
    }

    fn opt_duration(&self, field: &str, d: Option<&Spanned<String>>) -> Checked<Option<Duration>> {
        d.map(|d| self.duration(field, d)).transpose()
    }

    fn duration(&self, field: &str, d: &Spanned<String>) -> Checked<Duration> {
        match parse_duration(&d.value) {
            Some(v) if v > MAX_DURATION => self.error(&d.referenced, field, "must be at most a year (8760h)"),
            Some(v) if !v.is_zero() => Ok(v),
            Some(_) => self.error(&d.referenced, field, "must be more than 0"),
            None => self.error(&d.referenced, field, format!("{:?} is not a duration like 250ms, 2s or 1m", d.value)),
        }
    }
}

/// The longest duration the file takes (timeouts, backoff): a year, far inside protobuf's Duration range.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Whether `line` has `key` as a mapping key (`key:`, `"key":`), not inside another word.
fn has_key(line: &str, key: &str) -> bool {
    line.match_indices(key).any(|(i, _)| {
        let before = line[..i].chars().next_back();
        let after = &line[i + key.len()..];
        matches!(before, None | Some(' ' | '{' | ',' | '-' | '"' | '\''))
            && (after.starts_with(':') || after.starts_with("\":") || after.starts_with("':"))
    })
}

/// A Kubernetes object name (DNS-1123 label).
fn dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// A DNS-like name, optionally with `:<port>` (`greeter`, `greeter.default.svc.cluster.local:50051`).
fn valid_name(name: &str) -> bool {
    let (host, port) = name.rsplit_once(':').unwrap_or((name, "1"));
    valid_host(host) && port.parse::<u16>().is_ok_and(|p| p > 0)
}

/// Lower-case letters, digits, `-` and `.`.
fn valid_host(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// `250ms`, `1.5s`, `2m`, `1h`, `100us`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = s.split_at(split);
    let number: f64 = number.parse().ok()?;
    let seconds = match unit {
        "us" | "µs" => number / 1e6,
        "ms" => number / 1e3,
        "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(seconds).ok()
}

#[cfg(test)]
mod tests;
