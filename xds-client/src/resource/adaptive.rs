//! The adaptive concurrency filter's configuration
//! (`envoy.extensions.filters.http.adaptive_concurrency.v3.AdaptiveConcurrency`) in a client's listener: its
//! gradient controller, which the client runs per destination cluster.

use envoy_types::pb::envoy::extensions::filters::http::adaptive_concurrency::v3::AdaptiveConcurrency as ProtoAdaptive;
use envoy_types::pb::envoy::extensions::filters::http::adaptive_concurrency::v3::adaptive_concurrency::ConcurrencyControllerConfig;
use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf::Any;
use mesh_core::GrpcCode;
use mesh_core::policy::{AdaptiveConcurrency, MinRtt};
use prost::Message;

use super::duration;

/// Message name of the adaptive concurrency filter's configuration.
pub(crate) const ADAPTIVE_CONCURRENCY: &str = "envoy.extensions.filters.http.adaptive_concurrency.v3.AdaptiveConcurrency";

/// Decodes and validates an `AdaptiveConcurrency` carried in `any`: `None` when it is turned off
/// (`enabled` with a default value of false).
pub(crate) fn decode(any: &Any) -> Result<Option<AdaptiveConcurrency>, String> {
    let a = ProtoAdaptive::decode(any.value.as_slice()).map_err(|e| format!("malformed AdaptiveConcurrency: {e}"))?;
    if a.enabled.as_ref().is_some_and(|f| f.default_value.as_ref().is_some_and(|v| !v.value)) {
        return Ok(None);
    }
    let Some(ConcurrencyControllerConfig::GradientControllerConfig(g)) = a.concurrency_controller_config else {
        return Err("concurrency_controller_config: missing (the gradient controller is the only one)".into());
    };
    let defaults = AdaptiveConcurrency::default();
    let percent = |p: Option<&Percent>, field: &str, default: f64| -> Result<f64, String> {
        match p {
            None => Ok(default),
            Some(p) if (0.0..=100.0).contains(&p.value) => Ok(p.value / 100.0),
            Some(p) => Err(format!("{field}: {} is not a percent from 0 to 100", p.value)),
        }
    };
    let percentile = percent(g.sample_aggregate_percentile.as_ref(), "sample_aggregate_percentile", defaults.percentile)?;
    let limits = g.concurrency_limit_params.as_ref().ok_or("concurrency_limit_params: missing")?;
    let update_interval = duration(
        limits.concurrency_update_interval.as_ref().ok_or("concurrency_limit_params.concurrency_update_interval: missing")?,
        "concurrency_limit_params.concurrency_update_interval",
    )?;
    if update_interval.is_zero() {
        return Err("concurrency_limit_params.concurrency_update_interval: must be more than 0".into());
    }
    let max_limit = limits.max_concurrency_limit.map_or(defaults.max_limit, |v| v.value);
    let rtt = g.min_rtt_calc_params.as_ref().ok_or("min_rtt_calc_params: missing")?;
    let min_concurrency = rtt.min_concurrency.map_or(defaults.min_concurrency, |v| v.value);
    let min_limit = limits.min_concurrency_limit.map_or(min_concurrency, |v| v.value);
    if max_limit == 0 || min_concurrency == 0 || min_limit == 0 || min_limit > max_limit {
        return Err(format!(
            "concurrency limits: min_concurrency {min_concurrency}, min_concurrency_limit {min_limit} and max_concurrency_limit \
             {max_limit} must be at least 1, the minimum no more than the maximum"
        ));
    }
    let interval = rtt.interval.as_ref().map(|d| duration(d, "min_rtt_calc_params.interval")).transpose()?.unwrap_or_default();
    let min_rtt = if interval.is_zero() {
        let fixed = rtt.fixed_value.as_ref().ok_or("min_rtt_calc_params.fixed_value: required when interval is zero or unset")?;
        MinRtt::Fixed(duration(fixed, "min_rtt_calc_params.fixed_value")?)
    } else {
        if rtt.fixed_value.is_some() {
            tracing::warn!("min_rtt_calc_params.fixed_value is not used: a non-zero interval measures minRTT instead");
        }
        let requests = rtt.request_count.map_or(50, |v| v.value);
        if requests == 0 {
            return Err("min_rtt_calc_params.request_count: must be at least 1".into());
        }
        MinRtt::Sampled { interval, requests, jitter: percent(rtt.jitter.as_ref(), "min_rtt_calc_params.jitter", 0.15)? }
    };
    let buffer = percent(rtt.buffer.as_ref(), "min_rtt_calc_params.buffer", defaults.buffer)?;
    // Our default is RESOURCE_EXHAUSTED, a status a gRPC caller can tell from a dead backend; an explicit
    // HTTP status (at least 400, as Envoy) is read through gRPC's HTTP table.
    let shed_code = match a.concurrency_limit_exceeded_status.as_ref().map(|s| s.code) {
        Some(code) if code >= 400 => GrpcCode::from_http_status(code as u16),
        _ => defaults.shed_code,
    };
    Ok(Some(AdaptiveConcurrency { percentile, update_interval, max_limit, min_limit, min_rtt, min_concurrency, buffer, shed_code }))
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::extensions::filters::http::adaptive_concurrency::v3::GradientControllerConfig;
    use envoy_types::pb::envoy::extensions::filters::http::adaptive_concurrency::v3::gradient_controller_config::{
        ConcurrencyLimitCalculationParams, MinimumRttCalculationParams,
    };
    use envoy_types::pb::google::protobuf::{Duration as ProtoDuration, UInt32Value};

    use super::super::to_any;
    use super::*;

    fn config(limits: Option<ConcurrencyLimitCalculationParams>, rtt: MinimumRttCalculationParams) -> Any {
        let gradient = GradientControllerConfig { concurrency_limit_params: limits, min_rtt_calc_params: Some(rtt), ..Default::default() };
        to_any(&ProtoAdaptive {
            concurrency_controller_config: Some(ConcurrencyControllerConfig::GradientControllerConfig(gradient)),
            ..Default::default()
        })
    }

    fn interval(ms: i32) -> ConcurrencyLimitCalculationParams {
        ConcurrencyLimitCalculationParams {
            concurrency_update_interval: Some(ProtoDuration { seconds: 0, nanos: ms * 1_000_000 }),
            ..Default::default()
        }
    }

    #[test]
    fn envoys_defaults_fill_what_is_unset_and_bad_limits_are_rejected() {
        let sampled = MinimumRttCalculationParams { interval: Some(ProtoDuration { seconds: 30, nanos: 0 }), ..Default::default() };
        let a = decode(&config(Some(interval(200)), sampled)).unwrap().expect("enabled by default");
        assert_eq!(a.update_interval, std::time::Duration::from_millis(200));
        assert_eq!(a.min_rtt, MinRtt::Sampled { interval: std::time::Duration::from_secs(30), requests: 50, jitter: 0.15 });
        assert_eq!((a.min_limit, a.max_limit, a.min_concurrency, a.shed_code), (3, 1000, 3, GrpcCode::ResourceExhausted));

        assert!(decode(&config(None, sampled)).unwrap_err().contains("concurrency_limit_params: missing"));
        let no_fixed = MinimumRttCalculationParams::default();
        assert!(decode(&config(Some(interval(100)), no_fixed)).unwrap_err().contains("fixed_value: required"));
        let upside_down = ConcurrencyLimitCalculationParams {
            max_concurrency_limit: Some(UInt32Value { value: 2 }),
            min_concurrency_limit: Some(UInt32Value { value: 5 }),
            ..interval(100)
        };
        assert!(decode(&config(Some(upside_down), sampled)).unwrap_err().contains("the minimum no more than the maximum"));
    }
}
