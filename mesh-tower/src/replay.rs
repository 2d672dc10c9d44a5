//! A request body that can be sent again.
//!
//! [`ReplayBody`] wraps a body and keeps a copy of every frame read from it, up to a limit, so that a request can
//! be resent after the first attempt consumed part or all of its body: the balancer's transparent retry (a
//! stream the server refused, gRPC A6) and, later, retry policies. A copy made with [`ReplayBody::try_clone`]
//! yields the recorded frames first, then goes on reading the original body where the last copy left off.
//!
//! Only the newest copy may read: once a copy is made, older ones fail their next poll (their stream is gone
//! anyway). Once more than the limit has been read the record is dropped and no copy can be made, so a large
//! streaming body is never held in memory and never duplicated.
//!
//! ```
//! # use bytes::Bytes;
//! # use http_body_util::{BodyExt, Full};
//! # use mesh_tower::replay::ReplayBody;
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let first = ReplayBody::new(Full::new(Bytes::from_static(b"hello")), 64 * 1024);
//! let again = first.try_clone().expect("nothing read yet");
//! assert_eq!(again.collect().await.unwrap().to_bytes(), "hello");
//! # }
//! ```

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use crate::BoxError;

/// Request bodies are kept for a resend up to this many bytes by default (Envoy's and Linkerd's order of size).
pub const DEFAULT_REPLAY_LIMIT: usize = 64 * 1024;

/// A body whose frames are recorded, up to a limit, so that it can be sent again. See the [module docs](self).
pub struct ReplayBody<B> {
    shared: Arc<Mutex<Shared<B>>>,
    /// Which copy this is; only the newest reads.
    copy: u32,
    /// How many recorded frames this copy has yielded.
    replayed: usize,
}

struct Shared<B> {
    /// The original body; `None` in a [`Recorder::snapshot`], which holds only what was recorded.
    inner: Option<B>,
    /// Frames read from `inner`, in order, while within the limit.
    frames: Frames,
    /// Bytes of data in `frames`.
    bytes: usize,
    limit: usize,
    /// More than `limit` was read, or `inner` failed: no copy can replay it.
    lost: bool,
    /// `inner` has ended.
    ended: bool,
    /// The newest copy's number.
    newest: u32,
}

#[derive(Clone)]
enum Recorded {
    Data(Bytes),
    Trailers(Box<HeaderMap>),
}

/// Recorded frames, the first one inline: a unary gRPC request is one data frame, and recording it then
/// allocates nothing.
#[derive(Default)]
struct Frames {
    first: Option<Recorded>,
    rest: Vec<Recorded>,
}

impl Frames {
    fn get(&self, i: usize) -> Option<&Recorded> {
        match i {
            0 => self.first.as_ref(),
            _ => self.rest.get(i - 1),
        }
    }

    fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }

    fn push(&mut self, frame: Recorded) {
        match self.first {
            None => self.first = Some(frame),
            Some(_) => self.rest.push(frame),
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Recorded> {
        self.first.iter().chain(&self.rest)
    }
}

impl Recorded {
    fn frame(&self) -> Frame<Bytes> {
        match self {
            Self::Data(data) => Frame::data(data.clone()),
            Self::Trailers(trailers) => Frame::trailers((**trailers).clone()),
        }
    }
}

/// Why a body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// A newer copy of the body took over (the stream this copy fed is gone).
    #[error("request body superseded by a resend")]
    Superseded,
    /// The original body failed.
    #[error("request body failed: {0}")]
    Body(#[source] BoxError),
}

impl<B> ReplayBody<B> {
    /// Wraps `inner`, recording up to `limit` bytes of it.
    pub fn new(inner: B, limit: usize) -> Self {
        let shared = Shared { inner: Some(inner), frames: Frames::default(), bytes: 0, limit, lost: false, ended: false, newest: 0 };
        Self { shared: Arc::new(Mutex::new(shared)), copy: 0, replayed: 0 }
    }

    /// A copy that yields the body from its start, or `None` when that is no longer possible (more than the
    /// limit was read, or the body failed). Older copies stop reading.
    pub fn try_clone(&self) -> Option<Self> {
        copy(&self.shared)
    }

    /// A handle that makes copies later without itself being a body that could be read.
    pub(crate) fn recorder(&self) -> Recorder<B> {
        Recorder(self.shared.clone())
    }
}

/// Makes copies of a [`ReplayBody`] (see [`ReplayBody::recorder`]).
pub(crate) struct Recorder<B>(Arc<Mutex<Shared<B>>>);

impl<B> Recorder<B> {
    /// As [`ReplayBody::try_clone`].
    pub(crate) fn try_clone(&self) -> Option<ReplayBody<B>> {
        copy(&self.0)
    }

    /// A body of its own holding the whole body as recorded so far, when all of it was (the original ended
    /// within the limit); `None` otherwise. It shares nothing with the original: reading either leaves the
    /// other alone (a mirror's copy, sent beside the call's own attempts).
    pub(crate) fn snapshot(&self) -> Option<ReplayBody<B>>
    where
        B: Body,
    {
        let state = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let complete = state.ended || state.inner.as_ref().is_none_or(Body::is_end_stream);
        if state.lost || !complete {
            return None;
        }
        let mut frames = Frames::default();
        for recorded in state.frames.iter() {
            frames.push(recorded.clone());
        }
        let shared = Shared { inner: None, frames, bytes: state.bytes, limit: state.limit, lost: false, ended: true, newest: 0 };
        Some(ReplayBody { shared: Arc::new(Mutex::new(shared)), copy: 0, replayed: 0 })
    }
}

fn copy<B>(shared: &Arc<Mutex<Shared<B>>>) -> Option<ReplayBody<B>> {
    let mut state = shared.lock().unwrap_or_else(|e| e.into_inner());
    if state.lost {
        return None;
    }
    state.newest = state.newest.wrapping_add(1);
    Some(ReplayBody { shared: shared.clone(), copy: state.newest, replayed: 0 })
}

impl<B> std::fmt::Debug for ReplayBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayBody").field("copy", &self.copy).field("replayed", &self.replayed).finish()
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = ReplayError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, ReplayError>>> {
        let this = self.get_mut();
        let mut shared = this.shared.lock().unwrap_or_else(|e| e.into_inner());
        if shared.newest != this.copy {
            return Poll::Ready(Some(Err(ReplayError::Superseded)));
        }
        if let Some(recorded) = shared.frames.get(this.replayed) {
            this.replayed += 1;
            return Poll::Ready(Some(Ok(recorded.frame())));
        }
        let shared = &mut *shared;
        let Some(inner) = shared.inner.as_mut().filter(|_| !shared.ended) else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                shared.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(error))) => {
                shared.lost = true;
                Poll::Ready(Some(Err(ReplayError::Body(error.into()))))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if !shared.lost {
                    let recorded = match (frame.data_ref(), frame.trailers_ref()) {
                        (Some(data), _) => {
                            shared.bytes += data.len();
                            Some(Recorded::Data(data.clone()))
                        }
                        (None, Some(trailers)) => Some(Recorded::Trailers(Box::new(trailers.clone()))),
                        // A kind of frame this version of http-body does not know: it cannot be replayed.
                        (None, None) => None,
                    };
                    match recorded {
                        Some(recorded) if shared.bytes <= shared.limit => {
                            shared.frames.push(recorded);
                            this.replayed += 1;
                        }
                        _ => {
                            shared.lost = true;
                            shared.frames = Frames::default();
                        }
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        shared.newest == self.copy
            && self.replayed >= shared.frames.len()
            && (shared.ended || shared.inner.as_ref().is_none_or(Body::is_end_stream))
    }

    fn size_hint(&self) -> SizeHint {
        let shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        let unread: u64 = shared
            .frames
            .iter()
            .skip(self.replayed)
            .map(|f| match f {
                Recorded::Data(data) => data.len() as u64,
                Recorded::Trailers(_) => 0,
            })
            .sum();
        if shared.ended {
            return SizeHint::with_exact(unread);
        }
        let Some(inner) = shared.inner.as_ref().map(Body::size_hint) else {
            return SizeHint::with_exact(unread);
        };
        let mut hint = SizeHint::new();
        hint.set_lower(unread + inner.lower());
        if let Some(upper) = inner.upper() {
            hint.set_upper(unread + upper);
        }
        hint
    }
}

/// What a resend needs of the call's head: method, URI, version and headers, the headers' names and values in
/// one buffer, inline when small (a gRPC call's headers are a few dozen bytes). Cloning the `HeaderMap` instead
/// costs two allocations, plus one per value not yet shared, on every call; this costs none for ordinary calls,
/// and the map is rebuilt only for a resend (rare). Extensions stay behind: only this process reads them, and
/// hyper does not send them.
pub(crate) struct HeadCopy {
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
    pub(crate) fn new(head: &http::request::Parts) -> Self {
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
    pub(crate) fn request<B>(&self, body: B) -> Option<http::Request<B>> {
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
    use http_body_util::{BodyExt, Full, StreamBody};

    fn chunks(parts: &[&'static [u8]]) -> impl Body<Data = Bytes, Error = std::convert::Infallible> + Unpin {
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> =
            parts.iter().map(|p| Ok(Frame::data(Bytes::from_static(p)))).collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn a_copy_replays_what_was_read_and_continues_with_the_rest() {
        let mut first = ReplayBody::new(chunks(&[b"ab", b"cd", b"ef"]), 1024);
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "ab");
        let again = first.try_clone().unwrap();
        assert!(matches!(first.frame().await, Some(Err(ReplayError::Superseded))), "the old copy stops");
        assert_eq!(again.collect().await.unwrap().to_bytes(), "abcdef");
    }

    #[tokio::test]
    async fn a_copy_of_an_unread_or_finished_body_is_the_whole_body() {
        let unread = ReplayBody::new(Full::new(Bytes::from_static(b"hello")), 1024);
        assert_eq!(unread.try_clone().unwrap().collect().await.unwrap().to_bytes(), "hello");

        let mut read = ReplayBody::new(chunks(&[b"he", b"llo"]), 1024);
        while read.frame().await.is_some() {}
        assert!(read.is_end_stream());
        let again = read.try_clone().unwrap();
        assert_eq!(again.size_hint().exact(), Some(5));
        assert_eq!(again.collect().await.unwrap().to_bytes(), "hello");
    }

    #[tokio::test]
    async fn frames_and_trailers_replay_in_order() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-end", http::HeaderValue::from_static("1"));
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"a"))),
            Ok(Frame::data(Bytes::from_static(b"b"))),
            Ok(Frame::trailers(trailers.clone())),
        ];
        let mut body = ReplayBody::new(StreamBody::new(futures_util::stream::iter(frames)), 1024);
        while body.frame().await.is_some() {}
        let collected = body.try_clone().unwrap().collect().await.unwrap();
        assert_eq!(collected.trailers(), Some(&trailers));
        assert_eq!(collected.to_bytes(), "ab");
    }

    #[tokio::test]
    async fn past_the_limit_no_copy_is_possible_and_nothing_is_kept() {
        let mut body = ReplayBody::new(chunks(&[b"1234", b"5678"]), 6);
        assert!(body.frame().await.is_some());
        assert!(body.try_clone().is_some(), "4 bytes are within the limit");
        let mut body = body.try_clone().unwrap();
        while body.frame().await.is_some() {}
        assert!(body.try_clone().is_none(), "8 bytes are past it");
        assert_eq!(body.shared.lock().unwrap().frames.len(), 0);
    }
}
