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
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Address connections go to.
    pub addr: SocketAddr,
    /// Load-balancing weight (at least 1; 1 when discovery gives none).
    pub weight: u32,
    /// Where the endpoint runs.
    pub locality: Locality,
    /// Priority level (0 is preferred; higher levels take traffic on failover).
    pub priority: u32,
    /// Health status reported by discovery.
    pub health: HealthStatus,
    /// Free-form labels (`version=v2`), used for subsets and by policies.
    pub metadata: BTreeMap<String, String>,
}

impl Endpoint {
    /// An endpoint with weight 1, default locality, priority 0 and unknown health.
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr, weight: 1, locality: Locality::default(), priority: 0, health: HealthStatus::Unknown, metadata: BTreeMap::new() }
    }

    /// Sets the weight (0 is raised to 1, as Envoy does for unset weights).
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight.max(1);
        self
    }

    /// Adds a metadata label.
    pub fn with_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
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
    /// Current endpoints.
    pub endpoints: Vec<Endpoint>,
}

impl Cluster {
    /// A cluster with default policies and no endpoints.
    pub fn new(name: ServiceName) -> Self {
        Self { name, lb: LbPolicy::default(), policies: ClusterPolicies::default(), endpoints: Vec::new() }
    }
}

/// How a route selects requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteMatch {
    /// Path starts with the prefix (`/` matches everything).
    Prefix(String),
    /// Path equals the string.
    Exact(String),
}

impl RouteMatch {
    /// Whether a request path matches.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            Self::Prefix(p) => path.starts_with(p.as_str()),
            Self::Exact(p) => path == p,
        }
    }
}

/// One target of a weighted split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightedCluster {
    /// Target cluster.
    pub cluster: ServiceName,
    /// Relative weight.
    pub weight: u32,
}

/// A routing rule: requests matching `matcher` go to one of `clusters` by weight.
#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    /// Which requests this route takes.
    pub matcher: RouteMatch,
    /// Header conditions that must all hold (`name`, exact value).
    pub headers: Vec<(String, String)>,
    /// Targets and their weights (one entry for a plain route).
    pub clusters: Vec<WeightedCluster>,
    /// Per-route policies (timeouts, retries, hashing).
    pub policies: RoutePolicies,
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
    fn endpoint_validation() {
        Endpoint::new("127.0.0.1:80".parse().unwrap()).validate().unwrap();
        assert!(Endpoint::new("0.0.0.0:80".parse().unwrap()).validate().is_err());
        assert!(Endpoint::new("127.0.0.1:0".parse().unwrap()).validate().is_err());
        assert_eq!(Endpoint::new("127.0.0.1:80".parse().unwrap()).with_weight(0).weight, 1);
    }

    #[test]
    fn route_match() {
        assert!(RouteMatch::Prefix("/a.B/".into()).matches("/a.B/C"));
        assert!(!RouteMatch::Exact("/a.B/C".into()).matches("/a.B/CD"));
    }
}
