//! LDS: proxyless `api_listener`s and sidecar socket listeners, with their HTTP filters.

use envoy_types::pb::envoy::config::core::v3::socket_address::{PortSpecifier, Protocol};
use envoy_types::pb::envoy::config::core::v3::{Address, RuntimeFractionalPercent, SocketAddress, address};
use envoy_types::pb::envoy::config::listener::v3::{ApiListener, Filter, FilterChain, Listener, filter};
use envoy_types::pb::envoy::config::rbac::v3::permission::Rule;
use envoy_types::pb::envoy::config::rbac::v3::principal::{Authenticated, Identifier};
use envoy_types::pb::envoy::config::rbac::v3::{Permission, Policy, Principal, Rbac as RbacRules, permission, principal, rbac};
use envoy_types::pb::envoy::config::route::v3::HeaderMatcher;
use envoy_types::pb::envoy::config::route::v3::header_matcher::HeaderMatchSpecifier;
use envoy_types::pb::envoy::extensions::filters::common::fault::v3::{FaultDelay, fault_delay};
use envoy_types::pb::envoy::extensions::filters::http::adaptive_concurrency::v3::adaptive_concurrency::ConcurrencyControllerConfig;
use envoy_types::pb::envoy::extensions::filters::http::adaptive_concurrency::v3::gradient_controller_config::{
    ConcurrencyLimitCalculationParams, MinimumRttCalculationParams,
};
use envoy_types::pb::envoy::extensions::filters::http::adaptive_concurrency::v3::{AdaptiveConcurrency, GradientControllerConfig};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{FaultAbort, HttpFault, fault_abort};
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::{
    CodecType, PathWithEscapedSlashesAction, RouteSpecifier,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_filter,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{PathMatcher, RegexMatcher, StringMatcher, path_matcher, string_matcher};
use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, Percent, TokenBucket, fractional_percent};
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use envoy_types::util::pack_any;
use std::time::Duration;

use mesh_core::authz::{Glob, namespace_pattern, rule_header_name};
use mesh_core::policy::{AuthzAction, AuthzRule, MinRtt};

use super::{LISTENER, Resource, Shape, ads, duration, pack};
use crate::mesh::Service;

/// The name of a service's sidecar listener.
pub(crate) fn sidecar_listener_name(service: &str) -> String {
    format!("{service}:sidecar")
}

pub(super) fn listeners(service: &Service, shape: Shape, out: &mut Vec<Resource>) {
    match shape {
        Shape::Proxyless => {
            let hcm = hcm(service, shape);
            let listener = Listener {
                name: service.name.clone(),
                api_listener: Some(ApiListener { api_listener: Some(pack_any(hcm)) }),
                ..Default::default()
            };
            out.push(pack(LISTENER, &service.name, listener));
        }
        Shape::Sidecar => {
            let Some(port) = service.sidecar_port else { return };
            let name = sidecar_listener_name(&service.name);
            let listener = Listener {
                name: name.clone(),
                address: Some(socket_address(std::net::SocketAddr::from(([127, 0, 0, 1], port)))),
                filter_chains: vec![FilterChain {
                    filters: vec![Filter {
                        name: "envoy.filters.network.http_connection_manager".to_owned(),
                        config_type: Some(filter::ConfigType::TypedConfig(pack_any(hcm(service, shape)))),
                    }],
                    // A strict service's sidecar takes mTLS callers only, with a certificate from the mesh CA.
                    transport_socket: (service.mtls == mesh_core::policy::MtlsMode::Strict).then(strict_socket),
                    ..Default::default()
                }],
                ..Default::default()
            };
            out.push(pack(LISTENER, &name, listener));
        }
    }
}

/// mTLS required of every caller: the sidecar's certificate and roots over SDS.
fn strict_socket() -> envoy_types::pb::envoy::config::core::v3::TransportSocket {
    use envoy_types::pb::envoy::config::core::v3::transport_socket;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::DownstreamTlsContext;
    let tls = DownstreamTlsContext {
        common_tls_context: Some(super::sds_tls_context()),
        require_client_certificate: Some(envoy_types::pb::google::protobuf::BoolValue { value: true }),
        ..Default::default()
    };
    envoy_types::pb::envoy::config::core::v3::TransportSocket {
        name: "envoy.transport_sockets.tls".to_owned(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(tls))),
    }
}

/// The inbound listener of a service's server at `addr` (A36), under `name`.
pub(super) fn server_listener(service: &Service, name: &str, addr: std::net::SocketAddr) -> Listener {
    use envoy_types::pb::envoy::config::listener::v3::FilterChainMatch;
    use mesh_core::policy::MtlsMode;
    let chain = |tls: bool, transport_protocol: &str| FilterChain {
        name: if tls { "mtls".to_owned() } else { "plaintext".to_owned() },
        filter_chain_match: (!transport_protocol.is_empty())
            .then(|| FilterChainMatch { transport_protocol: transport_protocol.to_owned(), ..Default::default() }),
        filters: vec![Filter {
            name: "envoy.filters.network.http_connection_manager".to_owned(),
            config_type: Some(filter::ConfigType::TypedConfig(pack_any(server_hcm(service, addr)))),
        }],
        transport_socket: tls.then(server_mtls_socket),
        ..Default::default()
    };
    let (filter_chains, default_filter_chain) = match service.mtls {
        MtlsMode::Strict => (vec![chain(true, "")], None),
        // Our servers tell TLS connections apart by their first byte and take them on the `tls` chain; a gRPC
        // server drops that chain (A36) and serves plaintext, as istiod's permissive mode does for it.
        MtlsMode::Permissive => (vec![chain(true, "tls")], Some(chain(false, ""))),
        MtlsMode::Disable => (vec![chain(false, "")], None),
    };
    Listener { name: name.to_owned(), address: Some(socket_address(addr)), filter_chains, default_filter_chain, ..Default::default() }
}

fn socket_address(addr: std::net::SocketAddr) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            protocol: Protocol::Tcp as i32,
            address: addr.ip().to_string(),
            port_specifier: Some(PortSpecifier::PortValue(u32::from(addr.port()))),
            ..Default::default()
        })),
    }
}

/// mTLS required of every caller of an xDS-enabled server: its certificate and the roots from the bootstrap's
/// provider instance (A29), the one strict clusters name.
fn server_mtls_socket() -> envoy_types::pb::envoy::config::core::v3::TransportSocket {
    use envoy_types::pb::envoy::config::core::v3::transport_socket;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::common_tls_context::ValidationContextType;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
        CertificateProviderPluginInstance, CertificateValidationContext, CommonTlsContext, DownstreamTlsContext,
    };
    let provider = || CertificateProviderPluginInstance {
        instance_name: crate::control::CERTIFICATE_PROVIDER.to_owned(),
        certificate_name: String::new(),
    };
    let tls = DownstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            tls_certificate_provider_instance: Some(provider()),
            validation_context_type: Some(ValidationContextType::ValidationContext(CertificateValidationContext {
                ca_certificate_provider_instance: Some(provider()),
                ..Default::default()
            })),
            ..Default::default()
        }),
        require_client_certificate: Some(envoy_types::pb::google::protobuf::BoolValue { value: true }),
        ..Default::default()
    };
    envoy_types::pb::envoy::config::core::v3::TransportSocket {
        name: "envoy.transport_sockets.tls".to_owned(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(tls))),
    }
}

/// A server's HttpConnectionManager: RBAC, the server rate limit, the router, and one non-forwarding route.
fn server_hcm(service: &Service, addr: std::net::SocketAddr) -> HttpConnectionManager {
    use envoy_types::pb::envoy::config::route::v3::{
        NonForwardingAction, Route, RouteConfiguration, RouteMatch, VirtualHost, route, route_match,
    };
    let mut filters = rbac_filters(service);
    if let Some(limit) = &service.server_rate_limit {
        // gRPC servers do not run this filter: optional, so they skip it instead of rejecting the listener.
        let mut config = local_rate_limit(&format!("{}_server_rate_limit", service.name), limit);
        config.rate_limited_as_resource_exhausted = true;
        filters.push(http_filter("envoy.filters.http.local_ratelimit", pack_any(config), true));
    }
    filters.push(http_filter("envoy.filters.http.router", pack_any(Router::default()), false));
    let routes = RouteConfiguration {
        name: format!("inbound|{addr}"),
        virtual_hosts: vec![VirtualHost {
            name: "inbound".to_owned(),
            domains: vec!["*".to_owned()],
            routes: vec![Route {
                name: "inbound".to_owned(),
                r#match: Some(RouteMatch { path_specifier: Some(route_match::PathSpecifier::Prefix(String::new())), ..Default::default() }),
                action: Some(route::Action::NonForwardingAction(NonForwardingAction {})),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    HttpConnectionManager {
        stat_prefix: format!("inbound_{}", service.name),
        codec_type: CodecType::Auto as i32,
        route_specifier: Some(RouteSpecifier::RouteConfig(routes)),
        http_filters: filters,
        ..Default::default()
    }
}

/// The service's authorization rules as RBAC filters: a DENY filter of its deny rules, then an ALLOW filter of
/// its allow rules (or of none, for `authorization_default: deny`, Istio's allow-nothing).
fn rbac_filters(service: &Service) -> Vec<HttpFilter> {
    let mut filters = Vec::new();
    for action in [AuthzAction::Deny, AuthzAction::Allow] {
        let rules: Vec<&AuthzRule> = service.authorization.iter().filter(|r| r.action == action).collect();
        let allow_nothing = action == AuthzAction::Allow && service.authorization_default == AuthzAction::Deny;
        if !rules.is_empty() || allow_nothing {
            filters.push(http_filter("envoy.filters.http.rbac", pack_any(rbac_filter(action, &rules)), false));
        }
    }
    filters
}

fn local_rate_limit(stat_prefix: &str, limit: &mesh_core::policy::RateLimit) -> LocalRateLimit {
    let always = || RuntimeFractionalPercent { default_value: Some(percent(100)), runtime_key: String::new() };
    LocalRateLimit {
        stat_prefix: stat_prefix.to_owned(),
        token_bucket: Some(TokenBucket {
            max_tokens: limit.max_tokens,
            tokens_per_fill: Some(UInt32Value { value: limit.tokens_per_fill }),
            fill_interval: Some(duration(limit.fill_interval)),
        }),
        filter_enabled: Some(always()),
        filter_enforced: Some(always()),
        ..Default::default()
    }
}

fn hcm(service: &Service, shape: Shape) -> HttpConnectionManager {
    let mut filters = Vec::new();
    if let Some(fault) = &service.fault {
        filters.push(http_filter("envoy.filters.http.fault", pack_any(fault_filter(fault)), false));
    }
    if let Some(limit) = &service.rate_limit {
        let config = local_rate_limit(&format!("{}_rate_limit", service.name), limit);
        // gRPC clients do not run this filter; optional, so they skip it instead of rejecting the listener.
        filters.push(http_filter("envoy.filters.http.local_ratelimit", pack_any(config), shape == Shape::Proxyless));
    }
    if let Some(adaptive) = &service.adaptive_concurrency {
        // Optional for gRPC clients, which do not run it; ours and Envoy do.
        filters.push(http_filter(
            "envoy.filters.http.adaptive_concurrency",
            pack_any(adaptive_filter(adaptive)),
            shape == Shape::Proxyless,
        ));
    }
    // Authorization is enforced where calls are received: by the sidecar here (proxyless servers get it
    // with xDS-enabled server listeners), never by a proxyless client.
    if shape == Shape::Sidecar {
        filters.extend(rbac_filters(service));
    }
    filters.push(http_filter("envoy.filters.http.router", pack_any(Router::default()), false));
    let mut hcm = HttpConnectionManager {
        stat_prefix: service.name.clone(),
        codec_type: CodecType::Auto as i32,
        route_specifier: Some(RouteSpecifier::Rds(Rds { config_source: Some(ads()), route_config_name: service.name.clone() })),
        http_filters: filters,
        ..Default::default()
    };
    if shape == Shape::Sidecar {
        // Envoy matches RBAC paths as it normalizes them, and by default it does not: then `//admin` would step
        // around a deny on `/admin/*`. Dot segments removed, slashes merged, `%2F`/`%5C` decoded to `/`, as
        // `mesh_core::authz::normalize_path` does (the request goes on with the normalized path).
        hcm.normalize_path = Some(envoy_types::pb::google::protobuf::BoolValue { value: true });
        hcm.merge_slashes = true;
        hcm.path_with_escaped_slashes_action = PathWithEscapedSlashesAction::UnescapeAndForward as i32;
    }
    hcm
}

fn http_filter(name: &str, config: Any, is_optional: bool) -> HttpFilter {
    HttpFilter { name: name.to_owned(), config_type: Some(http_filter::ConfigType::TypedConfig(config)), is_optional, ..Default::default() }
}

fn adaptive_filter(a: &mesh_core::policy::AdaptiveConcurrency) -> AdaptiveConcurrency {
    let share = |value: f64| Some(Percent { value: value * 100.0 });
    let (interval, fixed_value, request_count, jitter) = match a.min_rtt {
        MinRtt::Sampled { interval, requests, jitter } => {
            (Some(duration(interval)), None, Some(UInt32Value { value: requests }), share(jitter))
        }
        // Envoy's way to fix minRTT: a zero interval and the value.
        MinRtt::Fixed(rtt) => (Some(duration(Duration::ZERO)), Some(duration(rtt)), None, None),
    };
    let gradient = GradientControllerConfig {
        sample_aggregate_percentile: share(a.percentile),
        concurrency_limit_params: Some(ConcurrencyLimitCalculationParams {
            max_concurrency_limit: Some(UInt32Value { value: a.max_limit }),
            concurrency_update_interval: Some(duration(a.update_interval)),
            min_concurrency_limit: Some(UInt32Value { value: a.min_limit }),
        }),
        min_rtt_calc_params: Some(MinimumRttCalculationParams {
            interval,
            fixed_value,
            request_count,
            jitter,
            min_concurrency: Some(UInt32Value { value: a.min_concurrency }),
            buffer: share(a.buffer),
        }),
    };
    AdaptiveConcurrency {
        concurrency_controller_config: Some(ConcurrencyControllerConfig::GradientControllerConfig(gradient)),
        // Unset: Envoy answers 503 (UNAVAILABLE to a gRPC caller), our client RESOURCE_EXHAUSTED.
        ..Default::default()
    }
}

fn percent(numerator: u32) -> FractionalPercent {
    FractionalPercent { numerator, denominator: fractional_percent::DenominatorType::Hundred as i32 }
}

fn fault_filter(fault: &mesh_core::policy::FaultInjection) -> HttpFault {
    let per_million = |numerator| FractionalPercent { numerator, denominator: fractional_percent::DenominatorType::Million as i32 };
    HttpFault {
        delay: fault.delay.map(|d| FaultDelay {
            percentage: Some(per_million(d.per_million)),
            fault_delay_secifier: Some(match d.fixed {
                Some(delay) => fault_delay::FaultDelaySecifier::FixedDelay(duration(delay)),
                None => fault_delay::FaultDelaySecifier::HeaderDelay(Default::default()),
            }),
        }),
        abort: fault.abort.map(|a| FaultAbort {
            percentage: Some(per_million(a.per_million)),
            error_type: Some(match a.code {
                Some(code) => fault_abort::ErrorType::GrpcStatus(code.as_i32().unsigned_abs()),
                None => fault_abort::ErrorType::HeaderAbort(Default::default()),
            }),
            ..Default::default()
        }),
        max_active_faults: fault.max_active_faults.map(|value| UInt32Value { value }),
        ..Default::default()
    }
}

/// An RBAC filter of `rules` (all of one `action`), as [`mesh_core::authz::Engine::from_rules`] builds it: one
/// policy `rule-{i}` a rule, with one principal and one permission, each the AND (`and_ids`, `and_rules`) of the
/// rule's conditions and each condition the OR (`or_ids`, `or_rules`) of its values. Principals are
/// `authenticated.principal_name` matchers, namespaces `safe_regex` ones on the same name; paths and methods are
/// `url_path`, headers `header` matchers (`*`: `present_match`). An ALLOW filter without rules denies every call.
fn rbac_filter(action: AuthzAction, rules: &[&AuthzRule]) -> Rbac {
    let policies = rules.iter().enumerate().map(|(i, rule)| (format!("rule-{i}"), rbac_policy(rule))).collect();
    let action = match action {
        AuthzAction::Allow => rbac::Action::Allow,
        AuthzAction::Deny => rbac::Action::Deny,
    };
    Rbac { rules: Some(RbacRules { action: action as i32, policies, ..Default::default() }), ..Default::default() }
}

fn rbac_policy(rule: &AuthzRule) -> Policy {
    let principal = |identifier| Principal { identifier: Some(identifier) };
    let permission = |rule| Permission { rule: Some(rule) };
    let authenticated = |m| principal(Identifier::Authenticated(Authenticated { principal_name: Some(m) }));
    let name = |p: &String| string_matcher(Glob::parse(p)).map_or(principal(Identifier::Any(true)), authenticated);
    let path = |p: &String| {
        string_matcher(Glob::parse(p))
            .map_or(permission(Rule::Any(true)), |m| permission(Rule::UrlPath(PathMatcher { rule: Some(path_matcher::Rule::Path(m)) })))
    };
    let any_principal = |ids: Vec<Principal>| one_of(ids, |ids| principal(Identifier::OrIds(principal::Set { ids })));
    let any_permission = |rules: Vec<Permission>| one_of(rules, |rules| permission(Rule::OrRules(permission::Set { rules })));

    let mut principals = Vec::new();
    if !rule.principals.is_empty() && !rule.principals.iter().any(|p| p == "*") {
        principals.push(any_principal(rule.principals.iter().map(name).collect()));
    }
    if !rule.namespaces.is_empty() {
        let namespace = |ns: &String| {
            let regex = RegexMatcher { regex: namespace_pattern(ns), engine_type: None };
            authenticated(StringMatcher { match_pattern: Some(string_matcher::MatchPattern::SafeRegex(regex)), ignore_case: false })
        };
        principals.push(any_principal(rule.namespaces.iter().map(namespace).collect()));
    }
    if !rule.not_principals.is_empty() {
        principals.push(principal(Identifier::NotId(Box::new(any_principal(rule.not_principals.iter().map(name).collect())))));
    }
    let mut permissions = Vec::new();
    if !rule.paths.is_empty() && !rule.paths.iter().any(|p| p == "*") {
        permissions.push(any_permission(rule.paths.iter().map(path).collect()));
    }
    if !rule.not_paths.is_empty() {
        permissions.push(permission(Rule::NotRule(Box::new(any_permission(rule.not_paths.iter().map(path).collect())))));
    }
    if !rule.methods.is_empty() {
        permissions.push(any_permission(rule.methods.iter().map(path).collect()));
    }
    for (name, value) in &rule.headers {
        let specifier = match string_matcher(Glob::parse(value)) {
            Some(m) => HeaderMatchSpecifier::StringMatch(m),
            None => HeaderMatchSpecifier::PresentMatch(true),
        };
        let header = HeaderMatcher { name: rule_header_name(name), header_match_specifier: Some(specifier), ..Default::default() };
        permissions.push(permission(Rule::Header(header)));
    }
    let principal = match principals.len() {
        0 => principal(Identifier::Any(true)),
        1 => principals.remove(0),
        _ => principal(Identifier::AndIds(principal::Set { ids: principals })),
    };
    let permission = match permissions.len() {
        0 => permission(Rule::Any(true)),
        1 => permissions.remove(0),
        _ => permission(Rule::AndRules(permission::Set { rules: permissions })),
    };
    Policy { permissions: vec![permission], principals: vec![principal], ..Default::default() }
}

/// The lone item, or the OR `or` makes of them.
fn one_of<T>(mut items: Vec<T>, or: impl FnOnce(Vec<T>) -> T) -> T {
    if items.len() == 1 { items.remove(0) } else { or(items) }
}

/// A mesh-file pattern as an Envoy string matcher; `None` for `*`.
fn string_matcher(glob: Glob<'_>) -> Option<StringMatcher> {
    let pattern = match glob {
        Glob::Any => return None,
        Glob::Exact(s) => string_matcher::MatchPattern::Exact(s.to_owned()),
        Glob::Prefix(s) => string_matcher::MatchPattern::Prefix(s.to_owned()),
        Glob::Suffix(s) => string_matcher::MatchPattern::Suffix(s.to_owned()),
    };
    Some(StringMatcher { match_pattern: Some(pattern), ignore_case: false })
}
