//! Call deadlines from the caller's `grpc-timeout` header (gRPC's wire format: up to 8 digits and a unit,
//! `H`, `M`, `S`, `m`, `u` or `n`).
//!
//! The router ends a call that carries one when it runs out ([`crate::Error::Deadline`], DEADLINE_EXCEEDED),
//! and marks the request with its [`Deadline`]; each retry sends the time that is left, so the server sees the
//! caller's remaining budget, not the original one.

use std::time::Duration;

/// Request extension: when the caller's deadline runs out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline(pub tokio::time::Instant);

/// The header's name.
pub const GRPC_TIMEOUT: &str = "grpc-timeout";

/// Parses a `grpc-timeout` value; `None` for a malformed one (gRPC then ignores it).
pub fn parse(value: &[u8]) -> Option<Duration> {
    let (digits, unit) = value.split_at_checked(value.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n * 3600),
        b"M" => Duration::from_secs(n * 60),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Formats `left` as a `grpc-timeout` value, in the finest unit that fits 8 digits (rounded up, so a deadline
/// is never shortened to zero by the unit).
pub fn format(left: Duration) -> http::HeaderValue {
    let units: [(u128, &str); 5] = [(1, "n"), (1_000, "u"), (1_000_000, "m"), (1_000_000_000, "S"), (60_000_000_000, "M")];
    let nanos = left.as_nanos();
    for (per, unit) in units {
        let n = nanos.div_ceil(per);
        if n < 100_000_000 {
            return http::HeaderValue::from_str(&format!("{n}{unit}")).unwrap_or(http::HeaderValue::from_static("99999999H"));
        }
    }
    http::HeaderValue::from_static("99999999H")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_and_format_in_the_finest_unit_that_fits() {
        assert_eq!(parse(b"300m"), Some(Duration::from_millis(300)));
        assert_eq!(parse(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse(b"5n"), Some(Duration::from_nanos(5)));
        for bad in [&b""[..], b"m", b"123456789m", b"12x", b"-1S", b"1.5S"] {
            assert_eq!(parse(bad), None, "{:?}", std::str::from_utf8(bad));
        }
        assert_eq!(format(Duration::from_millis(250)), "250000u");
        assert_eq!(format(Duration::from_nanos(1500)), "1500n");
        assert_eq!(format(Duration::from_secs(500)), "500000m");
        for left in [Duration::from_nanos(1), Duration::from_millis(999), Duration::from_secs(86_400)] {
            let back = parse(format(left).as_bytes()).unwrap();
            assert!(back >= left && back - left < left / 1000 + Duration::from_nanos(1), "{left:?} → {back:?}");
        }
    }
}
