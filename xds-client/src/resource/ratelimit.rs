//! The local rate limit filter's configuration (`envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit`)
//! in a client's listener: one token bucket for the target's calls.

use envoy_types::pb::envoy::config::core::v3::RuntimeFractionalPercent;
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::r#type::v3::fractional_percent::DenominatorType;
use envoy_types::pb::google::protobuf::Any;
use mesh_core::policy::RateLimit;
use prost::Message;

use super::duration;

/// Message name of the local rate limit filter's configuration.
pub(crate) const LOCAL_RATE_LIMIT: &str = "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";

/// Decodes and validates a `LocalRateLimit` carried in `any`: `None` when it limits nothing (no token bucket,
/// or not enabled or not enforced, which are Envoy's defaults).
pub(crate) fn decode(any: &Any) -> Result<Option<RateLimit>, String> {
    let l = LocalRateLimit::decode(any.value.as_slice()).map_err(|e| format!("malformed LocalRateLimit: {e}"))?;
    let Some(bucket) = &l.token_bucket else { return Ok(None) };
    let enabled = share(l.filter_enabled.as_ref());
    let enforced = share(l.filter_enforced.as_ref());
    if enabled == 0 || enforced == 0 {
        return Ok(None);
    }
    let fill_interval =
        duration(bucket.fill_interval.as_ref().ok_or("token_bucket.fill_interval: missing")?, "token_bucket.fill_interval")?;
    let limit = RateLimit { max_tokens: bucket.max_tokens, tokens_per_fill: bucket.tokens_per_fill.map_or(1, |v| v.value), fill_interval };
    limit.validate().map_err(|e| match e {
        mesh_core::Error::InvalidPolicy { field, reason, .. } => format!("token_bucket.{field}: {reason}"),
        other => other.to_string(),
    })?;
    let mut unsupported = Vec::new();
    if enabled < 1_000_000 || enforced < 1_000_000 {
        unsupported.push("filter_enabled/filter_enforced below 100% (every call is limited)");
    }
    if !l.descriptors.is_empty() || !l.rate_limits.is_empty() {
        unsupported.push("descriptors");
    }
    if !unsupported.is_empty() {
        tracing::warn!(?unsupported, "LocalRateLimit fields accepted but not enforced");
    }
    Ok(Some(limit))
}

/// A runtime fraction's default share, in parts per million (unset: 0, as Envoy).
fn share(p: Option<&RuntimeFractionalPercent>) -> u32 {
    let Some(p) = p.and_then(|p| p.default_value.as_ref()) else { return 0 };
    let scale = match DenominatorType::try_from(p.denominator) {
        Ok(DenominatorType::Hundred) => 10_000,
        Ok(DenominatorType::TenThousand) => 100,
        Ok(DenominatorType::Million) | Err(_) => 1,
    };
    p.numerator.saturating_mul(scale).min(1_000_000)
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, TokenBucket};
    use envoy_types::pb::google::protobuf::{Duration as ProtoDuration, UInt32Value};

    use super::super::to_any;
    use super::*;

    fn always() -> Option<RuntimeFractionalPercent> {
        let value = FractionalPercent { numerator: 100, denominator: DenominatorType::Hundred as i32 };
        Some(RuntimeFractionalPercent { default_value: Some(value), runtime_key: String::new() })
    }

    fn limit(max_tokens: u32, fill_ms: i32) -> LocalRateLimit {
        LocalRateLimit {
            token_bucket: Some(TokenBucket {
                max_tokens,
                tokens_per_fill: Some(UInt32Value { value: 10 }),
                fill_interval: Some(ProtoDuration { seconds: 0, nanos: fill_ms * 1_000_000 }),
            }),
            filter_enabled: always(),
            filter_enforced: always(),
            ..Default::default()
        }
    }

    #[test]
    fn an_enabled_and_enforced_bucket_is_read() {
        let read = decode(&to_any(&limit(20, 500))).unwrap();
        assert_eq!(read, Some(RateLimit { max_tokens: 20, tokens_per_fill: 10, fill_interval: std::time::Duration::from_millis(500) }));
        let disabled = LocalRateLimit { filter_enabled: None, ..limit(20, 500) };
        assert_eq!(decode(&to_any(&disabled)).unwrap(), None, "Envoy's default: not enabled");
        let not_enforced = LocalRateLimit { filter_enforced: None, ..limit(20, 500) };
        assert_eq!(decode(&to_any(&not_enforced)).unwrap(), None, "enabled but not enforced: counts only");
        assert!(decode(&to_any(&limit(0, 500))).unwrap_err().contains("token_bucket.max_tokens"));
    }
}
