//! Response classification: what became of a call, decided once, where the response body finds its last
//! frame ([`crate::balance::ResponseBody`]).
//!
//! A gRPC response's outcome is its `grpc-status`: in the trailers, or in the headers of a trailers-only
//! response. A plain HTTP response's is its status code. A call the transport broke is a [`Failure`] (a
//! stream reset and its code, a GOAWAY, a lost connection, a protocol error). The outcome feeds the
//! endpoint's success and failure counters (what outlier detection reads), and is there for the retry, breaker
//! and metrics layers: [`crate::balance::ResponseBody::outcome`] once the body has ended, [`head`] for what
//! the response's head already decides.

use std::fmt;

use mesh_core::GrpcCode;

/// How a request that was sent failed in transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Failure {
    /// The peer reset the stream (RST_STREAM) with this HTTP/2 error code.
    Reset(u32),
    /// The peer's GOAWAY (with this HTTP/2 error code) ended the connection before the stream completed.
    GoAway(u32),
    /// The connection was lost: closed, an I/O error, or torn down by our side.
    ConnectionLost,
    /// The response broke HTTP or HTTP/2 rules.
    Protocol,
}

impl Failure {
    /// Classifies a transport error (hyper's, carrying h2's).
    pub(crate) fn of(error: &hyper::Error) -> Self {
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            if let Some(h2) = cause.downcast_ref::<h2::Error>() {
                let code = h2.reason().map_or(0, u32::from);
                return if h2.is_io() {
                    Self::ConnectionLost
                } else if h2.is_go_away() && h2.is_remote() {
                    Self::GoAway(code)
                } else if h2.is_reset() {
                    Self::Reset(code)
                } else {
                    // Our side ended the connection over the peer's protocol error, or h2 refused the frames.
                    Self::Protocol
                };
            }
            if cause.is::<std::io::Error>() {
                return Self::ConnectionLost;
            }
            source = cause.source();
        }
        if error.is_canceled() || error.is_closed() || error.is_incomplete_message() { Self::ConnectionLost } else { Self::Protocol }
    }

    /// The status a caller sees: gRPC's HTTP/2 error-code table for a reset, UNAVAILABLE for a lost
    /// connection or a GOAWAY (the server going away), INTERNAL for a protocol error.
    pub fn grpc_code(self) -> GrpcCode {
        match self {
            Self::Reset(code) => GrpcCode::from_http2_reset(code),
            Self::GoAway(_) | Self::ConnectionLost => GrpcCode::Unavailable,
            Self::Protocol => GrpcCode::Internal,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Reset(code) => write!(f, "stream reset, {}", h2_name(*code)),
            Self::GoAway(code) => write!(f, "connection going away, {}", h2_name(*code)),
            Self::ConnectionLost => f.write_str("connection lost"),
            Self::Protocol => f.write_str("protocol error"),
        }
    }
}

/// An HTTP/2 error code's name (RFC 9113 §7).
fn h2_name(code: u32) -> String {
    let name = match code {
        0x0 => "NO_ERROR",
        0x1 => "PROTOCOL_ERROR",
        0x2 => "INTERNAL_ERROR",
        0x3 => "FLOW_CONTROL_ERROR",
        0x4 => "SETTINGS_TIMEOUT",
        0x5 => "STREAM_CLOSED",
        0x6 => "FRAME_SIZE_ERROR",
        0x7 => "REFUSED_STREAM",
        0x8 => "CANCEL",
        0x9 => "COMPRESSION_ERROR",
        0xa => "CONNECT_ERROR",
        0xb => "ENHANCE_YOUR_CALM",
        0xc => "INADEQUATE_SECURITY",
        0xd => "HTTP_1_1_REQUIRED",
        other => return format!("error code {other:#x}"),
    };
    name.to_owned()
}

/// What became of a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A gRPC response ended with this status.
    Grpc(GrpcCode),
    /// A plain HTTP response ended; its status code.
    Http(u16),
    /// The transport broke the call after it was sent.
    Failed(Failure),
}

impl Outcome {
    /// Whether the endpoint failed the call, as outlier detection counts it (Envoy's semantics): a transport
    /// failure, an HTTP 5xx, or a gRPC status that maps to 5xx ([`GrpcCode::is_server_error`]).
    pub fn is_failure(self) -> bool {
        match self {
            Self::Grpc(code) => code.is_server_error(),
            Self::Http(status) => status >= 500,
            Self::Failed(_) => true,
        }
    }

    /// Whether the failure is a gateway error, as Envoy's consecutive-gateway-failure detection counts it: a
    /// transport failure, HTTP 502, 503 or 504, or UNAVAILABLE or DEADLINE_EXCEEDED (which map to 503 and 504).
    pub fn is_gateway_failure(self) -> bool {
        match self {
            Self::Grpc(code) => matches!(code, GrpcCode::Unavailable | GrpcCode::DeadlineExceeded),
            Self::Http(status) => matches!(status, 502..=504),
            Self::Failed(_) => true,
        }
    }

    /// The gRPC status of the call (gRPC's HTTP-to-gRPC table for a plain HTTP answer).
    pub fn grpc_code(self) -> GrpcCode {
        match self {
            Self::Grpc(code) => code,
            Self::Http(status) => GrpcCode::from_http_status(status),
            Self::Failed(failure) => failure.grpc_code(),
        }
    }
}

/// How a response is being classified: what its head said, and what its end will decide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pending {
    /// Decided by the head (a trailers-only gRPC response, or a plain HTTP response).
    Decided(Outcome),
    /// A gRPC response whose status comes in its trailers.
    Trailers,
}

/// What a response's head decides: the outcome of a trailers-only gRPC response (its `grpc-status` in the
/// headers) or of a plain HTTP response (its status code; a non-200 answer to a gRPC request is one), `None`
/// for a gRPC response whose status is still to come in its trailers.
pub fn head<T>(response: &http::Response<T>) -> Option<Outcome> {
    match pending_of(response.status(), response.headers()) {
        Pending::Decided(outcome) => Some(outcome),
        Pending::Trailers => None,
    }
}

pub(crate) fn pending(head: &http::response::Parts) -> Pending {
    pending_of(head.status, &head.headers)
}

/// A server response body's classification, found once where its frames show its end: its trailers, its
/// last `None`, or an error (the call is then `CANCELLED`, A66). The server layers' view of what the client
/// side keeps in [`crate::balance::ResponseBody`].
#[derive(Debug)]
pub(crate) struct BodyEnd {
    pending: Pending,
    ended: bool,
}

const CANCELLED: Outcome = Outcome::Grpc(GrpcCode::Cancelled);

impl BodyEnd {
    pub(crate) fn new(head: &http::response::Parts) -> Self {
        Self { pending: pending(head), ended: false }
    }

    /// The body's outcome, the first time a polled frame ends it.
    pub(crate) fn polled<D, E>(&mut self, polled: &std::task::Poll<Option<Result<http_body::Frame<D>, E>>>) -> Option<Outcome> {
        let outcome = match polled {
            std::task::Poll::Ready(Some(Ok(frame))) => self.decide(frame.trailers_ref().map(Some)?),
            std::task::Poll::Ready(None) => self.decide(None),
            std::task::Poll::Ready(Some(Err(_))) => CANCELLED,
            std::task::Poll::Pending => return None,
        };
        (!std::mem::replace(&mut self.ended, true)).then_some(outcome)
    }

    /// The outcome of a body dropped now, unless it had ended: what its head decided, else `CANCELLED`.
    pub(crate) fn dropped(&mut self) -> Option<Outcome> {
        let outcome = match self.pending {
            Pending::Decided(outcome) => outcome,
            Pending::Trailers => CANCELLED,
        };
        (!std::mem::replace(&mut self.ended, true)).then_some(outcome)
    }

    fn decide(&self, trailers: Option<&http::HeaderMap>) -> Outcome {
        match self.pending {
            Pending::Decided(outcome) => outcome,
            Pending::Trailers => self::trailers(trailers),
        }
    }
}

/// Whether a request or response with these headers is gRPC (its content type is `application/grpc`, with or
/// without a `+proto`-like suffix).
pub(crate) fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers.get(http::header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

fn pending_of(status: http::StatusCode, headers: &http::HeaderMap) -> Pending {
    if !is_grpc(headers) || status != http::StatusCode::OK {
        return Pending::Decided(Outcome::Http(status.as_u16()));
    }
    match grpc_status(headers) {
        Some(code) => Pending::Decided(Outcome::Grpc(code)),
        None => Pending::Trailers,
    }
}

/// The outcome of a gRPC response whose body ended with `trailers` (`None`: it ended without them, which
/// gRPC reports as UNKNOWN, the status never having arrived).
pub(crate) fn trailers(trailers: Option<&http::HeaderMap>) -> Outcome {
    Outcome::Grpc(trailers.and_then(grpc_status).unwrap_or(GrpcCode::Unknown))
}

/// A `grpc-status` header's code; an unparsable or unknown one is UNKNOWN, as gRPC reads it.
fn grpc_status(headers: &http::HeaderMap) -> Option<GrpcCode> {
    let value = headers.get("grpc-status")?;
    let number = std::str::from_utf8(value.as_bytes()).ok().and_then(|v| v.trim().parse::<i32>().ok());
    Some(number.and_then(GrpcCode::from_i32).unwrap_or(GrpcCode::Unknown))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(status: u16, headers: &[(&str, &str)]) -> http::Response<()> {
        let mut builder = http::Response::builder().status(status);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn a_response_is_classified_from_its_head_or_its_trailers() {
        let grpc = ("content-type", "application/grpc");
        assert_eq!(head(&response(200, &[grpc])), None, "a gRPC status comes in the trailers");
        assert_eq!(head(&response(200, &[grpc, ("grpc-status", "14")])), Some(Outcome::Grpc(GrpcCode::Unavailable)));
        assert_eq!(head(&response(200, &[grpc, ("grpc-status", "x")])), Some(Outcome::Grpc(GrpcCode::Unknown)));
        assert_eq!(head(&response(503, &[grpc])), Some(Outcome::Http(503)));
        assert_eq!(head(&response(404, &[])), Some(Outcome::Http(404)));
        let mut ok = http::HeaderMap::new();
        ok.insert("grpc-status", http::HeaderValue::from_static("0"));
        assert_eq!(trailers(Some(&ok)), Outcome::Grpc(GrpcCode::Ok));
        assert_eq!(trailers(None), Outcome::Grpc(GrpcCode::Unknown));
    }

    #[test]
    fn failures_are_server_side_errors_and_client_errors_are_not() {
        assert!(Outcome::Grpc(GrpcCode::Unavailable).is_failure());
        assert!(Outcome::Http(502).is_failure());
        assert!(Outcome::Failed(Failure::ConnectionLost).is_failure());
        assert!(!Outcome::Grpc(GrpcCode::Ok).is_failure());
        assert!(!Outcome::Grpc(GrpcCode::NotFound).is_failure());
        assert!(!Outcome::Http(404).is_failure());
        assert!(Outcome::Grpc(GrpcCode::DeadlineExceeded).is_gateway_failure());
        assert!(Outcome::Http(503).is_gateway_failure() && Outcome::Failed(Failure::Reset(0x2)).is_gateway_failure());
        assert!(!Outcome::Grpc(GrpcCode::Internal).is_gateway_failure() && !Outcome::Http(500).is_gateway_failure());
        assert_eq!(Outcome::Http(404).grpc_code(), GrpcCode::Unimplemented);
        assert_eq!(Failure::Reset(0x8).grpc_code(), GrpcCode::Cancelled);
        assert_eq!(Failure::Reset(0x0).grpc_code(), GrpcCode::Internal);
        assert_eq!(Failure::GoAway(0x0).grpc_code(), GrpcCode::Unavailable);
        assert_eq!(Failure::Reset(0xb).to_string(), "stream reset, ENHANCE_YOUR_CALM");
    }
}
