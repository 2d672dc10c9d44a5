//! Per-endpoint connection management and the publication of snapshots.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use mesh_core::lb::{PeakEwma, PriorityHealth, RingHash, priority_load};
use mesh_core::{Endpoint, LbPolicy};
use tokio::sync::oneshot;
use tokio::task::AbortHandle;

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
    task: Mutex<Option<AbortHandle>>,
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
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
        lock(&self.sender).take();
    }
}

impl<B: RequestBody, C: Connect> State<B, C> {
    pub(super) fn snapshot(&self) -> Arc<Snapshot<B>> {
        self.snapshot.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(super) fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Applies a discovery change and publishes the new set.
    pub(super) fn apply(self: &Arc<Self>, change: Change) {
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
        // Removed endpoints stop, and new ones start connecting, once the new
        // set is published: a large update becomes visible without waiting for
        // thousands of task aborts and spawns. Calls in flight on a removed
        // endpoint drain.
        for handle in gone {
            tracing::debug!(addr = %handle.addr, in_flight = handle.in_flight(), "endpoint removed; draining");
            handle.stop();
        }
        for handle in added {
            if endpoints.get(&handle.addr).is_some_and(|h| Arc::ptr_eq(h, &handle)) {
                let task = tokio::spawn(Arc::clone(self).run_endpoint(Arc::clone(&handle))).abort_handle();
                *lock(&handle.task) = Some(task);
            }
        }
    }

    /// Adds or updates an endpoint; returns the handle when it is new (its
    /// connection task is not started yet).
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
            task: Mutex::new(None),
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

    /// Keeps one endpoint connected until it is removed.
    async fn run_endpoint(self: Arc<Self>, handle: Arc<Handle<B>>) {
        let policy = &self.config.connection;
        let mut backoff = policy.reconnect_backoff_base;
        loop {
            let started = Instant::now();
            // Boxed: the task's idle size (in backoff) stays small.
            match Box::pin(self.connect(handle.addr)).await {
                Ok((sender, closed)) => {
                    backoff = policy.reconnect_backoff_base;
                    *lock(&handle.sender) = Some(sender);
                    handle.set_state(ConnState::Ready);
                    tracing::debug!(target_name = %self.target, addr = %handle.addr, "endpoint ready");
                    self.schedule_refresh();
                    let _ = closed.await;
                    lock(&handle.sender).take();
                    handle.set_state(ConnState::Connecting);
                    tracing::debug!(target_name = %self.target, addr = %handle.addr, "connection closed; reconnecting");
                    self.schedule_refresh();
                    // A connection that dies at once is a failure, not a reason to spin.
                    if started.elapsed() >= Duration::from_secs(1) {
                        continue;
                    }
                }
                Err(error) => {
                    tracing::warn!(target_name = %self.target, addr = %handle.addr, %error, retry_in = ?backoff, "connect failed");
                    *lock(&self.last_error) = error.to_string();
                    handle.set_state(ConnState::TransientFailure);
                    self.schedule_refresh();
                }
            }
            tokio::time::sleep(jitter(backoff, &self.seed)).await;
            backoff = backoff.mul_f64(1.6).min(policy.reconnect_backoff_max);
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
