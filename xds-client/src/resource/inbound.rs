//! LDS for servers: a Listener with an address and filter chains (gRFC A36), each chain's TLS from a
//! `DownstreamTlsContext` (A29) and its HTTP connection manager (A39, A41).
//!
//! Validation follows A36: no listener filters, no `use_original_dst`; every chain (the default one too) holds
//! exactly one network filter, the HttpConnectionManager, validated as a client's is; no two chains may share
//! matching rules once normalized (CIDRs masked and capped, lists expanded); chains whose rules can never
//! match on a gRPC server (`destination_port`, `server_names`, `application_protocols`, a `transport_protocol`
//! other than `raw_buffer`) count for that check, and are then dropped.

use std::net::{IpAddr, SocketAddr};

use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
use envoy_types::pb::envoy::config::core::v3::socket_address::{PortSpecifier, Protocol};
use envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType as SocketConfig;
use envoy_types::pb::envoy::config::core::v3::{Address, CidrRange, TransportSocket};
use envoy_types::pb::envoy::config::listener::v3::filter::ConfigType as FilterConfig;
use envoy_types::pb::envoy::config::listener::v3::filter_chain_match::ConnectionSourceType;
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain as ProtoChain, FilterChainMatch as ProtoMatch, Listener};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::common_tls_context::ValidationContextType;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::downstream_tls_context::OcspStaplePolicy;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{CertificateValidationContext, DownstreamTlsContext};
use envoy_types::pb::google::protobuf::Any;
use mesh_core::authz::Cidr;
use mesh_core::inbound::{FilterChain, FilterChainMatch, InboundListener, InboundTls, SourceType};
use prost::Message;

use super::listener::{HCM, connection_manager};
use super::{extension_type, type_name};

/// Message name of the TLS transport socket a server chain may hold.
const DOWNSTREAM_TLS: &str = "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
/// Message name of the plaintext transport socket.
const RAW_BUFFER: &str = "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer";

/// Decodes a server listener (a Listener without `api_listener`).
pub(super) fn decode(listener: Listener) -> Result<InboundListener, String> {
    if listener.use_original_dst.is_some_and(|b| b.value) {
        return Err("use_original_dst: true is not supported (A36)".into());
    }
    if !listener.listener_filters.is_empty() {
        return Err("listener_filters: not supported (A36: it must be empty)".into());
    }
    if listener.filter_chain_matcher.is_some() {
        return Err("filter_chain_matcher: the matcher API is not supported (use filter_chain_match)".into());
    }
    let address = address(listener.address.as_ref()).map_err(|e| format!("address: {e}"))?;
    let mut seen: Vec<Rules> = Vec::with_capacity(listener.filter_chains.len());
    let mut filter_chains = Vec::with_capacity(listener.filter_chains.len());
    for (i, proto) in listener.filter_chains.iter().enumerate() {
        let field = format!("filter_chains[{i}]");
        let rules = Rules::new(proto.filter_chain_match.as_ref()).map_err(|e| format!("{field}.filter_chain_match.{e}"))?;
        if let Some(j) = seen.iter().position(|other| other.overlaps(&rules)) {
            return Err(format!(
                "{field}: multiple filter chains with the same matching rules (filter_chains[{j}] and filter_chains[{i}])"
            ));
        }
        let chain = filter_chain(&field, proto, rules.matcher())?;
        if rules.can_match() {
            filter_chains.push(chain);
        } else {
            tracing::debug!(listener = %listener.name, chain = %field, "dropping a filter chain that never matches on a gRPC server (A36)");
        }
        seen.push(rules);
    }
    let default_filter_chain = match &listener.default_filter_chain {
        Some(proto) => Some(filter_chain("default_filter_chain", proto, FilterChainMatch::default())?),
        None => None,
    };
    Ok(InboundListener { name: listener.name, address, filter_chains, default_filter_chain })
}

/// The listener's TCP address: an IP literal and a port.
fn address(address: Option<&Address>) -> Result<SocketAddr, String> {
    let Some(AddressKind::SocketAddress(sa)) = address.and_then(|a| a.address.as_ref()) else {
        return Err("not a socket_address".into());
    };
    if sa.protocol != Protocol::Tcp as i32 {
        return Err("socket_address.protocol: only TCP is supported".into());
    }
    let ip: IpAddr = sa.address.parse().map_err(|_| format!("socket_address.address: {:?} is not an IP address", sa.address))?;
    match sa.port_specifier {
        Some(PortSpecifier::PortValue(port @ 1..=65535)) => Ok(SocketAddr::new(ip, port as u16)),
        Some(PortSpecifier::NamedPort(_)) => Err("socket_address.named_port: not supported (use port_value)".into()),
        Some(PortSpecifier::PortValue(port)) => Err(format!("socket_address.port_value: {port} is not a port")),
        None => Err("socket_address.port_value: missing".into()),
    }
}

/// A chain's matching rules, normalized (A36): what the duplicate check compares, and the matcher they give.
/// An empty list stands for "any"; two rule sets overlap when some connection fits both equally.
struct Rules {
    destination_port: Option<u32>,
    destination_prefixes: Vec<Cidr>,
    server_names: Vec<String>,
    transport_protocol: String,
    application_protocols: Vec<String>,
    source_type: SourceType,
    source_prefixes: Vec<Cidr>,
    source_ports: Vec<u16>,
}

impl Rules {
    fn new(m: Option<&ProtoMatch>) -> Result<Self, String> {
        let Some(m) = m else {
            return Ok(Self::any());
        };
        if !m.direct_source_prefix_ranges.is_empty() {
            return Err("direct_source_prefix_ranges: not supported".into());
        }
        if !m.address_suffix.is_empty() || m.suffix_len.is_some() {
            return Err("address_suffix: not supported".into());
        }
        let source_type = match ConnectionSourceType::try_from(m.source_type) {
            Ok(ConnectionSourceType::Any) => SourceType::Any,
            Ok(ConnectionSourceType::SameIpOrLoopback) => SourceType::SameIpOrLoopback,
            Ok(ConnectionSourceType::External) => SourceType::External,
            Err(_) => return Err(format!("source_type: unknown value {}", m.source_type)),
        };
        let source_ports = m
            .source_ports
            .iter()
            .enumerate()
            .map(|(k, &p)| u16::try_from(p).map_err(|_| format!("source_ports[{k}]: {p} is not a port")))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            destination_port: m.destination_port.map(|p| p.value),
            destination_prefixes: cidrs(&m.prefix_ranges, "prefix_ranges")?,
            server_names: m.server_names.clone(),
            transport_protocol: m.transport_protocol.clone(),
            application_protocols: m.application_protocols.clone(),
            source_type,
            source_prefixes: cidrs(&m.source_prefix_ranges, "source_prefix_ranges")?,
            source_ports,
        })
    }

    fn any() -> Self {
        Self {
            destination_port: None,
            destination_prefixes: Vec::new(),
            server_names: Vec::new(),
            transport_protocol: String::new(),
            application_protocols: Vec::new(),
            source_type: SourceType::Any,
            source_prefixes: Vec::new(),
            source_ports: Vec::new(),
        }
    }

    /// Whether one normalized matcher of `self` (one element of each list, A36's Cartesian product) is also
    /// one of `other`'s: then the most specific chain for some connection is not unique.
    fn overlaps(&self, other: &Self) -> bool {
        fn share<T: PartialEq>(a: &[T], b: &[T]) -> bool {
            (a.is_empty() && b.is_empty()) || a.iter().any(|x| b.contains(x))
        }
        self.destination_port == other.destination_port
            && self.transport_protocol == other.transport_protocol
            && self.source_type == other.source_type
            && share(&self.destination_prefixes, &other.destination_prefixes)
            && share(&self.server_names, &other.server_names)
            && share(&self.application_protocols, &other.application_protocols)
            && share(&self.source_prefixes, &other.source_prefixes)
            && share(&self.source_ports, &other.source_ports)
    }

    /// A36: a gRPC server has no original destination and runs no listener filters, so these rules never match.
    fn can_match(&self) -> bool {
        self.destination_port.is_none()
            && self.server_names.is_empty()
            && self.application_protocols.is_empty()
            && matches!(self.transport_protocol.as_str(), "" | "raw_buffer")
    }

    fn matcher(&self) -> FilterChainMatch {
        FilterChainMatch {
            destination_prefixes: self.destination_prefixes.clone(),
            raw_buffer: self.transport_protocol == "raw_buffer",
            source_type: self.source_type,
            source_prefixes: self.source_prefixes.clone(),
            source_ports: self.source_ports.clone(),
        }
    }
}

/// CIDR ranges normalized as A36 says: an absent `prefix_len` is 0, a longer one is capped at the family's
/// bits, bits past the prefix are ignored.
fn cidrs(ranges: &[CidrRange], field: &str) -> Result<Vec<Cidr>, String> {
    let mut out = Vec::with_capacity(ranges.len());
    for (k, r) in ranges.iter().enumerate() {
        let addr: IpAddr =
            r.address_prefix.parse().map_err(|_| format!("{field}[{k}].address_prefix: {:?} is not an IP address", r.address_prefix))?;
        let len = r.prefix_len.map_or(0, |l| l.value);
        let cidr = Cidr { addr, prefix_len: u8::try_from(len).unwrap_or(u8::MAX) }.normalized();
        if !out.contains(&cidr) {
            out.push(cidr);
        }
    }
    Ok(out)
}

/// One filter chain: exactly one network filter, the HttpConnectionManager (A36), and its transport socket.
// `use_proxy_proto` is deprecated, but a chain that sets it expects the PROXY protocol's source address.
#[allow(deprecated)]
fn filter_chain(field: &str, proto: &ProtoChain, matcher: FilterChainMatch) -> Result<FilterChain, String> {
    if proto.use_proxy_proto.is_some_and(|b| b.value) {
        return Err(format!("{field}.use_proxy_proto: not supported"));
    }
    let Some(last) = proto.filters.len().checked_sub(1) else {
        return Err(format!("{field}.filters: empty (a chain holds one HttpConnectionManager)"));
    };
    if last > 0 {
        // The first filter says what is wrong: an unsupported type, or an HttpConnectionManager not alone.
        let f = &proto.filters[0];
        network_filter(field, 0, f)?;
        return Err(format!("{field}.filters[0] ({}): the HttpConnectionManager must be the last and only filter", f.name));
    }
    let (k, name) = (last, proto.filters[last].name.as_str());
    let hcm = HttpConnectionManager::decode(network_filter(field, k, &proto.filters[last])?.value.as_slice())
        .map_err(|e| format!("{field}.filters[{k}] ({name}): malformed HttpConnectionManager: {e}"))?;
    let http = connection_manager(hcm).map_err(|e| format!("{field}.filters[{k}] ({name}): {e}"))?;
    let tls = match &proto.transport_socket {
        Some(ts) => downstream_tls(ts).map_err(|e| format!("{field}.transport_socket: {e}"))?,
        None => None,
    };
    Ok(FilterChain { name: proto.name.clone(), matcher, tls, http })
}

/// A network filter's config, which must be an HttpConnectionManager (A36: the only network filter).
fn network_filter<'a>(field: &str, k: usize, f: &'a Filter) -> Result<&'a Any, String> {
    let any = match &f.config_type {
        Some(FilterConfig::TypedConfig(any)) => any,
        Some(FilterConfig::ConfigDiscovery(_)) => {
            return Err(format!("{field}.filters[{k}] ({}): config_discovery is not supported", f.name));
        }
        None => return Err(format!("{field}.filters[{k}] ({}): no typed_config", f.name)),
    };
    match type_name(&any.type_url) {
        HCM => Ok(any),
        ty => {
            Err(format!("{field}.filters[{k}] ({}): unsupported network filter type {ty:?} (A36: only the HttpConnectionManager)", f.name))
        }
    }
}

/// A chain's TLS (A29): a `DownstreamTlsContext` whose certificates come from provider instances; a raw
/// buffer socket is plaintext.
// The `*_certificate_provider_instance` fields of CommonTlsContext are deprecated but still sent.
#[allow(deprecated)]
fn downstream_tls(ts: &TransportSocket) -> Result<Option<InboundTls>, String> {
    let Some(SocketConfig::TypedConfig(any)) = &ts.config_type else {
        return match ts.name.as_str() {
            "envoy.transport_sockets.raw_buffer" => Ok(None),
            name => Err(format!("{name:?} has no typed_config")),
        };
    };
    let ty = extension_type(any);
    if ty == RAW_BUFFER {
        return Ok(None);
    }
    if ty != DOWNSTREAM_TLS {
        return Err(format!("unsupported transport socket type {ty:?} (a server takes {DOWNSTREAM_TLS})"));
    }
    let ctx = DownstreamTlsContext::decode(any.value.as_slice()).map_err(|e| format!("malformed DownstreamTlsContext: {e}"))?;
    if ctx.require_sni.is_some_and(|b| b.value) {
        return Err("require_sni: true is not supported (A29)".into());
    }
    if ctx.ocsp_staple_policy != OcspStaplePolicy::LenientStapling as i32 {
        let policy = OcspStaplePolicy::try_from(ctx.ocsp_staple_policy)
            .map_or_else(|_| ctx.ocsp_staple_policy.to_string(), |p| p.as_str_name().into());
        return Err(format!("ocsp_staple_policy: {policy} is not supported (A29: only LENIENT_STAPLING)"));
    }
    let Some(common) = ctx.common_tls_context.as_ref() else {
        return Err("common_tls_context: missing (A29: a server needs tls_certificate_provider_instance)".into());
    };
    if !common.tls_certificates.is_empty() || !common.tls_certificate_sds_secret_configs.is_empty() {
        return Err("common_tls_context: tls_certificates and tls_certificate_sds_secret_configs are not supported (A29: use tls_certificate_provider_instance)".into());
    }
    // The current field, or the older one (whose empty instance name means "default").
    let certificate_provider = match (&common.tls_certificate_provider_instance, &common.tls_certificate_certificate_provider_instance) {
        (Some(p), _) if !p.instance_name.is_empty() => p.instance_name.clone(),
        (None, Some(p)) => Some(p.instance_name.clone()).filter(|n| !n.is_empty()).unwrap_or_else(|| "default".into()),
        _ => return Err(
            "common_tls_context.tls_certificate_provider_instance: missing (A29: a server's certificate comes from a provider instance)"
                .into(),
        ),
    };
    let ca_certificate_provider = match &common.validation_context_type {
        None => None,
        Some(ValidationContextType::ValidationContext(v)) => validation_context(v, "validation_context")?,
        Some(ValidationContextType::CombinedValidationContext(c)) => {
            let default = match &c.default_validation_context {
                Some(v) => validation_context(v, "combined_validation_context.default_validation_context")?,
                None => None,
            };
            let older = c.validation_context_certificate_provider_instance.as_ref().map(|p| provider_name(&p.instance_name));
            default.or(older)
        }
        Some(ValidationContextType::ValidationContextCertificateProviderInstance(p)) => Some(provider_name(&p.instance_name)),
        Some(ValidationContextType::ValidationContextSdsSecretConfig(_)) => {
            return Err(
                "common_tls_context.validation_context_sds_secret_config: not supported (A29: use ca_certificate_provider_instance)".into(),
            );
        }
        Some(ValidationContextType::ValidationContextCertificateProvider(_)) => {
            return Err(
                "common_tls_context.validation_context_certificate_provider: not supported (A29: use ca_certificate_provider_instance)"
                    .into(),
            );
        }
    };
    let require_client_certificate = ctx.require_client_certificate.is_some_and(|b| b.value);
    if require_client_certificate && ca_certificate_provider.is_none() {
        return Err(
            "require_client_certificate: true needs a ca_certificate_provider_instance to check client certificates against (A29)".into()
        );
    }
    Ok(Some(InboundTls { certificate_provider, ca_certificate_provider, require_client_certificate }))
}

/// The roots provider of a server's validation context; subject alt name matchers are a client's (A29).
// `match_subject_alt_names` is deprecated but still sent by control planes.
#[allow(deprecated)]
fn validation_context(v: &CertificateValidationContext, field: &str) -> Result<Option<String>, String> {
    if !v.match_subject_alt_names.is_empty() || !v.match_typed_subject_alt_names.is_empty() {
        return Err(format!("common_tls_context.{field}: subject alt name matchers are not supported on a server (A29)"));
    }
    if v.trusted_ca.is_some() {
        return Err(format!("common_tls_context.{field}.trusted_ca: not supported (A29: use ca_certificate_provider_instance)"));
    }
    match &v.ca_certificate_provider_instance {
        Some(p) if p.instance_name.is_empty() => {
            Err(format!("common_tls_context.{field}.ca_certificate_provider_instance.instance_name: empty"))
        }
        Some(p) => Ok(Some(p.instance_name.clone())),
        None => Ok(None),
    }
}

/// An instance name of the older `CertificateProviderInstance`, where empty means "default".
fn provider_name(name: &str) -> String {
    if name.is_empty() { "default".into() } else { name.into() }
}
