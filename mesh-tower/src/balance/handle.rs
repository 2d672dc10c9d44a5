//! One endpoint's handle: its connection's sender, requests in flight, outcome counters, latency estimate,
//! connection state and outlier-detection state, in 72 bytes.

use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::sync::atomic::{AtomicU8, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_core::lb::PeakEwma;

use super::outlier::Trip;
use super::pool::{Conn, Sent};
use super::{RequestBody, lock};

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
    pub(super) fn from_u8(v: u8) -> Self {
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
    pub(super) addr: Addr,
    /// Boxed: 16 bytes with the lock instead of 24, whether connected or not.
    pub(super) sender: Mutex<Option<Box<Conn<B>>>>,
    pub(super) in_flight: AtomicU32,
    /// Calls that ended, by outcome ([`crate::classify::Outcome::is_failure`]): what outlier detection reads.
    /// They wrap at 2^32; readers take differences.
    pub(super) successes: AtomicU32,
    pub(super) failures: AtomicU32,
    /// Peak-EWMA RTT estimate in nanoseconds (`f32` bits), and when it was last updated (nanoseconds since the
    /// balancer's epoch). A sample too small to change the `f32` leaves the timestamp as it is, so its time
    /// counts in the next sample instead of being lost (which would stall the decay at high call rates).
    pub(super) ewma_estimate: AtomicU32,
    pub(super) ewma_stamp: AtomicU64,
    /// Backoff of the next connection attempt after a failure, in microseconds.
    pub(super) backoff_us: AtomicU32,
    pub(super) state: AtomicU8,
    /// [`STOPPED`], [`WAITING`] and [`EJECTED`].
    pub(super) flags: AtomicU8,
    /// Consecutive failures: server errors in the low byte, gateway errors in the high one (outlier detection;
    /// kept only when it is on).
    pub(super) consecutive: AtomicU16,
    /// The balancer's outlier detector, woken when a consecutive threshold is reached; `None` when off.
    pub(super) trip: Option<Arc<Trip>>,
}

/// An address in 16 bytes instead of `SocketAddr`'s 32: IPv4 inline, IPv6 (rarer, and 28 bytes) boxed.
pub(super) enum Addr {
    V4(SocketAddrV4),
    V6(Box<SocketAddrV6>),
}

impl Addr {
    pub(super) fn new(addr: SocketAddr) -> Self {
        match addr {
            SocketAddr::V4(v4) => Self::V4(v4),
            SocketAddr::V6(v6) => Self::V6(Box::new(v6)),
        }
    }

    pub(super) fn get(&self) -> SocketAddr {
        match self {
            Self::V4(v4) => SocketAddr::V4(*v4),
            Self::V6(v6) => SocketAddr::V6(**v6),
        }
    }
}

/// Removed from the set: no more connection attempts.
pub(super) const STOPPED: u8 = 1;
/// Has an entry in the connection manager's retry timers.
pub(super) const WAITING: u8 = 2;
/// Ejected by outlier detection: out of the snapshot's ready lists.
pub(super) const EJECTED: u8 = 4;

impl<B> Handle<B> {
    pub(super) fn new(addr: SocketAddr, default_rtt: Duration, now: Duration, backoff: Duration, trip: Option<Arc<Trip>>) -> Self {
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
            consecutive: AtomicU16::new(0),
            trip,
        }
    }

    pub(super) fn addr(&self) -> SocketAddr {
        self.addr.get()
    }

    pub(super) fn state(&self) -> ConnState {
        ConnState::from_u8(self.state.load(Ordering::Acquire))
    }

    pub(super) fn set_state(&self, state: ConnState) {
        self.state.store(state as u8, Ordering::Release);
    }

    pub(super) fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed).into()
    }

    /// Counts a call that ended on this endpoint: `failed` by a server error, of which `gateway` is a gateway
    /// error ([`crate::classify::Outcome`]).
    pub(super) fn record(&self, failed: bool, gateway: bool) {
        let counter = if failed { &self.failures } else { &self.successes };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(trip) = &self.trip
            && let Some(reason) = trip.observe(&self.consecutive, failed, gateway)
            && !self.is_ejected()
            && trip.ejects_now(reason)
        {
            self.set_ejected(true);
        }
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
    pub(super) fn send(
        &self,
        request: http::Request<B>,
    ) -> Result<Sent<impl Future<Output = SendResult<B>> + Send + use<B>>, http::Request<B>>
    where
        B: RequestBody,
    {
        match lock(&self.sender).as_mut() {
            Some(conn) => Ok((conn.sender.try_send_request(request), conn.peer.clone())),
            None => Err(request),
        }
    }

    pub(super) fn ewma(&self, decay: Duration) -> PeakEwma {
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

    pub(super) fn is_stopped(&self) -> bool {
        self.flags.load(Ordering::Acquire) & STOPPED != 0
    }

    pub(super) fn set_ejected(&self, ejected: bool) {
        if ejected {
            self.flags.fetch_or(EJECTED, Ordering::AcqRel);
        } else {
            self.flags.fetch_and(!EJECTED, Ordering::AcqRel);
        }
    }

    pub(super) fn is_ejected(&self) -> bool {
        self.flags.load(Ordering::Acquire) & EJECTED != 0
    }
}

/// A duration in whole microseconds, saturating at `u32::MAX` (71 minutes).
pub(super) fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::pool::Due;

    #[test]
    fn latency_estimate_keeps_converging_at_a_million_samples_a_second() {
        // Each sample moves the estimate by less than an f32 step here; the time it covers must still count.
        let handle: Handle<http_body_util::Empty<bytes::Bytes>> =
            Handle::new("10.0.0.1:80".parse().unwrap(), Duration::from_millis(30), Duration::ZERO, Duration::from_secs(1), None);
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
        // (issue 14), 64 before outlier detection's pointer (issue 15). In its `Arc` (16 bytes more) 72 bytes take
        // the same 96-byte glibc malloc chunk as 64 did: 80 is the next size that costs more.
        let handle = std::mem::size_of::<Handle<http_body_util::Empty<bytes::Bytes>>>();
        assert!(handle <= 72, "Handle is {handle} bytes");
        assert_eq!(std::mem::size_of::<Due<http_body_util::Empty<bytes::Bytes>>>(), 16);
        for addr in ["10.1.2.3:80", "[2001:db8::1]:443", "[fe80::1%2]:8080"] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(Addr::new(addr).get(), addr);
        }
    }
}
