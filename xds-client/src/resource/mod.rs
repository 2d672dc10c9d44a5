//! Decoding and validation of the four xDS resources (LDS, RDS, CDS, EDS) into
//! `mesh-core` types; LDS holds client (API) listeners and server listeners (A36).
//!
//! Decoding has two phases, as in gRPC: [`resource_name`] reads only the name
//! (tag 1 of every resource), so a response whose body is broken can still be
//! NACKed per resource; [`decode`] then decodes and validates the whole
//! resource. Validation follows gRPC's xDS client rules (gRFCs A27, A28, A36,
//! A39, A41, A42, A52, A81) and Envoy's semantics; unknown fields are ignored.
//! Nothing here panics on network data.

use std::borrow::Cow;
use std::time::Duration;

use envoy_types::pb::google::protobuf::{Any, Duration as ProtoDuration};
use prost::Message;

mod adaptive;
pub mod cluster;
pub mod endpoint;
mod fault;
pub mod hedging;
mod inbound;
pub mod listener;
mod ratelimit;
pub mod rbac;
pub mod route;

pub use cluster::ClusterResource;
pub use endpoint::EndpointsResource;
pub use listener::{ListenerResource, RouteSource};

/// The four resource types of the client path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceType {
    /// LDS: `envoy.config.listener.v3.Listener`.
    Listener,
    /// RDS: `envoy.config.route.v3.RouteConfiguration`.
    RouteConfiguration,
    /// CDS: `envoy.config.cluster.v3.Cluster`.
    Cluster,
    /// EDS: `envoy.config.endpoint.v3.ClusterLoadAssignment`.
    ClusterLoadAssignment,
}

impl ResourceType {
    /// Every resource type, in LDS, RDS, CDS, EDS order.
    pub const ALL: [ResourceType; 4] = [Self::Listener, Self::RouteConfiguration, Self::Cluster, Self::ClusterLoadAssignment];

    /// The type URL of the resource in an `Any` and in discovery requests.
    pub fn type_url(self) -> &'static str {
        match self {
            Self::Listener => "type.googleapis.com/envoy.config.listener.v3.Listener",
            Self::RouteConfiguration => "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            Self::Cluster => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            Self::ClusterLoadAssignment => "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
        }
    }

    /// The resource type whose type URL is `url`, if any.
    pub fn from_type_url(url: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.type_url() == url)
    }

    /// The discovery service's short name: `LDS`, `RDS`, `CDS` or `EDS`.
    pub fn short_name(self) -> &'static str {
        match self {
            Self::Listener => "LDS",
            Self::RouteConfiguration => "RDS",
            Self::Cluster => "CDS",
            Self::ClusterLoadAssignment => "EDS",
        }
    }

    /// LDS and CDS: a SotW response lists all resources, so a missing one is deleted (A53/Envoy).
    pub fn all_resources_required_in_sotw(self) -> bool {
        matches!(self, Self::Listener | Self::Cluster)
    }
}

/// A decoded, validated resource.
// Unboxed by design: resources are decoded once and moved into the cache.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Resource {
    /// A client-side (API) listener.
    Listener(ListenerResource),
    /// A server-side listener (A36): an address and filter chains, for an xDS-enabled server.
    ServerListener(mesh_core::inbound::InboundListener),
    /// A route table.
    RouteConfiguration(mesh_core::RouteConfig),
    /// A cluster.
    Cluster(ClusterResource),
    /// The endpoints of a cluster.
    ClusterLoadAssignment(EndpointsResource),
}

impl Resource {
    /// The resource's name (for EDS, its cluster name).
    pub fn name(&self) -> &str {
        match self {
            Self::Listener(l) => &l.name,
            Self::ServerListener(l) => &l.name,
            Self::RouteConfiguration(r) => &r.name,
            Self::Cluster(c) => c.cluster.name.as_str(),
            Self::ClusterLoadAssignment(e) => &e.cluster_name,
        }
    }

    /// The resource's type.
    pub fn resource_type(&self) -> ResourceType {
        match self {
            Self::Listener(_) | Self::ServerListener(_) => ResourceType::Listener,
            Self::RouteConfiguration(_) => ResourceType::RouteConfiguration,
            Self::Cluster(_) => ResourceType::Cluster,
            Self::ClusterLoadAssignment(_) => ResourceType::ClusterLoadAssignment,
        }
    }
}

/// Why a resource was rejected; `name` is None when even the name could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {reason}", name.as_deref().unwrap_or("<unnamed resource>"))]
pub struct DecodeError {
    /// The resource's name, when it could be read.
    pub name: Option<String>,
    /// What is wrong, naming the offending field.
    pub reason: String,
}

/// Type URL of the `envoy.service.discovery.v3.Resource` wrapper.
const WRAPPER_TYPE_URL: &str = "type.googleapis.com/envoy.service.discovery.v3.Resource";

/// The fields of `envoy.service.discovery.v3.Resource` the client reads.
#[derive(Clone, PartialEq, Message)]
struct Wrapper {
    #[prost(message, optional, tag = "2")]
    resource: Option<Any>,
    #[prost(string, tag = "3")]
    name: String,
}

/// The name of any of the four resources: all carry it in field 1.
#[derive(Clone, PartialEq, Message)]
struct NameOnly {
    #[prost(string, tag = "1")]
    name: String,
}

/// The type URL field of `xds.type.v3.TypedStruct` / `udpa.type.v1.TypedStruct`.
#[derive(Clone, PartialEq, Message)]
struct TypedStruct {
    #[prost(string, tag = "1")]
    type_url: String,
}

/// A resource's bytes, taken out of a discovery `Resource` wrapper when it came in one.
struct Unwrapped<'a> {
    value: Cow<'a, [u8]>,
    wrapper_name: Option<String>,
}

/// Unwraps a discovery `Resource` wrapper and checks the type URL; returns
/// the resource's bytes and the wrapper's name, if any.
fn unwrap<'a>(ty: ResourceType, type_url: &str, value: &'a [u8]) -> Result<Unwrapped<'a>, DecodeError> {
    let (inner_type_url, value, wrapper_name) = if type_url == WRAPPER_TYPE_URL {
        let w = Wrapper::decode(value).map_err(|e| DecodeError { name: None, reason: format!("malformed Resource wrapper: {e}") })?;
        let name = Some(w.name).filter(|n| !n.is_empty());
        match w.resource {
            Some(inner) => (Cow::Owned(inner.type_url), Cow::Owned(inner.value), name),
            None => return Err(DecodeError { name, reason: "Resource wrapper: resource is missing".into() }),
        }
    } else {
        (Cow::Borrowed(type_url), Cow::Borrowed(value), None)
    };
    if inner_type_url != ty.type_url() {
        let reason = format!("type_url {inner_type_url:?} is not {} ({})", ty.type_url(), ty.short_name());
        return Err(DecodeError { name: wrapper_name, reason });
    }
    Ok(Unwrapped { value, wrapper_name })
}

/// Phase 1: the resource's name (unwraps an `envoy.service.discovery.v3.Resource` wrapper whose type_url is "type.googleapis.com/envoy.service.discovery.v3.Resource"; checks the inner type_url matches `ty`).
pub fn resource_name(ty: ResourceType, any: &Any) -> Result<String, DecodeError> {
    resource_name_raw(ty, &any.type_url, &any.value)
}

/// [`resource_name`] of a resource given as its type URL and bytes.
pub(crate) fn resource_name_raw(ty: ResourceType, type_url: &str, value: &[u8]) -> Result<String, DecodeError> {
    let unwrapped = unwrap(ty, type_url, value)?;
    read_name(ty, &unwrapped.value, unwrapped.wrapper_name)
}

/// Reads field 1 of an unwrapped resource; on failure the error carries the wrapper's name.
fn read_name(ty: ResourceType, value: &[u8], wrapper_name: Option<String>) -> Result<String, DecodeError> {
    NameOnly::decode(value)
        .map(|n| n.name)
        .map_err(|e| DecodeError { name: wrapper_name, reason: format!("malformed {} resource: {e}", ty.short_name()) })
}

/// Phase 2: decode and validate fully. Errors name the resource.
pub fn decode(ty: ResourceType, any: &Any) -> Result<Resource, DecodeError> {
    decode_raw(ty, &any.type_url, &any.value)
}

/// [`decode`] of a resource given as its type URL and bytes.
pub(crate) fn decode_raw(ty: ResourceType, type_url: &str, value: &[u8]) -> Result<Resource, DecodeError> {
    let unwrapped = unwrap(ty, type_url, value)?;
    let bytes: &[u8] = &unwrapped.value;
    let name = read_name(ty, bytes, unwrapped.wrapper_name)?;
    let decoded = match ty {
        ResourceType::Listener => listener::decode(bytes),
        ResourceType::RouteConfiguration => route::decode(bytes).map(Resource::RouteConfiguration),
        ResourceType::Cluster => cluster::decode(bytes).map(Resource::Cluster),
        ResourceType::ClusterLoadAssignment => endpoint::decode(bytes).map(Resource::ClusterLoadAssignment),
    };
    decoded.map_err(|reason| DecodeError { name: Some(name), reason })
}

/// The message name of a type URL (the part after the last `/`).
fn type_name(type_url: &str) -> &str {
    type_url.rsplit_once('/').map_or(type_url, |(_, name)| name)
}

/// The message name of an extension config, looking inside a `TypedStruct`.
fn extension_type(any: &Any) -> Cow<'_, str> {
    match type_name(&any.type_url) {
        "xds.type.v3.TypedStruct" | "udpa.type.v1.TypedStruct" => match TypedStruct::decode(any.value.as_slice()) {
            Ok(ts) => Cow::Owned(type_name(&ts.type_url).to_owned()),
            Err(_) => Cow::Borrowed(""),
        },
        name => Cow::Borrowed(name),
    }
}

/// Converts a protobuf duration; negative or out-of-range values are errors naming `field`.
fn duration(d: &ProtoDuration, field: &str) -> Result<Duration, String> {
    match (u64::try_from(d.seconds), u32::try_from(d.nanos)) {
        (Ok(secs), Ok(nanos)) if nanos < 1_000_000_000 => Ok(Duration::new(secs, nanos)),
        _ => Err(format!("{field}: invalid duration ({}s, {}ns)", d.seconds, d.nanos)),
    }
}

/// Test helper: wraps a message into an `Any` with its canonical type URL.
#[cfg(test)]
fn to_any<M: Message + prost::Name>(m: &M) -> Any {
    Any { type_url: M::type_url(), value: m.encode_to_vec() }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
    use envoy_types::pb::envoy::service::discovery::v3::Resource as Wrapped;

    use super::*;

    #[test]
    fn type_urls_round_trip() {
        for ty in ResourceType::ALL {
            assert_eq!(ResourceType::from_type_url(ty.type_url()), Some(ty));
        }
        assert_eq!(ResourceType::from_type_url("type.googleapis.com/envoy.config.cluster.v3.Foo"), None);
        let short: Vec<_> = ResourceType::ALL.iter().map(|t| t.short_name()).collect();
        assert_eq!(short, ["LDS", "RDS", "CDS", "EDS"]);
        assert!(
            ResourceType::Cluster.all_resources_required_in_sotw() && !ResourceType::RouteConfiguration.all_resources_required_in_sotw()
        );
        assert_eq!(to_any(&Cluster::default()).type_url, ResourceType::Cluster.type_url());
    }

    #[test]
    fn resource_name_reads_plain_and_wrapped_resources() {
        let rc = to_any(&RouteConfiguration { name: "routes".into(), ..Default::default() });
        assert_eq!(resource_name(ResourceType::RouteConfiguration, &rc).unwrap(), "routes");
        let wrapped = Any {
            type_url: WRAPPER_TYPE_URL.into(),
            value: Wrapped { name: "routes".into(), resource: Some(rc.clone()), ..Default::default() }.encode_to_vec(),
        };
        assert_eq!(resource_name(ResourceType::RouteConfiguration, &wrapped).unwrap(), "routes");
        let decoded = decode(ResourceType::RouteConfiguration, &wrapped).unwrap();
        assert_eq!((decoded.name(), decoded.resource_type()), ("routes", ResourceType::RouteConfiguration));

        let err = resource_name(ResourceType::Cluster, &wrapped).unwrap_err();
        assert_eq!(err.name.as_deref(), Some("routes"));
        assert!(err.reason.contains("type_url"), "{err}");
        let broken = Any { type_url: rc.type_url.clone(), value: vec![0x0a, 0x05] };
        let wrapped_broken = Wrapped { name: "outer".into(), resource: Some(broken), ..Default::default() };
        let wrapped_broken = Any { type_url: WRAPPER_TYPE_URL.into(), value: wrapped_broken.encode_to_vec() };
        assert_eq!(decode(ResourceType::RouteConfiguration, &wrapped_broken).unwrap_err().name.as_deref(), Some("outer"));
        let empty = Any { type_url: WRAPPER_TYPE_URL.into(), value: Wrapped::default().encode_to_vec() };
        assert!(resource_name(ResourceType::Cluster, &empty).unwrap_err().reason.contains("resource is missing"));
    }

    #[test]
    fn garbage_has_no_name() {
        let any = Any { type_url: ResourceType::Listener.type_url().into(), value: vec![0x0a, 0xff] };
        let err = decode(ResourceType::Listener, &any).unwrap_err();
        assert_eq!(err.name, None);
        assert!(err.to_string().starts_with("<unnamed resource>: malformed LDS"), "{err}");
    }

    #[test]
    fn body_errors_keep_the_name() {
        // A virtual host whose name is not UTF-8: the resource's name still reads.
        let mut value = RouteConfiguration { name: "r".into(), ..Default::default() }.encode_to_vec();
        value.extend([0x12, 0x03, 0x0a, 0x01, 0xff]);
        let any = Any { type_url: ResourceType::RouteConfiguration.type_url().into(), value };
        let err = decode(ResourceType::RouteConfiguration, &any).unwrap_err();
        assert_eq!(err.name.as_deref(), Some("r"), "{err}");
    }

    #[test]
    fn durations() {
        assert_eq!(duration(&ProtoDuration { seconds: 1, nanos: 5 }, "t"), Ok(Duration::new(1, 5)));
        assert!(duration(&ProtoDuration { seconds: -1, nanos: 0 }, "t").unwrap_err().starts_with("t: "));
        assert!(duration(&ProtoDuration { seconds: 0, nanos: 1_000_000_000 }, "t").is_err());
    }
}
