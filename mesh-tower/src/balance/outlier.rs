//! Outlier detection in the balancer: each endpoint's calls, as they end, feed its consecutive-failure
//! counters ([`Trip::observe`]). The failure that trips an always-enforced threshold takes the endpoint out of
//! the picks at once, on the call path ([`Trip::ejects_now`]: the next call already goes elsewhere, so an
//! endpoint gets exactly the configured number of failures in a row); a detector in the balancer's task
//! confirms it or returns it, and ejects endpoints by the decisions of
//! [`mesh_core::outlier`] (consecutive failures at once, success rate and failure percentage each interval),
//! marks them on their handles, and republishes the snapshot, so no picker sees an ejected endpoint. A
//! priority level whose every ready endpoint is ejected serves from them anyway (Envoy's panic mode, narrowed
//! to ejection): ejection never leaves a level with endpoints to call unable to serve.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::time::Duration;

use mesh_core::lb::SplitMix64;
use mesh_core::outlier::{self, Change, Host, Reason, Spared};
use mesh_core::policy::OutlierDetection;
use tokio::sync::Notify;

use super::handle::Handle;
use super::{RequestBody, State, lock};
use crate::connect::Connect;

/// What each endpoint's handle shares with the detector: the consecutive thresholds, the wake-up for a trip, and
/// what the call path needs to take a tripped endpoint out of picks at once.
#[derive(Debug)]
pub(super) struct Trip {
    /// Server errors in a row that trip (0: off).
    server: u16,
    /// Gateway errors in a row that trip (0: off).
    gateway: u16,
    /// The detector's settings: which trips are always enforced, and the max ejection percent.
    config: OutlierDetection,
    /// Endpoints ejected now, and endpoints tracked: the detector sets both after each decision, and the call
    /// path adds the ones it ejects between.
    ejected: AtomicU32,
    endpoints: AtomicU32,
    tripped: Notify,
}

impl Trip {
    fn new(config: OutlierDetection) -> Self {
        let threshold = |c: Option<mesh_core::policy::Consecutive>| c.map_or(0, |c| c.threshold.min(255) as u16);
        Self {
            server: threshold(config.consecutive_5xx),
            gateway: threshold(config.consecutive_gateway),
            config,
            ejected: AtomicU32::new(0),
            endpoints: AtomicU32::new(0),
            tripped: Notify::new(),
        }
    }

    /// Whether an endpoint whose failure just tripped `reason` leaves the picks now, on the call path: when the
    /// trip is always enforced and the max ejection percent leaves room (the detector's own check, on counts the
    /// call path may race: the detector confirms or returns the endpoint at once after). Takes the room.
    pub(super) fn ejects_now(&self, reason: Reason) -> bool {
        let algorithm = match reason {
            Reason::Consecutive5xx => self.config.consecutive_5xx,
            Reason::ConsecutiveGateway => self.config.consecutive_gateway,
            Reason::SuccessRate | Reason::FailurePercentage => None,
        };
        let endpoints = self.endpoints.load(Ordering::Relaxed) as usize;
        algorithm.is_some_and(|a| a.enforcing >= 100)
            && self
                .ejected
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |ejected| {
                    self.config.room_to_eject(ejected as usize, endpoints).then_some(ejected + 1)
                })
                .is_ok()
    }

    /// Counts a call's end in an endpoint's consecutive counters (server errors in the low byte, gateway errors
    /// in the high one, each saturating at 255), and wakes the detector when a threshold is reached; returns the
    /// threshold this end reached, if it just did. Plain loads and stores: two calls ending at once may count as
    /// one, which costs a trip one call later.
    pub(super) fn observe(&self, consecutive: &AtomicU16, failed: bool, gateway: bool) -> Option<Reason> {
        let old = consecutive.load(Ordering::Relaxed);
        let new = if failed {
            let server = (old & 0xff).saturating_add(1).min(255);
            let gateway = if gateway { ((old >> 8) + 1).min(255) } else { 0 };
            server | (gateway << 8)
        } else {
            0
        };
        if new == old {
            return None;
        }
        consecutive.store(new, Ordering::Relaxed);
        let tripped = self.trips(new).filter(|_| self.trips(old).is_none());
        if tripped.is_some() {
            self.tripped.notify_one();
        }
        tripped
    }

    /// Which consecutive threshold `packed` counters reach, if any (server errors first).
    fn trips(&self, packed: u16) -> Option<Reason> {
        if self.server > 0 && packed & 0xff >= self.server {
            Some(Reason::Consecutive5xx)
        } else if self.gateway > 0 && packed >> 8 >= self.gateway {
            Some(Reason::ConsecutiveGateway)
        } else {
            None
        }
    }
}

/// The detector: one per balancer with outlier detection, owned by the balancer's task.
pub(super) struct Detector<B> {
    /// Shared with the handles; its settings are the detector's.
    trip: Arc<Trip>,
    /// The endpoints it tracks, in address order (the endpoint list's), with the outcome counts last read.
    tracked: Vec<Tracked<B>>,
    rng: SplitMix64,
    interval: tokio::time::Interval,
}

struct Tracked<B> {
    addr: SocketAddr,
    handle: Arc<Handle<B>>,
    host: Host,
    /// The handle's (successes, failures) when last read.
    seen: (u32, u32),
}

impl<B: RequestBody> Detector<B> {
    /// A detector for `config`, and what the balancer's handles share with it.
    pub(super) fn new(config: OutlierDetection) -> (Self, Arc<Trip>) {
        // Validated at the edge to be non-zero; a zero here would make tokio panic, so it never reaches it.
        let period = config.interval.max(Duration::from_millis(1));
        let trip = Arc::new(Trip::new(config));
        let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let detector = Self { trip: trip.clone(), tracked: Vec::new(), rng: SplitMix64::new(0x0d1e), interval };
        (detector, trip)
    }

    /// Waits for the next thing to do: a trip, or the interval's end.
    pub(super) async fn next(&mut self) -> Event {
        tokio::select! {
            () = self.trip.tripped.notified() => Event::Tripped,
            _ = self.interval.tick() => Event::Interval,
        }
    }

    /// Handles `event` on `state`'s endpoints; republishes the snapshot when an endpoint was ejected or returned.
    pub(super) fn handle<C: Connect>(&mut self, event: Event, state: &State<B, C>) {
        self.sync(state);
        let now = state.now();
        let mut hosts: Vec<Host> = self.tracked.iter().map(|t| t.host).collect();
        let changes = match event {
            Event::Tripped => {
                let mut changes = Vec::new();
                for (i, tracked) in self.tracked.iter().enumerate() {
                    let Some(reason) = self.trip.trips(tracked.handle.consecutive.load(Ordering::Relaxed)) else { continue };
                    changes.extend(outlier::consecutive(&self.trip.config, &mut hosts, i, reason, now, &mut self.rng));
                }
                changes
            }
            Event::Interval => {
                for (tracked, host) in self.tracked.iter_mut().zip(&mut hosts) {
                    let (successes, failures) = tracked.handle.outcomes();
                    host.successes = u64::from(successes.wrapping_sub(tracked.seen.0));
                    host.failures = u64::from(failures.wrapping_sub(tracked.seen.1));
                    tracked.seen = (successes, failures);
                }
                outlier::sweep(&self.trip.config, &mut hosts, now, &mut self.rng)
            }
        };
        for (tracked, host) in self.tracked.iter_mut().zip(hosts) {
            tracked.host = host;
        }
        let mut republish = false;
        for change in &changes {
            match *change {
                Change::Ejected(i, reason) => {
                    let tracked = &self.tracked[i];
                    tracked.handle.set_ejected(true);
                    tracked.handle.consecutive.store(0, Ordering::Relaxed);
                    crate::stats::count(&state.stats.detected[reason.index()]);
                    crate::stats::count(&state.stats.ejected[reason.index()]);
                    republish = true;
                    let time = self.trip.config.ejection_time(tracked.host.multiplier);
                    tracing::info!(addr = %tracked.addr, reason = reason.name(), ?time, "endpoint ejected");
                }
                Change::Spared(i, reason, spared) => {
                    let tracked = &self.tracked[i];
                    // A consecutive trip is counted again only when it trips again (Envoy resets the count);
                    // a sweep's spare leaves the consecutive count alone.
                    if matches!(reason, Reason::Consecutive5xx | Reason::ConsecutiveGateway) {
                        tracked.handle.consecutive.store(0, Ordering::Relaxed);
                    }
                    crate::stats::count(&state.stats.detected[reason.index()]);
                    if spared == Spared::Overflow {
                        crate::stats::count(&state.stats.ejection_overflows);
                    }
                    tracing::debug!(addr = %tracked.addr, reason = reason.name(), ?spared, "outlier detected, not ejected");
                }
                Change::Returned(i) => {
                    let tracked = &self.tracked[i];
                    republish = true;
                    tracked.handle.set_ejected(false);
                    tracked.handle.consecutive.store(0, Ordering::Relaxed);
                    tracing::info!(addr = %tracked.addr, "ejected endpoint returns");
                }
            }
        }
        // The decisions are the detector's: an endpoint the call path took out of picks that the detector did not
        // eject (spared, or its trip gone stale) is put back.
        for tracked in &self.tracked {
            if tracked.handle.is_ejected() && !tracked.host.is_ejected() {
                tracked.handle.set_ejected(false);
                // A snapshot made meanwhile may have left it out: publish one that has it.
                republish = true;
                tracing::debug!(addr = %tracked.addr, "outlier not ejected after all; back in the picks");
            }
        }
        self.count();
        if republish {
            state.refresh();
        }
    }

    /// Follows a change of the balancer's endpoint list at once, so the call path's max ejection percent counts
    /// the endpoints there are now.
    pub(super) fn follow<C: Connect>(&mut self, state: &State<B, C>) {
        self.sync(state);
        self.count();
    }

    /// Tells the call path how many endpoints are tracked and ejected.
    fn count(&self) {
        let ejected = self.tracked.iter().filter(|t| t.handle.is_ejected()).count();
        self.trip.ejected.store(ejected as u32, Ordering::Relaxed);
        self.trip.endpoints.store(self.tracked.len() as u32, Ordering::Relaxed);
    }

    /// Follows the balancer's endpoint list: a new endpoint (or a new handle for an address) starts with no
    /// ejection history; a removed one is forgotten.
    fn sync<C: Connect>(&mut self, state: &State<B, C>) {
        let list = lock(&state.endpoints).clone();
        let mut old = std::mem::take(&mut self.tracked).into_iter().peekable();
        for (endpoint, handle) in list.iter() {
            while old.next_if(|t| t.addr < endpoint.addr).is_some() {}
            let tracked = match old.next_if(|t| t.addr == endpoint.addr) {
                Some(t) if Arc::ptr_eq(&t.handle, handle) => t,
                // Handles start at zero, under this detector (it is as old as the balancer).
                _ => Tracked { addr: endpoint.addr, handle: handle.clone(), host: Host::default(), seen: (0, 0) },
            };
            self.tracked.push(tracked);
        }
    }
}

/// What woke the detector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Event {
    /// An endpoint's consecutive failures reached a threshold.
    Tripped,
    /// An interval ended.
    Interval,
}
