//! Request mirroring (Envoy's `request_mirror_policies`): a copy of a share of a route's calls goes to a shadow
//! cluster, fire and forget.
//!
//! - Each mirror draws its own share (parts per million) per call.
//! - The copy leaves once the call has its answer (or its error), in a task of its own: the call's response
//!   and latency never depend on the shadow. A copy needs the whole request body, as recorded for replay; a
//!   body still streaming when the answer came, or longer than the replay limit, is not copied (counted as
//!   skipped).
//! - The copy's authority gets `-shadow` appended to its host (Envoy's default, unless the policy turns it
//!   off), so the shadow can tell copies from calls.
//! - A copy ends at the call's deadline, else the route timeout, else after [`DEFAULT_MIRROR_TIMEOUT`]
//!   (Envoy's default route timeout), so a hung shadow cannot pile up tasks. Its answer is read to the end and
//!   dropped; its errors are logged at debug and change nothing.
//! - A mirror naming a cluster the table does not have sends nothing (counted as skipped).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::{BoxFuture, Either};
use http_body::Body;
use mesh_core::lb::{Random, SplitMix64};
use mesh_core::policy::Mirror;
use tower::{Layer, Service};

use crate::BoxError;
use crate::balance::{RequestBody, ResponseBody};
use crate::cluster::ClusterService;
use crate::deadline::{self, Deadline};
use crate::replay::{HeadCopy, ReplayBody};
use crate::stats::{TargetStats, count};

/// How long a copy may take when neither the caller nor the route sets a deadline.
pub const DEFAULT_MIRROR_TIMEOUT: Duration = Duration::from_secs(15);

type Request<B> = http::Request<ReplayBody<B>>;

/// Mirrors a route's calls to its shadow clusters.
pub struct MirrorLayer<B> {
    shared: Arc<Shared<B>>,
}

struct Shared<B> {
    /// Each mirror and its built cluster (`None`: not in the table).
    mirrors: Vec<(Mirror, Option<ClusterService<B>>)>,
    /// The route timeout, which bounds a copy when the caller sets no deadline.
    timeout: Option<Duration>,
    seed: AtomicU64,
    stats: Arc<TargetStats>,
}

impl<B> Clone for MirrorLayer<B> {
    fn clone(&self) -> Self {
        Self { shared: self.shared.clone() }
    }
}

impl<B> fmt::Debug for MirrorLayer<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mirrors: Vec<&Mirror> = self.shared.mirrors.iter().map(|(m, _)| m).collect();
        f.debug_struct("MirrorLayer").field("mirrors", &mirrors).finish()
    }
}

impl<B> MirrorLayer<B> {
    /// Mirrors to each of `mirrors` (with its built cluster, `None` when the table has none), copies bounded
    /// by the route's `timeout`, counted in `stats`.
    pub fn new(mirrors: Vec<(Mirror, Option<ClusterService<B>>)>, timeout: Option<Duration>, stats: Arc<TargetStats>) -> Self {
        Self { shared: Arc::new(Shared { mirrors, timeout, seed: AtomicU64::new(0x5ad0), stats }) }
    }
}

impl<S, B> Layer<S> for MirrorLayer<B> {
    type Service = Mirrored<S, B>;

    fn layer(&self, inner: S) -> Mirrored<S, B> {
        Mirrored { inner, shared: self.shared.clone() }
    }
}

/// The mirroring service ([`MirrorLayer`]).
pub struct Mirrored<S, B> {
    inner: S,
    shared: Arc<Shared<B>>,
}

impl<S: Clone, B> Clone for Mirrored<S, B> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone(), shared: self.shared.clone() }
    }
}

impl<S, B> fmt::Debug for Mirrored<S, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mirrored").field("mirrors", &self.shared.mirrors.len()).finish()
    }
}

impl<S, B> Service<Request<B>> for Mirrored<S, B>
where
    S: Service<Request<B>, Response = http::Response<ResponseBody>, Error = BoxError>,
    S::Future: Send + 'static,
    B: RequestBody,
{
    type Response = http::Response<ResponseBody>;
    type Error = BoxError;
    type Future = Either<S::Future, BoxFuture<'static, Result<http::Response<ResponseBody>, BoxError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let shared = &self.shared;
        let mut rng = SplitMix64::new(shared.seed.fetch_add(1, Ordering::Relaxed));
        let chosen: Vec<usize> =
            (0..shared.mirrors.len()).filter(|&i| (rng.below(1_000_000) as u32) < shared.mirrors[i].0.per_million).collect();
        if chosen.is_empty() {
            return Either::Left(self.inner.call(request));
        }
        let (head, body) = request.into_parts();
        let copy = HeadCopy::new(&head);
        let deadline = head.extensions.get::<Deadline>().copied();
        let recorder = body.recorder();
        let call = self.inner.call(http::Request::from_parts(head, body));
        let shared = shared.clone();
        Either::Right(Box::pin(async move {
            let result = call.await;
            for i in chosen {
                let (mirror, service) = &shared.mirrors[i];
                let request = recorder.snapshot().and_then(|body| copy.request(body));
                match (service, request) {
                    (Some(service), Some(request)) => {
                        count(&shared.stats.mirrored);
                        let until = deadline
                            .map_or_else(|| tokio::time::Instant::now() + shared.timeout.unwrap_or(DEFAULT_MIRROR_TIMEOUT), |d| d.0);
                        tokio::spawn(shadow(service.clone(), shadowed(request, mirror.shadow_host, until), until));
                    }
                    (service, _) => {
                        count(&shared.stats.mirrors_skipped);
                        let why = if service.is_none() { "the cluster is not in the table" } else { "the body is not whole" };
                        tracing::debug!(cluster = %mirror.cluster, why, "call not mirrored");
                    }
                }
            }
            result
        }))
    }
}

/// The copy as the shadow gets it: `-shadow` on its host when asked, and the time left until `until`.
fn shadowed<B>(mut request: Request<B>, shadow_host: bool, until: tokio::time::Instant) -> Request<B> {
    let left = until.saturating_duration_since(tokio::time::Instant::now());
    request.headers_mut().insert(deadline::GRPC_TIMEOUT, deadline::format(left));
    request.extensions_mut().insert(Deadline(until));
    if shadow_host {
        let uri = request.uri().clone();
        if let Some(authority) = uri.authority() {
            let host = authority.host();
            let renamed = match authority.port() {
                Some(port) => format!("{host}-shadow:{port}"),
                None => format!("{host}-shadow"),
            };
            let mut parts = uri.into_parts();
            parts.authority = renamed.parse().ok().or(parts.authority);
            if let Ok(uri) = http::Uri::from_parts(parts) {
                *request.uri_mut() = uri;
            }
        }
        if let Some(value) = request.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()) {
            let renamed = match value.rsplit_once(':') {
                Some((host, port)) => format!("{host}-shadow:{port}"),
                None => format!("{value}-shadow"),
            };
            if let Ok(value) = http::HeaderValue::from_str(&renamed) {
                request.headers_mut().insert(http::header::HOST, value);
            }
        }
    }
    request
}

/// Sends one copy and reads its answer to the end, all by `until`; what comes back is dropped.
async fn shadow<B: RequestBody>(service: ClusterService<B>, request: Request<B>, until: tokio::time::Instant) {
    let send = async {
        let mut body = std::pin::pin!(service.send(request).await?.into_body());
        while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
            frame?;
        }
        Ok::<(), BoxError>(())
    };
    match tokio::time::timeout_at(until, send).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::debug!(%error, "mirrored call failed"),
        Err(_) => tracing::debug!("mirrored call ran out of time"),
    }
}
