//! Per-endpoint connection management and the publication of snapshots.

use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use mesh_core::lb::{LocalityHealth, PeakEwma, PriorityHealth, RingHash, locality_effective_weights, priority_load};
use mesh_core::{Endpoint, EndpointSet, LbPolicy, Locality};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{Assignment, Entry, List, LocalityGroup, RequestBody, Snapshot, State, lock};
use crate::Error;
use crate::connect::{Connect, EndpointTarget};
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

/// One endpoint's connection and load statistics. Small (a cluster can have tens of thousands of endpoints):
/// the endpoint's discovery data lives in the balancer's list next to it, and its latency estimate is two
/// atomics rather than a lock.
pub(super) struct Handle<B> {
    addr: Addr,
    /// Boxed: 16 bytes with the lock instead of 24, whether connected or not.
    sender: Mutex<Option<Box<SendRequest<B>>>>,
    in_flight: AtomicU32,
    /// Calls that ended, by outcome ([`crate::classify::Outcome::is_failure`]): what outlier detection reads.
    /// They wrap at 2^32; readers take differences.
    successes: AtomicU32,
    failures: AtomicU32,
    /// Peak-EWMA RTT estimate in nanoseconds (`f32` bits), and when it was last updated (nanoseconds since the
    /// balancer's epoch). A sample too small to change the `f32` leaves the timestamp as it is, so its time
    /// counts in the next sample instead of being lost (which would stall the decay at high call rates).
    ewma_estimate: AtomicU32,
    ewma_stamp: AtomicU64,
    /// Backoff of the next connection attempt after a failure, in microseconds.
    backoff_us: AtomicU32,
    state: AtomicU8,
    /// [`STOPPED`] and [`WAITING`].
    flags: AtomicU8,
}

/// An address in 16 bytes instead of `SocketAddr`'s 32: IPv4 inline, IPv6 (rarer, and 28 bytes) boxed.
enum Addr {
    V4(SocketAddrV4),
    V6(Box<SocketAddrV6>),
}

impl Addr {
    fn new(addr: SocketAddr) -> Self {
        match addr {
            SocketAddr::V4(v4) => Self::V4(v4),
            SocketAddr::V6(v6) => Self::V6(Box::new(v6)),
        }
    }

    fn get(&self) -> SocketAddr {
        match self {
            Self::V4(v4) => SocketAddr::V4(*v4),
            Self::V6(v6) => SocketAddr::V6(**v6),
        }
    }
}

/// Removed from the set: no more connection attempts.
const STOPPED: u8 = 1;
/// Has an entry in the connection manager's retry timers.
const WAITING: u8 = 2;

impl<B> Handle<B> {
    fn new(addr: SocketAddr, default_rtt: Duration, now: Duration, backoff: Duration) -> Self {
        Self {
            addr: Addr::new(addr),
            sender: Mutex::new(None),
            in_flight: AtomicU32::new(0),
            successes: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            ewma_estimate: AtomicU32::new((default_rtt.as_nanos() as f32).to_bits()),
            ewma_stamp: AtomicU64::new(now.as_nanos() as u64),
            backoff_us: AtomicU32::new(micros(backoff)),
            state: AtomicU8::new(ConnState::Connecting as u8),
            flags: AtomicU8::new(0),
        }
    }

    pub(super) fn addr(&self) -> SocketAddr {
        self.addr.get()
    }

    pub(super) fn state(&self) -> ConnState {
        ConnState::from_u8(self.state.load(Ordering::Acquire))
    }

    fn set_state(&self, state: ConnState) {
        self.state.store(state as u8, Ordering::Release);
    }

    pub(super) fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed).into()
    }

    /// Counts a call that ended on this endpoint.
    pub(super) fn record(&self, failed: bool) {
        let counter = if failed { &self.failures } else { &self.successes };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Calls that ended here: (successes, failures), each wrapping at 2^32.
    pub(super) fn outcomes(&self) -> (u32, u32) {
        (self.successes.load(Ordering::Relaxed), self.failures.load(Ordering::Relaxed))
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

    fn ewma(&self, decay: Duration) -> PeakEwma {
        let estimate = f32::from_bits(self.ewma_estimate.load(Ordering::Relaxed)).into();
        PeakEwma::from_parts(estimate, Duration::from_nanos(self.ewma_stamp.load(Ordering::Relaxed)), decay)
    }

    /// Records a latency sample without a lock: plain loads and stores, so two samples landing at once may
    /// lose one of them (the next one lands), which costs less than making every response path wait.
    pub(super) fn observe(&self, rtt: Duration, now: Duration, decay: Duration) {
        let mut ewma = self.ewma(decay);
        let before = self.ewma_estimate.load(Ordering::Relaxed);
        ewma.observe(rtt, now);
        let after = (ewma.estimate_ns() as f32).to_bits();
        if after != before {
            self.ewma_estimate.store(after, Ordering::Relaxed);
            self.ewma_stamp.store(ewma.stamp().as_nanos() as u64, Ordering::Relaxed);
        }
    }

    pub(super) fn ewma_cost(&self, now: Duration, decay: Duration) -> f64 {
        self.ewma(decay).cost(self.in_flight(), now)
    }

    /// Stops reconnecting and releases the connection: it closes once the
    /// requests in flight on it have finished.
    pub(super) fn stop(&self) {
        self.flags.fetch_or(STOPPED, Ordering::AcqRel);
        lock(&self.sender).take();
    }

    fn is_stopped(&self) -> bool {
        self.flags.load(Ordering::Acquire) & STOPPED != 0
    }
}

/// A duration in whole microseconds, saturating at `u32::MAX` (71 minutes).
fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
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
        let mut list: Vec<Entry<B>> = match change {
            Change::Insert(endpoint) => {
                let mut list = endpoints.to_vec();
                if self.valid(&endpoint) {
                    match list.binary_search_by_key(&endpoint.addr, |(e, _)| e.addr) {
                        Ok(i) => list[i].0 = endpoint,
                        Err(i) => {
                            let handle = self.new_handle(&endpoint);
                            added.push(Arc::clone(&handle));
                            list.insert(i, (endpoint, handle));
                        }
                    }
                }
                list
            }
            Change::Remove(addr) => {
                let mut list = endpoints.to_vec();
                if let Ok(i) = list.binary_search_by_key(&addr, |(e, _)| e.addr) {
                    gone.push(list.remove(i).1);
                }
                list
            }
            Change::Reset(set) => {
                let EndpointSet { endpoints: mut incoming, locality_weights, drop_overloads: drops } = set;
                if locality_weights.len() > 1 && matches!(self.config.lb, LbPolicy::WeightedRoundRobin | LbPolicy::RingHash { .. }) {
                    tracing::warn!(target_name = %self.target, lb = self.config.lb.name(), "locality weights are not used with this LB policy");
                }
                *lock(&self.assignment) = Arc::new(Assignment { locality_weights, drops });
                incoming.retain(|e| self.valid(e));
                // Stable, so of a repeated address the last one wins.
                incoming.sort_by_key(|e| e.addr);
                let mut list = Vec::with_capacity(incoming.len());
                // Sized for the worst case (all new) at once: a doubling series would leave its freed buffers
                // between the new handles.
                added.reserve_exact(incoming.len());
                let mut old = endpoints.iter().peekable();
                let mut incoming = incoming.into_iter().peekable();
                while let Some(endpoint) = incoming.next() {
                    if incoming.peek().is_some_and(|next| next.addr == endpoint.addr) {
                        continue;
                    }
                    while let Some((_, handle)) = old.next_if(|(e, _)| e.addr < endpoint.addr) {
                        gone.push(Arc::clone(handle));
                    }
                    // The incoming copy is kept even when equal: it is the one discovery shares.
                    let handle = match old.next_if(|(e, _)| e.addr == endpoint.addr) {
                        Some((_, handle)) => Arc::clone(handle),
                        None => {
                            let handle = self.new_handle(&endpoint);
                            added.push(Arc::clone(&handle));
                            handle
                        }
                    };
                    list.push((endpoint, handle));
                }
                gone.extend(old.map(|(_, handle)| Arc::clone(handle)));
                list
            }
        };
        list.shrink_to_fit();
        *endpoints = Arc::new(list);
        self.publish(&endpoints, true);
        // Removed endpoints stop once the new set is published, so a large update is visible first. Calls in
        // flight on a removed endpoint drain.
        for handle in &gone {
            tracing::debug!(addr = %handle.addr(), in_flight = handle.in_flight(), "endpoint removed; draining");
            handle.stop();
        }
        Applied { added, gone }
    }

    fn valid(&self, endpoint: &Endpoint) -> bool {
        let valid = endpoint.validate();
        if let Err(error) = &valid {
            tracing::warn!(target_name = %self.target, %error, "ignoring endpoint");
        }
        valid.is_ok()
    }

    /// A handle for a new endpoint (not connecting yet).
    fn new_handle(&self, endpoint: &Endpoint) -> Arc<Handle<B>> {
        let default_rtt = match self.config.lb {
            LbPolicy::P2cEwma { default_rtt, .. } => default_rtt,
            _ => Duration::from_millis(30),
        };
        tracing::debug!(target_name = %self.target, addr = %endpoint.addr, "endpoint added");
        Arc::new(Handle::new(endpoint.addr, default_rtt, self.now(), self.config.connection.reconnect_backoff_base))
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

    /// Builds and installs a new snapshot over `list` (shared, not copied). Called with the endpoint lock
    /// held, so snapshots are published in order.
    fn publish(&self, list: &List<B>, set_changed: bool) {
        let previous = self.snapshot();
        let mut priorities: Vec<u16> = list.iter().map(|(e, _)| e.priority).collect();
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
        let assignment = lock(&self.assignment).clone();
        let localities = self.locality_groups(list, &priorities, &mut levels, &assignment);
        let ring = if !previous.hashing {
            None
        } else if set_changed || previous.ring.is_none() {
            self.build_ring(list)
        } else {
            previous.ring.clone()
        };
        let snapshot = Snapshot {
            generation: previous.generation + 1,
            all_failed: !list.is_empty() && list.iter().all(|(_, h)| h.state() == ConnState::TransientFailure),
            priority_load: priority_load(&health, self.config.overprovisioning_factor),
            endpoints: Arc::clone(list),
            ready,
            levels,
            localities,
            assignment,
            ring,
            hashing: previous.hashing,
            set_at: if set_changed { Some(SystemTime::now()) } else { previous.set_at },
        };
        let generation = snapshot.generation;
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(snapshot);
        self.changed.send_replace(generation);
    }

    /// The localities of each level when locality weighting applies: two or more weighted localities and a
    /// policy that picks within a subset (not weighted round robin, whose schedule spans the level, nor ring
    /// hash, whose ring does). Sorts each level's ready list by locality so each locality is one range.
    fn locality_groups(
        &self,
        list: &[Entry<B>],
        priorities: &[u16],
        levels: &mut [Vec<usize>],
        assignment: &Assignment,
    ) -> Vec<Vec<LocalityGroup>> {
        let weights = &assignment.locality_weights;
        if weights.len() < 2 || matches!(self.config.lb, LbPolicy::WeightedRoundRobin | LbPolicy::RingHash { .. }) {
            return Vec::new();
        }
        let mut totals: HashMap<(usize, &Locality), u32> = HashMap::new();
        for (endpoint, _) in list {
            let level = priorities.binary_search(&endpoint.priority).unwrap_or(0);
            *totals.entry((level, &*endpoint.locality)).or_default() += 1;
        }
        let locality = |i: usize| &*list[i].0.locality;
        levels
            .iter_mut()
            .enumerate()
            .map(|(level, ready)| {
                ready.sort_by(|&a, &b| locality(a).cmp(locality(b)).then(a.cmp(&b)));
                let mut groups = Vec::new();
                let mut start = 0;
                while start < ready.len() {
                    let here = locality(ready[start]);
                    let end = start + ready[start..].iter().take_while(|&&i| locality(i) == here).count();
                    let health = LocalityHealth {
                        weight: weights.get(here).copied().unwrap_or(0),
                        healthy: (end - start) as u32,
                        total: totals.get(&(level, here)).copied().unwrap_or(0),
                    };
                    let weight = locality_effective_weights(&[health], self.config.overprovisioning_factor)[0];
                    groups.push(LocalityGroup { end: end as u32, weight });
                    start = end;
                }
                groups
            })
            .collect()
    }

    fn build_ring(&self, list: &[Entry<B>]) -> Option<Arc<RingHash<usize>>> {
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
    async fn connect(&self, addr: SocketAddr) -> Result<(SendRequest<B>, oneshot::Receiver<()>), Error> {
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

/// A connection attempt's outcome.
type Attempt<B> = (Arc<Handle<B>>, Result<(SendRequest<B>, oneshot::Receiver<()>), Error>);

/// An endpoint waiting to retry, ordered so the earliest is at the top of a max-heap.
struct Due<B> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_estimate_keeps_converging_at_a_million_samples_a_second() {
        // Each sample moves the estimate by less than an f32 step here; the time it covers must still count.
        let handle: Handle<http_body_util::Empty<bytes::Bytes>> =
            Handle::new("10.0.0.1:80".parse().unwrap(), Duration::from_millis(30), Duration::ZERO, Duration::from_secs(1));
        let (rtt, decay) = (Duration::from_millis(1), Duration::from_secs(1));
        for i in 1..=10_000_000u64 {
            handle.observe(rtt, Duration::from_micros(i), decay);
        }
        let estimate = handle.ewma(decay).estimate();
        assert!(estimate < Duration::from_micros(1010), "estimate stalled at {estimate:?}");
    }

    #[test]
    fn per_endpoint_state_stays_small() {
        // A cluster can have tens of thousands of endpoints: the handle and its retry entry are what each costs
        // the balancer besides its list entry (issue 3's memory target). 56 bytes before the outcome counters
        // (issue 14), which outlier detection reads.
        let handle = std::mem::size_of::<Handle<http_body_util::Empty<bytes::Bytes>>>();
        assert!(handle <= 64, "Handle is {handle} bytes");
        assert_eq!(std::mem::size_of::<Due<http_body_util::Empty<bytes::Bytes>>>(), 16);
        for addr in ["10.1.2.3:80", "[2001:db8::1]:443", "[fe80::1%2]:8080"] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(Addr::new(addr).get(), addr);
        }
    }
}
