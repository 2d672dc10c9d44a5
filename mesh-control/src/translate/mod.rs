//! Mesh model → standard xDS v3 resources.
//!
//! Per service `S` (in the client's view):
//! - RDS `S`: one virtual host (`*`) with the service's routes: path/header matches, weighted clusters, timeout
//!   (as `timeout` and `max_stream_duration`, so Envoy and gRPC both apply it), retry policy, and a hash policy on
//!   `x-mesh-hash-key` for ring hash.
//! - CDS `S` (all endpoints) and `S|subset` per subset: EDS over ADS, LB policy, circuit breakers with the retry
//!   budget, outlier detection, HTTP/2 upstream (Envoy's `HttpProtocolOptions`), upstream TLS for mTLS `strict`.
//! - EDS for each cluster: endpoints grouped by locality (locality weight = the sum of its endpoint weights, which
//!   gRPC requires), health status, weights.
//! - LDS, in the shape the client needs ([`Shape`]): proxyless `S` is an `api_listener` (as istiod serves gRPC
//!   proxyless clients) with the fault filter (and, marked optional, the local rate limit filter) and the
//!   router; sidecar `S:sidecar` is a socket listener on `127.0.0.1:<sidecar.port>` whose
//!   HttpConnectionManager has fault, local rate limit, RBAC (authorization) and router filters.
//! - LDS for xDS-enabled servers (proxyless shape, gRFC A36): for each endpoint address `A` of a service, a
//!   server Listener `grpc/server?xds.resource.listening_address=A` ([`SERVER_LISTENER_TEMPLATE`]) whose
//!   chains carry the service's mTLS mode (strict: one mTLS chain; permissive: an mTLS chain for TLS
//!   connections and a plaintext default chain; disable: plaintext), and whose HttpConnectionManager has RBAC
//!   (authorization), the server rate limit (optional: gRPC servers skip it) and the router, with an inline
//!   route table of one non-forwarding route.

mod cluster;
mod listener;
mod route;

use std::collections::BTreeSet;

use envoy_types::pb::envoy::config::core::v3::config_source::ConfigSourceSpecifier;
use envoy_types::pb::envoy::config::core::v3::{AggregatedConfigSource, ApiVersion, ConfigSource};
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration};
use mesh_core::model::Endpoint;

use crate::mesh::{KubeRef, Mesh};

/// The bootstrap's `server_listener_resource_name_template` in the bootstraps mesh-control writes: the name
/// of a server's inbound listener, `%s` the listening address.
pub const SERVER_LISTENER_TEMPLATE: &str = "grpc/server?xds.resource.listening_address=%s";

/// Type URL of listeners (LDS).
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// Type URL of route configurations (RDS).
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// Type URL of clusters (CDS).
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// Type URL of cluster load assignments (EDS).
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// SDS: a TLS certificate and key, or a validation context.
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// The secret holding a sidecar's own certificate and key (Istio's name).
pub const IDENTITY_SECRET: &str = "default";
/// The secret holding the roots a sidecar trusts (Istio's name).
pub const ROOTS_SECRET: &str = "ROOTCA";

/// Which listeners a client gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Shape {
    /// `api_listener` listeners named after services (our library, gRPC proxyless clients).
    Proxyless,
    /// Socket listeners for an Envoy sidecar.
    Sidecar,
}

impl Shape {
    /// Its name in snapshot keys and status output.
    pub fn name(self) -> &'static str {
        match self {
            Self::Proxyless => "proxyless",
            Self::Sidecar => "sidecar",
        }
    }
}

/// One xDS resource.
#[derive(Clone, Debug, PartialEq)]
pub struct Resource {
    /// Its type URL (one of this module's constants).
    pub type_url: &'static str,
    /// Its name.
    pub name: String,
    /// The encoded resource.
    pub resource: Any,
}

/// The xDS resources a client of `shape` sees: every service, or only those in `view`. `kube` gives the endpoints
/// of a Kubernetes-backed service or subset.
pub fn resources(mesh: &Mesh, shape: Shape, view: Option<&BTreeSet<String>>, kube: &dyn Fn(&KubeRef) -> Vec<Endpoint>) -> Vec<Resource> {
    let mut out = Vec::new();
    if shape == Shape::Proxyless {
        // Every service's servers, whatever the view: a server needs its own listener.
        let mut seen = BTreeSet::new();
        for service in mesh.services.values() {
            for (_, endpoints) in cluster::cluster_endpoints(service, kube) {
                for addr in endpoints.iter().map(|e| e.addr).filter(|a| seen.insert(*a)) {
                    let name = SERVER_LISTENER_TEMPLATE.replace("%s", &addr.to_string());
                    out.push(pack(LISTENER, &name, listener::server_listener(service, &name, addr)));
                }
            }
        }
    }
    for service in mesh.services.values().filter(|s| view.is_none_or(|v| v.contains(&s.name))) {
        out.push(pack(ROUTE, &service.name, route::route_config(service)));
        listener::listeners(service, shape, &mut out);
        for (name, endpoints) in cluster::cluster_endpoints(service, kube) {
            out.push(pack(CLUSTER, &name, cluster::cluster(service, &name, shape)));
            out.push(pack(ENDPOINT, &name, cluster::load_assignment(&name, &endpoints)));
        }
    }
    // A route may split (or mirror) to a service outside the view: its clusters come along so the route is complete.
    let names: BTreeSet<String> = out.iter().filter(|r| r.type_url == CLUSTER).map(|r| r.name.clone()).collect();
    let mut missing = BTreeSet::new();
    for service in mesh.services.values().filter(|s| view.is_none_or(|v| v.contains(&s.name))) {
        for route in &service.routes {
            let named = route.split.iter().chain(&route.mirror).map(|(c, _)| c.clone());
            missing.extend(named.filter(|c| !names.contains(c)));
        }
    }
    for name in missing {
        if let Some(service) = mesh.services.get(&name) {
            for (cluster_name, endpoints) in cluster::cluster_endpoints(service, kube).into_iter().filter(|(c, _)| *c == name) {
                out.push(pack(CLUSTER, &cluster_name, cluster::cluster(service, &cluster_name, shape)));
                out.push(pack(ENDPOINT, &cluster_name, cluster::load_assignment(&cluster_name, &endpoints)));
            }
        }
    }
    out
}

/// A sidecar's certificate, key and roots as the SDS secrets its strict clusters and listeners name.
pub fn secrets(chain: &str, key: &str, bundle: &str) -> Vec<Resource> {
    use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source::Specifier};
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{CertificateValidationContext, Secret, TlsCertificate, secret};
    let inline = |text: &str| Some(DataSource { specifier: Some(Specifier::InlineString(text.to_owned())), ..Default::default() });
    let identity = Secret {
        name: IDENTITY_SECRET.to_owned(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(chain),
            private_key: inline(key),
            ..Default::default()
        })),
    };
    let roots = Secret {
        name: ROOTS_SECRET.to_owned(),
        r#type: Some(secret::Type::ValidationContext(CertificateValidationContext { trusted_ca: inline(bundle), ..Default::default() })),
    };
    vec![pack(SECRET, IDENTITY_SECRET, identity), pack(SECRET, ROOTS_SECRET, roots)]
}

/// The TLS context of a sidecar's strict clusters and listeners: its certificate and roots over SDS (on the ADS
/// stream), ALPN h2, TLS 1.3 only.
fn sds_tls_context() -> envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::CommonTlsContext {
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::common_tls_context::ValidationContextType;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::tls_parameters::TlsProtocol;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{CommonTlsContext, SdsSecretConfig, TlsParameters};
    let sds = |name: &str| SdsSecretConfig { name: name.to_owned(), sds_config: Some(ads()) };
    CommonTlsContext {
        tls_params: Some(TlsParameters {
            tls_minimum_protocol_version: TlsProtocol::TlSv13 as i32,
            tls_maximum_protocol_version: TlsProtocol::TlSv13 as i32,
            ..Default::default()
        }),
        tls_certificate_sds_secret_configs: vec![sds(IDENTITY_SECRET)],
        validation_context_type: Some(ValidationContextType::ValidationContextSdsSecretConfig(sds(ROOTS_SECRET))),
        alpn_protocols: vec!["h2".to_owned()],
        ..Default::default()
    }
}

fn pack<T: prost::Name>(type_url: &'static str, name: &str, message: T) -> Resource {
    Resource { type_url, name: name.to_owned(), resource: envoy_types::util::pack_any(message) }
}

fn ads() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        resource_api_version: ApiVersion::V3 as i32,
        ..Default::default()
    }
}

fn duration(d: std::time::Duration) -> PbDuration {
    PbDuration { seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX), nanos: d.subsec_nanos() as i32 }
}

#[cfg(test)]
mod tests;
