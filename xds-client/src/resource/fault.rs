//! The HTTP fault filter's configuration (`envoy.extensions.filters.http.fault.v3.HTTPFault`, gRPC A33), from a
//! listener's filter or a route's override.

use envoy_types::pb::envoy::extensions::filters::common::fault::v3::fault_delay::FaultDelaySecifier;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::fault_abort::ErrorType;
use envoy_types::pb::envoy::r#type::v3::FractionalPercent;
use envoy_types::pb::envoy::r#type::v3::fractional_percent::DenominatorType;
use envoy_types::pb::google::protobuf::Any;
use mesh_core::GrpcCode;
use mesh_core::policy::{FaultAbort, FaultDelay, FaultInjection};
use prost::Message;

use super::{duration, route};

/// Message name of the fault filter's configuration.
pub(crate) const HTTP_FAULT: &str = "envoy.extensions.filters.http.fault.v3.HTTPFault";

/// Decodes and validates an `HTTPFault` carried in `any`.
pub(crate) fn decode(any: &Any) -> Result<FaultInjection, String> {
    let f = HttpFault::decode(any.value.as_slice()).map_err(|e| format!("malformed HTTPFault: {e}"))?;
    let delay = match &f.delay {
        None => None,
        Some(d) => {
            let fixed = match &d.fault_delay_secifier {
                Some(FaultDelaySecifier::FixedDelay(delay)) => Some(duration(delay, "delay.fixed_delay")?),
                Some(FaultDelaySecifier::HeaderDelay(_)) => None,
                None => return Err("delay: neither fixed_delay nor header_delay".into()),
            };
            Some(FaultDelay { fixed, per_million: per_million(d.percentage.as_ref(), "delay.percentage")? })
        }
    };
    let abort = match &f.abort {
        None => None,
        Some(a) => {
            let code = match a.error_type {
                Some(ErrorType::GrpcStatus(code)) => Some(
                    i32::try_from(code)
                        .ok()
                        .and_then(GrpcCode::from_i32)
                        .filter(|c| *c != GrpcCode::Ok)
                        .ok_or_else(|| format!("abort.grpc_status: {code} is not a gRPC status other than OK"))?,
                ),
                // A33: an HTTP status aborts with the gRPC code gRPC's HTTP table gives it.
                Some(ErrorType::HttpStatus(status)) if (200..600).contains(&status) => Some(GrpcCode::from_http_status(status as u16)),
                Some(ErrorType::HttpStatus(status)) => return Err(format!("abort.http_status: {status} is not an HTTP status")),
                Some(ErrorType::HeaderAbort(_)) => None,
                None => return Err("abort: no http_status, grpc_status or header_abort".into()),
            };
            Some(FaultAbort { code, per_million: per_million(a.percentage.as_ref(), "abort.percentage")? })
        }
    };
    let headers = f.headers.iter().map(route::header).collect::<Result<Vec<_>, _>>().map_err(|e| format!("headers: {e}"))?;
    let mut unsupported = Vec::new();
    if !f.upstream_cluster.is_empty() {
        unsupported.push("upstream_cluster");
    }
    if !f.downstream_nodes.is_empty() {
        unsupported.push("downstream_nodes");
    }
    if f.response_rate_limit.is_some() {
        unsupported.push("response_rate_limit");
    }
    if !unsupported.is_empty() {
        tracing::warn!(?unsupported, "HTTPFault fields accepted but not enforced");
    }
    Ok(FaultInjection { delay, abort, max_active_faults: f.max_active_faults.map(|v| v.value), headers })
}

/// A share in parts per million; unset is 0 (Envoy: no percentage, no fault).
pub(super) fn per_million(p: Option<&FractionalPercent>, field: &str) -> Result<u32, String> {
    let Some(p) = p else { return Ok(0) };
    let scale = match DenominatorType::try_from(p.denominator) {
        Ok(DenominatorType::Hundred) => 10_000,
        Ok(DenominatorType::TenThousand) => 100,
        Ok(DenominatorType::Million) => 1,
        Err(_) => return Err(format!("{field}: unknown denominator {}", p.denominator)),
    };
    Ok(p.numerator.saturating_mul(scale).min(1_000_000))
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::extensions::filters::common::fault::v3::{FaultDelay as ProtoDelay, fault_delay};
    use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{FaultAbort as ProtoAbort, fault_abort};
    use envoy_types::pb::google::protobuf::{Duration as ProtoDuration, UInt32Value};

    use super::super::to_any;
    use super::*;

    fn percent(numerator: u32, denominator: DenominatorType) -> Option<FractionalPercent> {
        Some(FractionalPercent { numerator, denominator: denominator as i32 })
    }

    #[test]
    fn delays_aborts_and_shares_are_read() {
        let f = HttpFault {
            delay: Some(ProtoDelay {
                fault_delay_secifier: Some(FaultDelaySecifier::FixedDelay(ProtoDuration { seconds: 0, nanos: 250_000_000 })),
                percentage: percent(50, DenominatorType::Hundred),
            }),
            abort: Some(ProtoAbort {
                error_type: Some(ErrorType::HttpStatus(503)),
                percentage: percent(25, DenominatorType::TenThousand),
                ..Default::default()
            }),
            max_active_faults: Some(UInt32Value { value: 7 }),
            ..Default::default()
        };
        let fault = decode(&to_any(&f)).unwrap();
        assert_eq!(fault.delay, Some(FaultDelay { fixed: Some(std::time::Duration::from_millis(250)), per_million: 500_000 }));
        assert_eq!(fault.abort, Some(FaultAbort { code: Some(GrpcCode::Unavailable), per_million: 2_500 }), "503 reads as UNAVAILABLE");
        assert_eq!(fault.max_active_faults, Some(7));

        let headers = HttpFault {
            delay: Some(ProtoDelay {
                fault_delay_secifier: Some(fault_delay::FaultDelaySecifier::HeaderDelay(Default::default())),
                percentage: percent(1, DenominatorType::Million),
            }),
            abort: Some(ProtoAbort { error_type: Some(fault_abort::ErrorType::HeaderAbort(Default::default())), ..Default::default() }),
            ..Default::default()
        };
        let fault = decode(&to_any(&headers)).unwrap();
        assert_eq!(fault.delay, Some(FaultDelay { fixed: None, per_million: 1 }));
        assert_eq!(fault.abort, Some(FaultAbort { code: None, per_million: 0 }), "no percentage: no share");
    }

    #[test]
    fn bad_faults_are_rejected_with_the_field() {
        let abort =
            |error_type| HttpFault { abort: Some(ProtoAbort { error_type: Some(error_type), ..Default::default() }), ..Default::default() };
        let reason = |f: HttpFault| decode(&to_any(&f)).unwrap_err();
        assert!(reason(abort(ErrorType::GrpcStatus(0))).contains("abort.grpc_status: 0"));
        assert!(reason(abort(ErrorType::GrpcStatus(99))).contains("abort.grpc_status: 99"));
        assert!(reason(abort(ErrorType::HttpStatus(99))).contains("abort.http_status: 99"));
        let no_kind = HttpFault { delay: Some(ProtoDelay::default()), ..Default::default() };
        assert!(reason(no_kind).contains("delay: neither"));
    }
}
