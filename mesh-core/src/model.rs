//! The service model: what exists in the mesh and where it runs.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::policy::{ClusterPolicies, LbPolicy, RoutePolicies};
use crate::{Error, Result};

/// A service's name as clients address it (`greeter`, `greeter.prod.svc`).
///
/// Cheap to clone; validated on construction (non-empty, at most 253 bytes, no
/// whitespace or control characters).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceName(Arc<str>);

impl ServiceName {
    /// Validates and wraps a name.
    pub fn new(name: impl AsRef<str>) -> Result<Self> {
        let name = name.as_ref();
        let reason = if name.is_empty() {
            Some("empty")
        } else if name.len() > 253 {
            Some("longer than 253 bytes")
        } else if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
            Some("contains whitespace or control characters")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(Error::InvalidServiceName { name: name.to_owned(), reason }),
            None => Ok(Self(name.into())),
        }
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where an endpoint runs, as in Envoy's `Locality`.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Locality {
    /// Region, e.g. `us-east1`.
    pub region: String,
    /// Zone within the region, e.g. `us-east1-b`.
    pub zone: String,
    /// Sub-zone (rack, node pool) within the zone.
    pub sub_zone: String,
}

/// Health of an endpoint as reported by discovery (Envoy's `HealthStatus`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum HealthStatus {
    /// Not known: treated as healthy, as Envoy and gRPC do.
    #[default]
    Unknown,
    /// Healthy: receives traffic.
    Healthy,
    /// Unhealthy: receives no traffic.
    Unhealthy,
    /// Draining: finishes in-flight work, receives no new traffic.
    Draining,
    /// Degraded: used only when too few healthy endpoints remain.
    Degraded,
}

impl HealthStatus {
    /// Whether new requests may be sent to an endpoint in this state.
    pub fn is_routable(self) -> bool {
        matches!(self, Self::Unknown | Self::Healthy | Self::Degraded)
    }
}

/// One network endpoint of a service.
///
/// Compact (56 bytes) because a cluster can have tens of thousands: the
/// locality and the labels are shared, so endpoints of one locality, or
/// without labels, point at one copy. Discovery hands endpoints around as
/// `Arc<Endpoint>`, so the xDS cache and a balancer share each one too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Address connections go to.
    pub addr: SocketAddr,
    /// Load-balancing weight (at least 1; 1 when discovery gives none).
    pub weight: u32,
    /// Where the endpoint runs (shared by the endpoints of one locality).
    pub locality: Arc<Locality>,
    /// Priority level (0 is preferred; higher levels take traffic on failover). Levels are contiguous from 0
    /// (gRPC's rule), so 16 bits are plenty and keep the endpoint at 56 bytes.
    pub priority: u16,
    /// Health status reported by discovery.
    pub health: HealthStatus,
    /// Free-form labels (`version=v2`), used for subsets and by policies.
    pub metadata: Arc<Labels>,
}

/// Endpoint labels: key to value, in key order.
pub type Labels = BTreeMap<String, String>;

/// The default locality and the empty label set, shared by every endpoint that has them (no allocation per
/// endpoint).
static SHARED_DEFAULTS: std::sync::LazyLock<(Arc<Locality>, Arc<Labels>)> =
    std::sync::LazyLock::new(|| (Arc::new(Locality::default()), Arc::new(Labels::new())));

impl Locality {
    /// The default (empty) locality, shared.
    pub fn shared_default() -> Arc<Locality> {
        Arc::clone(&SHARED_DEFAULTS.0)
    }
}

/// The empty label set, shared.
pub fn no_labels() -> Arc<Labels> {
    Arc::clone(&SHARED_DEFAULTS.1)
}

impl Endpoint {
    /// An endpoint with weight 1, default locality, priority 0 and unknown health.
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr, weight: 1, locality: Locality::shared_default(), priority: 0, health: HealthStatus::Unknown, metadata: no_labels() }
    }

    /// Sets the weight (0 is raised to 1, as Envoy does for unset weights).
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight.max(1);
        self
    }

    /// Adds a metadata label.
    pub fn with_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        Arc::make_mut(&mut self.metadata).insert(key.into(), value.into());
        self
    }

    /// Checks the address is one a client can connect to.
    pub fn validate(&self) -> Result<()> {
        let reason = if self.addr.port() == 0 {
            Some("port 0")
        } else if self.addr.ip().is_unspecified() {
            Some("unspecified IP address")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(Error::InvalidEndpoint { addr: self.addr, reason }),
            None => Ok(()),
        }
    }
}

/// A named group of interchangeable endpoints and the policies that apply
/// when calling them (Envoy's cluster).
#[derive(Clone, Debug, PartialEq)]
pub struct Cluster {
    /// Cluster name.
    pub name: ServiceName,
    /// How requests are spread over the endpoints.
    pub lb: LbPolicy,
    /// Resilience and security policies for calls to this cluster.
    pub policies: ClusterPolicies,
    /// Where the endpoints come from.
    pub discovery: ClusterDiscovery,
    /// Endpoints carried by the cluster itself (`ClusterDiscovery::Static`).
    pub endpoints: Vec<Endpoint>,
}

impl Cluster {
    /// A cluster with default policies and no endpoints.
    pub fn new(name: ServiceName) -> Self {
        Self {
            name,
            lb: LbPolicy::default(),
            policies: ClusterPolicies::default(),
            discovery: ClusterDiscovery::Eds { service_name: None },
            endpoints: Vec::new(),
        }
    }
}

/// How a request path is matched.
#[derive(Clone, Debug)]
pub enum PathMatch {
    /// Path starts with the prefix (`""` or `/` matches everything).
    Prefix(String),
    /// Path equals the string.
    Exact(String),
    /// Path matches the whole regular expression (RE2 syntax).
    Regex(Regex),
}

/// How a header value (or any string) is matched (Envoy `StringMatcher`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StringMatch {
    /// Equal to.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// Ends with.
    Suffix(String),
    /// Contains.
    Contains(String),
    /// Whole value matches the regular expression.
    Regex(Regex),
    /// The header is present (`true`) or absent (`false`).
    Present(bool),
    /// The value is a decimal integer in `start..end` (Envoy's `range_match`; gRPC A28).
    Range {
        /// Lowest value matched.
        start: i64,
        /// First value above the range.
        end: i64,
    },
}

impl StringMatch {
    /// Whether `value` (the header's value, `None` when absent) matches.
    pub fn matches(&self, value: Option<&str>) -> bool {
        match (self, value) {
            (Self::Present(want), v) => v.is_some() == *want,
            (_, None) => false,
            (Self::Exact(s), Some(v)) => crate::text::eq(v, s),
            (Self::Prefix(s), Some(v)) => crate::text::starts_with(v, s),
            (Self::Suffix(s), Some(v)) => crate::text::ends_with(v, s),
            (Self::Contains(s), Some(v)) => v.contains(s.as_str()),
            (Self::Regex(r), Some(v)) => r.is_full_match(v),
            (Self::Range { start, end }, Some(v)) => v.parse::<i64>().is_ok_and(|n| (*start..*end).contains(&n)),
        }
    }
}

/// A header condition of a route.
#[derive(Clone, Debug, PartialEq)]
pub struct HeaderMatch {
    /// Lower-case header name.
    pub name: String,
    /// How its value must look.
    pub matcher: StringMatch,
    /// Negates the result.
    pub invert: bool,
}

/// Which requests a route takes.
#[derive(Clone, Debug)]
pub struct RouteMatch {
    /// Path condition.
    pub path: PathMatch,
    /// Whether prefix and exact path matching is case sensitive (default true).
    pub case_sensitive: bool,
    /// Header conditions that must all hold.
    pub headers: Vec<HeaderMatch>,
    /// The share of matching requests the route takes, in parts per million (Envoy's `runtime_fraction`, its
    /// default value: gRPC A28); `None` takes them all. The others go on to the next route.
    pub fraction: Option<u32>,
}

impl RouteMatch {
    /// Matches every request.
    pub fn any() -> Self {
        Self { path: PathMatch::Prefix(String::new()), case_sensitive: true, headers: Vec::new(), fraction: None }
    }

    /// Whether a request that [`matches`](Self::matches) is taken, given a uniform draw below one million
    /// (drawn only for a route with a fraction).
    pub fn takes(&self, draw: impl FnOnce() -> u32) -> bool {
        self.fraction.is_none_or(|share| draw() < share)
    }

    /// Matches paths starting with `prefix`.
    pub fn prefix(prefix: impl Into<String>) -> Self {
        Self { path: PathMatch::Prefix(prefix.into()), ..Self::any() }
    }

    /// Whether a request with this path and headers matches. `header` looks
    /// a header up by lower-case name.
    pub fn matches<'a>(&self, path: &str, header: impl Fn(&str) -> Option<&'a str>) -> bool {
        let path_ok = match &self.path {
            PathMatch::Prefix(p) if self.case_sensitive => crate::text::starts_with(path, p),
            PathMatch::Prefix(p) => path.len() >= p.len() && path.is_char_boundary(p.len()) && path[..p.len()].eq_ignore_ascii_case(p),
            PathMatch::Exact(p) if self.case_sensitive => crate::text::eq(path, p),
            PathMatch::Exact(p) => path.eq_ignore_ascii_case(p),
            PathMatch::Regex(r) => r.is_full_match(path),
        };
        path_ok && self.headers.iter().all(|h| h.matches(header(&h.name)))
    }
}

impl HeaderMatch {
    /// Whether a request whose header of this name has `value` (`None`: absent) matches.
    pub fn matches(&self, value: Option<&str>) -> bool {
        self.matcher.matches(value) != self.invert
    }
}

/// One target of a weighted split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightedCluster {
    /// Target cluster.
    pub cluster: String,
    /// Relative weight.
    pub weight: u32,
}

/// What a route does with the requests it takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteAction {
    /// Send to one of the clusters by weight (one entry for a plain route).
    Clusters(Vec<WeightedCluster>),
    /// Fail the request (Envoy `non_forwarding_action`; gRPC fails UNAVAILABLE).
    NonForwarding,
}

/// A routing rule: requests matching `matcher` get `action`.
#[derive(Clone, Debug)]
pub struct Route {
    /// Its name (xDS `Route.name`; empty: unnamed), the `mesh.route` of its calls' metrics.
    pub name: String,
    /// Which requests this route takes.
    pub matcher: RouteMatch,
    /// What happens to them.
    pub action: RouteAction,
    /// Per-route policies (timeouts, retries, hashing).
    pub policies: RoutePolicies,
}

/// A set of domains and their routes, tried in order (Envoy virtual host).
#[derive(Clone, Debug)]
pub struct VirtualHost {
    /// Name, for logs.
    pub name: String,
    /// Domains served: exact, `*.suffix`, `prefix.*` or `*`.
    pub domains: Vec<String>,
    /// Routes, first match wins.
    pub routes: Vec<Route>,
}

impl VirtualHost {
    /// The first route matching the request.
    pub fn route_for<'a>(&self, path: &str, header: impl Fn(&str) -> Option<&'a str> + Copy) -> Option<&Route> {
        self.routes.iter().find(|r| r.matcher.matches(path, header))
    }
}

/// Where a listener's route table comes from (an HTTP connection manager's `rds` or `route_config`).
#[derive(Clone, Debug)]
pub enum RouteSource {
    /// Fetched over RDS under this name.
    Rds(String),
    /// Carried in the listener.
    Inline(RouteConfig),
}

/// A route table (Envoy `RouteConfiguration`).
#[derive(Clone, Debug)]
pub struct RouteConfig {
    /// Name.
    pub name: String,
    /// Virtual hosts.
    pub virtual_hosts: Vec<VirtualHost>,
}

impl RouteConfig {
    /// The virtual host for `authority`, chosen as Envoy and gRPC do: an exact
    /// domain, else the longest `*.suffix` wildcard, else the longest
    /// `prefix.*` wildcard, else `*`. Matching ignores ASCII case.
    pub fn virtual_host_for(&self, authority: &str) -> Option<&VirtualHost> {
        let host = authority.to_ascii_lowercase();
        // (rank, length): exact 3, suffix 2, prefix 1, any 0; longer wins.
        let score = |domain: &str| -> Option<(u8, usize)> {
            let d = domain.to_ascii_lowercase();
            if d == "*" {
                Some((0, 0))
            } else if let Some(suffix) = d.strip_prefix('*') {
                (host.ends_with(suffix) && host.len() > suffix.len()).then_some((2, d.len()))
            } else if let Some(prefix) = d.strip_suffix('*') {
                (host.starts_with(prefix) && host.len() > prefix.len()).then_some((1, d.len()))
            } else {
                (d == host).then_some((3, d.len()))
            }
        };
        self.virtual_hosts
            .iter()
            .filter_map(|vh| vh.domains.iter().filter_map(|d| score(d)).max().map(|s| (s, vh)))
            .max_by_key(|(s, _)| *s)
            .map(|(_, vh)| vh)
    }
}

/// A compiled regular expression that compares by its pattern.
#[derive(Clone, Debug)]
pub struct Regex(regex::Regex);

impl Regex {
    /// Compiles `pattern`; the error says why it is invalid.
    pub fn new(pattern: &str) -> Result<Self> {
        let invalid = |e: regex::Error| Error::InvalidPolicy { policy: "regex", field: "pattern", reason: e.to_string() };
        // Valid on its own first, so its groups balance and the anchors
        // below cannot be escaped (`a)|(?:b` would otherwise slip through).
        regex::Regex::new(pattern).map_err(invalid)?;
        // Anchor so the whole input must match, as Envoy's safe_regex does.
        regex::Regex::new(&format!("^(?:{pattern})$")).map(Self).map_err(invalid)
    }

    /// Whether the whole of `text` matches.
    pub fn is_full_match(&self, text: &str) -> bool {
        self.0.is_match(text)
    }

    /// The pattern as given (without the anchors added).
    pub fn as_str(&self) -> &str {
        let s = self.0.as_str();
        &s[4..s.len() - 2]
    }
}

impl PartialEq for Regex {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Regex {}

/// How a cluster finds its endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterDiscovery {
    /// From EDS, under `service_name` (the cluster name when `None`).
    Eds {
        /// EDS resource name.
        service_name: Option<String>,
    },
    /// A fixed list carried by the cluster itself.
    Static,
    /// One DNS name resolved by the client (Envoy `LOGICAL_DNS`).
    LogicalDns {
        /// Host name.
        host: String,
        /// Port.
        port: u16,
    },
}

/// A share of requests an endpoint set asks clients to drop (EDS drop overloads).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DropOverload {
    /// Category, reported in load reports.
    pub category: String,
    /// Requests dropped per million.
    pub parts_per_million: u32,
}

/// The endpoints of one cluster (Envoy `ClusterLoadAssignment`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointSet {
    /// Endpoints with locality, priority, weight and health (shared with the balancers that use them).
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Load-balancing weight of each locality (absent: locality weighting off).
    pub locality_weights: BTreeMap<Locality, u32>,
    /// Requests to drop, by category.
    pub drop_overloads: Vec<DropOverload>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_name_validation() {
        assert_eq!(ServiceName::new("greeter").unwrap().as_str(), "greeter");
        for bad in ["", "a b", "x\n"] {
            assert!(matches!(ServiceName::new(bad), Err(Error::InvalidServiceName { .. })), "{bad:?}");
        }
    }

    #[test]
    fn endpoints_are_compact_and_share_defaults() {
        assert_eq!(std::mem::size_of::<Endpoint>(), 56);
        let (a, b) = (Endpoint::new("127.0.0.1:80".parse().unwrap()), Endpoint::new("127.0.0.1:81".parse().unwrap()));
        assert!(Arc::ptr_eq(&a.locality, &b.locality) && Arc::ptr_eq(&a.metadata, &b.metadata));
        let labelled = a.clone().with_label("version", "v2");
        assert_eq!(labelled.metadata.get("version").map(String::as_str), Some("v2"));
        assert!(a.metadata.is_empty(), "adding a label copies the shared set");
    }

    #[test]
    fn endpoint_validation() {
        Endpoint::new("127.0.0.1:80".parse().unwrap()).validate().unwrap();
        assert!(Endpoint::new("0.0.0.0:80".parse().unwrap()).validate().is_err());
        assert!(Endpoint::new("127.0.0.1:0".parse().unwrap()).validate().is_err());
        assert_eq!(Endpoint::new("127.0.0.1:80".parse().unwrap()).with_weight(0).weight, 1);
    }

    #[test]
    fn route_match() {
        let none = |_: &str| None;
        assert!(RouteMatch::prefix("/a.B/").matches("/a.B/C", none));
        let exact = RouteMatch { path: PathMatch::Exact("/a.B/C".into()), ..RouteMatch::any() };
        assert!(!exact.matches("/a.B/CD", none));
        let ci = RouteMatch { path: PathMatch::Prefix("/A.b/".into()), case_sensitive: false, ..RouteMatch::any() };
        assert!(ci.matches("/a.B/C", none));
        let re = RouteMatch { path: PathMatch::Regex(Regex::new("/a\\.B/[CD]").unwrap()), ..RouteMatch::any() };
        assert!(re.matches("/a.B/D", none) && !re.matches("/a.B/DD", none));
        let header = RouteMatch {
            headers: vec![HeaderMatch { name: "x-canary".into(), matcher: StringMatch::Exact("1".into()), invert: false }],
            ..RouteMatch::any()
        };
        assert!(header.matches("/x", |n| (n == "x-canary").then_some("1")));
        assert!(!header.matches("/x", none));
        assert!(Regex::new("(").is_err());
        assert!(Regex::new("a)|(?:b").is_err(), "a pattern must not escape the anchors");
    }

    #[test]
    fn a_range_matches_integers_from_its_start_up_to_its_end() {
        let range = StringMatch::Range { start: -10, end: 10 };
        assert!(range.matches(Some("-10")) && range.matches(Some("9")));
        assert!(!range.matches(Some("10")) && !range.matches(Some("-11")));
        assert!(!range.matches(Some("5.0")) && !range.matches(Some("five")) && !range.matches(None));
    }

    #[test]
    fn a_route_with_a_fraction_takes_the_draws_below_it() {
        let half = RouteMatch { fraction: Some(500_000), ..RouteMatch::any() };
        assert!(half.takes(|| 499_999) && !half.takes(|| 500_000));
        assert!(RouteMatch::any().takes(|| unreachable!("no fraction, no draw")));
    }

    #[test]
    fn virtual_host_selection_prefers_exact_then_suffix_then_prefix_then_any() {
        let vh = |name: &str, domains: &[&str]| VirtualHost {
            name: name.into(),
            domains: domains.iter().map(|d| d.to_string()).collect(),
            routes: vec![],
        };
        let config = RouteConfig {
            name: "r".into(),
            virtual_hosts: vec![vh("any", &["*"]), vh("prefix", &["greeter.*"]), vh("suffix", &["*.svc"]), vh("exact", &["greeter.svc"])],
        };
        let pick = |a: &str| config.virtual_host_for(a).map(|v| v.name.as_str());
        assert_eq!(pick("greeter.svc"), Some("exact"));
        assert_eq!(pick("other.svc"), Some("suffix"));
        assert_eq!(pick("greeter.prod"), Some("prefix"));
        assert_eq!(pick("x"), Some("any"));
        assert_eq!(pick("GREETER.SVC"), Some("exact"));
    }
}
