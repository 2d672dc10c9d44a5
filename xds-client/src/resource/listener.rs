//! LDS: client-side (API) listeners and the HTTP connection manager they share with server listeners.
//!
//! A Listener with an `api_listener` is a client's ([`ListenerResource`]); one with an `address` and filter
//! chains instead is a server's ([`mesh_core::inbound::InboundListener`], decoded in `inbound.rs`), as gRPC
//! tells them apart (A36).

use std::collections::HashSet;

use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter::ConfigType;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{HttpConnectionManager, HttpFilter};
use mesh_core::inbound::InboundHttp;
use prost::Message;

pub use mesh_core::RouteSource;

use super::{Resource, adaptive, extension_type, fault, inbound, ratelimit, rbac, route};

/// Message name of the HTTP connection manager an API listener or a filter chain must hold.
pub(super) const HCM: &str = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
/// Message name of the router filter, which must come last.
const ROUTER: &str = "envoy.extensions.filters.http.router.v3.Router";
/// HTTP filters besides the router whose configuration the client accepts;
/// their names are passed on in [`ListenerResource::http_filters`].
const KNOWN_FILTERS: &[&str] = &[ROUTER, fault::HTTP_FAULT, ratelimit::LOCAL_RATE_LIMIT, adaptive::ADAPTIVE_CONCURRENCY, rbac::RBAC];

/// A client-side listener: where its routes come from and its HTTP filters.
#[derive(Clone, Debug)]
pub struct ListenerResource {
    /// Listener name (the target the client resolves).
    pub name: String,
    /// The route table, by RDS name or inline.
    pub route: RouteSource,
    /// HTTP filter names in order, the router last; optional filters the
    /// client does not know are left out.
    pub http_filters: Vec<String>,
    /// The fault filter's configuration, for routes without an override of their own.
    pub fault: Option<mesh_core::policy::FaultInjection>,
    /// The local rate limit filter's bucket, shared by every route.
    pub rate_limit: Option<mesh_core::policy::RateLimit>,
    /// The adaptive concurrency filter's controller settings: each cluster the target calls gets a limiter.
    pub adaptive_concurrency: Option<mesh_core::policy::AdaptiveConcurrency>,
    /// The RBAC filters, in order, each one kept (one that enforces nothing is [`mesh_core::authz::Rbac::permissive`]).
    /// RBAC is a server-side filter (A41): a client does not run them; a server's are on its filter chains
    /// ([`InboundHttp::rbac`]).
    pub rbac: Vec<mesh_core::authz::Rbac>,
}

/// Decodes and validates a `Listener`: a client's API listener, or a server's listener (A36).
pub(crate) fn decode(bytes: &[u8]) -> Result<Resource, String> {
    let mut listener = Listener::decode(bytes).map_err(|e| format!("malformed Listener: {e}"))?;
    let Some(any) = listener.api_listener.take().and_then(|a| a.api_listener) else {
        if listener.address.is_some() {
            return inbound::decode(listener).map(Resource::ServerListener);
        }
        return Err("neither api_listener nor address: a client listener needs an api_listener, a server listener an address (A36)".into());
    };
    if super::type_name(&any.type_url) != HCM {
        return Err(format!("api_listener: type {:?} is not an HttpConnectionManager", any.type_url));
    }
    let hcm =
        HttpConnectionManager::decode(any.value.as_slice()).map_err(|e| format!("api_listener: malformed HttpConnectionManager: {e}"))?;
    let InboundHttp { route, http_filters, fault, rate_limit, adaptive_concurrency, rbac } = connection_manager(hcm)?;
    Ok(Resource::Listener(ListenerResource { name: listener.name, route, http_filters, fault, rate_limit, adaptive_concurrency, rbac }))
}

/// Validates an HttpConnectionManager, a client's or a server's: its route source and its HTTP filters (A39).
pub(super) fn connection_manager(hcm: HttpConnectionManager) -> Result<InboundHttp, String> {
    let route = match hcm.route_specifier {
        Some(RouteSpecifier::Rds(rds)) if rds.route_config_name.is_empty() => return Err("rds.route_config_name: empty".into()),
        Some(RouteSpecifier::Rds(rds)) => RouteSource::Rds(rds.route_config_name),
        Some(RouteSpecifier::RouteConfig(rc)) => RouteSource::Inline(route::convert(&rc).map_err(|e| format!("route_config: {e}"))?),
        Some(RouteSpecifier::ScopedRoutes(_)) => return Err("scoped_routes: scoped routes not supported".into()),
        None => return Err("HttpConnectionManager has neither rds nor route_config".into()),
    };
    // A41: RBAC's remote_ip is the peer's address, which holds only while no hop's address is trusted instead.
    if hcm.xff_num_trusted_hops != 0 {
        return Err(format!("xff_num_trusted_hops: {} is not supported (it must be 0)", hcm.xff_num_trusted_hops));
    }
    if !hcm.original_ip_detection_extensions.is_empty() {
        return Err("original_ip_detection_extensions: not supported (it must be empty)".into());
    }
    let Filters { names: http_filters, fault, rate_limit, adaptive_concurrency, rbac } = http_filters(&hcm.http_filters)?;
    Ok(InboundHttp { route, http_filters, fault, rate_limit, adaptive_concurrency, rbac })
}

/// What a listener's HTTP filters say.
struct Filters {
    names: Vec<String>,
    fault: Option<mesh_core::policy::FaultInjection>,
    rate_limit: Option<mesh_core::policy::RateLimit>,
    adaptive_concurrency: Option<mesh_core::policy::AdaptiveConcurrency>,
    rbac: Vec<mesh_core::authz::Rbac>,
}

/// Filter names in order (gRPC A39): unique names, known config types unless
/// optional, the router last; the fault, rate limit and adaptive concurrency filters' configurations (one of
/// each at most); and every RBAC filter's, in order.
fn http_filters(filters: &[HttpFilter]) -> Result<Filters, String> {
    let (mut fault, mut rate_limit, mut adaptive_concurrency) = (None, None, None);
    let mut rbac = Vec::new();
    let mut names = Vec::with_capacity(filters.len());
    let mut seen = HashSet::new();
    let mut last_is_router = false;
    for (i, f) in filters.iter().enumerate() {
        if f.name.is_empty() {
            return Err(format!("http_filters[{i}]: empty name"));
        }
        if !seen.insert(f.name.as_str()) {
            return Err(format!("http_filters[{i}]: duplicate filter name {:?}", f.name));
        }
        let ty = match &f.config_type {
            Some(ConfigType::TypedConfig(any)) => extension_type(any),
            _ => "".into(),
        };
        if !KNOWN_FILTERS.contains(&ty.as_ref()) {
            if f.is_optional {
                tracing::debug!(filter = %f.name, %ty, "skipping optional HTTP filter of unsupported type");
                continue;
            }
            let ty = if ty.is_empty() { "no typed_config" } else { ty.as_ref() };
            return Err(format!("http_filters[{i}]: filter {:?} has unsupported config type ({ty})", f.name));
        }
        if ty == fault::HTTP_FAULT
            && let Some(ConfigType::TypedConfig(any)) = &f.config_type
        {
            if fault.is_some() {
                return Err(format!("http_filters[{i}]: a second fault filter ({:?})", f.name));
            }
            fault = Some(fault::decode(any).map_err(|e| format!("http_filters[{i}] ({}): {e}", f.name))?);
        }
        if ty == ratelimit::LOCAL_RATE_LIMIT
            && let Some(ConfigType::TypedConfig(any)) = &f.config_type
        {
            if rate_limit.is_some() {
                return Err(format!("http_filters[{i}]: a second local rate limit filter ({:?})", f.name));
            }
            rate_limit = ratelimit::decode(any).map_err(|e| format!("http_filters[{i}] ({}): {e}", f.name))?;
        }
        if ty == adaptive::ADAPTIVE_CONCURRENCY
            && let Some(ConfigType::TypedConfig(any)) = &f.config_type
        {
            if adaptive_concurrency.is_some() {
                return Err(format!("http_filters[{i}]: a second adaptive concurrency filter ({:?})", f.name));
            }
            adaptive_concurrency = adaptive::decode(any).map_err(|e| format!("http_filters[{i}] ({}): {e}", f.name))?;
        }
        if ty == rbac::RBAC
            && let Some(ConfigType::TypedConfig(any)) = &f.config_type
        {
            rbac.push(rbac::decode(any).map_err(|e| format!("http_filters[{i}] ({}): {e}", f.name))?);
        }
        last_is_router = ty == ROUTER;
        names.push(f.name.clone());
    }
    if !last_is_router {
        return Err(format!("http_filters: the last filter must be the router ({ROUTER})"));
    }
    Ok(Filters { names, fault, rate_limit, adaptive_concurrency, rbac })
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::listener::v3::ApiListener;
    use envoy_types::pb::envoy::config::rbac::v3::{Permission, Policy, Principal, Rbac as RbacRules, permission, principal, rbac};
    use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, VirtualHost};
    use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
    use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac;
    use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{Rds, ScopedRoutes};
    use envoy_types::pb::google::protobuf::Any;

    use super::super::{DecodeError, ResourceType, to_any};
    use super::*;

    fn filter(name: &str, any: Option<Any>, is_optional: bool) -> HttpFilter {
        HttpFilter { name: name.into(), is_optional, config_type: any.map(ConfigType::TypedConfig), ..Default::default() }
    }

    fn router() -> HttpFilter {
        filter("router", Some(to_any(&Router::default())), false)
    }

    fn rds(name: &str) -> Option<RouteSpecifier> {
        Some(RouteSpecifier::Rds(Rds { route_config_name: name.into(), config_source: None }))
    }

    fn listener(route: Option<RouteSpecifier>, filters: Vec<HttpFilter>) -> Any {
        let hcm = HttpConnectionManager { route_specifier: route, http_filters: filters, ..Default::default() };
        to_any(&Listener {
            name: "greeter".into(),
            api_listener: Some(ApiListener { api_listener: Some(to_any(&hcm)) }),
            ..Default::default()
        })
    }

    fn decode_listener(any: &Any) -> Result<ListenerResource, DecodeError> {
        match super::super::decode(ResourceType::Listener, any)? {
            Resource::Listener(l) => Ok(l),
            other => panic!("unexpected {other:?}"),
        }
    }

    fn reason(any: &Any) -> String {
        let err = decode_listener(any).unwrap_err();
        assert_eq!(err.name.as_deref(), Some("greeter"), "{err}");
        err.reason
    }

    #[test]
    fn rds_listener() {
        let unknown_optional = filter("opt", Some(Any { type_url: "type.googleapis.com/x.Unknown".into(), value: vec![] }), true);
        let fault = filter("fault", Some(to_any(&HttpFault::default())), false);
        let l = decode_listener(&listener(rds("routes"), vec![fault, unknown_optional, router()])).unwrap();
        assert_eq!(l.name, "greeter");
        assert!(matches!(&l.route, RouteSource::Rds(n) if n == "routes"));
        assert_eq!(l.http_filters, ["fault", "router"]);
    }

    #[test]
    fn inline_route_config() {
        let vh = VirtualHost { name: "vh".into(), domains: vec!["*".into()], ..Default::default() };
        let rc = RouteConfiguration { name: "inline".into(), virtual_hosts: vec![vh], ..Default::default() };
        let l = decode_listener(&listener(Some(RouteSpecifier::RouteConfig(rc)), vec![router()])).unwrap();
        let RouteSource::Inline(rc) = l.route else { panic!("not inline") };
        assert_eq!((rc.name.as_str(), rc.virtual_hosts.len()), ("inline", 1));

        let bad = RouteConfiguration { virtual_hosts: vec![VirtualHost::default()], ..Default::default() };
        assert!(reason(&listener(Some(RouteSpecifier::RouteConfig(bad)), vec![router()])).contains("route_config: virtual_hosts[0]"));
    }

    #[test]
    fn rejections() {
        let no_api = to_any(&Listener { name: "greeter".into(), ..Default::default() });
        assert!(reason(&no_api).contains("neither api_listener nor address"));
        let not_hcm = to_any(&Listener {
            name: "greeter".into(),
            api_listener: Some(ApiListener { api_listener: Some(to_any(&Router::default())) }),
            ..Default::default()
        });
        assert!(reason(&not_hcm).contains("not an HttpConnectionManager"));
        assert!(reason(&listener(None, vec![router()])).contains("neither rds nor route_config"));
        assert!(reason(&listener(rds(""), vec![router()])).contains("route_config_name"));
        let scoped = Some(RouteSpecifier::ScopedRoutes(ScopedRoutes::default()));
        assert!(reason(&listener(scoped, vec![router()])).contains("scoped routes not supported"));
        assert!(reason(&listener(rds("r"), vec![])).contains("last filter must be the router"));
        let fault = filter("fault", Some(to_any(&HttpFault::default())), false);
        assert!(reason(&listener(rds("r"), vec![router(), fault])).contains("last filter must be the router"));
        let unknown = filter("authz", Some(Any { type_url: "type.googleapis.com/x.Authz".into(), value: vec![] }), false);
        assert!(reason(&listener(rds("r"), vec![unknown, router()])).contains("\"authz\""));
        assert!(reason(&listener(rds("r"), vec![filter("bare", None, false), router()])).contains("\"bare\""));
        assert!(reason(&listener(rds("r"), vec![router(), router()])).contains("duplicate"));
    }

    fn rbac_filter(name: &str, action: rbac::Action) -> HttpFilter {
        let policy = Policy {
            permissions: vec![Permission { rule: Some(permission::Rule::Any(true)) }],
            principals: vec![Principal { identifier: Some(principal::Identifier::Any(true)) }],
            ..Default::default()
        };
        let rules = RbacRules { action: action as i32, policies: [("all".to_owned(), policy)].into(), ..Default::default() };
        filter(name, Some(to_any(&Rbac { rules: Some(rules), ..Default::default() })), false)
    }

    #[test]
    fn rbac_filters_are_kept_in_order() {
        let filters = vec![rbac_filter("deny", rbac::Action::Deny), rbac_filter("allow", rbac::Action::Allow), router()];
        let l = decode_listener(&listener(rds("r"), filters)).unwrap();
        assert_eq!(l.http_filters, ["deny", "allow", "router"]);
        let actions: Vec<_> = l.rbac.iter().map(|r| r.action).collect();
        assert_eq!(actions, [mesh_core::authz::Action::Deny, mesh_core::authz::Action::Allow]);
        assert!(decode_listener(&listener(rds("r"), vec![router()])).unwrap().rbac.is_empty());
    }

    #[test]
    fn an_rbac_filter_it_cannot_enforce_nacks_the_listener() {
        let matcher = Rbac { matcher: Some(Default::default()), ..Default::default() };
        let filters = vec![filter("authz", Some(to_any(&matcher)), false), router()];
        let why = reason(&listener(rds("r"), filters));
        assert!(why.contains("http_filters[0] (authz): matcher: the matcher API is not supported"), "{why}");
        // Optional or not: a filter of a known type is decoded, and its errors are the listener's.
        let filters = vec![filter("authz", Some(to_any(&matcher)), true), router()];
        assert!(reason(&listener(rds("r"), filters)).contains("matcher"));
    }

    #[test]
    fn trusted_hops_nack_the_listener_for_rbac_remote_ip() {
        let hcm = |xff_num_trusted_hops, original_ip_detection_extensions| HttpConnectionManager {
            route_specifier: rds("r"),
            http_filters: vec![router()],
            xff_num_trusted_hops,
            original_ip_detection_extensions,
            ..Default::default()
        };
        let wrap = |hcm: HttpConnectionManager| {
            to_any(&Listener {
                name: "greeter".into(),
                api_listener: Some(ApiListener { api_listener: Some(to_any(&hcm)) }),
                ..Default::default()
            })
        };
        assert!(reason(&wrap(hcm(1, vec![]))).contains("xff_num_trusted_hops: 1"));
        assert!(reason(&wrap(hcm(0, vec![Default::default()]))).contains("original_ip_detection_extensions"));
    }
}
