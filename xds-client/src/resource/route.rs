//! RDS: route configurations, as gRPC reads them (gRFCs A28, A31, A42, A44).
//!
//! Routes the client can never use are left out rather than rejected, as gRPC
//! does: routes with query-parameter matchers, `cluster_header` or cluster
//! specifier plugins, redirects, direct responses and filter actions, and
//! CONNECT or URI-template path matchers.

use std::collections::HashMap;
use std::time::Duration;

use envoy_types::pb::envoy::config::route::v3::header_matcher::HeaderMatchSpecifier;
use envoy_types::pb::envoy::config::route::v3::route::Action;
use envoy_types::pb::envoy::config::route::v3::route_action::ClusterSpecifier;
use envoy_types::pb::envoy::config::route::v3::route_action::RequestMirrorPolicy as ProtoMirror;
use envoy_types::pb::envoy::config::route::v3::route_action::hash_policy::PolicySpecifier;
use envoy_types::pb::envoy::config::route::v3::route_match::PathSpecifier;
use envoy_types::pb::envoy::config::route::v3::{
    FilterConfig, HeaderMatcher, RetryPolicy as ProtoRetry, Route as ProtoRoute, RouteAction as ProtoAction, RouteConfiguration,
    RouteMatch as ProtoMatch, VirtualHost as ProtoVirtualHost, WeightedCluster as ProtoWeighted,
};
use envoy_types::pb::envoy::r#type::matcher::v3::StringMatcher;
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
use envoy_types::pb::google::protobuf::Any;
use mesh_core::policy::{FaultInjection, HashPolicy, HedgePolicy, HttpRetryOn, Mirror, RetryPolicy, RouteHash, RoutePolicies};
use mesh_core::{
    GrpcCode, HeaderMatch, PathMatch, Regex, Route, RouteAction, RouteConfig, RouteMatch, StringMatch, VirtualHost, WeightedCluster,
};
use prost::Message;

use super::{duration, fault};

/// Message name of a per-route filter override wrapper (A39).
pub(super) const FILTER_CONFIG: &str = "envoy.config.route.v3.FilterConfig";

/// Most attempts a retry policy may ask for (gRPC caps at 5).
const MAX_ATTEMPTS: u32 = 5;

/// Decodes and validates a `RouteConfiguration`.
pub(crate) fn decode(bytes: &[u8]) -> Result<RouteConfig, String> {
    let rc = RouteConfiguration::decode(bytes).map_err(|e| format!("malformed RouteConfiguration: {e}"))?;
    convert(&rc)
}

/// Validates a `RouteConfiguration` (also used for routes inline in a listener).
pub(crate) fn convert(rc: &RouteConfiguration) -> Result<RouteConfig, String> {
    let virtual_hosts = rc
        .virtual_hosts
        .iter()
        .enumerate()
        .map(|(i, vh)| virtual_host(vh).map_err(|e| format!("virtual_hosts[{i}] ({:?}): {e}", vh.name)))
        .collect::<Result<_, _>>()?;
    Ok(RouteConfig { name: rc.name.clone(), virtual_hosts })
}

fn virtual_host(vh: &ProtoVirtualHost) -> Result<VirtualHost, String> {
    if vh.domains.is_empty() {
        return Err("domains: empty".into());
    }
    let vh_fault = fault_override(&vh.typed_per_filter_config).map_err(|e| format!("typed_per_filter_config: {e}"))?;
    if vh.hedge_policy.is_some() {
        tracing::warn!(virtual_host = %vh.name, "a virtual host's hedge_policy is not enforced; set it on its routes");
    }
    let mut routes = Vec::with_capacity(vh.routes.len());
    for (i, r) in vh.routes.iter().enumerate() {
        match route(r, vh.retry_policy.as_ref(), vh_fault.as_ref(), &vh.typed_per_filter_config) {
            Ok(Some(r)) => routes.push(r),
            Ok(None) => tracing::debug!(virtual_host = %vh.name, route = %r.name, "skipping route the client cannot use"),
            Err(e) => return Err(format!("routes[{i}] ({:?}): {e}", r.name)),
        }
    }
    Ok(VirtualHost { name: vh.name.clone(), domains: vh.domains.clone(), routes })
}

/// A fault filter override among a route's or virtual host's `typed_per_filter_config` (A39), bare or in a
/// `FilterConfig`. Overrides are found by type: a listener has at most one fault filter.
fn fault_override(configs: &HashMap<String, Any>) -> Result<Option<FaultInjection>, String> {
    for (name, any) in configs {
        let any = match super::type_name(&any.type_url) {
            FILTER_CONFIG => {
                match FilterConfig::decode(any.value.as_slice()).map_err(|e| format!("{name}: malformed FilterConfig: {e}"))? {
                    FilterConfig { config: Some(inner), disabled: false, .. } => inner,
                    _ => continue,
                }
            }
            _ => any.clone(),
        };
        if super::type_name(&any.type_url) == fault::HTTP_FAULT {
            return fault::decode(&any).map(Some).map_err(|e| format!("{name}: {e}"));
        }
    }
    Ok(None)
}

/// Fails on an RBAC override (`RBACPerRoute`, bare or in a `FilterConfig`) among a server route's
/// `typed_per_filter_config`: the server enforces its chain's RBAC filters on every route, so an override that
/// changed them for one route would be silently ignored.
fn refuse_rbac_override(configs: &HashMap<String, Any>) -> Result<(), String> {
    for (name, any) in configs {
        let inner = match super::type_name(&any.type_url) {
            FILTER_CONFIG => FilterConfig::decode(any.value.as_slice()).ok().and_then(|c| c.config),
            _ => Some(any.clone()),
        };
        if inner.is_some_and(|inner| super::type_name(&inner.type_url) == super::rbac::RBAC_PER_ROUTE) {
            return Err(format!("{name}: RBACPerRoute overrides are not supported on a server's routes yet (refused, not ignored)"));
        }
    }
    Ok(())
}

/// The route, or `None` when the client can never use it.
fn route(
    r: &ProtoRoute,
    vh_retry: Option<&ProtoRetry>,
    vh_fault: Option<&FaultInjection>,
    vh_overrides: &HashMap<String, Any>,
) -> Result<Option<Route>, String> {
    let m = r.r#match.as_ref().ok_or("match: missing")?;
    let action = r.action.as_ref().ok_or("action: missing")?;
    if !m.query_parameters.is_empty() {
        return Ok(None);
    }
    let Some(matcher) = route_match(m)? else { return Ok(None) };
    let (action, policies) = match action {
        Action::Route(ra) => match clusters(ra)? {
            Some(clusters) => {
                let mut policies = route_policies(ra, vh_retry)?;
                // The mesh's typed hedging policy (the route's, else its virtual host's) replaces whatever the
                // retry policy made: A6 hedges or retries, not both.
                // A route's own retry policy, or its own entry for the extension (a disabled one included), wins
                // over its virtual host's hedging.
                let own = ra.retry_policy.is_some() || r.typed_per_filter_config.contains_key(super::hedging::FILTER_NAME);
                let hedging =
                    match super::hedging::decode(&r.typed_per_filter_config).map_err(|e| format!("typed_per_filter_config: {e}"))? {
                        Some(hedging) => Some(hedging),
                        None if own => None,
                        None => super::hedging::decode(vh_overrides).map_err(|e| format!("virtual host typed_per_filter_config: {e}"))?,
                    };
                if let Some(hedging) = hedging {
                    if policies.retry.take().is_some() {
                        tracing::debug!(route = %r.name, "the route's typed hedging policy replaces its retry policy");
                    }
                    policies.hedge = Some(hedging);
                }
                let fault = fault_override(&r.typed_per_filter_config).map_err(|e| format!("typed_per_filter_config: {e}"))?;
                policies.fault = fault.or_else(|| vh_fault.cloned());
                (RouteAction::Clusters(clusters), policies)
            }
            None => return Ok(None),
        },
        Action::NonForwardingAction(_) => {
            // A server's route (A36): its fault override applies (A39); an RBAC override is refused, not ignored.
            for (field, configs) in
                [("typed_per_filter_config", &r.typed_per_filter_config), ("virtual host typed_per_filter_config", vh_overrides)]
            {
                refuse_rbac_override(configs).map_err(|e| format!("{field}: {e}"))?;
            }
            let fault = fault_override(&r.typed_per_filter_config).map_err(|e| format!("typed_per_filter_config: {e}"))?;
            (RouteAction::NonForwarding, RoutePolicies { fault: fault.or_else(|| vh_fault.cloned()), ..RoutePolicies::default() })
        }
        Action::Redirect(_) | Action::DirectResponse(_) | Action::FilterAction(_) => return Ok(None),
    };
    Ok(Some(Route { name: r.name.clone(), matcher, action, policies }))
}

fn route_match(m: &ProtoMatch) -> Result<Option<RouteMatch>, String> {
    let path = match &m.path_specifier {
        Some(PathSpecifier::Prefix(p) | PathSpecifier::PathSeparatedPrefix(p)) => PathMatch::Prefix(p.clone()),
        Some(PathSpecifier::Path(p)) => PathMatch::Exact(p.clone()),
        Some(PathSpecifier::SafeRegex(r)) => PathMatch::Regex(regex(&r.regex).map_err(|e| format!("match.safe_regex: {e}"))?),
        Some(PathSpecifier::ConnectMatcher(_) | PathSpecifier::PathMatchPolicy(_)) => return Ok(None),
        None => return Err("match: no path specifier".into()),
    };
    let headers = m
        .headers
        .iter()
        .enumerate()
        .map(|(i, h)| header(h).map_err(|e| format!("match.headers[{i}] ({:?}): {e}", h.name)))
        .collect::<Result<_, _>>()?;
    // As gRPC (A28): the runtime fraction's default value, no runtime.
    let fraction = match &m.runtime_fraction {
        None => None,
        Some(f) => Some(fault::per_million(f.default_value.as_ref(), "match.runtime_fraction.default_value")?),
    };
    Ok(Some(RouteMatch { path, case_sensitive: m.case_sensitive.as_ref().is_none_or(|b| b.value), headers, fraction }))
}

// The direct matchers are deprecated in favour of string_match but still sent.
#[allow(deprecated)]
pub(crate) fn header(h: &HeaderMatcher) -> Result<HeaderMatch, String> {
    if h.name.is_empty() {
        return Err("name: empty".into());
    }
    let matcher = match &h.header_match_specifier {
        None => StringMatch::Present(true),
        Some(HeaderMatchSpecifier::ExactMatch(s)) => StringMatch::Exact(s.clone()),
        Some(HeaderMatchSpecifier::PrefixMatch(s)) => StringMatch::Prefix(s.clone()),
        Some(HeaderMatchSpecifier::SuffixMatch(s)) => StringMatch::Suffix(s.clone()),
        Some(HeaderMatchSpecifier::ContainsMatch(s)) => StringMatch::Contains(s.clone()),
        Some(HeaderMatchSpecifier::PresentMatch(present)) => StringMatch::Present(*present),
        Some(HeaderMatchSpecifier::SafeRegexMatch(r)) => StringMatch::Regex(regex(&r.regex).map_err(|e| format!("safe_regex_match: {e}"))?),
        Some(HeaderMatchSpecifier::StringMatch(sm)) => string_match(sm).map_err(|e| format!("string_match: {e}"))?,
        Some(HeaderMatchSpecifier::RangeMatch(r)) if r.start < r.end => StringMatch::Range { start: r.start, end: r.end },
        Some(HeaderMatchSpecifier::RangeMatch(r)) => return Err(format!("range_match: start {} is not below end {}", r.start, r.end)),
    };
    Ok(HeaderMatch { name: h.name.to_ascii_lowercase(), matcher, invert: h.invert_match })
}

/// An Envoy `StringMatcher`; `ignore_case` literals become case-insensitive regexes.
pub(crate) fn string_match(sm: &StringMatcher) -> Result<StringMatch, String> {
    let literal = |s: &str, before: &str, after: &str| regex(&format!("(?is){before}{}{after}", escape(s)));
    Ok(match (&sm.match_pattern, sm.ignore_case) {
        (Some(MatchPattern::Exact(s)), false) => StringMatch::Exact(s.clone()),
        (Some(MatchPattern::Prefix(s)), false) => StringMatch::Prefix(s.clone()),
        (Some(MatchPattern::Suffix(s)), false) => StringMatch::Suffix(s.clone()),
        (Some(MatchPattern::Contains(s)), false) => StringMatch::Contains(s.clone()),
        (Some(MatchPattern::Exact(s)), true) => StringMatch::Regex(literal(s, "", "")?),
        (Some(MatchPattern::Prefix(s)), true) => StringMatch::Regex(literal(s, "", ".*")?),
        (Some(MatchPattern::Suffix(s)), true) => StringMatch::Regex(literal(s, ".*", "")?),
        (Some(MatchPattern::Contains(s)), true) => StringMatch::Regex(literal(s, ".*", ".*")?),
        // ignore_case has no effect on safe_regex (Envoy).
        (Some(MatchPattern::SafeRegex(r)), _) => StringMatch::Regex(regex(&r.regex).map_err(|e| format!("safe_regex: {e}"))?),
        (Some(MatchPattern::Custom(_)), _) => return Err("custom matchers are not supported".into()),
        (None, _) => return Err("no match pattern".into()),
    })
}

fn regex(pattern: &str) -> Result<Regex, String> {
    Regex::new(pattern).map_err(|e| e.to_string())
}

/// Escapes regex metacharacters (the set `regex::escape` escapes).
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The weighted targets of a route, or `None` for specifiers the client ignores.
fn clusters(ra: &ProtoAction) -> Result<Option<Vec<WeightedCluster>>, String> {
    match &ra.cluster_specifier {
        Some(ClusterSpecifier::Cluster(c)) if c.is_empty() => Err("route.cluster: empty".into()),
        Some(ClusterSpecifier::Cluster(c)) => Ok(Some(vec![WeightedCluster { cluster: c.clone(), weight: 1 }])),
        Some(ClusterSpecifier::WeightedClusters(wc)) => weighted(wc).map(Some).map_err(|e| format!("route.weighted_clusters: {e}")),
        Some(
            ClusterSpecifier::ClusterHeader(_)
            | ClusterSpecifier::ClusterSpecifierPlugin(_)
            | ClusterSpecifier::InlineClusterSpecifierPlugin(_),
        ) => Ok(None),
        None => Err("route: no cluster specifier".into()),
    }
}

fn weighted(wc: &ProtoWeighted) -> Result<Vec<WeightedCluster>, String> {
    let mut total = 0u64;
    let mut out = Vec::with_capacity(wc.clusters.len());
    for (i, c) in wc.clusters.iter().enumerate() {
        if c.name.is_empty() {
            return Err(format!("clusters[{i}].name: empty"));
        }
        let weight = c.weight.map_or(0, |w| w.value);
        total += u64::from(weight);
        if weight > 0 {
            out.push(WeightedCluster { cluster: c.name.clone(), weight });
        }
    }
    if total > u64::from(u32::MAX) {
        return Err(format!("total weight {total} exceeds {}", u32::MAX));
    }
    if out.is_empty() {
        return Err("total weight is zero".into());
    }
    Ok(out)
}

fn route_policies(ra: &ProtoAction, vh_retry: Option<&ProtoRetry>) -> Result<RoutePolicies, String> {
    // As gRPC (A31): grpc_timeout_header_max, else max_stream_duration; we
    // fall back to the route timeout. Zero means no limit.
    let msd = ra.max_stream_duration.as_ref();
    let timeout =
        match (msd.and_then(|m| m.grpc_timeout_header_max.as_ref()), msd.and_then(|m| m.max_stream_duration.as_ref()), &ra.timeout) {
            (Some(d), _, _) => Some(duration(d, "route.max_stream_duration.grpc_timeout_header_max")?),
            (None, Some(d), _) => Some(duration(d, "route.max_stream_duration.max_stream_duration")?),
            (None, None, Some(d)) => Some(duration(d, "route.timeout")?),
            (None, None, None) => None,
        };
    let mut retry = match ra.retry_policy.as_ref().or(vh_retry) {
        Some(rp) => retry_policy(rp).map_err(|e| format!("retry_policy.{e}"))?,
        None => None,
    };
    // Envoy's hedge_on_per_try_timeout: an attempt still out at its per-try timeout gets a hedge beside it,
    // and a failed one is retried. That is A6's hedging with the retry policy's attempts, its per-try timeout
    // as the delay, and its retry_on as the non-fatal codes; the route hedges instead of retrying.
    let delay = retry.as_ref().and_then(|r| r.per_try_timeout);
    let hedge = match (&ra.hedge_policy, delay) {
        (Some(h), Some(delay)) if h.hedge_on_per_try_timeout => {
            if h.initial_requests.is_some_and(|n| n.value > 1) || h.additional_request_chance.is_some() {
                tracing::warn!("hedge_policy.initial_requests and additional_request_chance are not enforced");
            }
            retry.take().map(|retried| {
                // A hedged attempt's failure is non-fatal by its gRPC code only; the HTTP conditions of the
                // retry policy it replaces have no hedging meaning here.
                if retried.http_retry_on.any() {
                    tracing::warn!(conditions = ?retried.http_retry_on.names(), "HTTP retry_on conditions of a hedged route are not enforced");
                }
                HedgePolicy { max_attempts: retried.max_attempts, delay, non_fatal: retried.retry_on }
            })
        }
        (Some(_), _) => {
            tracing::warn!("hedge_policy without hedge_on_per_try_timeout and a per-try timeout has no delay to hedge at; not enforced");
            None
        }
        (None, _) => None,
    };
    let hash = ra
        .hash_policy
        .iter()
        .filter_map(|h| {
            let policy = match &h.policy_specifier {
                Some(PolicySpecifier::Header(h)) if !h.header_name.is_empty() => HashPolicy::Header(h.header_name.to_ascii_lowercase()),
                Some(PolicySpecifier::FilterState(f)) if f.key == "io.grpc.channel_id" => HashPolicy::ChannelId,
                // Other kinds (cookies, source IP, query parameters) never apply to a gRPC client, as in gRPC.
                _ => return None,
            };
            Some(RouteHash { policy, terminal: h.terminal })
        })
        .collect();
    let mirrors = ra
        .request_mirror_policies
        .iter()
        .enumerate()
        .map(|(i, m)| mirror(m).map_err(|e| format!("route.request_mirror_policies[{i}]: {e}")))
        .collect::<Result<_, _>>()?;
    Ok(RoutePolicies { timeout: timeout.filter(|t| !t.is_zero()), retry, hash, hedge, mirrors, ..RoutePolicies::default() })
}

/// A mirror policy: its cluster and share (unset: every call, as Envoy).
fn mirror(m: &ProtoMirror) -> Result<Mirror, String> {
    if !m.cluster_header.is_empty() {
        return Err("cluster_header: not supported (name the cluster)".into());
    }
    if m.cluster.is_empty() {
        return Err("cluster: empty".into());
    }
    let per_million = match &m.runtime_fraction {
        None => 1_000_000,
        Some(f) => fault::per_million(f.default_value.as_ref(), "runtime_fraction.default_value")?,
    };
    if m.trace_sampled.is_some() {
        tracing::warn!(cluster = %m.cluster, "request_mirror_policies.trace_sampled is not enforced");
    }
    Ok(Mirror { cluster: m.cluster.clone(), per_million, shadow_host: !m.disable_shadow_host_suffix_append })
}

/// gRPC's retry rules (A44) for status codes, and Envoy's HTTP conditions (`5xx`, `gateway-error`, `reset`,
/// `connect-failure`, `retriable-status-codes`) beside them (gRPC ignores those; Envoy, and so the sidecar, acts
/// on them); `None` when nothing is retried.
fn retry_policy(rp: &ProtoRetry) -> Result<Option<RetryPolicy>, String> {
    let mut retry_on = Vec::new();
    let mut http = HttpRetryOn::default();
    let mut unsupported = Vec::new();
    for name in rp.retry_on.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        if http.set(name) {
            continue;
        }
        // gRPC spells codes in lowercase with dashes, so `deadline_exceeded` is not one of them.
        let Some(code) = GrpcCode::from_name(name).filter(|c| GrpcCode::RETRYABLE.contains(c) && !name.contains('_')) else {
            unsupported.push(name);
            continue;
        };
        if !retry_on.contains(&code) {
            retry_on.push(code);
        }
    }
    if !unsupported.is_empty() {
        tracing::warn!(?unsupported, "retry_on conditions accepted but not enforced");
    }
    if rp.retry_on.split(',').any(|n| n.trim() == "retriable-status-codes") {
        http.retriable_status_codes = rp.retriable_status_codes.iter().filter_map(|&c| u16::try_from(c).ok()).collect();
    }
    let num_retries = rp.num_retries.map_or(1, |n| n.value);
    if num_retries == 0 {
        return Err("num_retries: must be at least 1".into());
    }
    let back_off = rp.retry_back_off.as_ref();
    let base_backoff = match back_off.and_then(|b| b.base_interval.as_ref()) {
        Some(d) => duration(d, "retry_back_off.base_interval")?,
        None => Duration::from_millis(25),
    };
    if base_backoff.is_zero() {
        return Err("retry_back_off.base_interval: must be greater than zero".into());
    }
    let max_backoff = match back_off.and_then(|b| b.max_interval.as_ref()) {
        Some(d) => duration(d, "retry_back_off.max_interval")?,
        None => base_backoff.saturating_mul(10),
    };
    if max_backoff < base_backoff {
        return Err("retry_back_off.max_interval: must not be less than base_interval".into());
    }
    let per_try_timeout = rp.per_try_timeout.as_ref().map(|d| duration(d, "per_try_timeout")).transpose()?.filter(|d| !d.is_zero());
    if retry_on.is_empty() && !http.any() {
        return Ok(None);
    }
    let max_attempts = num_retries.saturating_add(1).min(MAX_ATTEMPTS);
    Ok(Some(RetryPolicy { max_attempts, retry_on, http_retry_on: http, per_try_timeout, base_backoff, max_backoff }))
}

#[cfg(test)]
#[allow(deprecated)]
mod tests {
    use envoy_types::pb::envoy::config::route::v3::route_action::{HashPolicy as ProtoHash, MaxStreamDuration, hash_policy};
    use envoy_types::pb::envoy::config::route::v3::weighted_cluster::ClusterWeight;
    use envoy_types::pb::envoy::config::route::v3::{
        DirectResponseAction, NonForwardingAction, QueryParameterMatcher, RedirectAction, retry_policy::RetryBackOff,
    };
    use envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher;
    use envoy_types::pb::google::protobuf::{BoolValue, Duration as ProtoDuration, UInt32Value};

    use super::super::{DecodeError, Resource, ResourceType, to_any};
    use super::*;

    #[test]
    fn a_virtual_hosts_typed_hedging_applies_to_routes_without_their_own_retry_or_hedging() {
        use envoy_types::pb::google::protobuf::value::Kind;
        use envoy_types::pb::google::protobuf::{Struct, Value};
        use prost::Message as _;
        let hedging = |attempts: f64| {
            let fields = [("maxAttempts".to_owned(), Value { kind: Some(Kind::NumberValue(attempts)) })];
            let value = Struct { fields: fields.into_iter().collect() };
            let typed = super::super::hedging::TypedStruct { type_url: super::super::hedging::TYPE_URL.into(), value: Some(value) };
            Any { type_url: "type.googleapis.com/xds.type.v3.TypedStruct".into(), value: typed.encode_to_vec() }
        };
        let prefix = |p: &str| Some(ProtoMatch { path_specifier: Some(PathSpecifier::Prefix(p.into())), ..Default::default() });
        let mut retrying = to("c");
        retrying.retry_policy =
            Some(ProtoRetry { retry_on: "unavailable".into(), num_retries: Some(UInt32Value { value: 2 }), ..Default::default() });
        let own_retry = route("retry", prefix("/r"), Some(Action::Route(retrying)));
        let mut own_hedging = route("hedge", prefix("/h"), Some(Action::Route(to("c"))));
        own_hedging.typed_per_filter_config = [(super::super::hedging::FILTER_NAME.to_owned(), hedging(4.0))].into();
        let plain = route("plain", prefix("/"), Some(Action::Route(to("c"))));
        let vh = ProtoVirtualHost {
            name: "vh".into(),
            domains: vec!["*".into()],
            routes: vec![own_retry, own_hedging, plain],
            typed_per_filter_config: [("mesh.hedging".to_owned(), hedging(2.0))].into(),
            ..Default::default()
        };
        let rc = decode_rc(&to_any(&RouteConfiguration { name: "r".into(), virtual_hosts: vec![vh], ..Default::default() })).unwrap();
        let policies = |i: usize| &rc.virtual_hosts[0].routes[i].policies;
        assert!(policies(0).hedge.is_none() && policies(0).retry.is_some(), "a route's own retry policy wins");
        assert_eq!(policies(1).hedge.as_ref().map(|h| h.max_attempts), Some(4), "a route's own hedging wins");
        assert_eq!(policies(2).hedge.as_ref().map(|h| h.max_attempts), Some(2), "the virtual host's applies to the rest");
        assert!(policies(2).retry.is_none());
    }

    #[test]
    fn fault_overrides_come_from_the_route_then_its_virtual_host() {
        use envoy_types::pb::envoy::extensions::filters::http::fault::v3::fault_abort::ErrorType;
        use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{FaultAbort, HttpFault};
        let abort = |code| {
            let f = HttpFault {
                abort: Some(FaultAbort { error_type: Some(ErrorType::GrpcStatus(code)), ..Default::default() }),
                ..Default::default()
            };
            to_any(&f)
        };
        let mut overridden = route(
            "own",
            Some(ProtoMatch { path_specifier: Some(PathSpecifier::Prefix("/a".into())), ..Default::default() }),
            Some(Action::Route(to("c"))),
        );
        let wrapped = FilterConfig { config: Some(abort(8)), ..Default::default() };
        overridden.typed_per_filter_config = [("envoy.filters.http.fault".to_owned(), to_any(&wrapped))].into();
        let plain = route(
            "vh",
            Some(ProtoMatch { path_specifier: Some(PathSpecifier::Prefix("/".into())), ..Default::default() }),
            Some(Action::Route(to("c"))),
        );
        let vh = ProtoVirtualHost {
            name: "vh".into(),
            domains: vec!["*".into()],
            routes: vec![overridden, plain],
            typed_per_filter_config: [("fault".to_owned(), abort(14))].into(),
            ..Default::default()
        };
        let rc = decode_rc(&to_any(&RouteConfiguration { name: "r".into(), virtual_hosts: vec![vh], ..Default::default() })).unwrap();
        let code = |i: usize| rc.virtual_hosts[0].routes[i].policies.fault.as_ref().and_then(|f| f.abort).and_then(|a| a.code);
        assert_eq!(code(0), Some(GrpcCode::ResourceExhausted), "the route's own override, in a FilterConfig");
        assert_eq!(code(1), Some(GrpcCode::Unavailable), "the virtual host's");
    }

    /// A server's non-forwarding routes keep their fault overrides (A39); an RBAC override is refused, naming it.
    #[test]
    fn server_routes_keep_fault_overrides_and_refuse_rbac_overrides() {
        use envoy_types::pb::envoy::config::route::v3::NonForwardingAction;
        use envoy_types::pb::envoy::extensions::filters::http::fault::v3::fault_abort::ErrorType;
        use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{FaultAbort, HttpFault};
        use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::RbacPerRoute;
        let abort = HttpFault {
            abort: Some(FaultAbort { error_type: Some(ErrorType::GrpcStatus(8)), ..Default::default() }),
            ..Default::default()
        };
        let mut server = route("inbound", prefix(""), Some(Action::NonForwardingAction(NonForwardingAction {})));
        server.typed_per_filter_config = [("fault".to_owned(), to_any(&abort))].into();
        let rc = |routes: Vec<ProtoRoute>| {
            let vh = ProtoVirtualHost { name: "vh".into(), domains: vec!["*".into()], routes, ..Default::default() };
            decode_rc(&to_any(&RouteConfiguration { name: "r".into(), virtual_hosts: vec![vh], ..Default::default() }))
        };
        let decoded = rc(vec![server.clone()]).unwrap();
        let fault = decoded.virtual_hosts[0].routes[0].policies.fault.as_ref().and_then(|f| f.abort).and_then(|a| a.code);
        assert_eq!(fault, Some(GrpcCode::ResourceExhausted));
        let wrapped = FilterConfig { config: Some(to_any(&RbacPerRoute { rbac: None })), ..Default::default() };
        server.typed_per_filter_config = [("rbac".to_owned(), to_any(&wrapped))].into();
        let error = format!("{:?}", rc(vec![server]).unwrap_err());
        assert!(error.contains("rbac: RBACPerRoute overrides are not supported"), "{error}");
    }

    fn pd(ms: i64) -> Option<ProtoDuration> {
        Some(ProtoDuration { seconds: ms / 1000, nanos: (ms % 1000) as i32 * 1_000_000 })
    }

    fn prefix(p: &str) -> Option<ProtoMatch> {
        Some(ProtoMatch { path_specifier: Some(PathSpecifier::Prefix(p.into())), ..Default::default() })
    }

    fn to(cluster: &str) -> ProtoAction {
        ProtoAction { cluster_specifier: Some(ClusterSpecifier::Cluster(cluster.into())), ..Default::default() }
    }

    fn route(name: &str, m: Option<ProtoMatch>, action: Option<Action>) -> ProtoRoute {
        ProtoRoute { name: name.into(), r#match: m, action, ..Default::default() }
    }

    fn config(routes: Vec<ProtoRoute>) -> Any {
        let vh = ProtoVirtualHost { name: "vh".into(), domains: vec!["greeter".into(), "*.svc".into()], routes, ..Default::default() };
        to_any(&RouteConfiguration { name: "routes".into(), virtual_hosts: vec![vh], ..Default::default() })
    }

    fn decode_rc(any: &Any) -> Result<RouteConfig, DecodeError> {
        match super::super::decode(ResourceType::RouteConfiguration, any)? {
            Resource::RouteConfiguration(rc) => Ok(rc),
            other => panic!("unexpected {other:?}"),
        }
    }

    fn reason(routes: Vec<ProtoRoute>) -> String {
        let err = decode_rc(&config(routes)).unwrap_err();
        assert_eq!(err.name.as_deref(), Some("routes"), "{err}");
        err.reason
    }

    fn header(name: &str, spec: HeaderMatchSpecifier, invert: bool) -> HeaderMatcher {
        HeaderMatcher { name: name.into(), header_match_specifier: Some(spec), invert_match: invert, ..Default::default() }
    }

    #[test]
    fn good_route_configuration() {
        let mut m = ProtoMatch {
            path_specifier: Some(PathSpecifier::Path("/greet.Greeter/Hello".into())),
            case_sensitive: Some(BoolValue { value: false }),
            headers: vec![
                header("X-Canary", HeaderMatchSpecifier::ExactMatch("1".into()), false),
                header("x-env", HeaderMatchSpecifier::PrefixMatch("prod".into()), true),
                header(
                    "x-user",
                    HeaderMatchSpecifier::StringMatch(StringMatcher {
                        ignore_case: true,
                        match_pattern: Some(MatchPattern::Exact("Bob.".into())),
                    }),
                    false,
                ),
            ],
            ..Default::default()
        };
        let mut action = to("greeter-v2");
        action.max_stream_duration =
            Some(MaxStreamDuration { max_stream_duration: pd(5000), grpc_timeout_header_max: pd(2000), ..Default::default() });
        action.timeout = pd(9000);
        action.retry_policy = Some(ProtoRetry {
            retry_on: "unavailable, cancelled,5xx,unavailable".into(),
            num_retries: Some(UInt32Value { value: 9 }),
            retry_back_off: Some(RetryBackOff { base_interval: pd(100), max_interval: None }),
            ..Default::default()
        });
        action.hash_policy = vec![
            ProtoHash {
                policy_specifier: Some(hash_policy::PolicySpecifier::Header(hash_policy::Header {
                    header_name: "X-User".into(),
                    regex_rewrite: None,
                })),
                terminal: true,
            },
            ProtoHash {
                policy_specifier: Some(hash_policy::PolicySpecifier::FilterState(hash_policy::FilterState {
                    key: "io.grpc.channel_id".into(),
                })),
                ..Default::default()
            },
            ProtoHash {
                policy_specifier: Some(hash_policy::PolicySpecifier::FilterState(hash_policy::FilterState { key: "other".into() })),
                ..Default::default()
            },
        ];
        let weights = |ws: &[(&str, Option<u32>)]| ProtoWeighted {
            clusters: ws
                .iter()
                .map(|(n, w)| ClusterWeight { name: (*n).into(), weight: w.map(|value| UInt32Value { value }), ..Default::default() })
                .collect(),
            ..Default::default()
        };
        let split = ProtoAction {
            cluster_specifier: Some(ClusterSpecifier::WeightedClusters(weights(&[
                ("a", Some(3)),
                ("b", Some(0)),
                ("c", None),
                ("d", Some(7)),
            ]))),
            timeout: pd(1500),
            ..Default::default()
        };
        let regex = ProtoMatch {
            path_specifier: Some(PathSpecifier::SafeRegex(RegexMatcher { regex: "/a\\.B/[CD]".into(), engine_type: None })),
            ..Default::default()
        };
        let routes = vec![
            route("exact", Some(m.clone()), Some(Action::Route(action))),
            route("split", Some(regex), Some(Action::Route(split))),
            route(
                "header",
                prefix("/"),
                Some(Action::Route(ProtoAction {
                    cluster_specifier: Some(ClusterSpecifier::ClusterHeader("x-c".into())),
                    ..Default::default()
                })),
            ),
            route("redirect", prefix("/"), Some(Action::Redirect(RedirectAction::default()))),
            route("direct", prefix("/"), Some(Action::DirectResponse(DirectResponseAction::default()))),
            route(
                "query",
                Some(ProtoMatch { query_parameters: vec![QueryParameterMatcher::default()], ..prefix("/").unwrap() }),
                Some(Action::Route(to("x"))),
            ),
            route("fail", prefix(""), Some(Action::NonForwardingAction(NonForwardingAction {}))),
        ];
        let rc = decode_rc(&config(routes)).unwrap();
        assert_eq!(rc.name, "routes");
        let vh = &rc.virtual_hosts[0];
        assert_eq!(vh.domains, ["greeter", "*.svc"]);
        assert_eq!(vh.routes.len(), 3, "{:?}", vh.routes);

        let r = &vh.routes[0];
        assert!(matches!(&r.matcher.path, PathMatch::Exact(p) if p == "/greet.Greeter/Hello"));
        assert!(!r.matcher.case_sensitive);
        assert_eq!(r.matcher.headers[0].name, "x-canary");
        assert!(r.matcher.headers[1].invert);
        let hdr = |n: &str| match n {
            "x-canary" => Some("1"),
            "x-user" => Some("bOB."),
            _ => None,
        };
        assert!(r.matcher.matches("/GREET.greeter/hello", hdr));
        assert!(!r.matcher.matches("/GREET.greeter/hello", |n| if n == "x-user" { Some("bobx") } else { hdr(n) }));
        assert_eq!(r.action, RouteAction::Clusters(vec![WeightedCluster { cluster: "greeter-v2".into(), weight: 1 }]));
        assert_eq!(r.policies.timeout, Some(Duration::from_secs(2)));
        let retry = r.policies.retry.as_ref().unwrap();
        assert_eq!(retry.retry_on, [GrpcCode::Unavailable, GrpcCode::Cancelled]);
        assert_eq!(retry.http_retry_on.names(), ["5xx"], "Envoy's HTTP conditions are kept beside the codes");
        assert_eq!(retry.max_attempts, 5);
        assert_eq!((retry.base_backoff, retry.max_backoff), (Duration::from_millis(100), Duration::from_secs(1)));
        assert_eq!(
            r.policies.hash,
            [
                RouteHash { policy: HashPolicy::Header("x-user".into()), terminal: true },
                RouteHash { policy: HashPolicy::ChannelId, terminal: false }
            ]
        );

        let r = &vh.routes[1];
        assert!(r.matcher.matches("/a.B/D", |_| None) && !r.matcher.matches("/a.B/E", |_| None));
        let want = vec![WeightedCluster { cluster: "a".into(), weight: 3 }, WeightedCluster { cluster: "d".into(), weight: 7 }];
        assert_eq!(r.action, RouteAction::Clusters(want));
        assert_eq!(r.policies.timeout, Some(Duration::from_millis(1500)));
        assert_eq!(r.policies.retry, None);
        assert_eq!(vh.routes[2].action, RouteAction::NonForwarding);

        // The virtual host's retry policy applies to routes without one.
        m.headers.clear();
        let vh_retry = ProtoRetry { retry_on: "internal".into(), ..Default::default() };
        let vh = ProtoVirtualHost {
            domains: vec!["*".into()],
            routes: vec![route("r", Some(m), Some(Action::Route(to("c"))))],
            retry_policy: Some(vh_retry),
            ..Default::default()
        };
        let rc = convert(&RouteConfiguration { virtual_hosts: vec![vh], ..Default::default() }).unwrap();
        let retry = rc.virtual_hosts[0].routes[0].policies.retry.clone().unwrap();
        assert_eq!((retry.retry_on, retry.max_attempts, retry.max_backoff), (vec![GrpcCode::Internal], 2, Duration::from_millis(250)));
    }

    #[test]
    fn rejections() {
        let ok = || Some(Action::Route(to("c")));
        assert!(reason(vec![route("r1", None, ok())]).contains("routes[0] (\"r1\"): match: missing"));
        assert!(reason(vec![route("r1", prefix("/"), None)]).contains("routes[0] (\"r1\"): action: missing"));
        let bad_regex = ProtoMatch {
            path_specifier: Some(PathSpecifier::SafeRegex(RegexMatcher { regex: "(".into(), engine_type: None })),
            ..Default::default()
        };
        assert!(reason(vec![route("re", Some(bad_regex), ok())]).contains("(\"re\"): match.safe_regex"));
        let bad_header = ProtoMatch {
            headers: vec![header("h", HeaderMatchSpecifier::SafeRegexMatch(RegexMatcher { regex: "[".into(), engine_type: None }), false)],
            ..prefix("/").unwrap()
        };
        assert!(reason(vec![route("h", Some(bad_header), ok())]).contains("match.headers[0] (\"h\"): safe_regex_match"));
        assert!(reason(vec![route("empty", prefix("/"), Some(Action::Route(to(""))))]).contains("route.cluster: empty"));
        assert!(reason(vec![route("none", prefix("/"), Some(Action::Route(ProtoAction::default())))]).contains("no cluster specifier"));

        let weighted = |ws: Vec<u32>| {
            let clusters = ws
                .into_iter()
                .enumerate()
                .map(|(i, w)| ClusterWeight { name: format!("c{i}"), weight: Some(UInt32Value { value: w }), ..Default::default() })
                .collect();
            let action = ProtoAction {
                cluster_specifier: Some(ClusterSpecifier::WeightedClusters(ProtoWeighted { clusters, ..Default::default() })),
                ..Default::default()
            };
            vec![route("w", prefix("/"), Some(Action::Route(action)))]
        };
        assert!(reason(weighted(vec![0, 0])).contains("weighted_clusters: total weight is zero"));
        assert!(reason(weighted(vec![u32::MAX, 1])).contains("weighted_clusters: total weight 4294967296 exceeds"));
        assert!(decode_rc(&config(weighted(vec![u32::MAX, 0]))).is_ok());

        let retry = |rp: ProtoRetry| {
            let mut action = to("c");
            action.retry_policy = Some(rp);
            vec![route("rt", prefix("/"), Some(Action::Route(action)))]
        };
        let zero_base = ProtoRetry {
            retry_on: "unavailable".into(),
            retry_back_off: Some(RetryBackOff { base_interval: pd(0), max_interval: None }),
            ..Default::default()
        };
        assert!(reason(retry(zero_base)).contains("retry_policy.retry_back_off.base_interval"));
        let zero_retries = ProtoRetry { retry_on: "unavailable".into(), num_retries: Some(UInt32Value { value: 0 }), ..Default::default() };
        assert!(reason(retry(zero_retries)).contains("retry_policy.num_retries"));

        let vh = ProtoVirtualHost { name: "nodomain".into(), ..Default::default() };
        let err =
            decode_rc(&to_any(&RouteConfiguration { name: "routes".into(), virtual_hosts: vec![vh], ..Default::default() })).unwrap_err();
        assert!(err.reason.contains("virtual_hosts[0] (\"nodomain\"): domains: empty"), "{err}");
    }

    #[test]
    fn http_retry_conditions_alone_make_a_policy() {
        let rp = ProtoRetry {
            retry_on: "gateway-error, reset,connect-failure,retriable-status-codes,retriable-4xx".into(),
            retriable_status_codes: vec![409, 429],
            ..Default::default()
        };
        let retry = retry_policy(&rp).unwrap().expect("a policy of HTTP conditions only");
        assert!(retry.retry_on.is_empty());
        let http = &retry.http_retry_on;
        assert_eq!(http.names(), ["gateway-error", "reset", "connect-failure", "retriable-status-codes"]);
        assert_eq!(http.retriable_status_codes, [409, 429]);
        assert!(http.retries_status(503) && http.retries_status(409) && !http.retries_status(500));
        let none = ProtoRetry { retry_on: "retriable-4xx".into(), ..Default::default() };
        assert!(retry_policy(&none).unwrap().is_none(), "nothing this client acts on: no policy");
    }

    #[test]
    fn mirrors_ranges_and_runtime_fractions_are_read_and_bad_ones_rejected() {
        use envoy_types::pb::envoy::config::core::v3::RuntimeFractionalPercent;
        use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, Int64Range, fractional_percent::DenominatorType};
        let fraction = |numerator, denominator: DenominatorType| {
            Some(RuntimeFractionalPercent {
                default_value: Some(FractionalPercent { numerator, denominator: denominator as i32 }),
                ..Default::default()
            })
        };
        let mut action = to("c");
        action.request_mirror_policies = vec![
            ProtoMirror { cluster: "shadow".into(), runtime_fraction: fraction(25, DenominatorType::Hundred), ..Default::default() },
            ProtoMirror { cluster: "all".into(), disable_shadow_host_suffix_append: true, ..Default::default() },
        ];
        let mut m = prefix("/").unwrap();
        m.runtime_fraction = fraction(10, DenominatorType::TenThousand);
        m.headers = vec![header("x-n", HeaderMatchSpecifier::RangeMatch(Int64Range { start: 1, end: 5 }), false)];
        let rc = decode_rc(&config(vec![route("r", Some(m.clone()), Some(Action::Route(action.clone())))])).unwrap();
        let r = &rc.virtual_hosts[0].routes[0];
        assert_eq!(
            r.policies.mirrors,
            [
                Mirror { cluster: "shadow".into(), per_million: 250_000, shadow_host: true },
                Mirror { cluster: "all".into(), per_million: 1_000_000, shadow_host: false },
            ]
        );
        assert_eq!(r.matcher.fraction, Some(1_000));
        assert_eq!(r.matcher.headers[0].matcher, StringMatch::Range { start: 1, end: 5 });

        let mut by_header = action.clone();
        by_header.request_mirror_policies = vec![ProtoMirror { cluster_header: "x-shadow".into(), ..Default::default() }];
        let why = reason(vec![route("r", prefix("/"), Some(Action::Route(by_header)))]);
        assert!(why.contains("request_mirror_policies[0]: cluster_header"), "{why}");
        let mut empty = m.clone();
        empty.headers = vec![header("x-n", HeaderMatchSpecifier::RangeMatch(Int64Range { start: 5, end: 5 }), false)];
        let why = reason(vec![route("r", Some(empty), Some(Action::Route(to("c"))))]);
        assert!(why.contains("range_match: start 5 is not below end 5"), "{why}");
    }

    #[test]
    fn escaping_keeps_literals_literal() {
        let re = regex(&format!("(?i){}", escape("a.b*(c)[d]{1}^$|+?\\#&-~ e"))).unwrap();
        assert!(re.is_full_match("A.B*(C)[D]{1}^$|+?\\#&-~ E"));
        assert!(!re.is_full_match("aXb*(c)[d]{1}^$|+?\\#&-~ e"));
    }
}
