//! The connection pool: one HTTP/2 connection per endpoint, opened through the connector, kept up with
//! backoff from the balancer's own task.

use std::collections::{BinaryHeap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use mesh_core::Endpoint;

use super::handle::{ConnState, Handle, WAITING, micros};
use super::{RequestBody, State, lock};
use crate::Error;
use crate::connect::{Connect, Connection, EndpointTarget, PeerIdentity};

impl<B: RequestBody, C: Connect> State<B, C> {
    /// The connection target of the endpoint at `addr`: its latest discovery data (looked up in the set, so the
    /// per-endpoint handle stays small) and the cluster's TLS policy.
    fn target_of(&self, addr: SocketAddr) -> EndpointTarget {
        let list = lock(&self.endpoints).clone();
        let endpoint = match list.binary_search_by_key(&addr, |(e, _)| e.addr) {
            Ok(i) => Arc::clone(&list[i].0),
            // Removed meanwhile: the connection, if it opens, closes with the handle.
            Err(_) => Arc::new(Endpoint::new(addr)),
        };
        EndpointTarget { endpoint, tls: self.tls.clone() }
    }

    /// Marks an endpoint whose connection was found closed, so no one picks it
    /// until it reconnects.
    pub(super) fn mark_broken(&self, handle: &Handle<B>) {
        if handle.state() == ConnState::Ready {
            handle.set_state(ConnState::Connecting);
            self.refresh();
        }
    }

    /// Opens a connection; the returned receiver fires when it closes.
    async fn connect(&self, addr: SocketAddr) -> Result<(Conn<B>, oneshot::Receiver<()>), Error> {
        let policy = &self.config.connection;
        let target = self.target_of(addr);
        let io = match tokio::time::timeout(policy.connect_timeout, self.connector.connect(&target)).await {
            Ok(Ok(io)) => io,
            Ok(Err(source)) => return Err(Error::Connect { addr, source }),
            Err(_) => {
                return Err(Error::Connect {
                    addr,
                    source: std::io::Error::new(std::io::ErrorKind::TimedOut, format!("timed out after {:?}", policy.connect_timeout)),
                });
            }
        };
        let peer = io.peer_identity();
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder.timer(TokioTimer::new());
        if let Some(interval) = policy.keepalive_interval {
            builder.keep_alive_interval(interval).keep_alive_timeout(policy.keepalive_timeout).keep_alive_while_idle(true);
        }
        // Boxed: the handshake's state is large and needed only once the TCP connect succeeded, so the attempts
        // that fail (a large unreachable set retries thousands) stay small tasks.
        let (sender, connection) =
            Box::pin(builder.handshake(io)).await.map_err(|source| Error::Handshake { addr, source: source.into() })?;
        let (tx, rx) = oneshot::channel();
        // The connection runs in its own task so that removing the endpoint
        // (which aborts the reconnect loop) does not cut requests in flight.
        let span = tracing::debug_span!(parent: &self.span, "connection", %addr);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "connection ended with error");
                }
                let _ = tx.send(());
            },
            span,
        ));
        Ok((Conn { sender, peer }, rx))
    }
}

/// A connection attempt's outcome.
type Attempt<B> = (Arc<Handle<B>>, Result<(Conn<B>, oneshot::Receiver<()>), Error>);

/// An endpoint's open connection: its sender, and the peer identity its connector handed back.
pub(super) struct Conn<B> {
    pub(super) sender: SendRequest<B>,
    pub(super) peer: Option<PeerIdentity>,
}

/// A request handed to a connection: the response to wait for, and the peer that serves it.
pub(super) type Sent<F> = (F, Option<PeerIdentity>);

/// An endpoint waiting to retry, ordered so the earliest is at the top of a max-heap.
pub(super) struct Due<B> {
    /// Nanoseconds since the manager's origin.
    at: u64,
    handle: Weak<Handle<B>>,
}

impl<B> PartialEq for Due<B> {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}

impl<B> Eq for Due<B> {}

impl<B> PartialOrd for Due<B> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl<B> Ord for Due<B> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.at.cmp(&self.at)
    }
}

/// Keeps every endpoint of a balancer connected from the balancer's task: each connection attempt runs as a
/// task of its own while it lasts (so a large update's attempts use every runtime thread), and an endpoint
/// waiting to retry is a 16-byte entry in a timer heap rather than a sleeping task (a task in backoff costs
/// about half a kilobyte; 10,000 unreachable endpoints would hold 5 MB of them).
///
/// Per endpoint: connect (bounded by the connect timeout); on success it is READY until the connection
/// closes, then reconnects at once if the connection lived a second or more, else after the backoff; on
/// failure it is TRANSIENT_FAILURE and retries after the backoff (gRPC's: ×1.6 per failure up to the max,
/// ±20% jitter). A stopped (removed) endpoint is dropped at its next event.
pub(super) struct Connections<B, C> {
    state: Weak<State<B, C>>,
    /// Outcomes of attempts in flight, and how many there are.
    outcomes: (mpsc::UnboundedSender<Attempt<B>>, mpsc::UnboundedReceiver<Attempt<B>>),
    attempting: usize,
    /// Resolve when an open connection closes: (endpoint, when it opened).
    open: FuturesUnordered<BoxFuture<'static, (Arc<Handle<B>>, Instant)>>,
    /// Endpoints waiting to retry, earliest first. Removed endpoints' entries are left in place and counted
    /// in `stale`; they are skipped when due, and swept out once they are half the heap.
    waiting: BinaryHeap<Due<B>>,
    stale: usize,
    /// What retry times count from.
    origin: tokio::time::Instant,
    /// Endpoints due to connect while [`MAX_CONNECTING`] attempts already run, in order.
    queued: VecDeque<Weak<Handle<B>>>,
}

/// Connection attempts one balancer runs at once. A 10,000-endpoint update then opens connections in waves
/// instead of one burst of SYNs, and never holds 10,000 attempts' tasks at the same time.
const MAX_CONNECTING: usize = 128;

impl<B: RequestBody, C: Connect> Connections<B, C> {
    pub(super) fn new(state: &Arc<State<B, C>>) -> Self {
        Self {
            state: Arc::downgrade(state),
            outcomes: mpsc::unbounded_channel(),
            attempting: 0,
            open: FuturesUnordered::new(),
            waiting: BinaryHeap::new(),
            stale: 0,
            origin: tokio::time::Instant::now(),
            queued: VecDeque::new(),
        }
    }

    /// Starts connecting `handle` now, or as soon as an attempt slot frees.
    pub(super) fn start(&mut self, state: &Arc<State<B, C>>, handle: Arc<Handle<B>>) {
        if self.attempting >= MAX_CONNECTING {
            self.queued.push_back(Arc::downgrade(&handle));
            return;
        }
        self.attempting += 1;
        let (state, outcomes) = (Arc::clone(state), self.outcomes.0.clone());
        let span = tracing::debug_span!(parent: &state.span, "connect", addr = %handle.addr());
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let result = state.connect(handle.addr()).await;
                // The balancer may be gone; then the connection just closes.
                let _ = outcomes.send((handle, result));
            },
            span,
        ));
    }

    /// Accounts for removed (stopped) endpoints: their retry entries are now stale, and swept out once there
    /// are more than 64 of them and they make up half the heap.
    pub(super) fn forget(&mut self, gone: &[Arc<Handle<B>>]) {
        for handle in gone {
            if handle.flags.fetch_and(!WAITING, Ordering::AcqRel) & WAITING != 0 {
                self.stale += 1;
            }
        }
        if self.stale > 64 && self.stale * 2 > self.waiting.len() {
            self.waiting.retain(|due| due.handle.upgrade().is_some_and(|h| !h.is_stopped()));
            self.waiting.shrink_to_fit();
            self.stale = 0;
        }
    }

    /// Waits for the next connection event and handles it; `None` once the balancer is gone.
    pub(super) async fn next(&mut self) -> Option<()> {
        let due = self.waiting.peek().map(|d| self.origin + Duration::from_nanos(d.at));
        tokio::select! {
            Some(attempt) = self.outcomes.1.recv() => {
                self.attempting -= 1;
                let state = self.state.upgrade()?;
                self.connected(&state, attempt);
                while self.attempting < MAX_CONNECTING
                    && let Some(handle) = self.queued.pop_front()
                {
                    if let Some(handle) = handle.upgrade().filter(|h| !h.is_stopped()) {
                        self.start(&state, handle);
                    }
                }
                if self.queued.is_empty() && self.queued.capacity() > 64 {
                    self.queued = VecDeque::new();
                }
            }
            Some((handle, opened)) = self.open.next(), if !self.open.is_empty() => {
                let state = self.state.upgrade()?;
                self.closed(&state, handle, opened);
            }
            () = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                let state = self.state.upgrade()?;
                let now = self.origin.elapsed().as_nanos() as u64;
                while self.waiting.peek().is_some_and(|d| d.at <= now) {
                    let Some(due) = self.waiting.pop() else { break };
                    match due.handle.upgrade().filter(|h| !h.is_stopped()) {
                        Some(handle) => {
                            handle.flags.fetch_and(!WAITING, Ordering::AcqRel);
                            self.start(&state, handle);
                        }
                        None => self.stale = self.stale.saturating_sub(1),
                    }
                }
                if self.waiting.capacity() > 64 && self.waiting.len() * 4 < self.waiting.capacity() {
                    self.waiting.shrink_to_fit();
                }
            }
            else => std::future::pending::<()>().await,
        }
        Some(())
    }

    fn connected(&mut self, state: &Arc<State<B, C>>, (handle, result): Attempt<B>) {
        if handle.is_stopped() {
            return;
        }
        let policy = &state.config.connection;
        match result {
            Ok((sender, closed)) => {
                *lock(&handle.sender) = Some(Box::new(sender));
                handle.set_state(ConnState::Ready);
                handle.backoff_us.store(micros(policy.reconnect_backoff_base), Ordering::Relaxed);
                tracing::debug!(target_name = %state.target, addr = %handle.addr(), "endpoint ready");
                state.schedule_refresh();
                let opened = Instant::now();
                self.open.push(Box::pin(async move {
                    let _ = closed.await;
                    (handle, opened)
                }));
            }
            Err(error) => {
                let backoff = Duration::from_micros(handle.backoff_us.load(Ordering::Relaxed).into());
                // Loud once per failure streak, quiet on its retries: 10,000 unreachable endpoints would
                // otherwise log 10,000 warnings per backoff round.
                if handle.state() == ConnState::TransientFailure {
                    tracing::debug!(target_name = %state.target, addr = %handle.addr(), %error, retry_in = ?backoff, "connect failed again");
                } else {
                    tracing::warn!(target_name = %state.target, addr = %handle.addr(), %error, retry_in = ?backoff, "connect failed");
                }
                *lock(&state.last_error) = Some(Arc::new(error));
                handle.set_state(ConnState::TransientFailure);
                state.schedule_refresh();
                let next = backoff.mul_f64(1.6).min(policy.reconnect_backoff_max);
                self.retry_later(handle, jitter(backoff, &state.seed), next);
            }
        }
    }

    fn closed(&mut self, state: &Arc<State<B, C>>, handle: Arc<Handle<B>>, opened: Instant) {
        lock(&handle.sender).take();
        if handle.is_stopped() {
            return;
        }
        handle.set_state(ConnState::Connecting);
        tracing::debug!(target_name = %state.target, addr = %handle.addr(), "connection closed; reconnecting");
        state.schedule_refresh();
        let base = state.config.connection.reconnect_backoff_base;
        // A connection that dies at once is a failure, not a reason to spin.
        if opened.elapsed() >= Duration::from_secs(1) {
            self.start(state, handle);
        } else {
            let next = base.mul_f64(1.6).min(state.config.connection.reconnect_backoff_max);
            self.retry_later(handle, jitter(base, &state.seed), next);
        }
    }

    /// Retries `handle` after `after`, with `backoff` for the attempt after that.
    fn retry_later(&mut self, handle: Arc<Handle<B>>, after: Duration, backoff: Duration) {
        handle.backoff_us.store(micros(backoff), Ordering::Relaxed);
        handle.flags.fetch_or(WAITING, Ordering::AcqRel);
        if self.waiting.len() == self.waiting.capacity() {
            // Room for every attempt still running or queued to fail too: one allocation of the right size rather
            // than a doubling series whose freed buffers a large unreachable set would leave behind.
            self.waiting.reserve_exact(self.attempting + self.queued.len() + 1);
        }
        let at = (self.origin.elapsed() + after).as_nanos() as u64;
        self.waiting.push(Due { at, handle: Arc::downgrade(&handle) });
    }
}

/// Backoff with ±20% jitter, as gRPC's connection backoff.
fn jitter(backoff: Duration, seed: &AtomicU64) -> Duration {
    let mut rng = mesh_core::lb::SplitMix64::new(seed.fetch_add(1, Ordering::Relaxed));
    let unit = mesh_core::lb::Random::next_u64(&mut rng) as f64 / u64::MAX as f64;
    backoff.mul_f64(0.8 + 0.4 * unit)
}
