//! The endpoint set and its snapshots: discovery changes applied, the immutable view callers pick from
//! rebuilt and published (priority levels, localities, the hash ring).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mesh_core::lb::{LocalityHealth, PriorityHealth, RingHash, locality_effective_weights, priority_load};
use mesh_core::{Endpoint, EndpointSet, LbPolicy, Locality};

use super::handle::{ConnState, Handle};
use super::{Assignment, Entry, List, LocalityGroup, RequestBody, Snapshot, State, lock};
use crate::connect::Connect;
use crate::discover::Change;

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
        Arc::new(Handle::new(endpoint.addr, default_rtt, self.now(), self.config.connection.reconnect_backoff_base, self.trip.clone()))
    }

    /// Asks for a snapshot rebuild after a connection state change.
    pub(super) fn schedule_refresh(&self) {
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
        // Ready endpoints outlier detection ejected, per level: a level left with none serves from these.
        let mut ejected = vec![Vec::new(); priorities.len()];
        for (i, (endpoint, handle)) in list.iter().enumerate() {
            let level = priorities.binary_search(&endpoint.priority).unwrap_or(0);
            health[level].total += 1;
            if handle.state() == ConnState::Ready && endpoint.health.is_routable() {
                if handle.is_ejected() {
                    ejected[level].push(i);
                    continue;
                }
                health[level].healthy += 1;
                levels[level].push(i);
                ready[i] = true;
            }
        }
        for (level, ejected) in ejected.into_iter().enumerate() {
            if levels[level].is_empty() && !ejected.is_empty() {
                tracing::debug!(target_name = %self.target, level, "every ready endpoint of the level is ejected; serving from them");
                health[level].healthy = ejected.len() as u32;
                for &i in &ejected {
                    ready[i] = true;
                }
                levels[level] = ejected;
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
}

/// What a discovery change did to the endpoint set.
pub(super) struct Applied<B> {
    /// New endpoints, not connecting yet.
    pub(super) added: Vec<Arc<Handle<B>>>,
    /// Removed endpoints, stopped (draining).
    pub(super) gone: Vec<Arc<Handle<B>>>,
}

/// Key of a ring entry: hashed by address only.
#[derive(Clone)]
struct RingKey(usize, SocketAddr);

impl std::fmt::Display for RingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.1.fmt(f)
    }
}
