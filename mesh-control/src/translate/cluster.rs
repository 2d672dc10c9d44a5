//! CDS and EDS.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::cluster::v3::circuit_breakers::Thresholds;
use envoy_types::pb::envoy::config::cluster::v3::circuit_breakers::thresholds::RetryBudget;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbConfig, LbPolicy as PbLbPolicy, LeastRequestLbConfig, RingHashLbConfig,
};
use envoy_types::pb::envoy::config::cluster::v3::{CircuitBreakers, Cluster, LoadBalancingPolicy, OutlierDetection, load_balancing_policy};
use envoy_types::pb::envoy::config::core::v3::socket_address::{PortSpecifier, Protocol};
use envoy_types::pb::envoy::config::core::v3::{
    Address, HealthStatus as PbHealth, Http2ProtocolOptions, Locality as PbLocality, SocketAddress, TransportSocket, TypedExtensionConfig,
    address, transport_socket,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint as PbEndpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::common_tls_context::ValidationContextType;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateProviderPluginInstance, CertificateValidationContext, CommonTlsContext, UpstreamTlsContext,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::explicit_http_config::ProtocolConfig;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::{ExplicitHttpConfig, UpstreamProtocolOptions};
use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf::{Any, UInt32Value, UInt64Value};
use envoy_types::util::pack_any;
use mesh_core::model::{Endpoint, HealthStatus, Locality};
use mesh_core::policy::{Consecutive, FailurePercentage, LbPolicy, MtlsMode, SuccessRate};

use super::{Shape, ads, duration};
use crate::mesh::{EndpointSource, KubeRef, Service, Subset, cluster_name};

/// Every cluster of a service with its endpoints: the whole service first, then one per subset.
pub(super) fn cluster_endpoints(service: &Service, kube: &dyn Fn(&KubeRef) -> Vec<Endpoint>) -> Vec<(String, Vec<Endpoint>)> {
    let resolve = |source: &EndpointSource| match source {
        EndpointSource::Static(e) => e.clone(),
        EndpointSource::Kubernetes(k) => kube(k),
    };
    let base = resolve(&service.endpoints);
    let mut all = base.clone();
    // gRPC rejects an assignment naming an address twice: subsets' own endpoints join the whole once each.
    let mut seen: std::collections::HashSet<std::net::SocketAddr> = base.iter().map(|e| e.addr).collect();
    let mut out = Vec::with_capacity(service.subsets.len() + 1);
    for (name, subset) in &service.subsets {
        let endpoints = match subset {
            Subset::Labels(labels) => base.iter().filter(|e| labels.iter().all(|(k, v)| e.metadata.get(k) == Some(v))).cloned().collect(),
            Subset::Endpoints(source) => {
                let own = resolve(source);
                all.extend(own.iter().filter(|e| seen.insert(e.addr)).cloned());
                own
            }
        };
        out.push((cluster_name(&service.name, Some(name)), endpoints));
    }
    out.insert(0, (service.name.clone(), all));
    out
}

pub(super) fn cluster(service: &Service, name: &str, shape: Shape) -> Cluster {
    let mut cluster = Cluster {
        name: name.to_owned(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig { eds_config: Some(ads()), service_name: name.to_owned() }),
        connect_timeout: Some(duration(std::time::Duration::from_secs(1))),
        circuit_breakers: Some(circuit_breakers(service)),
        outlier_detection: service.outlier_detection.as_ref().map(outlier_detection),
        typed_extension_protocol_options: [("envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_owned(), http2())].into(),
        transport_socket: (service.mtls == MtlsMode::Strict).then(|| mtls_socket(shape)),
        ..Default::default()
    };
    match &service.lb {
        LbPolicy::RoundRobin => cluster.lb_policy = PbLbPolicy::RoundRobin as i32,
        LbPolicy::LeastRequest { choice_count } => {
            cluster.lb_policy = PbLbPolicy::LeastRequest as i32;
            cluster.lb_config = Some(LbConfig::LeastRequestLbConfig(LeastRequestLbConfig {
                choice_count: Some(UInt32Value { value: *choice_count }),
                ..Default::default()
            }));
        }
        LbPolicy::RingHash { ring, .. } => {
            cluster.lb_policy = PbLbPolicy::RingHash as i32;
            cluster.lb_config = Some(LbConfig::RingHashLbConfig(RingHashLbConfig {
                minimum_ring_size: Some(UInt64Value { value: ring.minimum_ring_size }),
                maximum_ring_size: Some(UInt64Value { value: ring.maximum_ring_size }),
                ..Default::default()
            }));
        }
        // Ours first; Envoy and gRPC skip a policy they do not know and take the next one.
        LbPolicy::P2cEwma { .. } => cluster.load_balancing_policy = Some(policy_list(&["mesh.lb.v1.P2cEwma", LEAST_REQUEST])),
        LbPolicy::WeightedRoundRobin => cluster.load_balancing_policy = Some(policy_list(&[WRR, ROUND_ROBIN])),
    }
    cluster
}

const LEAST_REQUEST: &str = "envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest";
const ROUND_ROBIN: &str = "envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin";
const WRR: &str = "envoy.extensions.load_balancing_policies.client_side_weighted_round_robin.v3.ClientSideWeightedRoundRobin";

fn policy_list(types: &[&str]) -> LoadBalancingPolicy {
    let policies = types
        .iter()
        .map(|t| {
            // Known Envoy policies are empty messages here; ours travels as an xds.type.v3.TypedStruct.
            let typed_config = if t.starts_with("mesh.") {
                // xds.type.v3.TypedStruct { type_url = 1 }, encoded by hand (envoy-types does not carry it).
                let mut value = Vec::new();
                prost::encoding::string::encode(1, &format!("type.googleapis.com/{t}"), &mut value);
                Any { type_url: "type.googleapis.com/xds.type.v3.TypedStruct".to_owned(), value }
            } else {
                Any { type_url: format!("type.googleapis.com/{t}"), value: Vec::new() }
            };
            load_balancing_policy::Policy {
                typed_extension_config: Some(TypedExtensionConfig { name: (*t).to_owned(), typed_config: Some(typed_config) }),
            }
        })
        .collect();
    LoadBalancingPolicy { policies }
}

/// Every field explicit, `enforcing_*` included, so Envoy's defaults (success rate on) never differ from ours.
fn outlier_detection(o: &mesh_core::policy::OutlierDetection) -> OutlierDetection {
    let u32v = |value: u32| Some(UInt32Value { value });
    let (c5, cg) = (
        o.consecutive_5xx.unwrap_or(Consecutive { threshold: 5, enforcing: 0 }),
        o.consecutive_gateway.unwrap_or(Consecutive { threshold: 5, enforcing: 0 }),
    );
    let rate = o.success_rate.unwrap_or(SuccessRate { enforcing: 0, ..SuccessRate::default() });
    let percentage = o.failure_percentage.unwrap_or(FailurePercentage { enforcing: 0, ..FailurePercentage::default() });
    OutlierDetection {
        interval: Some(duration(o.interval)),
        base_ejection_time: Some(duration(o.base_ejection_time)),
        max_ejection_time: Some(duration(o.max_ejection_time)),
        max_ejection_percent: u32v(o.max_ejection_percent),
        consecutive_5xx: u32v(c5.threshold),
        enforcing_consecutive_5xx: u32v(c5.enforcing),
        consecutive_gateway_failure: u32v(cg.threshold),
        enforcing_consecutive_gateway_failure: u32v(cg.enforcing),
        success_rate_stdev_factor: u32v(rate.stdev_factor),
        enforcing_success_rate: u32v(rate.enforcing),
        success_rate_minimum_hosts: u32v(rate.minimum_hosts),
        success_rate_request_volume: u32v(rate.request_volume),
        failure_percentage_threshold: u32v(percentage.threshold),
        enforcing_failure_percentage: u32v(percentage.enforcing),
        failure_percentage_minimum_hosts: u32v(percentage.minimum_hosts),
        failure_percentage_request_volume: u32v(percentage.request_volume),
        ..Default::default()
    }
}

fn circuit_breakers(service: &Service) -> CircuitBreakers {
    let cb = &service.circuit_breakers;
    let retry_budget = cb.retry_budget.as_ref().map(|b| RetryBudget {
        budget_percent: Some(Percent { value: b.ratio * 100.0 }),
        min_retry_concurrency: Some(UInt32Value { value: b.min_per_second }),
        // Unset means 10 s to our client (and "active requests only" to Envoy, as before).
        budget_interval: (b.window != mesh_core::policy::RetryBudget::default().window).then(|| super::duration(b.window)),
    });
    CircuitBreakers {
        thresholds: vec![Thresholds {
            max_connections: Some(UInt32Value { value: cb.max_connections }),
            max_pending_requests: Some(UInt32Value { value: cb.max_pending_requests }),
            max_requests: Some(UInt32Value { value: cb.max_requests }),
            max_retries: Some(UInt32Value { value: cb.max_retries }),
            retry_budget,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Upstream HTTP/2 (Envoy defaults to HTTP/1.1 towards clusters; gRPC needs HTTP/2).
fn http2() -> Any {
    pack_any(HttpProtocolOptions {
        upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(ExplicitHttpConfig {
            protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(Http2ProtocolOptions::default())),
        })),
        ..Default::default()
    })
}

/// mTLS for a strict service's clusters. Proxyless clients take the certificate and roots from their
/// bootstrap's [`CERTIFICATE_PROVIDER`](crate::control::CERTIFICATE_PROVIDER) instance (gRFC A29); Envoy
/// takes them over SDS from the control plane (the [`super::IDENTITY_SECRET`] and [`super::ROOTS_SECRET`]
/// secrets), speaks h2 and TLS 1.3.
fn mtls_socket(shape: Shape) -> TransportSocket {
    let common = match shape {
        Shape::Proxyless => {
            let provider = || CertificateProviderPluginInstance {
                instance_name: crate::control::CERTIFICATE_PROVIDER.to_owned(),
                certificate_name: String::new(),
            };
            CommonTlsContext {
                tls_certificate_provider_instance: Some(provider()),
                validation_context_type: Some(ValidationContextType::ValidationContext(CertificateValidationContext {
                    ca_certificate_provider_instance: Some(provider()),
                    ..Default::default()
                })),
                ..Default::default()
            }
        }
        Shape::Sidecar => super::sds_tls_context(),
    };
    let tls = UpstreamTlsContext { common_tls_context: Some(common), ..Default::default() };
    TransportSocket {
        name: "envoy.transport_sockets.tls".to_owned(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(tls))),
    }
}

pub(super) fn load_assignment(name: &str, endpoints: &[Endpoint]) -> ClusterLoadAssignment {
    let mut by_locality: BTreeMap<(u32, &Locality), Vec<&Endpoint>> = BTreeMap::new();
    for e in endpoints {
        by_locality.entry((u32::from(e.priority), &*e.locality)).or_default().push(e);
    }
    let localities = by_locality
        .into_iter()
        .map(|((priority, locality), endpoints)| LocalityLbEndpoints {
            locality: Some(PbLocality {
                region: locality.region.clone(),
                zone: locality.zone.clone(),
                sub_zone: locality.sub_zone.clone(),
            }),
            load_balancing_weight: Some(UInt32Value { value: endpoints.iter().map(|e| e.weight.max(1)).fold(0u32, u32::saturating_add) }),
            priority,
            lb_endpoints: endpoints.into_iter().map(lb_endpoint).collect(),
            ..Default::default()
        })
        .collect();
    ClusterLoadAssignment { cluster_name: name.to_owned(), endpoints: localities, ..Default::default() }
}

fn lb_endpoint(e: &Endpoint) -> LbEndpoint {
    let health = match e.health {
        HealthStatus::Unknown => PbHealth::Unknown,
        HealthStatus::Healthy => PbHealth::Healthy,
        HealthStatus::Unhealthy => PbHealth::Unhealthy,
        HealthStatus::Draining => PbHealth::Draining,
        HealthStatus::Degraded => PbHealth::Degraded,
    };
    LbEndpoint {
        health_status: health as i32,
        load_balancing_weight: Some(UInt32Value { value: e.weight.max(1) }),
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(PbEndpoint {
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    protocol: Protocol::Tcp as i32,
                    address: e.addr.ip().to_string(),
                    port_specifier: Some(PortSpecifier::PortValue(u32::from(e.addr.port()))),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        })),
        ..Default::default()
    }
}
