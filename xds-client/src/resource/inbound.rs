//! LDS for servers: a Listener with an address and filter chains (gRFC A36), each chain's TLS from a
//! `DownstreamTlsContext` (A29) and its HTTP connection manager (A39, A41).
//!
//! Validation follows A36: no listener filters, no `use_original_dst`; every chain (the default one too) holds
//! exactly one network filter, the HttpConnectionManager, validated as a client's is; no two chains may share
//! matching rules once normalized (CIDRs masked and capped, lists expanded); chains whose rules can never
//! match on a gRPC server (`destination_port`, `server_names`, `application_protocols`, a `transport_protocol`
//! other than `raw_buffer` or `tls`) count for that check, and are then dropped. A `tls` chain is kept: our
//! server tells TLS connections apart by their first byte ([`mesh_core::inbound::TransportProtocol`]).

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
use mesh_core::inbound::{FilterChain, FilterChainMatch, InboundListener, InboundTls, SourceType, TransportProtocol};
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

    /// A36: a gRPC server has no original destination and runs no listener filters, so these rules never match
    /// (`tls` does on ours, which looks at a connection's first byte).
    fn can_match(&self) -> bool {
        self.destination_port.is_none()
            && self.server_names.is_empty()
            && self.application_protocols.is_empty()
            && matches!(self.transport_protocol.as_str(), "" | "raw_buffer" | "tls")
    }

    fn matcher(&self) -> FilterChainMatch {
        FilterChainMatch {
            destination_prefixes: self.destination_prefixes.clone(),
            transport_protocol: match self.transport_protocol.as_str() {
                "raw_buffer" => TransportProtocol::RawBuffer,
                "tls" => TransportProtocol::Tls,
                _ => TransportProtocol::Any,
            },
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

#[cfg(test)]
#[allow(deprecated)]
mod tests {
    use envoy_types::pb::envoy::config::core::v3::SocketAddress;
    use envoy_types::pb::envoy::config::listener::v3::ListenerFilter;
    use envoy_types::pb::envoy::config::rbac::v3::{Permission, Policy, Principal, Rbac as RbacRules, permission, principal, rbac};
    use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, VirtualHost};
    use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac;
    use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter::ConfigType as HttpConfig;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{HttpFilter, Rds};
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::common_tls_context::{
        CertificateProviderInstance, CombinedCertificateValidationContext,
    };
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
        CertificateProviderPluginInstance, CommonTlsContext, SdsSecretConfig, UpstreamTlsContext,
    };
    use envoy_types::pb::google::protobuf::{BoolValue, UInt32Value};
    use mesh_core::RouteSource;
    use mesh_core::authz::Action;

    use super::super::{DecodeError, Resource, ResourceType, to_any};
    use super::*;
    use crate::XdsResource;
    use crate::resource::ListenerResource;

    const NAME: &str = "grpc/server?xds.resource.listening_address=0.0.0.0:50051";

    fn http_filter(name: &str, any: Any) -> HttpFilter {
        HttpFilter { name: name.into(), config_type: Some(HttpConfig::TypedConfig(any)), ..Default::default() }
    }

    fn router() -> HttpFilter {
        http_filter("router", to_any(&Router::default()))
    }

    fn rbac_filter(name: &str, action: rbac::Action) -> HttpFilter {
        let policy = Policy {
            permissions: vec![Permission { rule: Some(permission::Rule::Any(true)) }],
            principals: vec![Principal { identifier: Some(principal::Identifier::Any(true)) }],
            ..Default::default()
        };
        let rules = RbacRules { action: action as i32, policies: [("all".to_owned(), policy)].into(), ..Default::default() };
        http_filter(name, to_any(&Rbac { rules: Some(rules), ..Default::default() }))
    }

    fn hcm(http_filters: Vec<HttpFilter>) -> HttpConnectionManager {
        let rds = Rds { route_config_name: "routes".into(), config_source: None };
        HttpConnectionManager { route_specifier: Some(RouteSpecifier::Rds(rds)), http_filters, ..Default::default() }
    }

    fn network(any: Any) -> Filter {
        Filter { name: "hcm".into(), config_type: Some(FilterConfig::TypedConfig(any)) }
    }

    fn chain(name: &str, m: Option<ProtoMatch>) -> ProtoChain {
        ProtoChain { name: name.into(), filter_chain_match: m, filters: vec![network(to_any(&hcm(vec![router()])))], ..Default::default() }
    }

    fn cidr(prefix: &str, len: Option<u32>) -> CidrRange {
        CidrRange { address_prefix: prefix.into(), prefix_len: len.map(|value| UInt32Value { value }) }
    }

    fn instance(name: &str) -> Option<CertificateProviderPluginInstance> {
        Some(CertificateProviderPluginInstance { instance_name: name.into(), certificate_name: String::new() })
    }

    fn mtls_context() -> DownstreamTlsContext {
        DownstreamTlsContext {
            common_tls_context: Some(CommonTlsContext {
                tls_certificate_provider_instance: instance("identity"),
                validation_context_type: Some(ValidationContextType::ValidationContext(CertificateValidationContext {
                    ca_certificate_provider_instance: instance("roots"),
                    ..Default::default()
                })),
                ..Default::default()
            }),
            require_client_certificate: Some(BoolValue { value: true }),
            ..Default::default()
        }
    }

    fn socket(any: Any) -> Option<TransportSocket> {
        Some(TransportSocket { name: "envoy.transport_sockets.tls".into(), config_type: Some(SocketConfig::TypedConfig(any)) })
    }

    fn with_tls(mut c: ProtoChain, ctx: DownstreamTlsContext) -> ProtoChain {
        c.transport_socket = socket(to_any(&ctx));
        c
    }

    fn server(chains: Vec<ProtoChain>, default: Option<ProtoChain>) -> Listener {
        let address =
            SocketAddress { address: "0.0.0.0".into(), port_specifier: Some(PortSpecifier::PortValue(50051)), ..Default::default() };
        Listener {
            name: NAME.into(),
            address: Some(Address { address: Some(AddressKind::SocketAddress(address)) }),
            filter_chains: chains,
            default_filter_chain: default,
            ..Default::default()
        }
    }

    fn decode_server(l: &Listener) -> Result<InboundListener, DecodeError> {
        match super::super::decode(ResourceType::Listener, &to_any(l))? {
            Resource::ServerListener(l) => Ok(l),
            other => panic!("unexpected {other:?}"),
        }
    }

    fn reason(l: &Listener) -> String {
        let err = decode_server(l).unwrap_err();
        assert_eq!(err.name.as_deref(), Some(NAME), "{err}");
        err.reason
    }

    fn assert_nack(l: &Listener, expected: &str) {
        let why = reason(l);
        assert!(why.contains(expected), "expected {expected:?} in {why:?}");
    }

    fn match_source(prefixes: Vec<CidrRange>) -> Option<ProtoMatch> {
        Some(ProtoMatch { source_prefix_ranges: prefixes, ..Default::default() })
    }

    #[test]
    fn a_plaintext_chain_a_tls_chain_and_a_default_chain() {
        let pods = chain("pods", match_source(vec![cidr("10.0.0.0", Some(8))]));
        let everyone = with_tls(
            chain("mtls", Some(ProtoMatch { prefix_ranges: vec![cidr("0.0.0.0", Some(0))], ..Default::default() })),
            mtls_context(),
        );
        let sni = chain("sni", Some(ProtoMatch { server_names: vec!["greeter.mesh".into()], ..Default::default() }));
        let mut default = chain("default", None);
        let inline = RouteConfiguration {
            name: "inline".into(),
            virtual_hosts: vec![VirtualHost { name: "vh".into(), domains: vec!["*".into()], ..Default::default() }],
            ..Default::default()
        };
        let default_hcm = HttpConnectionManager {
            route_specifier: Some(RouteSpecifier::RouteConfig(inline)),
            http_filters: vec![rbac_filter("deny", rbac::Action::Deny), rbac_filter("allow", rbac::Action::Allow), router()],
            ..Default::default()
        };
        default.filters = vec![network(to_any(&default_hcm))];
        let l = decode_server(&server(vec![pods, everyone, sni], Some(default))).unwrap();

        assert_eq!((l.name.as_str(), l.address), (NAME, "0.0.0.0:50051".parse().unwrap()));
        let names: Vec<_> = l.filter_chains.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["pods", "mtls"], "a chain on server_names never matches on a gRPC server");
        let (pods, mtls) = (&l.filter_chains[0], &l.filter_chains[1]);
        assert!(pods.tls.is_none());
        assert_eq!(pods.matcher.source_prefixes, ["10.0.0.0/8".parse().unwrap()]);
        assert!(matches!(&pods.http.route, RouteSource::Rds(n) if n == "routes"));
        assert_eq!(pods.http.http_filters, ["router"]);
        let tls = InboundTls {
            certificate_provider: "identity".into(),
            ca_certificate_provider: Some("roots".into()),
            require_client_certificate: true,
        };
        assert_eq!(mtls.tls.as_ref(), Some(&tls));
        let default = l.default_filter_chain.as_ref().unwrap();
        assert!(matches!(&default.http.route, RouteSource::Inline(rc) if rc.name == "inline"));
        assert_eq!(default.http.http_filters, ["deny", "allow", "router"]);
        let actions: Vec<_> = default.http.rbac.iter().map(|r| r.action).collect();
        assert_eq!(actions, [Action::Deny, Action::Allow], "a server listener's RBAC chain, in order");

        // Round trip through the matcher: the most specific chain, else the default one.
        let pick = |dst: &str, src: &str| l.select(dst.parse().unwrap(), src.parse().unwrap(), false).map(|c| c.name.as_str());
        assert_eq!(pick("10.0.0.1:50051", "10.4.0.7:41000"), Some("mtls"), "the destination prefix decides first");
        let no_dst = decode_server(&server(
            vec![chain("pods", match_source(vec![cidr("10.0.0.0", Some(8))])), with_tls(chain("mtls", None), mtls_context())],
            Some(chain("default", None)),
        ))
        .unwrap();
        let pick = |dst: &str, src: &str| no_dst.select(dst.parse().unwrap(), src.parse().unwrap(), false).map(|c| c.name.as_str());
        assert_eq!(pick("10.0.0.1:50051", "10.4.0.7:41000"), Some("pods"));
        assert_eq!(pick("10.0.0.1:50051", "192.168.0.7:41000"), Some("mtls"));
        let pick = |dst: &str, src: &str| l.select(dst.parse().unwrap(), src.parse().unwrap(), false).map(|c| c.name.as_str());
        assert_eq!(pick("[2001:db8::1]:50051", "[2001:db8::2]:41000"), Some("default"), "no chain holds IPv6 destinations");
    }

    #[test]
    fn a_server_listener_is_not_a_client_listener() {
        let resource = super::super::decode(ResourceType::Listener, &to_any(&server(vec![chain("c", None)], None))).unwrap();
        assert_eq!((resource.name(), resource.resource_type()), (NAME, ResourceType::Listener));
        assert!(ListenerResource::from_resource(&resource).is_none());
        assert!(InboundListener::from_resource(&resource).is_some());
    }

    #[test]
    fn listener_level_nacks() {
        let mut l = server(vec![chain("c", None)], None);
        l.address = None;
        assert_nack(&l, "neither api_listener nor address");
        let mut l = server(vec![chain("c", None)], None);
        l.use_original_dst = Some(BoolValue { value: true });
        assert_nack(&l, "use_original_dst");
        l.use_original_dst = Some(BoolValue { value: false });
        assert!(decode_server(&l).is_ok());
        let mut l = server(vec![chain("c", None)], None);
        l.listener_filters = vec![ListenerFilter { name: "tls_inspector".into(), ..Default::default() }];
        assert_nack(&l, "listener_filters");
        let mut l = server(vec![chain("c", None)], None);
        l.filter_chain_matcher = Some(Default::default());
        assert_nack(&l, "filter_chain_matcher");
        let at = |address: &str, port| {
            let mut l = server(vec![chain("c", None)], None);
            let sa = SocketAddress { address: address.into(), port_specifier: port, ..Default::default() };
            l.address = Some(Address { address: Some(AddressKind::SocketAddress(sa)) });
            l
        };
        assert_nack(&at("greeter.local", Some(PortSpecifier::PortValue(50051))), "address: socket_address.address");
        assert_nack(&at("::", None), "address: socket_address.port_value");
        assert_nack(&at("::", Some(PortSpecifier::PortValue(70000))), "address: socket_address.port_value: 70000");
        assert_eq!(decode_server(&at("::", Some(PortSpecifier::PortValue(443)))).unwrap().address, "[::]:443".parse().unwrap());
    }

    #[test]
    fn network_filters_must_be_one_http_connection_manager() {
        let mut c = chain("c", None);
        c.filters.clear();
        assert_nack(&server(vec![c], None), "filter_chains[0].filters: empty");
        let mut c = chain("c", None);
        c.filters = vec![network(to_any(&Router::default()))];
        assert_nack(&server(vec![c], None), "filter_chains[0].filters[0] (hcm): unsupported network filter type");
        let mut c = chain("c", None);
        c.filters.insert(
            0,
            network(Any { type_url: "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy".into(), value: vec![] }),
        );
        assert_nack(&server(vec![c], None), "filters[0] (hcm): unsupported network filter type");
        let mut c = chain("c", None);
        c.filters.push(c.filters[0].clone());
        assert_nack(&server(vec![c], None), "the HttpConnectionManager must be the last and only filter");
        let mut c = chain("c", None);
        c.filters[0].config_type = None;
        assert_nack(&server(vec![], Some(c)), "default_filter_chain.filters[0] (hcm): no typed_config");
    }

    #[test]
    fn the_http_connection_manager_is_validated_as_on_a_client() {
        let with_filters = |filters| {
            let mut c = chain("c", None);
            c.filters = vec![network(to_any(&hcm(filters)))];
            c
        };
        let unknown = http_filter("authz", Any { type_url: "type.googleapis.com/x.Authz".into(), value: vec![] });
        assert_nack(&server(vec![with_filters(vec![unknown, router()])], None), "filter_chains[0].filters[0] (hcm): http_filters[0]");
        assert_nack(
            &server(vec![with_filters(vec![router(), rbac_filter("late", rbac::Action::Deny)])], None),
            "last filter must be the router",
        );
        assert_nack(&server(vec![], Some(with_filters(vec![]))), "default_filter_chain.filters[0] (hcm): http_filters");
        // A malformed RBAC filter NACKs the server listener as it does a client's.
        let matcher = http_filter("authz", to_any(&Rbac { matcher: Some(Default::default()), ..Default::default() }));
        assert_nack(
            &server(vec![with_filters(vec![matcher, router()])], None),
            "http_filters[0] (authz): matcher: the matcher API is not supported",
        );
        let mut no_route = chain("c", None);
        no_route.filters = vec![network(to_any(&HttpConnectionManager { http_filters: vec![router()], ..Default::default() }))];
        assert_nack(&server(vec![no_route], None), "neither rds nor route_config");
    }

    #[test]
    fn chains_with_the_same_matching_rules_nack() {
        let dup = "multiple filter chains with the same matching rules (filter_chains[0] and filter_chains[1])";
        assert_nack(&server(vec![chain("a", None), chain("b", None)], None), dup);
        assert_nack(&server(vec![chain("a", None), chain("b", Some(ProtoMatch::default()))], None), dup);
        // Normalized: bits past the prefix and an over-long prefix do not make a block different.
        let a = chain("a", match_source(vec![cidr("10.1.2.3", Some(8))]));
        let b = chain("b", match_source(vec![cidr("192.168.0.0", Some(16)), cidr("10.0.0.0", Some(8))]));
        assert_nack(&server(vec![a, b], None), dup);
        let a = chain("a", match_source(vec![cidr("10.1.2.3", Some(40))]));
        let b = chain("b", match_source(vec![cidr("10.1.2.3", Some(32))]));
        assert_nack(&server(vec![a, b], None), dup);
        // An absent prefix_len is 0; /0 is not "no prefix" (it still names a family).
        let a = chain("a", match_source(vec![cidr("10.1.2.3", None)]));
        let b = chain("b", match_source(vec![cidr("0.0.0.0", Some(0))]));
        assert_nack(&server(vec![a, b], None), dup);
        let a = chain("a", match_source(vec![cidr("0.0.0.0", Some(0))]));
        assert!(decode_server(&server(vec![a, chain("b", None)], None)).is_ok());
        // Chains that can never match still count.
        let port = |name| chain(name, Some(ProtoMatch { destination_port: Some(UInt32Value { value: 8080 }), ..Default::default() }));
        assert_nack(&server(vec![port("a"), port("b")], None), dup);
        assert_eq!(decode_server(&server(vec![port("a"), chain("b", None)], None)).unwrap().filter_chains.len(), 1);
        // Any field that differs makes the rules differ.
        let ports = |name, source_ports| chain(name, Some(ProtoMatch { source_ports, ..Default::default() }));
        assert_nack(&server(vec![ports("a", vec![1, 2]), ports("b", vec![2, 3])], None), dup);
        assert!(decode_server(&server(vec![ports("a", vec![1, 2]), ports("b", vec![3])], None)).is_ok());
        let external = Some(ProtoMatch { source_type: ConnectionSourceType::External as i32, ..Default::default() });
        assert!(decode_server(&server(vec![chain("a", external), chain("b", None)], None)).is_ok());
    }

    #[test]
    fn chains_that_never_match_are_dropped_and_raw_buffer_and_tls_are_kept() {
        let m = |m: ProtoMatch| Some(m);
        let chains = vec![
            chain("port", m(ProtoMatch { destination_port: Some(UInt32Value { value: 50051 }), ..Default::default() })),
            chain("sni", m(ProtoMatch { server_names: vec!["a".into()], ..Default::default() })),
            chain("tls", m(ProtoMatch { transport_protocol: "tls".into(), ..Default::default() })),
            chain("alpn", m(ProtoMatch { application_protocols: vec!["h2".into()], ..Default::default() })),
            chain("raw", m(ProtoMatch { transport_protocol: "raw_buffer".into(), ..Default::default() })),
            chain("any", None),
        ];
        let l = decode_server(&server(chains, None)).unwrap();
        let kept: Vec<_> = l.filter_chains.iter().map(|c| (c.name.as_str(), c.matcher.transport_protocol)).collect();
        assert_eq!(kept, [("tls", TransportProtocol::Tls), ("raw", TransportProtocol::RawBuffer), ("any", TransportProtocol::Any)]);
        let (dst, src) = ("10.0.0.1:50051".parse().unwrap(), "10.0.0.2:1".parse().unwrap());
        assert_eq!(l.select(dst, src, false).unwrap().name, "raw");
        assert_eq!(l.select(dst, src, true).unwrap().name, "tls");
    }

    #[test]
    fn malformed_matching_rules_nack() {
        let bad = chain("a", Some(ProtoMatch { prefix_ranges: vec![cidr("10.0.0", Some(8))], ..Default::default() }));
        assert_nack(&server(vec![bad], None), "filter_chains[0].filter_chain_match.prefix_ranges[0].address_prefix");
        let bad = chain("a", Some(ProtoMatch { source_ports: vec![70000], ..Default::default() }));
        assert_nack(&server(vec![bad], None), "filter_chain_match.source_ports[0]: 70000 is not a port");
        let bad = chain("a", Some(ProtoMatch { source_type: 7, ..Default::default() }));
        assert_nack(&server(vec![bad], None), "filter_chain_match.source_type");
        let bad = chain("a", Some(ProtoMatch { direct_source_prefix_ranges: vec![cidr("10.0.0.0", Some(8))], ..Default::default() }));
        assert_nack(&server(vec![bad], None), "filter_chain_match.direct_source_prefix_ranges");
    }

    #[test]
    fn downstream_tls_nacks() {
        let tls = |ctx: DownstreamTlsContext| server(vec![with_tls(chain("c", None), ctx)], None);
        let mut ctx = mtls_context();
        ctx.require_sni = Some(BoolValue { value: true });
        assert_nack(&tls(ctx), "filter_chains[0].transport_socket: require_sni");
        let mut ctx = mtls_context();
        ctx.ocsp_staple_policy = OcspStaplePolicy::StrictStapling as i32;
        assert_nack(&tls(ctx), "ocsp_staple_policy: STRICT_STAPLING");
        let mut ctx = mtls_context();
        ctx.common_tls_context.as_mut().unwrap().tls_certificate_provider_instance = None;
        assert_nack(&tls(ctx), "tls_certificate_provider_instance: missing");
        let mut ctx = mtls_context();
        ctx.common_tls_context = None;
        assert_nack(&tls(ctx), "common_tls_context: missing");
        let mut ctx = mtls_context();
        ctx.common_tls_context.as_mut().unwrap().validation_context_type = None;
        assert_nack(&tls(ctx), "require_client_certificate");
        let mut ctx = mtls_context();
        ctx.common_tls_context.as_mut().unwrap().tls_certificate_sds_secret_configs = vec![SdsSecretConfig::default()];
        assert_nack(&tls(ctx), "tls_certificate_sds_secret_configs");
        let mut ctx = mtls_context();
        let common = ctx.common_tls_context.as_mut().unwrap();
        common.validation_context_type = Some(ValidationContextType::ValidationContextSdsSecretConfig(SdsSecretConfig::default()));
        assert_nack(&tls(ctx), "validation_context_sds_secret_config");
        let mut ctx = mtls_context();
        let Some(ValidationContextType::ValidationContext(v)) = &mut ctx.common_tls_context.as_mut().unwrap().validation_context_type
        else {
            unreachable!()
        };
        v.match_typed_subject_alt_names = vec![Default::default()];
        assert_nack(&tls(ctx), "subject alt name matchers are not supported on a server");
        // A transport socket of another type.
        let mut c = chain("c", None);
        c.transport_socket = socket(to_any(&UpstreamTlsContext::default()));
        assert_nack(&server(vec![c], None), "filter_chains[0].transport_socket: unsupported transport socket type");
        let mut c = chain("c", None);
        c.transport_socket = Some(TransportSocket { name: "envoy.transport_sockets.tls".into(), config_type: None });
        assert_nack(&server(vec![], Some(c)), "default_filter_chain.transport_socket");
    }

    #[test]
    fn downstream_tls_reads_the_older_provider_fields_and_plain_tls() {
        let older = |name: &str| Some(CertificateProviderInstance { instance_name: name.into(), certificate_name: String::new() });
        let ctx = DownstreamTlsContext {
            common_tls_context: Some(CommonTlsContext {
                tls_certificate_certificate_provider_instance: older(""),
                validation_context_type: Some(ValidationContextType::ValidationContextCertificateProviderInstance(older("roots").unwrap())),
                ..Default::default()
            }),
            ..Default::default()
        };
        let l = decode_server(&server(vec![with_tls(chain("c", None), ctx)], None)).unwrap();
        let want = InboundTls {
            certificate_provider: "default".into(),
            ca_certificate_provider: Some("roots".into()),
            require_client_certificate: false,
        };
        assert_eq!(l.filter_chains[0].tls.as_ref(), Some(&want));

        let combined = DownstreamTlsContext {
            common_tls_context: Some(CommonTlsContext {
                tls_certificate_provider_instance: instance("identity"),
                validation_context_type: Some(ValidationContextType::CombinedValidationContext(CombinedCertificateValidationContext {
                    validation_context_certificate_provider_instance: older("old-roots"),
                    ..Default::default()
                })),
                ..Default::default()
            }),
            require_client_certificate: Some(BoolValue { value: true }),
            ..Default::default()
        };
        let l = decode_server(&server(vec![with_tls(chain("c", None), combined)], None)).unwrap();
        assert_eq!(l.filter_chains[0].tls.as_ref().unwrap().ca_certificate_provider.as_deref(), Some("old-roots"));

        // TLS without client certificates; a raw buffer socket is plaintext.
        let server_only = DownstreamTlsContext {
            common_tls_context: Some(CommonTlsContext { tls_certificate_provider_instance: instance("identity"), ..Default::default() }),
            ..Default::default()
        };
        let l = decode_server(&server(vec![with_tls(chain("c", None), server_only)], None)).unwrap();
        let want = InboundTls { certificate_provider: "identity".into(), ca_certificate_provider: None, require_client_certificate: false };
        assert_eq!(l.filter_chains[0].tls.as_ref(), Some(&want));
        let mut raw = chain("c", None);
        raw.transport_socket = Some(TransportSocket { name: "envoy.transport_sockets.raw_buffer".into(), config_type: None });
        assert!(decode_server(&server(vec![raw], None)).unwrap().filter_chains[0].tls.is_none());
    }
}
