//! Per-endpoint connection management and the publication of snapshots.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use mesh_core::lb::{PeakEwma, PriorityHealth, RingHash, priority_load};
use mesh_core::{Endpoint, LbPolicy};
use tokio::sync::{mpsc, oneshot};

use super::{Endpoints, RequestBody, Snapshot, State, lock};
use crate::Error;
use crate::connect::Connect;
use crate::discover::Change;

/// Outcome of a request handed to a connection.
pub(super) type SendResult<B> = Result<http::Response<hyper::body::Incoming>, hyper::client::conn::TrySendError<http::Request<B>>>;

/// Connection state of an endpoint (gRPC's subchannel states, without IDLE:
/// the mesh keeps connections warm).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConnState {
    /// First connection attempt in progress, or reconnecting after a clean close.
    Connecting,
    /// Connected; takes traffic.
    Ready,
    /// The last connection attempt failed; retrying with backoff.
    TransientFailure,
}

impl ConnState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Ready,
            2 => Self::TransientFailure,
            _ => Self::Connecting,
        }
    }
}

/// One endpoint's connection and load statistics.
pub(super) struct Handle<B> {
    pub(super) addr: SocketAddr,
    state: AtomicU8,
    sender: Mutex<Option<SendRequest<B>>>,
    in_flight: AtomicU64,
    ewma: Mutex<PeakEwma>,
    /// Removed from the set: no more connection attempts.
    stopped: AtomicBool,
    /// Where it waits in the connection manager's retry timers, if it does (so removal can drop the entry).
    retry: Mutex<Option<RetryKey>>,
    /// Latest discovery data (weight, locality, metadata) for this address;
    /// shared with snapshots, so publishing costs a reference count.
    endpoint: Mutex<Arc<Endpoint>>,
}

impl<B> Handle<B> {
    pub(super) fn state(&self) -> ConnState {
        ConnState::from_u8(self.state.load(Ordering::Acquire))
    }

    fn set_state(&self, state: ConnState) {
        self.state.store(state as u8, Ordering::Release);
    }

    pub(super) fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub(super) fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn end(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Hands `request` to the connection (the enqueue happens here, under
    /// the lock; the returned future only waits for the response), or gives
    /// it back when not connected. No per-request sender clone.
    // The request comes back whole so it can be re-picked, as hyper's own
    // `try_send_request` does.
    #[allow(clippy::result_large_err)]
    pub(super) fn send(&self, request: http::Request<B>) -> Result<impl Future<Output = SendResult<B>> + Send + use<B>, http::Request<B>>
    where
        B: RequestBody,
    {
        match lock(&self.sender).as_mut() {
            Some(sender) => Ok(sender.try_send_request(request)),
            None => Err(request),
        }
    }

    /// Records a latency sample. Under contention the sample is dropped
    /// rather than waited for: a blocked response path costs more than one
    /// missing sample of a moving average (the next one lands).
    pub(super) fn observe(&self, rtt: Duration, now: Duration) {
        if let Ok(mut ewma) = self.ewma.try_lock() {
            ewma.observe(rtt, now);
        }
    }

    pub(super) fn ewma_cost(&self, now: Duration) -> f64 {
        lock(&self.ewma).cost(self.in_flight(), now)
    }

    /// Stops reconnecting and releases the connection: it closes once the
    /// requests in flight on it have finished.
    pub(super) fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        lock(&self.sender).take();
    }

    fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }
}

impl<B: RequestBody, C: Connect> State<B, C> {
    pub(super) fn snapshot(&self) -> Arc<Snapshot<B>> {
        self.snapshot.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(super) fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Applies a discovery change, publishes the new set, and returns the endpoints that are new (the
    /// connection manager starts connecting them) and those removed (stopped; it forgets them).
    pub(super) fn apply(self: &Arc<Self>, change: Change) -> Applied<B> {
        let mut endpoints = lock(&self.endpoints);
        let (mut added, mut gone) = (Vec::new(), Vec::new());
        match change {
            Change::Insert(endpoint) => added.extend(self.insert(&mut endpoints, endpoint)),
            Change::Remove(addr) => gone.extend(endpoints.remove(&addr)),
            Change::Reset(list) => {
                let keep: HashSet<SocketAddr> = list.iter().map(|e| e.addr).collect();
                endpoints.retain(|addr, handle| {
                    let kept = keep.contains(addr);
                    if !kept {
                        gone.push(Arc::clone(handle));
                    }
                    kept
                });
                // A repeated address: the last one wins.
                for endpoint in list {
                    added.extend(self.insert(&mut endpoints, endpoint));
                }
            }
        }
        self.publish(&endpoints, true);
        // Removed endpoints stop once the new set is published, so a large update is visible first. Calls in
        // flight on a removed endpoint drain.
        for handle in &gone {
            tracing::debug!(addr = %handle.addr, in_flight = handle.in_flight(), "endpoint removed; draining");
            handle.stop();
        }
        // An address inserted twice in one reset has one live handle.
        added.retain(|handle| endpoints.get(&handle.addr).is_some_and(|h| Arc::ptr_eq(h, handle)));
        Applied { added, gone }
    }

    /// Adds or updates an endpoint; returns the handle when it is new (not
    /// connecting yet).
    fn insert(self: &Arc<Self>, endpoints: &mut Endpoints<B>, endpoint: Endpoint) -> Option<Arc<Handle<B>>> {
        if let Err(error) = endpoint.validate() {
            tracing::warn!(target_name = %self.target, %error, "ignoring endpoint");
            return None;
        }
        if let Some(handle) = endpoints.get(&endpoint.addr) {
            let mut current = lock(&handle.endpoint);
            if **current != endpoint {
                *current = Arc::new(endpoint);
            }
            return None;
        }
        let (default_rtt, decay) = match self.config.lb {
            LbPolicy::P2cEwma { default_rtt, decay } => (default_rtt, decay),
            _ => (Duration::from_millis(30), Duration::from_secs(10)),
        };
        let handle = Arc::new(Handle {
            addr: endpoint.addr,
            state: AtomicU8::new(ConnState::Connecting as u8),
            sender: Mutex::new(None),
            in_flight: AtomicU64::new(0),
            ewma: Mutex::new(PeakEwma::new(default_rtt, decay, self.now())),
            stopped: AtomicBool::new(false),
            retry: Mutex::new(None),
            endpoint: Mutex::new(Arc::new(endpoint)),
        });
        tracing::debug!(target_name = %self.target, addr = %handle.addr, "endpoint added");
        endpoints.insert(handle.addr, Arc::clone(&handle));
        Some(handle)
    }

    /// Asks for a snapshot rebuild after a connection state change.
    fn schedule_refresh(&self) {
        self.republish.notify_one();
    }

    /// Re-publishes now.
    pub(super) fn refresh(&self) {
        let endpoints = lock(&self.endpoints);
        self.publish(&endpoints, false);
    }

    /// Builds and installs a new snapshot. Called with the endpoint lock held,
    /// so snapshots are published in order.
    fn publish(&self, endpoints: &Endpoints<B>, set_changed: bool) {
        let previous = self.snapshot();
        // In address order: the map is ordered.
        let list: Vec<(Arc<Endpoint>, Arc<Handle<B>>)> = endpoints.values().map(|h| (lock(&h.endpoint).clone(), Arc::clone(h))).collect();

        let mut priorities: Vec<u32> = list.iter().map(|(e, _)| e.priority).collect();
        priorities.sort_unstable();
        priorities.dedup();
        let mut levels = vec![Vec::new(); priorities.len()];
        let mut ready = vec![false; list.len()];
        let mut health = vec![PriorityHealth { healthy: 0, total: 0 }; priorities.len()];
        for (i, (endpoint, handle)) in list.iter().enumerate() {
            let level = priorities.binary_search(&endpoint.priority).unwrap_or(0);
            health[level].total += 1;
            if handle.state() == ConnState::Ready && endpoint.health.is_routable() {
                health[level].healthy += 1;
                levels[level].push(i);
                ready[i] = true;
            }
        }
        let ring = if !previous.hashing {
            None
        } else if set_changed || previous.ring.is_none() {
            self.build_ring(&list)
        } else {
            previous.ring.clone()
        };
        let snapshot = Snapshot {
            generation: previous.generation + 1,
            all_failed: !list.is_empty() && list.iter().all(|(_, h)| h.state() == ConnState::TransientFailure),
            priority_load: priority_load(&health, self.config.overprovisioning_factor),
            endpoints: list,
            ready,
            levels,
            ring,
            hashing: previous.hashing,
            set_at: if set_changed { Some(SystemTime::now()) } else { previous.set_at },
        };
        let generation = snapshot.generation;
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(snapshot);
        self.changed.send_replace(generation);
    }

    fn build_ring(&self, list: &[(Arc<Endpoint>, Arc<Handle<B>>)]) -> Option<Arc<RingHash<usize>>> {
        let LbPolicy::RingHash { ring, .. } = &self.config.lb else { return None };
        // Ring entries hash the address, so positions survive set changes; the
        // ring stores indices into this snapshot's list.
        let items: Vec<(RingKey, u32)> = list.iter().enumerate().map(|(i, (e, _))| (RingKey(i, e.addr), e.weight)).collect();
        match RingHash::build(&items, ring) {
            Ok(built) => Some(Arc::new(built.map_keys(|k| k.0))),
            Err(error) => {
                tracing::error!(target_name = %self.target, %error, "cannot build hash ring");
                None
            }
        }
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
    async fn connect(&self, addr: SocketAddr) -> Result<(SendRequest<B>, oneshot::Receiver<()>), Error> {
        let policy = &self.config.connection;
        let io = match tokio::time::timeout(policy.connect_timeout, self.connector.connect(addr)).await {
            Ok(Ok(io)) => io,
            Ok(Err(source)) => return Err(Error::Connect { addr, source }),
            Err(_) => {
                return Err(Error::Connect {
                    addr,
                    source: std::io::Error::new(std::io::ErrorKind::TimedOut, format!("timed out after {:?}", policy.connect_timeout)),
                });
            }
        };
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder.timer(TokioTimer::new());
        if let Some(interval) = policy.keepalive_interval {
            builder.keep_alive_interval(interval).keep_alive_timeout(policy.keepalive_timeout).keep_alive_while_idle(true);
        }
        let (sender, connection) = builder.handshake(io).await.map_err(|source| Error::Handshake { addr, source })?;
        let (tx, rx) = oneshot::channel();
        // The connection runs in its own task so that removing the endpoint
        // (which aborts the reconnect loop) does not cut requests in flight.
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%addr, %error, "connection ended with error");
            }
            let _ = tx.send(());
        });
        Ok((sender, rx))
    }
}

/// What a discovery change did to the endpoint set.
pub(super) struct Applied<B> {
    /// New endpoints, not connecting yet.
    pub(super) added: Vec<Arc<Handle<B>>>,
    /// Removed endpoints, stopped (draining).
    pub(super) gone: Vec<Arc<Handle<B>>>,
}

/// A connection attempt's outcome, with the backoff to use if it failed.
type Attempt<B> = (Arc<Handle<B>>, Duration, Result<(SendRequest<B>, oneshot::Receiver<()>), Error>);

/// An endpoint waiting to retry, and the backoff of the attempt after.
type Retry<B> = (Weak<Handle<B>>, Duration);

/// A retry timer: when it is due, and a sequence number that keeps keys unique.
type RetryKey = (tokio::time::Instant, u64);

/// Keeps every endpoint of a balancer connected from the balancer's task: each connection attempt runs as a
/// task of its own while it lasts (so a large update's attempts use every runtime thread), and an endpoint
/// waiting to retry is an entry in a timer map rather than a sleeping task (a task in backoff costs about
/// half a kilobyte; 10,000 unreachable endpoints would hold 5 MB of them).
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
    /// Endpoints waiting to retry: (due, sequence) → (endpoint, backoff of the attempt after).
    waiting: BTreeMap<RetryKey, Retry<B>>,
    sequence: u64,
    /// Endpoints due to connect while [`MAX_CONNECTING`] attempts already run, in order.
    queued: VecDeque<Retry<B>>,
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
            waiting: BTreeMap::new(),
            sequence: 0,
            queued: VecDeque::new(),
        }
    }

    /// Starts connecting `handle` now, or as soon as an attempt slot frees.
    pub(super) fn start(&mut self, state: &Arc<State<B, C>>, handle: Arc<Handle<B>>, backoff: Duration) {
        if self.attempting >= MAX_CONNECTING {
            self.queued.push_back((Arc::downgrade(&handle), backoff));
            return;
        }
        self.attempting += 1;
        let (state, outcomes) = (Arc::clone(state), self.outcomes.0.clone());
        tokio::spawn(async move {
            let result = state.connect(handle.addr).await;
            // The balancer may be gone; then the connection just closes.
            let _ = outcomes.send((handle, backoff, result));
        });
    }

    /// Drops what the manager holds for removed endpoints.
    pub(super) fn forget(&mut self, gone: &[Arc<Handle<B>>]) {
        for handle in gone {
            if let Some(key) = lock(&handle.retry).take() {
                self.waiting.remove(&key);
            }
        }
    }

    /// Waits for the next connection event and handles it; `None` once the balancer is gone.
    pub(super) async fn next(&mut self) -> Option<()> {
        let due = self.waiting.first_key_value().map(|(&(at, _), _)| at);
        tokio::select! {
            Some(attempt) = self.outcomes.1.recv() => {
                self.attempting -= 1;
                let state = self.state.upgrade()?;
                self.connected(&state, attempt);
                while self.attempting < MAX_CONNECTING
                    && let Some((handle, backoff)) = self.queued.pop_front()
                {
                    if let Some(handle) = handle.upgrade().filter(|h| !h.is_stopped()) {
                        self.start(&state, handle, backoff);
                    }
                }
            }
            Some((handle, opened)) = self.open.next(), if !self.open.is_empty() => {
                let state = self.state.upgrade()?;
                self.closed(&state, handle, opened);
            }
            () = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                let state = self.state.upgrade()?;
                let now = tokio::time::Instant::now();
                while let Some(entry) = self.waiting.first_entry() {
                    if entry.key().0 > now {
                        break;
                    }
                    let (handle, backoff) = entry.remove();
                    if let Some(handle) = handle.upgrade().filter(|h| !h.is_stopped()) {
                        lock(&handle.retry).take();
                        self.start(&state, handle, backoff);
                    }
                }
            }
            else => std::future::pending::<()>().await,
        }
        Some(())
    }

    fn connected(&mut self, state: &Arc<State<B, C>>, (handle, backoff, result): Attempt<B>) {
        if handle.is_stopped() {
            return;
        }
        let policy = &state.config.connection;
        match result {
            Ok((sender, closed)) => {
                *lock(&handle.sender) = Some(sender);
                handle.set_state(ConnState::Ready);
                tracing::debug!(target_name = %state.target, addr = %handle.addr, "endpoint ready");
                state.schedule_refresh();
                let opened = Instant::now();
                self.open.push(Box::pin(async move {
                    let _ = closed.await;
                    (handle, opened)
                }));
            }
            Err(error) => {
                // Loud once per failure streak, quiet on its retries: 10,000 unreachable endpoints would
                // otherwise log 10,000 warnings per backoff round.
                if handle.state() == ConnState::TransientFailure {
                    tracing::debug!(target_name = %state.target, addr = %handle.addr, %error, retry_in = ?backoff, "connect failed again");
                } else {
                    tracing::warn!(target_name = %state.target, addr = %handle.addr, %error, retry_in = ?backoff, "connect failed");
                }
                *lock(&state.last_error) = error.to_string();
                handle.set_state(ConnState::TransientFailure);
                state.schedule_refresh();
                let next = backoff.mul_f64(1.6).min(policy.reconnect_backoff_max);
                self.retry_later(&handle, jitter(backoff, &state.seed), next);
            }
        }
    }

    fn closed(&mut self, state: &Arc<State<B, C>>, handle: Arc<Handle<B>>, opened: Instant) {
        lock(&handle.sender).take();
        if handle.is_stopped() {
            return;
        }
        handle.set_state(ConnState::Connecting);
        tracing::debug!(target_name = %state.target, addr = %handle.addr, "connection closed; reconnecting");
        state.schedule_refresh();
        let base = state.config.connection.reconnect_backoff_base;
        // A connection that dies at once is a failure, not a reason to spin.
        if opened.elapsed() >= Duration::from_secs(1) {
            self.start(state, handle, base);
        } else {
            let next = base.mul_f64(1.6).min(state.config.connection.reconnect_backoff_max);
            self.retry_later(&handle, jitter(base, &state.seed), next);
        }
    }

    fn retry_later(&mut self, handle: &Arc<Handle<B>>, after: Duration, backoff: Duration) {
        self.sequence += 1;
        let key = (tokio::time::Instant::now() + after, self.sequence);
        self.waiting.insert(key, (Arc::downgrade(handle), backoff));
        *lock(&handle.retry) = Some(key);
    }
}

/// Key of a ring entry: hashed by address only.
#[derive(Clone)]
struct RingKey(usize, SocketAddr);

impl std::fmt::Display for RingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.1.fmt(f)
    }
}

/// Backoff with ±20% jitter, as gRPC's connection backoff.
fn jitter(backoff: Duration, seed: &AtomicU64) -> Duration {
    let mut rng = mesh_core::lb::SplitMix64::new(seed.fetch_add(1, Ordering::Relaxed));
    let unit = mesh_core::lb::Random::next_u64(&mut rng) as f64 / u64::MAX as f64;
    backoff.mul_f64(0.8 + 0.4 * unit)
}
