//! gRPC status codes: one typed list for every crate (policies, xDS decoding, the mesh file, the CLI).

use std::fmt;

/// A gRPC status code (`grpc/status.proto`), by number and canonical name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[allow(missing_docs)] // The variants are gRPC's own names.
pub enum GrpcCode {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

/// Every code, in number order.
const ALL: [GrpcCode; 17] = [
    GrpcCode::Ok,
    GrpcCode::Cancelled,
    GrpcCode::Unknown,
    GrpcCode::InvalidArgument,
    GrpcCode::DeadlineExceeded,
    GrpcCode::NotFound,
    GrpcCode::AlreadyExists,
    GrpcCode::PermissionDenied,
    GrpcCode::ResourceExhausted,
    GrpcCode::FailedPrecondition,
    GrpcCode::Aborted,
    GrpcCode::OutOfRange,
    GrpcCode::Unimplemented,
    GrpcCode::Internal,
    GrpcCode::Unavailable,
    GrpcCode::DataLoss,
    GrpcCode::Unauthenticated,
];

impl GrpcCode {
    /// The codes a retry policy may name: gRPC's (A6, A44) and Envoy's `retry_on` gRPC conditions.
    pub const RETRYABLE: [GrpcCode; 5] =
        [GrpcCode::Cancelled, GrpcCode::DeadlineExceeded, GrpcCode::Internal, GrpcCode::ResourceExhausted, GrpcCode::Unavailable];

    /// The code with this number, if it is one.
    pub fn from_i32(number: i32) -> Option<Self> {
        usize::try_from(number).ok().and_then(|i| ALL.get(i)).copied()
    }

    /// The code's number.
    pub fn as_i32(self) -> i32 {
        self as i32
    }

    /// The canonical name: `UNAVAILABLE`, `DEADLINE_EXCEEDED`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ok => "OK",
            Self::Cancelled => "CANCELLED",
            Self::Unknown => "UNKNOWN",
            Self::InvalidArgument => "INVALID_ARGUMENT",
            Self::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Self::NotFound => "NOT_FOUND",
            Self::AlreadyExists => "ALREADY_EXISTS",
            Self::PermissionDenied => "PERMISSION_DENIED",
            Self::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Self::FailedPrecondition => "FAILED_PRECONDITION",
            Self::Aborted => "ABORTED",
            Self::OutOfRange => "OUT_OF_RANGE",
            Self::Unimplemented => "UNIMPLEMENTED",
            Self::Internal => "INTERNAL",
            Self::Unavailable => "UNAVAILABLE",
            Self::DataLoss => "DATA_LOSS",
            Self::Unauthenticated => "UNAUTHENTICATED",
        }
    }

    /// The status of a call whose HTTP/2 stream the peer reset with `code` (gRPC's HTTP/2 error-code table:
    /// REFUSED_STREAM is UNAVAILABLE, CANCEL is CANCELLED, ENHANCE_YOUR_CALM is RESOURCE_EXHAUSTED,
    /// INADEQUATE_SECURITY is PERMISSION_DENIED, every other code INTERNAL).
    pub fn from_http2_reset(code: u32) -> Self {
        match code {
            0x7 => Self::Unavailable,
            0x8 => Self::Cancelled,
            0xb => Self::ResourceExhausted,
            0xc => Self::PermissionDenied,
            _ => Self::Internal,
        }
    }

    /// The status of a call answered with a non-gRPC HTTP response of `status` (gRPC's HTTP-to-gRPC status
    /// table).
    pub fn from_http_status(status: u16) -> Self {
        match status {
            200 => Self::Unknown,
            400 => Self::Internal,
            401 => Self::Unauthenticated,
            403 => Self::PermissionDenied,
            404 => Self::Unimplemented,
            429 | 502..=504 => Self::Unavailable,
            _ => Self::Unknown,
        }
    }

    /// Whether the code says the server side failed, as an HTTP 5xx does: Envoy's gRPC-to-HTTP mapping
    /// sends UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE and DATA_LOSS to 5xx, which is
    /// what Envoy's outlier detection and `5xx` retry condition count.
    pub fn is_server_error(self) -> bool {
        matches!(self, Self::Unknown | Self::DeadlineExceeded | Self::Unimplemented | Self::Internal | Self::Unavailable | Self::DataLoss)
    }

    /// The name as Envoy's and gRPC's `retry_on` spell it: `unavailable`, `deadline-exceeded`.
    pub fn retry_on_name(self) -> String {
        self.name().to_ascii_lowercase().replace('_', "-")
    }

    /// The code named `name` in any of its spellings: `UNAVAILABLE`, `unavailable`, `deadline-exceeded`,
    /// `deadline_exceeded`.
    pub fn from_name(name: &str) -> Option<Self> {
        let name = name.trim();
        ALL.into_iter().find(|code| {
            let canonical = code.name();
            canonical.len() == name.len()
                && canonical.bytes().zip(name.bytes()).all(|(c, n)| c == n.to_ascii_uppercase() || (c == b'_' && n == b'-'))
        })
    }
}

impl fmt::Display for GrpcCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_names_round_trip_in_every_spelling() {
        for (i, code) in ALL.into_iter().enumerate() {
            assert_eq!(code.as_i32(), i as i32);
            assert_eq!(GrpcCode::from_i32(i as i32), Some(code));
            assert_eq!(GrpcCode::from_name(code.name()), Some(code));
            assert_eq!(GrpcCode::from_name(&code.retry_on_name()), Some(code));
            assert_eq!(GrpcCode::from_name(&code.name().to_ascii_lowercase()), Some(code));
        }
        assert_eq!(GrpcCode::DeadlineExceeded.retry_on_name(), "deadline-exceeded");
        for bad in ["", "5xx", "unavailable2", "DEADLINE"] {
            assert_eq!(GrpcCode::from_name(bad), None, "{bad:?}");
        }
        assert_eq!(GrpcCode::from_i32(17), None);
        assert_eq!(GrpcCode::from_i32(-1), None);
    }
}
