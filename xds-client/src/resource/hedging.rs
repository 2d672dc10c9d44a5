//! gRPC A6's hedging policy as a typed extension on a route: Envoy's route has no delay-based hedging (its
//! `hedge_on_per_try_timeout` hedges at the per-try timeout), and gRPC's service config is not sent over xDS,
//! so the mesh carries the policy in the route's `typed_per_filter_config` under [`FILTER_NAME`]: a
//! `TypedStruct` ([`TYPE_URL`]) whose fields are the service config's `hedgingPolicy` (`maxAttempts`,
//! `hedgingDelay`, `nonFatalStatusCodes`), wrapped in a `FilterConfig` with `is_optional` so that clients that do
//! not know it (Envoy, gRPC) skip it. A malformed one is refused, naming the field.

use std::time::Duration;

use envoy_types::pb::envoy::config::route::v3::FilterConfig;
use envoy_types::pb::google::protobuf::value::Kind;
use envoy_types::pb::google::protobuf::{Any, Struct};
use mesh_core::GrpcCode;
use mesh_core::policy::HedgePolicy;
use prost::Message;

/// The `typed_per_filter_config` key the policy goes under.
pub const FILTER_NAME: &str = "mesh.hedging";
/// The `TypedStruct`'s type URL.
pub const TYPE_URL: &str = "type.mesh.dev/mesh.policy.v1.HedgingPolicy";

/// `xds.type.v3.TypedStruct`: a config of type `type_url` as a JSON-shaped struct.
#[derive(Clone, PartialEq, Message)]
pub struct TypedStruct {
    /// The config's type.
    #[prost(string, tag = "1")]
    pub type_url: String,
    /// The config.
    #[prost(message, optional, tag = "2")]
    pub value: Option<Struct>,
}

const TYPED_STRUCT: &str = "xds.type.v3.TypedStruct";
const UDPA_TYPED_STRUCT: &str = "udpa.type.v1.TypedStruct";

/// The hedging policy among a route's `typed_per_filter_config`, if it has one (found by its type, bare or in
/// a `FilterConfig`; a disabled `FilterConfig` has none).
pub fn decode(configs: &std::collections::HashMap<String, Any>) -> Result<Option<HedgePolicy>, String> {
    for (name, any) in configs {
        let inner = match super::type_name(&any.type_url) {
            super::route::FILTER_CONFIG => {
                match FilterConfig::decode(any.value.as_slice()).map_err(|e| format!("{name}: malformed FilterConfig: {e}"))? {
                    FilterConfig { config: Some(inner), disabled: false, .. } => inner,
                    _ => continue,
                }
            }
            _ => any.clone(),
        };
        if !matches!(super::type_name(&inner.type_url), TYPED_STRUCT | UDPA_TYPED_STRUCT) {
            continue;
        }
        let typed = TypedStruct::decode(inner.value.as_slice()).map_err(|e| format!("{name}: malformed TypedStruct: {e}"))?;
        if typed.type_url.rsplit('/').next() != TYPE_URL.rsplit('/').next() {
            continue;
        }
        return policy(&typed.value.unwrap_or_default()).map(Some).map_err(|e| format!("{name}: {e}"));
    }
    Ok(None)
}

/// A6's rules: 2 to 5 attempts (more are capped at 5, as gRPC does), a non-negative delay, known status codes.
fn policy(config: &Struct) -> Result<HedgePolicy, String> {
    let field = |key: &str| config.fields.get(key).and_then(|v| v.kind.as_ref());
    let max_attempts = match field("maxAttempts") {
        Some(Kind::NumberValue(n)) if *n >= 2.0 && n.fract() == 0.0 => n.min(5.0) as u32,
        _ => return Err("maxAttempts: a whole number of at least 2".into()),
    };
    let delay = match field("hedgingDelay") {
        None => Duration::ZERO,
        Some(Kind::StringValue(text)) => text
            .strip_suffix('s')
            .and_then(|secs| secs.parse::<f64>().ok())
            .filter(|secs| *secs >= 0.0)
            .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
            .ok_or_else(|| format!("hedgingDelay: {text:?} is not a duration like \"0.05s\""))?,
        Some(_) => return Err("hedgingDelay: a duration string like \"0.05s\"".into()),
    };
    let non_fatal = match field("nonFatalStatusCodes") {
        None => Vec::new(),
        Some(Kind::ListValue(list)) => list
            .values
            .iter()
            .map(|v| match &v.kind {
                Some(Kind::StringValue(name)) => {
                    GrpcCode::from_name(name).ok_or_else(|| format!("nonFatalStatusCodes: unknown code {name:?}"))
                }
                Some(Kind::NumberValue(n)) if n.fract() == 0.0 => {
                    GrpcCode::from_i32(*n as i32).ok_or_else(|| format!("nonFatalStatusCodes: unknown code {n}"))
                }
                _ => Err("nonFatalStatusCodes: codes by name or number".to_owned()),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err("nonFatalStatusCodes: a list".into()),
    };
    Ok(HedgePolicy { max_attempts, delay, non_fatal })
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::{ListValue, Value};

    #[test]
    fn a_wrapped_or_bare_policy_is_read_and_bad_ones_are_refused_by_field() {
        let typed = |fields: Vec<(&str, Value)>| {
            let value = Struct { fields: fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect() };
            let typed = TypedStruct { type_url: TYPE_URL.to_owned(), value: Some(value) };
            Any { type_url: format!("type.googleapis.com/{TYPED_STRUCT}"), value: typed.encode_to_vec() }
        };
        let with = |fields: Vec<(&str, Value)>| decode(&[("bare".to_owned(), typed(fields))].into_iter().collect());
        let n = |n: f64| Value { kind: Some(Kind::NumberValue(n)) };
        let s = |s: &str| Value { kind: Some(Kind::StringValue(s.to_owned())) };
        let list = |values: Vec<Value>| Value { kind: Some(Kind::ListValue(ListValue { values })) };

        // Wrapped in an optional FilterConfig, as mesh-control writes it (its translation tests decode its own).
        let fields =
            vec![("maxAttempts", n(3.0)), ("hedgingDelay", s("0.04s")), ("nonFatalStatusCodes", list(vec![s("UNAVAILABLE"), n(4.0)]))];
        let wrapped = FilterConfig { config: Some(typed(fields)), is_optional: true, disabled: false };
        let any = Any { type_url: format!("type.googleapis.com/{}", super::super::route::FILTER_CONFIG), value: wrapped.encode_to_vec() };
        let policy = HedgePolicy {
            max_attempts: 3,
            delay: Duration::from_millis(40),
            non_fatal: vec![GrpcCode::Unavailable, GrpcCode::DeadlineExceeded],
        };
        assert_eq!(decode(&[(FILTER_NAME.to_owned(), any)].into_iter().collect()).unwrap(), Some(policy));
        assert_eq!(decode(&Default::default()).unwrap(), None);
        let capped = with(vec![("maxAttempts", n(9.0)), ("hedgingDelay", s("0.5s"))]).unwrap().unwrap();
        assert_eq!((capped.max_attempts, capped.delay), (5, Duration::from_millis(500)), "capped at 5, as gRPC");
        for (fields, named) in [
            (vec![("maxAttempts", n(1.0))], "maxAttempts"),
            (vec![("maxAttempts", n(2.0)), ("hedgingDelay", s("50ms"))], "hedgingDelay"),
            (vec![("maxAttempts", n(2.0)), ("nonFatalStatusCodes", list(vec![s("NOPE")]))], "unknown code"),
        ] {
            let error = with(fields).unwrap_err();
            assert!(error.starts_with("bare: ") && error.contains(named), "{error}");
        }
        // Another TypedStruct (someone else's extension) is not ours.
        let other = TypedStruct { type_url: "type.example.com/Other".into(), value: None };
        let any = Any { type_url: format!("type.googleapis.com/{TYPED_STRUCT}"), value: other.encode_to_vec() };
        assert_eq!(decode(&[("other".to_owned(), any)].into_iter().collect()).unwrap(), None);
    }
}
