//! CDS: clusters (gRPC A27, A42, A48, A52 rules; Envoy defaults).

use envoy_types::pb::envoy::config::cluster::v3::OutlierDetection as ProtoOutlier;
use envoy_types::pb::envoy::config::cluster::v3::circuit_breakers::thresholds::RetryBudget as RetryBudgetProto;
use envoy_types::pb::envoy::config::cluster::v3::cluster::ring_hash_lb_config::HashFunction;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType, LbConfig, LbPolicy as ProtoLbPolicy};
use envoy_types::pb::envoy::config::cluster::v3::{Cluster as ProtoCluster, LoadBalancingPolicy};
use envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType;
use envoy_types::pb::envoy::config::core::v3::{RoutingPriority, TransportSocket};
use envoy_types::pb::envoy::extensions::load_balancing_policies::least_request::v3::LeastRequest;
use envoy_types::pb::envoy::extensions::load_balancing_policies::ring_hash::v3::{RingHash, ring_hash};
use envoy_types::pb::envoy::extensions::load_balancing_policies::wrr_locality::v3::WrrLocality;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::UpstreamTlsContext;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::common_tls_context::ValidationContextType;
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
use envoy_types::pb::google::protobuf::{Duration as ProtoDuration, UInt32Value};
use mesh_core::lb::{MAX_RING_SIZE, RingHashConfig};
use mesh_core::policy::{
    ClusterPolicies, Consecutive, DEFAULT_HASH_HEADER, FailurePercentage, HashPolicy, OutlierDetection, RetryBudget, SuccessRate, TlsPolicy,
};
use mesh_core::{Cluster, ClusterDiscovery, Endpoint, LbPolicy, ServiceName};
use prost::Message;
use std::time::Duration;

use super::{duration, endpoint, extension_type};

/// Deepest nesting of `load_balancing_policy` (gRPC A52 allows 16).
const MAX_LB_DEPTH: usize = 16;

/// A validated cluster.
#[derive(Clone, Debug)]
pub struct ClusterResource {
    /// The cluster: discovery, load balancing, policies and, for static
    /// clusters, its endpoints.
    pub cluster: Cluster,
}

impl ClusterResource {
    /// EDS resource name to watch, if EDS.
    pub fn eds_service_name(&self) -> Option<&str> {
        match &self.cluster.discovery {
            ClusterDiscovery::Eds { service_name } => Some(service_name.as_deref().unwrap_or(self.cluster.name.as_str())),
            _ => None,
        }
    }
}

/// Decodes and validates a `Cluster`.
pub(crate) fn decode(bytes: &[u8]) -> Result<ClusterResource, String> {
    let c = ProtoCluster::decode(bytes).map_err(|e| format!("malformed Cluster: {e}"))?;
    let mut cluster = Cluster::new(ServiceName::new(&c.name).map_err(|e| format!("name: {e}"))?);
    (cluster.discovery, cluster.endpoints) = discovery(&c)?;
    cluster.lb = lb_policy(&c)?;
    cluster.policies = policies(&c)?;
    Ok(ClusterResource { cluster })
}

fn discovery(c: &ProtoCluster) -> Result<(ClusterDiscovery, Vec<Endpoint>), String> {
    let ty = match &c.cluster_discovery_type {
        Some(ClusterDiscoveryType::ClusterType(custom)) => return Err(format!("cluster_type: unsupported cluster type {:?}", custom.name)),
        Some(ClusterDiscoveryType::Type(ty)) => *ty,
        None => DiscoveryType::Static as i32,
    };
    match DiscoveryType::try_from(ty) {
        Ok(DiscoveryType::Eds) => {
            let service_name = c.eds_cluster_config.as_ref().map(|e| e.service_name.clone()).filter(|s| !s.is_empty());
            Ok((ClusterDiscovery::Eds { service_name }, Vec::new()))
        }
        Ok(DiscoveryType::Static) => {
            let endpoints = match &c.load_assignment {
                Some(la) => endpoint::convert(la)
                    .map_err(|e| format!("load_assignment: {e}"))?
                    .endpoints
                    .into_iter()
                    .map(std::sync::Arc::unwrap_or_clone)
                    .collect(),
                None => Vec::new(),
            };
            Ok((ClusterDiscovery::Static, endpoints))
        }
        Ok(DiscoveryType::LogicalDns) => {
            let mut all = c.load_assignment.iter().flat_map(|la| &la.endpoints).flat_map(|l| &l.lb_endpoints);
            let (Some(only), None) = (all.next(), all.next()) else {
                return Err("load_assignment: a LOGICAL_DNS cluster needs exactly one endpoint".into());
            };
            let (host, port) = endpoint::host_port(only).map_err(|e| format!("load_assignment: {e}"))?;
            Ok((ClusterDiscovery::LogicalDns { host: host.to_owned(), port }, Vec::new()))
        }
        Ok(other) => Err(format!("type: unsupported cluster type {}", other.as_str_name())),
        Err(_) => Err(format!("type: unknown cluster type {ty}")),
    }
}

fn lb_policy(c: &ProtoCluster) -> Result<LbPolicy, String> {
    let lb = match &c.load_balancing_policy {
        Some(list) if !list.policies.is_empty() => typed_lb_policy(list, 0).map_err(|e| format!("load_balancing_policy: {e}"))?,
        _ => match ProtoLbPolicy::try_from(c.lb_policy) {
            Ok(ProtoLbPolicy::RoundRobin) => LbPolicy::RoundRobin,
            Ok(ProtoLbPolicy::LeastRequest) => {
                let choice_count = match &c.lb_config {
                    Some(LbConfig::LeastRequestLbConfig(l)) => l.choice_count.map_or(2, |n| n.value),
                    _ => 2,
                };
                LbPolicy::LeastRequest { choice_count }
            }
            Ok(ProtoLbPolicy::RingHash) => match &c.lb_config {
                Some(LbConfig::RingHashLbConfig(r)) if r.hash_function != HashFunction::XxHash as i32 => {
                    return Err("ring_hash_lb_config.hash_function: only XX_HASH is supported".into());
                }
                Some(LbConfig::RingHashLbConfig(r)) => {
                    ring_hash(r.minimum_ring_size.map(|v| v.value), r.maximum_ring_size.map(|v| v.value))
                }
                _ => ring_hash(None, None),
            },
            Ok(other) => return Err(format!("lb_policy: unsupported {}", other.as_str_name())),
            Err(_) => return Err(format!("lb_policy: unknown value {}", c.lb_policy)),
        },
    };
    lb.validate().map_err(|e| format!("lb_policy: {e}"))?;
    Ok(lb)
}

/// Ring hash with Envoy's default bounds; routes supply the real hash policy.
fn ring_hash(min: Option<u64>, max: Option<u64>) -> LbPolicy {
    let ring = RingHashConfig { minimum_ring_size: min.unwrap_or(1024), maximum_ring_size: max.unwrap_or(MAX_RING_SIZE) };
    LbPolicy::RingHash { ring, hash: HashPolicy::Header(DEFAULT_HASH_HEADER.to_owned()) }
}

/// The first policy of the list the client supports (gRPC A52).
fn typed_lb_policy(list: &LoadBalancingPolicy, depth: usize) -> Result<LbPolicy, String> {
    if depth > MAX_LB_DEPTH {
        return Err("policies nested too deeply".into());
    }
    for (i, policy) in list.policies.iter().enumerate() {
        let Some(any) = policy.typed_extension_config.as_ref().and_then(|t| t.typed_config.as_ref()) else { continue };
        let bad = |e: prost::DecodeError| format!("policies[{i}]: malformed {}: {e}", any.type_url);
        let ty = extension_type(any);
        return Ok(match ty.as_ref() {
            "envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin" => LbPolicy::RoundRobin,
            "envoy.extensions.load_balancing_policies.client_side_weighted_round_robin.v3.ClientSideWeightedRoundRobin" => {
                LbPolicy::WeightedRoundRobin
            }
            "envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest" => {
                let lr = LeastRequest::decode(any.value.as_slice()).map_err(bad)?;
                LbPolicy::LeastRequest { choice_count: lr.choice_count.map_or(2, |n| n.value) }
            }
            "envoy.extensions.load_balancing_policies.ring_hash.v3.RingHash" => {
                let rh = RingHash::decode(any.value.as_slice()).map_err(bad)?;
                let hash_ok =
                    [ring_hash::HashFunction::DefaultHash as i32, ring_hash::HashFunction::XxHash as i32].contains(&rh.hash_function);
                if !hash_ok {
                    return Err(format!("policies[{i}]: ring hash hash_function: only XX_HASH is supported"));
                }
                ring_hash(rh.minimum_ring_size.map(|v| v.value), rh.maximum_ring_size.map(|v| v.value))
            }
            "envoy.extensions.load_balancing_policies.wrr_locality.v3.WrrLocality" => {
                let wrr = WrrLocality::decode(any.value.as_slice()).map_err(bad)?;
                let child =
                    wrr.endpoint_picking_policy.ok_or_else(|| format!("policies[{i}]: wrr_locality endpoint_picking_policy: missing"))?;
                typed_lb_policy(&child, depth + 1).map_err(|e| format!("policies[{i}]: wrr_locality: {e}"))?
            }
            name if name.ends_with("P2cEwma") => LbPolicy::p2c_ewma(),
            _ => continue,
        });
    }
    Err("no supported policy in the list".into())
}

fn policies(c: &ProtoCluster) -> Result<ClusterPolicies, String> {
    let mut p = ClusterPolicies::default();
    if let Some(d) = &c.connect_timeout {
        p.connection.connect_timeout = duration(d, "connect_timeout")?;
        if p.connection.connect_timeout.is_zero() {
            return Err("connect_timeout: must be greater than zero".into());
        }
    }
    let thresholds = c.circuit_breakers.iter().flat_map(|cb| &cb.thresholds).find(|t| t.priority == RoutingPriority::Default as i32);
    if let Some(t) = thresholds {
        let cb = &mut p.circuit_breakers;
        for (field, value) in [
            (&mut cb.max_connections, t.max_connections),
            (&mut cb.max_pending_requests, t.max_pending_requests),
            (&mut cb.max_requests, t.max_requests),
            (&mut cb.max_retries, t.max_retries),
        ] {
            if let Some(v) = value {
                *field = v.value;
            }
        }
        if let Some(b) = &t.retry_budget {
            cb.retry_budget = Some(retry_budget(b)?);
        }
    }
    if let Some(od) = &c.outlier_detection {
        p.outlier_detection = Some(outlier_detection(od).map_err(|e| format!("outlier_detection.{e}"))?);
    }
    if let Some(ts) = &c.transport_socket {
        p.tls = tls(ts).map_err(|e| format!("transport_socket: {e}"))?;
    }
    Ok(p)
}

/// Outlier detection, with Envoy's defaults for every unset field. An algorithm whose `enforcing_*` is 0 is
/// off. What is not enforced (local-origin splitting, ejection jitter, degraded hosts) is logged.
fn outlier_detection(od: &ProtoOutlier) -> Result<OutlierDetection, String> {
    let d = OutlierDetection::default();
    let (rate, percentage) = (SuccessRate::default(), FailurePercentage::default());
    let u32_or = |v: Option<UInt32Value>, default: u32| v.map_or(default, |v| v.value);
    let duration_or = |v: &Option<ProtoDuration>, field: &str, default: Duration| v.as_ref().map_or(Ok(default), |v| duration(v, field));
    let consecutive = |threshold, enforcing| Some(Consecutive { threshold, enforcing }).filter(|c| c.enforcing > 0);
    let config = OutlierDetection {
        interval: duration_or(&od.interval, "interval", d.interval)?,
        base_ejection_time: duration_or(&od.base_ejection_time, "base_ejection_time", d.base_ejection_time)?,
        max_ejection_time: duration_or(&od.max_ejection_time, "max_ejection_time", d.max_ejection_time)?,
        max_ejection_percent: u32_or(od.max_ejection_percent, d.max_ejection_percent),
        always_eject_one: od.always_eject_one_host.is_some_and(|v| v.value),
        consecutive_5xx: consecutive(u32_or(od.consecutive_5xx, 5), u32_or(od.enforcing_consecutive_5xx, 100)),
        consecutive_gateway: consecutive(u32_or(od.consecutive_gateway_failure, 5), u32_or(od.enforcing_consecutive_gateway_failure, 0)),
        success_rate: Some(SuccessRate {
            stdev_factor: u32_or(od.success_rate_stdev_factor, rate.stdev_factor),
            enforcing: u32_or(od.enforcing_success_rate, 100),
            minimum_hosts: u32_or(od.success_rate_minimum_hosts, rate.minimum_hosts),
            request_volume: u32_or(od.success_rate_request_volume, rate.request_volume),
        })
        .filter(|s| s.enforcing > 0),
        failure_percentage: Some(FailurePercentage {
            threshold: u32_or(od.failure_percentage_threshold, percentage.threshold),
            enforcing: u32_or(od.enforcing_failure_percentage, 0),
            minimum_hosts: u32_or(od.failure_percentage_minimum_hosts, percentage.minimum_hosts),
            request_volume: u32_or(od.failure_percentage_request_volume, percentage.request_volume),
        })
        .filter(|f| f.enforcing > 0),
    };
    config.validate().map_err(|e| match e {
        mesh_core::Error::InvalidPolicy { field, reason, .. } => format!("{field}: {reason}"),
        other => other.to_string(),
    })?;
    let mut unsupported = Vec::new();
    if od.split_external_local_origin_errors {
        unsupported.push("split_external_local_origin_errors");
    }
    if od.max_ejection_time_jitter.as_ref().is_some_and(|j| j.seconds != 0 || j.nanos != 0) {
        unsupported.push("max_ejection_time_jitter");
    }
    if od.detect_degraded_hosts.is_some_and(|v| v.value) {
        unsupported.push("detect_degraded_hosts");
    }
    if !unsupported.is_empty() {
        tracing::warn!(?unsupported, "outlier_detection fields accepted but not enforced");
    }
    Ok(config)
}

/// A threshold's `retry_budget`, read as a Linkerd-style budget (DESIGN.md): `budget_percent` of the calls of
/// the last `budget_interval` (10 s when unset or zero), plus `min_retry_concurrency` retries a second.
fn retry_budget(b: &RetryBudgetProto) -> Result<RetryBudget, String> {
    let d = RetryBudget::default();
    let ratio = match &b.budget_percent {
        None => d.ratio,
        Some(p) if (0.0..=100.0).contains(&p.value) => p.value / 100.0,
        Some(p) => return Err(format!("circuit_breakers.retry_budget.budget_percent: {} is not 0 to 100", p.value)),
    };
    let min_per_second = b.min_retry_concurrency.map_or(d.min_per_second, |v| v.value);
    let window = match &b.budget_interval {
        None => d.window,
        Some(i) => match duration(i, "circuit_breakers.retry_budget.budget_interval")? {
            zero if zero.is_zero() => d.window,
            window => {
                let clamped = window.clamp(RetryBudget::MIN_WINDOW, RetryBudget::MAX_WINDOW);
                if clamped != window {
                    tracing::warn!(?window, ?clamped, "retry_budget.budget_interval outside 1 s to 60 s; using the nearest bound");
                }
                clamped
            }
        },
    };
    Ok(RetryBudget { ratio, min_per_second, window })
}

/// Upstream TLS from the transport socket; raw buffer means plaintext.
// `match_subject_alt_names` is deprecated but still sent by control planes.
#[allow(deprecated)]
fn tls(ts: &TransportSocket) -> Result<Option<TlsPolicy>, String> {
    let Some(ConfigType::TypedConfig(any)) = &ts.config_type else {
        return match ts.name.as_str() {
            "envoy.transport_sockets.raw_buffer" => Ok(None),
            name => Err(format!("{name:?} has no typed_config")),
        };
    };
    match extension_type(any).as_ref() {
        "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer" => Ok(None),
        "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext" => {
            let ctx = UpstreamTlsContext::decode(any.value.as_slice()).map_err(|e| format!("malformed UpstreamTlsContext: {e}"))?;
            let common = ctx.common_tls_context.as_ref();
            // A29: certificates come from the bootstrap's provider instances; secrets sent inline or over SDS are
            // refused rather than ignored (the connection would otherwise go out without the configured identity).
            if common.is_some_and(|c| !c.tls_certificates.is_empty() || !c.tls_certificate_sds_secret_configs.is_empty()) {
                return Err("tls_certificates and tls_certificate_sds_secret_configs are not supported (A29: use tls_certificate_provider_instance)".into());
            }
            if let Some(ValidationContextType::ValidationContextSdsSecretConfig(_)) =
                common.and_then(|c| c.validation_context_type.as_ref())
            {
                return Err("validation_context_sds_secret_config is not supported (A29: use ca_certificate_provider_instance)".into());
            }
            let certificate_provider = common
                .and_then(|c| c.tls_certificate_provider_instance.as_ref())
                .map(|p| p.instance_name.clone())
                .filter(|n| !n.is_empty());
            let validation = match common.and_then(|c| c.validation_context_type.as_ref()) {
                Some(ValidationContextType::ValidationContext(v)) => Some(v),
                Some(ValidationContextType::CombinedValidationContext(c)) => c.default_validation_context.as_ref(),
                _ => None,
            };
            let sans = validation.into_iter().flat_map(|v| {
                v.match_subject_alt_names.iter().chain(v.match_typed_subject_alt_names.iter().filter_map(|m| m.matcher.as_ref()))
            });
            // Exact, case-sensitive matchers are the SPIFFE IDs accepted; the others match any SAN (A29).
            let (mut allowed_identities, mut san_matchers) = (Vec::new(), Vec::new());
            for m in sans {
                match (&m.match_pattern, m.ignore_case) {
                    (Some(MatchPattern::Exact(s)), false) => allowed_identities.push(s.clone()),
                    _ => san_matchers.push(super::route::string_match(m).map_err(|e| format!("subject alt name matcher: {e}"))?),
                }
            }
            let ca_certificate_provider = validation
                .and_then(|v| v.ca_certificate_provider_instance.as_ref())
                .map(|p| p.instance_name.clone())
                .filter(|n| !n.is_empty());
            Ok(Some(TlsPolicy {
                server_name: Some(ctx.sni).filter(|s| !s.is_empty()),
                allowed_identities,
                san_matchers,
                certificate_provider,
                ca_certificate_provider,
            }))
        }
        other => Err(format!("unsupported transport socket type {other:?}")),
    }
}

#[cfg(test)]
#[allow(deprecated)]
mod tests {
    use envoy_types::pb::envoy::config::cluster::v3::CircuitBreakers;
    use envoy_types::pb::envoy::config::cluster::v3::circuit_breakers::Thresholds;
    use envoy_types::pb::envoy::config::cluster::v3::cluster::{
        CustomClusterType, EdsClusterConfig, LeastRequestLbConfig, RingHashLbConfig,
    };
    use envoy_types::pb::envoy::config::cluster::v3::load_balancing_policy::Policy;
    use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
    use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
    use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, TypedExtensionConfig};
    use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
    use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, Endpoint as ProtoEndpoint, LbEndpoint, LocalityLbEndpoints};
    use envoy_types::pb::envoy::extensions::load_balancing_policies::client_side_weighted_round_robin::v3::ClientSideWeightedRoundRobin;
    use envoy_types::pb::envoy::extensions::load_balancing_policies::round_robin::v3::RoundRobin;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
        CertificateProviderPluginInstance, CertificateValidationContext, CommonTlsContext, SubjectAltNameMatcher,
    };
    use envoy_types::pb::envoy::r#type::v3::Percent;
    use envoy_types::pb::google::protobuf::{Any, UInt64Value};

    use super::super::{DecodeError, Resource, ResourceType, to_any};
    use super::*;
    use envoy_types::pb::envoy::r#type::matcher::v3::StringMatcher;

    fn eds(name: &str) -> ProtoCluster {
        ProtoCluster {
            name: name.into(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
            ..Default::default()
        }
    }

    fn decode_cluster(c: &ProtoCluster) -> Result<ClusterResource, DecodeError> {
        match super::super::decode(ResourceType::Cluster, &to_any(c))? {
            Resource::Cluster(c) => Ok(c),
            other => panic!("unexpected {other:?}"),
        }
    }

    fn reason(c: &ProtoCluster) -> String {
        let err = decode_cluster(c).unwrap_err();
        assert_eq!(err.name.as_deref(), Some(c.name.as_str()), "{err}");
        err.reason
    }

    fn lb_endpoint(host: &str, port: u32) -> LbEndpoint {
        let sa = SocketAddress { address: host.into(), port_specifier: Some(PortSpecifier::PortValue(port)), ..Default::default() };
        let ep = ProtoEndpoint { address: Some(Address { address: Some(AddressKind::SocketAddress(sa)) }), ..Default::default() };
        LbEndpoint { host_identifier: Some(HostIdentifier::Endpoint(ep)), ..Default::default() }
    }

    fn assignment(eps: Vec<LbEndpoint>) -> Option<ClusterLoadAssignment> {
        Some(ClusterLoadAssignment {
            endpoints: vec![LocalityLbEndpoints { lb_endpoints: eps, ..Default::default() }],
            ..Default::default()
        })
    }

    fn policy_list(anys: Vec<Any>) -> Option<LoadBalancingPolicy> {
        let policies = anys
            .into_iter()
            .map(|a| Policy { typed_extension_config: Some(TypedExtensionConfig { name: "p".into(), typed_config: Some(a) }) })
            .collect();
        Some(LoadBalancingPolicy { policies })
    }

    fn san(exact: &str) -> StringMatcher {
        StringMatcher { match_pattern: Some(MatchPattern::Exact(exact.into())), ignore_case: false }
    }

    fn tls_socket(sni: &str, sans: Vec<StringMatcher>) -> Option<TransportSocket> {
        let instance = |name: &str| Some(CertificateProviderPluginInstance { instance_name: name.into(), certificate_name: String::new() });
        let validation = CertificateValidationContext {
            match_subject_alt_names: sans,
            match_typed_subject_alt_names: vec![SubjectAltNameMatcher { matcher: Some(san("spiffe://mesh/typed")), ..Default::default() }],
            ca_certificate_provider_instance: instance("roots"),
            ..Default::default()
        };
        let ctx = UpstreamTlsContext {
            sni: sni.into(),
            common_tls_context: Some(CommonTlsContext {
                validation_context_type: Some(ValidationContextType::ValidationContext(validation)),
                tls_certificate_provider_instance: instance("default"),
                ..Default::default()
            }),
            ..Default::default()
        };
        Some(TransportSocket { name: "tls".into(), config_type: Some(ConfigType::TypedConfig(to_any(&ctx))) })
    }

    #[test]
    fn eds_cluster_with_policies() {
        let mut c = eds("greeter");
        c.eds_cluster_config = Some(EdsClusterConfig { service_name: "greeter-eds".into(), eds_config: None });
        c.lb_policy = ProtoLbPolicy::LeastRequest as i32;
        c.lb_config = Some(LbConfig::LeastRequestLbConfig(LeastRequestLbConfig {
            choice_count: Some(UInt32Value { value: 3 }),
            ..Default::default()
        }));
        c.connect_timeout = Some(ProtoDuration { seconds: 2, nanos: 0 });
        c.circuit_breakers = Some(CircuitBreakers {
            thresholds: vec![
                Thresholds { priority: RoutingPriority::High as i32, max_requests: Some(UInt32Value { value: 1 }), ..Default::default() },
                Thresholds {
                    max_requests: Some(UInt32Value { value: 99 }),
                    max_retries: Some(UInt32Value { value: 7 }),
                    retry_budget: Some(RetryBudgetProto {
                        budget_percent: Some(Percent { value: 50.0 }),
                        min_retry_concurrency: Some(UInt32Value { value: 2 }),
                        budget_interval: Some(ProtoDuration { seconds: 0, nanos: 100_000_000 }),
                    }),
                    ..Default::default()
                },
            ],
            ..Default::default()
        });
        c.outlier_detection = Some(ProtoOutlier {
            consecutive_5xx: Some(UInt32Value { value: 3 }),
            base_ejection_time: Some(ProtoDuration { seconds: 60, nanos: 0 }),
            enforcing_consecutive_gateway_failure: Some(UInt32Value { value: 50 }),
            enforcing_success_rate: Some(UInt32Value { value: 0 }),
            enforcing_failure_percentage: Some(UInt32Value { value: 100 }),
            failure_percentage_threshold: Some(UInt32Value { value: 40 }),
            ..Default::default()
        });
        c.transport_socket = tls_socket("greeter.svc", vec![san("spiffe://mesh/greeter")]);
        let r = decode_cluster(&c).unwrap();
        assert_eq!(r.eds_service_name(), Some("greeter-eds"));
        let cl = &r.cluster;
        assert_eq!(cl.name.as_str(), "greeter");
        assert_eq!(cl.discovery, ClusterDiscovery::Eds { service_name: Some("greeter-eds".into()) });
        assert_eq!(cl.lb, LbPolicy::LeastRequest { choice_count: 3 });
        assert_eq!(cl.policies.connection.connect_timeout, Duration::from_secs(2));
        let cb = &cl.policies.circuit_breakers;
        assert_eq!((cb.max_connections, cb.max_requests, cb.max_retries), (1024, 99, 7));
        // A window under a second is raised to one (tower's budget needs 1 to 60 s).
        let budget = RetryBudget { ratio: 0.5, min_per_second: 2, window: Duration::from_secs(1) };
        assert_eq!(cb.retry_budget, Some(budget));
        let od = cl.policies.outlier_detection.as_ref().unwrap();
        assert_eq!(
            (od.interval, od.base_ejection_time, od.max_ejection_time),
            (Duration::from_secs(10), Duration::from_secs(60), Duration::from_secs(300))
        );
        assert_eq!(od.consecutive_5xx, Some(Consecutive { threshold: 3, enforcing: 100 }));
        assert_eq!(od.consecutive_gateway, Some(Consecutive { threshold: 5, enforcing: 50 }), "on when enforced");
        assert_eq!(od.success_rate, None, "enforcing_success_rate 0 turns it off");
        assert_eq!(od.failure_percentage, Some(FailurePercentage { threshold: 40, ..FailurePercentage::default() }));
        let defaults = decode_cluster(&ProtoCluster { outlier_detection: Some(ProtoOutlier::default()), ..eds("d") }).unwrap();
        assert_eq!(defaults.cluster.policies.outlier_detection, Some(OutlierDetection::default()), "Envoy's defaults");
        let tls = cl.policies.tls.as_ref().unwrap();
        assert_eq!(tls.server_name.as_deref(), Some("greeter.svc"));
        assert_eq!(tls.allowed_identities, ["spiffe://mesh/greeter", "spiffe://mesh/typed"]);
        assert_eq!((tls.certificate_provider.as_deref(), tls.ca_certificate_provider.as_deref()), (Some("default"), Some("roots")));

        let plain = decode_cluster(&eds("plain")).unwrap();
        assert_eq!(plain.eds_service_name(), Some("plain"));
        assert_eq!(plain.cluster.lb, LbPolicy::RoundRobin);
        assert_eq!(plain.cluster.policies, ClusterPolicies::default());
    }

    #[test]
    fn static_and_logical_dns_clusters() {
        let mut c = ProtoCluster {
            name: "static".into(),
            load_assignment: assignment(vec![lb_endpoint("10.0.0.1", 80), lb_endpoint("10.0.0.2", 81)]),
            ..Default::default()
        };
        let r = decode_cluster(&c).unwrap();
        assert_eq!(r.cluster.discovery, ClusterDiscovery::Static);
        assert_eq!(r.eds_service_name(), None);
        let addrs: Vec<_> = r.cluster.endpoints.iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(addrs, ["10.0.0.1:80", "10.0.0.2:81"]);

        c.name = "dns".into();
        c.cluster_discovery_type = Some(ClusterDiscoveryType::Type(DiscoveryType::LogicalDns as i32));
        assert!(reason(&c).contains("exactly one endpoint"));
        c.load_assignment = assignment(vec![lb_endpoint("greeter.example.com", 443)]);
        let r = decode_cluster(&c).unwrap();
        assert_eq!(r.cluster.discovery, ClusterDiscovery::LogicalDns { host: "greeter.example.com".into(), port: 443 });
        c.load_assignment = assignment(vec![lb_endpoint("greeter.example.com", 70000)]);
        assert!(reason(&c).contains("port_value"));
    }

    #[test]
    fn lb_policies() {
        let mut c = eds("lb");
        c.lb_policy = ProtoLbPolicy::RingHash as i32;
        c.lb_config =
            Some(LbConfig::RingHashLbConfig(RingHashLbConfig { minimum_ring_size: Some(UInt64Value { value: 16 }), ..Default::default() }));
        let ring = RingHashConfig { minimum_ring_size: 16, maximum_ring_size: MAX_RING_SIZE };
        assert_eq!(
            decode_cluster(&c).unwrap().cluster.lb,
            LbPolicy::RingHash { ring, hash: HashPolicy::Header(DEFAULT_HASH_HEADER.into()) }
        );

        // The typed list wins over lb_policy; unknown entries are skipped.
        let unknown = Any { type_url: "type.googleapis.com/x.Unknown".into(), value: vec![] };
        let wrr = |child: Any| to_any(&WrrLocality { endpoint_picking_policy: policy_list(vec![child]) });
        c.load_balancing_policy = policy_list(vec![unknown.clone(), wrr(to_any(&LeastRequest::default()))]);
        assert_eq!(decode_cluster(&c).unwrap().cluster.lb, LbPolicy::LeastRequest { choice_count: 2 });
        c.load_balancing_policy = policy_list(vec![to_any(&ClientSideWeightedRoundRobin::default()), to_any(&RoundRobin::default())]);
        assert_eq!(decode_cluster(&c).unwrap().cluster.lb, LbPolicy::WeightedRoundRobin);
        let p2c = Any { type_url: "type.googleapis.com/mesh.lb.v1.P2cEwma".into(), value: vec![] };
        c.load_balancing_policy = policy_list(vec![unknown.clone(), p2c]);
        assert_eq!(decode_cluster(&c).unwrap().cluster.lb, LbPolicy::p2c_ewma());
        // xds.type.v3.TypedStruct { type_url = "type.googleapis.com/mesh.lb.v1.P2cEwma" }
        let inner = "type.googleapis.com/mesh.lb.v1.P2cEwma";
        let mut value = vec![0x0a, inner.len() as u8];
        value.extend(inner.as_bytes());
        c.load_balancing_policy = policy_list(vec![Any { type_url: "type.googleapis.com/xds.type.v3.TypedStruct".into(), value }]);
        assert_eq!(decode_cluster(&c).unwrap().cluster.lb, LbPolicy::p2c_ewma());
        let rh = RingHash { maximum_ring_size: Some(UInt64Value { value: 4096 }), ..Default::default() };
        c.load_balancing_policy = policy_list(vec![to_any(&rh)]);
        assert!(matches!(decode_cluster(&c).unwrap().cluster.lb, LbPolicy::RingHash { ring, .. } if ring.maximum_ring_size == 4096));

        c.load_balancing_policy = policy_list(vec![unknown]);
        assert!(reason(&c).contains("load_balancing_policy: no supported policy"));
        let murmur = RingHash { hash_function: ring_hash::HashFunction::MurmurHash2 as i32, ..Default::default() };
        c.load_balancing_policy = policy_list(vec![to_any(&murmur)]);
        assert!(reason(&c).contains("hash_function"));

        c.load_balancing_policy = None;
        c.lb_config =
            Some(LbConfig::RingHashLbConfig(RingHashLbConfig { hash_function: HashFunction::MurmurHash2 as i32, ..Default::default() }));
        assert!(reason(&c).contains("ring_hash_lb_config.hash_function"));
        c.lb_config = Some(LbConfig::RingHashLbConfig(RingHashLbConfig {
            minimum_ring_size: Some(UInt64Value { value: 10 }),
            maximum_ring_size: Some(UInt64Value { value: 5 }),
            ..Default::default()
        }));
        assert!(reason(&c).contains("lb_policy: invalid policy lb.ring"));
        c.lb_config = None;
        for bad in [ProtoLbPolicy::Maglev, ProtoLbPolicy::Random, ProtoLbPolicy::ClusterProvided] {
            c.lb_policy = bad as i32;
            assert!(reason(&c).contains(&format!("lb_policy: unsupported {}", bad.as_str_name())));
        }
        c.lb_policy = ProtoLbPolicy::LeastRequest as i32;
        c.lb_config = Some(LbConfig::LeastRequestLbConfig(LeastRequestLbConfig {
            choice_count: Some(UInt32Value { value: 1 }),
            ..Default::default()
        }));
        assert!(reason(&c).contains("choice_count"));
    }

    #[test]
    fn rejections() {
        assert_eq!(decode_cluster(&eds("")).unwrap_err().reason, "name: invalid service name \"\": empty");
        assert!(decode_cluster(&eds("a b")).unwrap_err().reason.starts_with("name:"));
        let mut c = eds("c");
        c.cluster_discovery_type =
            Some(ClusterDiscoveryType::ClusterType(CustomClusterType { name: "envoy.clusters.aggregate".into(), typed_config: None }));
        assert!(reason(&c).contains("unsupported cluster type"));
        for bad in [DiscoveryType::OriginalDst, DiscoveryType::StrictDns] {
            c.cluster_discovery_type = Some(ClusterDiscoveryType::Type(bad as i32));
            assert!(reason(&c).contains("type: unsupported cluster type"));
        }
        let mut c = eds("c");
        c.transport_socket = Some(TransportSocket {
            name: "alts".into(),
            config_type: Some(ConfigType::TypedConfig(Any {
                type_url: "type.googleapis.com/envoy.extensions.transport_sockets.alts.v3.Alts".into(),
                value: vec![],
            })),
        });
        assert!(reason(&c).contains("transport_socket: unsupported transport socket type"));
        // A29: every SAN matcher kind is taken; one that cannot be compiled NACKs the cluster.
        let prefix = StringMatcher { match_pattern: Some(MatchPattern::Prefix("spiffe://mesh/ns/prod/".into())), ignore_case: false };
        let upper = StringMatcher { match_pattern: Some(MatchPattern::Exact("SPIFFE://MESH/A".into())), ignore_case: true };
        c.transport_socket = tls_socket("", vec![prefix, upper]);
        let decoded = decode_cluster(&c).unwrap();
        let tls = decoded.cluster.policies.tls.unwrap();
        assert_eq!(tls.allowed_identities, ["spiffe://mesh/typed"], "exact, case-sensitive: an accepted SPIFFE ID");
        assert_eq!(tls.san_matchers.len(), 2);
        assert!(
            tls.san_matchers[0].matches(Some("spiffe://mesh/ns/prod/sa/x"))
                && !tls.san_matchers[0].matches(Some("spiffe://mesh/ns/dev/sa/x"))
        );
        assert!(tls.san_matchers[1].matches(Some("spiffe://mesh/a")), "ignore_case");
        let bad = StringMatcher {
            match_pattern: Some(MatchPattern::SafeRegex(envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher {
                regex: "(".into(),
                ..Default::default()
            })),
            ignore_case: false,
        };
        c.transport_socket = tls_socket("", vec![bad]);
        assert!(reason(&c).contains("transport_socket: subject alt name matcher"), "{}", reason(&c));
        c.transport_socket = None;
        c.outlier_detection = Some(ProtoOutlier { max_ejection_percent: Some(UInt32Value { value: 101 }), ..Default::default() });
        assert!(reason(&c).contains("outlier_detection.max_ejection_percent"));
        c.outlier_detection = Some(ProtoOutlier { consecutive_5xx: Some(UInt32Value { value: 0 }), ..Default::default() });
        assert!(reason(&c).contains("outlier_detection.consecutive_5xx: must be 1 to 255"), "{}", reason(&c));
        c.outlier_detection = None;
        let budget = RetryBudgetProto { budget_percent: Some(Percent { value: 120.0 }), ..Default::default() };
        let thresholds = Thresholds { retry_budget: Some(budget), ..Default::default() };
        c.circuit_breakers = Some(CircuitBreakers { thresholds: vec![thresholds], ..Default::default() });
        assert!(reason(&c).contains("circuit_breakers.retry_budget.budget_percent: 120 is not 0 to 100"), "{}", reason(&c));
        c.circuit_breakers = None;
        c.connect_timeout = Some(ProtoDuration { seconds: -1, nanos: 0 });
        assert!(reason(&c).contains("connect_timeout"));
    }
}
