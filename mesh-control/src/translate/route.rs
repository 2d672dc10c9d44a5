//! RDS.

use envoy_types::pb::envoy::config::core::v3::RuntimeFractionalPercent;
use envoy_types::pb::envoy::config::route::v3::header_matcher::HeaderMatchSpecifier;
use envoy_types::pb::envoy::config::route::v3::route_action::hash_policy::{Header as HashHeader, PolicySpecifier};
use envoy_types::pb::envoy::config::route::v3::route_action::{
    ClusterSpecifier, HashPolicy as PbHashPolicy, MaxStreamDuration, RequestMirrorPolicy,
};
use envoy_types::pb::envoy::config::route::v3::route_match::PathSpecifier;
use envoy_types::pb::envoy::config::route::v3::weighted_cluster::ClusterWeight;
use envoy_types::pb::envoy::config::route::v3::{
    FilterConfig, HeaderMatcher, HedgePolicy as PbHedgePolicy, RetryPolicy as PbRetryPolicy, Route, RouteAction, RouteConfiguration,
    RouteMatch, VirtualHost, WeightedCluster, retry_policy, route,
};
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
use envoy_types::pb::envoy::r#type::matcher::v3::{RegexMatcher, StringMatcher};
use envoy_types::pb::envoy::r#type::v3::fractional_percent::DenominatorType;
use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, Int64Range};
use envoy_types::pb::google::protobuf::value::Kind;
use envoy_types::pb::google::protobuf::{Any, ListValue, Struct, UInt32Value, Value};
use mesh_core::model::{PathMatch, StringMatch};
use mesh_core::policy::{HashPolicy, HedgePolicy, LbPolicy, RetryPolicy};

use super::duration;
use crate::mesh::Service;

pub(super) fn route_config(service: &Service) -> RouteConfiguration {
    let routes = service.routes.iter().enumerate().map(|(i, r)| route(service, i, r)).collect();
    RouteConfiguration {
        name: service.name.clone(),
        virtual_hosts: vec![VirtualHost { name: service.name.clone(), domains: vec!["*".to_owned()], routes, ..Default::default() }],
        ..Default::default()
    }
}

/// The `i`th route of `service`, named `<service>/<i>` (the name metrics and logs give it).
fn route(service: &Service, i: usize, r: &crate::mesh::Route) -> Route {
    let path_specifier = match &r.matches.path {
        PathMatch::Prefix(p) => PathSpecifier::Prefix(p.clone()),
        PathMatch::Exact(p) => PathSpecifier::Path(p.clone()),
        PathMatch::Regex(re) => PathSpecifier::SafeRegex(regex(re.as_str())),
    };
    let headers = r
        .matches
        .headers
        .iter()
        .map(|h| {
            let pattern = |p| HeaderMatchSpecifier::StringMatch(StringMatcher { match_pattern: Some(p), ignore_case: false });
            let spec = match &h.matcher {
                StringMatch::Present(p) => HeaderMatchSpecifier::PresentMatch(*p),
                StringMatch::Exact(v) => pattern(MatchPattern::Exact(v.clone())),
                StringMatch::Prefix(v) => pattern(MatchPattern::Prefix(v.clone())),
                StringMatch::Suffix(v) => pattern(MatchPattern::Suffix(v.clone())),
                StringMatch::Contains(v) => pattern(MatchPattern::Contains(v.clone())),
                StringMatch::Regex(re) => pattern(MatchPattern::SafeRegex(regex(re.as_str()))),
                StringMatch::Range { start, end } => HeaderMatchSpecifier::RangeMatch(Int64Range { start: *start, end: *end }),
            };
            HeaderMatcher { name: h.name.clone(), invert_match: h.invert, header_match_specifier: Some(spec), ..Default::default() }
        })
        .collect();
    let cluster_specifier = match r.split.as_slice() {
        [(cluster, _)] => ClusterSpecifier::Cluster(cluster.clone()),
        split => ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: split
                .iter()
                .map(|(name, weight)| ClusterWeight {
                    name: name.clone(),
                    weight: Some(UInt32Value { value: *weight }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
    };
    let timeout = r.timeout.or(service.timeout);
    let hash_policy = match &service.lb {
        LbPolicy::RingHash { hash: HashPolicy::Header(name), .. } => vec![PbHashPolicy {
            policy_specifier: Some(PolicySpecifier::Header(HashHeader { header_name: name.clone(), ..Default::default() })),
            ..Default::default()
        }],
        _ => Vec::new(),
    };
    let action = RouteAction {
        cluster_specifier: Some(cluster_specifier),
        timeout: timeout.map(duration),
        max_stream_duration: timeout.map(|t| MaxStreamDuration { max_stream_duration: Some(duration(t)), ..Default::default() }),
        // One attempt means no retries; gRPC rejects a retry policy with num_retries 0. A hedging service sends
        // a retry policy whose per-try timeout is the hedge delay, hedged on that timeout (Envoy's form).
        retry_policy: match &service.hedge {
            Some(h) => Some(retry(&RetryPolicy {
                max_attempts: h.max_attempts,
                retry_on: h.non_fatal.clone(),
                per_try_timeout: Some(h.delay),
                ..RetryPolicy::default()
            })),
            None => r.retry.as_ref().or(service.retry.as_ref()).filter(|p| p.max_attempts > 1).map(retry),
        },
        hedge_policy: service.hedge.as_ref().map(|_| PbHedgePolicy { hedge_on_per_try_timeout: true, ..Default::default() }),
        hash_policy,
        request_mirror_policies: r
            .mirror
            .iter()
            .map(|(cluster, percent)| RequestMirrorPolicy {
                cluster: cluster.clone(),
                runtime_fraction: Some(RuntimeFractionalPercent {
                    default_value: Some(FractionalPercent { numerator: *percent, denominator: DenominatorType::Hundred as i32 }),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    Route {
        name: format!("{}/{i}", service.name),
        r#match: Some(RouteMatch { path_specifier: Some(path_specifier), headers, ..Default::default() }),
        action: Some(route::Action::Route(action)),
        // A6's delay-based hedging as the mesh's typed extension (optional: Envoy and gRPC skip it and use the
        // hedge-on-per-try-timeout form above).
        typed_per_filter_config: service.hedge.as_ref().map(hedging).into_iter().collect(),
        ..Default::default()
    }
}

/// `xds.type.v3.TypedStruct` (not in envoy-types): a config of type `type_url` as a JSON-shaped struct.
#[derive(Clone, PartialEq, prost::Message)]
struct TypedStruct {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(message, optional, tag = "2")]
    value: Option<Struct>,
}

/// A6's hedging policy as the mesh's typed route extension: `typed_per_filter_config["mesh.hedging"]`, a
/// `FilterConfig` marked optional (so Envoy and gRPC skip it) around a `TypedStruct` of type
/// `type.mesh.dev/mesh.policy.v1.HedgingPolicy` with gRPC's service-config fields (xds-client's `hedging`
/// module reads it; the translation tests decode it there).
fn hedging(policy: &HedgePolicy) -> (String, Any) {
    use prost::Message as _;
    let number = |n: f64| Value { kind: Some(Kind::NumberValue(n)) };
    let string = |s: String| Value { kind: Some(Kind::StringValue(s)) };
    let codes = policy.non_fatal.iter().map(|c| string(c.name().to_owned())).collect();
    let fields = [
        ("maxAttempts".to_owned(), number(f64::from(policy.max_attempts))),
        ("hedgingDelay".to_owned(), string(format!("{}s", policy.delay.as_secs_f64()))),
        ("nonFatalStatusCodes".to_owned(), Value { kind: Some(Kind::ListValue(ListValue { values: codes })) }),
    ];
    let typed = TypedStruct {
        type_url: "type.mesh.dev/mesh.policy.v1.HedgingPolicy".to_owned(),
        value: Some(Struct { fields: fields.into_iter().collect() }),
    };
    let inner = Any { type_url: "type.googleapis.com/xds.type.v3.TypedStruct".to_owned(), value: typed.encode_to_vec() };
    let wrapped = FilterConfig { config: Some(inner), is_optional: true, disabled: false };
    let any = Any { type_url: "type.googleapis.com/envoy.config.route.v3.FilterConfig".to_owned(), value: wrapped.encode_to_vec() };
    ("mesh.hedging".to_owned(), any)
}

fn regex(pattern: &str) -> RegexMatcher {
    RegexMatcher { regex: pattern.to_owned(), ..Default::default() }
}

/// gRPC status names as Envoy's and gRPC's `retry_on` spell them (`UNAVAILABLE` → `unavailable`).
fn retry(r: &RetryPolicy) -> PbRetryPolicy {
    PbRetryPolicy {
        retry_on: r
            .retry_on
            .iter()
            .map(|c| c.retry_on_name())
            .chain(r.http_retry_on.names().into_iter().map(str::to_owned))
            .collect::<Vec<_>>()
            .join(","),
        retriable_status_codes: r.http_retry_on.retriable_status_codes.iter().map(|&c| u32::from(c)).collect(),
        num_retries: Some(UInt32Value { value: r.max_attempts.saturating_sub(1) }),
        per_try_timeout: r.per_try_timeout.map(duration),
        retry_back_off: Some(retry_policy::RetryBackOff {
            base_interval: Some(duration(r.base_backoff)),
            max_interval: Some(duration(r.max_backoff)),
        }),
        ..Default::default()
    }
}
