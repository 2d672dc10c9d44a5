//! The request path: drop, pick, send, re-pick or resend, wait when nothing is ready.

use std::sync::Arc;

use mesh_core::LbPolicy;

use super::body::{Counting, InFlight, ResponseBody};
use super::{RequestBody, ServedBy, State, lock};
use crate::classify::{self, Failure};
use crate::connect::Connect;
use crate::replay::{DEFAULT_REPLAY_LIMIT, ReplayBody};
use crate::{Error, Result};

/// How many times one call is resent transparently after a server refused it unprocessed. gRPC (A6) resends a
/// refused RPC once and one that never left the client without limit; one refusal per endpoint of a small
/// rolling restart, plus one, bounds both without letting a call bounce forever.
const MAX_RESENDS: u32 = 4;

impl<B: RequestBody, C: Connect> State<ReplayBody<B>, C> {
    /// Sends one request: pick, send, re-pick when the connection was closed before the request was written,
    /// resend when the server refused it unprocessed ([`refused`]), wait when nothing is ready.
    pub(super) async fn call(self: Arc<Self>, request: http::Request<B>) -> Result<http::Response<ResponseBody>> {
        let hash = self.request_hash(&request);
        let decay = match self.config.lb {
            LbPolicy::P2cEwma { decay, .. } => Some(decay),
            _ => None,
        };
        // A body that records what it sends and a copy of the head, so a refused request can go again whole:
        // hyper consumes the request it sends.
        let (head, body) = request.into_parts();
        let body = ReplayBody::new(body, DEFAULT_REPLAY_LIMIT);
        let recorder = body.recorder();
        let copy = HeadCopy::new(&head);
        let mut request = http::Request::from_parts(head, body);
        let mut resends = 0;
        // Drops are decided once per call, at its first pick; re-picks and resends do not draw again.
        let mut drop_checked = false;
        // Set when the call first has to wait: (receiver, deadline, start).
        let mut waiting: Option<(tokio::sync::watch::Receiver<u64>, tokio::time::Instant, tokio::time::Instant)> = None;
        loop {
            // Pick under the snapshot's read lock, taking only the chosen handle: one reference-count
            // increment and decrement fewer per call than cloning the snapshot (shared atomics that every
            // concurrent call bounces between cores).
            let picked = {
                let snapshot = self.snapshot.read().unwrap_or_else(|e| e.into_inner());
                if !drop_checked {
                    drop_checked = true;
                    if let Some(category) = self.dropped(&snapshot) {
                        return Err(Error::Dropped { target: self.target.clone(), category: category.to_owned() });
                    }
                }
                self.pick(&snapshot, hash).cloned().ok_or((snapshot.all_failed, snapshot.endpoints.len()))
            };
            let (all_failed, known) = match picked {
                Ok(handle) => {
                    let sent = if decay.is_some() { self.now() } else { Default::default() };
                    let (response, peer) = match handle.send(request) {
                        Ok(sent) => sent,
                        Err(unsent) => {
                            // Raced with a disconnect: the next snapshot will not offer it.
                            request = unsent;
                            self.mark_broken(&handle);
                            continue;
                        }
                    };
                    let counting = Counting::begin(&handle);
                    match response.await {
                        Ok(response) => {
                            if let Some(decay) = decay {
                                let now = self.now();
                                handle.observe(now.saturating_sub(sent), now, decay);
                            }
                            let (mut parts, body) = response.into_parts();
                            let addr = handle.addr();
                            parts.extensions.insert(ServedBy(addr));
                            if let Some(peer) = peer {
                                parts.extensions.insert(peer);
                            }
                            let pending = classify::pending(&parts);
                            counting.disarm();
                            let body = ResponseBody::new(body, pending, addr, InFlight::started(handle));
                            return Ok(http::Response::from_parts(parts, body));
                        }
                        Err(mut error) => {
                            drop(counting);
                            if let Some(unsent) = error.take_message() {
                                tracing::debug!(target_name = %self.target, addr = %handle.addr(), "connection closed before send; re-picking");
                                request = unsent;
                                self.mark_broken(&handle);
                                continue;
                            }
                            let error = error.into_error();
                            let Some(refusal) = refused(&error) else {
                                return Err(upstream(&handle, error));
                            };
                            if refusal == Refusal::GoAway {
                                // The connection takes no new streams: pick elsewhere until it is replaced.
                                self.mark_broken(&handle);
                            }
                            let again = (resends < MAX_RESENDS).then(|| recorder.try_clone()).flatten().and_then(|body| copy.request(body));
                            let Some(again) = again else {
                                return Err(upstream(&handle, error));
                            };
                            resends += 1;
                            tracing::debug!(target_name = %self.target, addr = %handle.addr(), ?refusal, resends, "refused unprocessed; resending");
                            request = again;
                            continue;
                        }
                    }
                }
                Err(unpicked) => unpicked,
            };
            // Every endpoint failed its last connect (a connect error is on record then): fail fast.
            if all_failed && let Some(last_error) = lock(&self.last_error).clone() {
                return Err(Error::AllEndpointsFailed { target: self.target.clone(), count: known, last_error });
            }
            // Subscribe before re-reading the snapshot so no change is missed.
            let Some((rx, deadline, started)) = waiting.as_mut() else {
                let started = tokio::time::Instant::now();
                waiting = Some((self.changed.subscribe(), started + self.config.ready_timeout, started));
                continue;
            };
            if tokio::time::timeout_at(*deadline, rx.changed()).await.is_err() {
                return Err(Error::NoReadyEndpoint { target: self.target.clone(), waited: started.elapsed(), known });
            }
        }
    }
}

/// A call that failed on `handle`'s endpoint after it was sent: classified, and counted as the endpoint's
/// failure.
fn upstream<B>(handle: &super::handle::Handle<B>, error: hyper::Error) -> Error {
    let failure = Failure::of(&error);
    handle.record(true);
    Error::Upstream { addr: handle.addr(), failure, source: error.into() }
}

/// What a resend needs of the call's head: method, URI, version and headers, the headers' names and values in
/// one buffer, inline when small (a gRPC call's headers are a few dozen bytes). Cloning the `HeaderMap` instead
/// costs two allocations, plus one per value not yet shared, on every call; this costs none for ordinary calls,
/// and the map is rebuilt only for a resend (rare). Extensions stay behind: only this process reads them, and
/// hyper does not send them.
struct HeadCopy {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    /// Per header: name length (u16), name, value length (u32), value, sensitive (u8).
    headers: Buffer,
}

/// Bytes held inline up to [`INLINE`], else on the heap.
enum Buffer {
    Inline(u8, [u8; INLINE]),
    Heap(Vec<u8>),
}

/// Header bytes kept inside the call's own state.
const INLINE: usize = 192;

impl Buffer {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Inline(len, bytes) => &bytes[..usize::from(*len)],
            Self::Heap(bytes) => bytes,
        }
    }
}

impl HeadCopy {
    fn new(head: &http::request::Parts) -> Self {
        let size: usize = head.headers.iter().map(|(n, v)| 7 + n.as_str().len() + v.len()).sum();
        let mut heap = Vec::with_capacity(if size > INLINE { size } else { 0 });
        let mut inline = [0u8; INLINE];
        let mut at = 0;
        let mut put = |bytes: &[u8]| match inline.get_mut(at..at + bytes.len()).filter(|_| size <= INLINE) {
            Some(slot) => {
                slot.copy_from_slice(bytes);
                at += bytes.len();
            }
            None => heap.extend_from_slice(bytes),
        };
        for (name, value) in &head.headers {
            // HTTP/2 header names are far below 64 KiB and values below 4 GiB (the peer's header list limit).
            put(&(name.as_str().len() as u16).to_le_bytes());
            put(name.as_str().as_bytes());
            put(&(value.len() as u32).to_le_bytes());
            put(value.as_bytes());
            put(&[u8::from(value.is_sensitive())]);
        }
        let headers = if size <= INLINE { Buffer::Inline(size as u8, inline) } else { Buffer::Heap(heap) };
        Self { method: head.method.clone(), uri: head.uri.clone(), version: head.version, headers }
    }

    /// The request to send again with `body`; `None` if the copy cannot be read back (it always can: it was
    /// written from valid headers).
    fn request<B>(&self, body: B) -> Option<http::Request<B>> {
        let mut request = http::Request::new(body);
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = self.version;
        let headers = request.headers_mut();
        let mut rest = self.headers.bytes();
        while !rest.is_empty() {
            let (len, tail) = rest.split_first_chunk::<2>()?;
            let (name, tail) = tail.split_at_checked(usize::from(u16::from_le_bytes(*len)))?;
            let (len, tail) = tail.split_first_chunk::<4>()?;
            let (value, tail) = tail.split_at_checked(u32::from_le_bytes(*len) as usize)?;
            let (sensitive, tail) = tail.split_first()?;
            let mut value = http::HeaderValue::from_bytes(value).ok()?;
            value.set_sensitive(*sensitive != 0);
            headers.append(http::HeaderName::from_bytes(name).ok()?, value);
            rest = tail;
        }
        Some(request)
    }
}

/// How a server turned a request away before processing it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    /// The connection is going away: the stream was above the last one the server's GOAWAY let through, or
    /// was opened after the GOAWAY arrived (h2 then never sends it).
    GoAway,
    /// RST_STREAM with REFUSED_STREAM: the server did no work on it (RFC 9113 §8.7).
    RefusedStream,
}

/// Whether `error` says the server never processed the request, so that sending it again is safe (gRPC A6
/// transparent retry). h2 gives a stream the peer's GOAWAY error only when the stream was above the GOAWAY's last
/// stream id or opened after it; a stream the server had accepted and that broke later ends with an I/O or
/// reset error instead, and is never resent here.
fn refused(error: &hyper::Error) -> Option<Refusal> {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(h2) = cause.downcast_ref::<h2::Error>() {
            if !h2.is_remote() {
                return None;
            }
            if h2.is_go_away() {
                return Some(Refusal::GoAway);
            }
            return (h2.is_reset() && h2.reason() == Some(h2::Reason::REFUSED_STREAM)).then_some(Refusal::RefusedStream);
        }
        source = cause.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_copy_gives_back_the_same_method_uri_and_headers_inline_or_not() {
        for padding in [0, 500] {
            let mut request = http::Request::post("http://greeter/pkg.Svc/Method").body(()).unwrap();
            let headers = request.headers_mut();
            headers.insert("te", http::HeaderValue::from_static("trailers"));
            headers.append("x-many", http::HeaderValue::from_static("one"));
            headers.append("x-many", http::HeaderValue::from_static("two"));
            let mut secret = http::HeaderValue::from_str(&"s".repeat(padding + 1)).unwrap();
            secret.set_sensitive(true);
            headers.insert("authorization", secret);
            let (head, ()) = request.into_parts();
            let copy = HeadCopy::new(&head);
            assert_eq!(matches!(copy.headers, Buffer::Inline(..)), padding == 0);
            let again = copy.request(()).unwrap();
            assert_eq!((again.method(), again.uri(), again.version()), (&head.method, &head.uri, head.version));
            assert_eq!(again.headers(), &head.headers);
            assert!(again.headers()["authorization"].is_sensitive());
        }
    }
}
