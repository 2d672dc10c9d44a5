//! Choosing an endpoint for one request.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use mesh_core::LbPolicy;
use mesh_core::lb::{LeastRequest, Random, SplitMix64, hash_key, p2c_by, pick_priority, pick_weighted};
use mesh_core::policy::HashPolicy;

use super::handle::{ConnState, Handle};
use super::{RequestBody, RequestHash, Snapshot, State, lock};
use crate::connect::Connect;

impl<B: RequestBody, C: Connect> State<B, C> {
    pub(super) fn request_hash<T>(&self, request: &http::Request<T>) -> Option<u64> {
        let LbPolicy::RingHash { hash: policy, .. } = &self.config.lb else { return None };
        if let Some(RequestHash(hash)) = request.extensions().get() {
            return Some(*hash);
        }
        let hash = match policy {
            HashPolicy::Header(name) => match request.headers().get(name) {
                Some(value) => hash_key(value.as_bytes()),
                // No key: a random position, as gRPC does.
                None => self.rng().next_u64(),
            },
            // One value per balancer: its address, unique among live balancers.
            HashPolicy::ChannelId => hash_key(&(self as *const Self as usize).to_le_bytes()),
        };
        Some(hash)
    }

    /// The drop category a call falls in, if any: each of the assignment's drop overloads in order, with its
    /// own draw (gRPC's `xds_cluster_impl`).
    pub(super) fn dropped<'s>(&self, snapshot: &'s Snapshot<B>) -> Option<&'s str> {
        let drops = &snapshot.assignment.drops;
        if drops.is_empty() {
            return None;
        }
        let mut rng = self.rng();
        drops.iter().find(|d| (rng.below(1_000_000) as u32) < d.parts_per_million).map(|d| d.category.as_str())
    }

    fn rng(&self) -> SplitMix64 {
        SplitMix64::new(self.seed.fetch_add(1, Ordering::Relaxed))
    }

    /// Picks a ready endpoint by the configured policy.
    pub(super) fn pick<'s>(&self, snapshot: &'s Snapshot<B>, hash: Option<u64>) -> Option<&'s Arc<Handle<B>>> {
        if let (Some(ring), Some(hash)) = (&snapshot.ring, hash) {
            // gRPC's ring-hash pick (A42): take the first endpoint on the ring
            // that has not failed and is not ejected; if it is still connecting
            // (or connected but not yet in this snapshot), wait for it rather
            // than spill its keys onto a neighbour.
            let candidate = |i: usize| {
                let (endpoint, handle) = &snapshot.endpoints[i];
                snapshot.ready[i]
                    || (handle.state() != ConnState::TransientFailure && !handle.is_ejected() && endpoint.health.is_routable())
            };
            // An endpoint ejected since the snapshot was made (on the call path) is passed over while another
            // candidate exists.
            let index = *ring
                .pick_where(hash, |&i| candidate(i) && !snapshot.endpoints[i].1.is_ejected())
                .or_else(|| ring.pick_where(hash, |&i| candidate(i)))?;
            return snapshot.ready[index].then(|| &snapshot.endpoints[index].1);
        }
        let level = match snapshot.levels.len() {
            0 => return None,
            1 => 0,
            _ => pick_priority(&snapshot.priority_load, &mut self.rng())?,
        };
        let mut ready = &snapshot.levels[level][..];
        if let Some(groups) = snapshot.localities.get(level).filter(|g| g.len() > 1) {
            // No locality with weight (say, endpoints inserted by hand with localities the assignment did not
            // weight): the whole level, rather than no pick while endpoints are ready.
            if let Some(group) = pick_weighted(groups.iter().map(|g| g.weight), &mut self.rng()) {
                let start = group.checked_sub(1).map_or(0, |previous| groups[previous].end as usize);
                ready = &ready[start..groups[group].end as usize];
            }
        }
        let handle = |i: usize| &snapshot.endpoints[ready[i]].1;
        if ready.len() == 1 {
            // Every policy picks the only ready endpoint; skip their shared counters and random draws.
            return Some(handle(0));
        }
        let chosen = match &self.config.lb {
            LbPolicy::RoundRobin | LbPolicy::RingHash { .. } => {
                (!ready.is_empty()).then(|| self.next.fetch_add(1, Ordering::Relaxed) % ready.len())
            }
            LbPolicy::WeightedRoundRobin => {
                let mut wrr = lock(&self.wrr);
                let key = snapshot.generation ^ ((level as u64) << 56);
                if wrr.0 != key {
                    wrr.1.update(ready.iter().map(|&i| (snapshot.endpoints[i].0.addr, snapshot.endpoints[i].0.weight)));
                    wrr.0 = key;
                }
                let addr = wrr.1.pick()?;
                ready.iter().position(|&i| snapshot.endpoints[i].0.addr == addr)
            }
            LbPolicy::LeastRequest { choice_count: 2 } => p2c_by(ready.len(), &mut self.rng(), |i| handle(i).in_flight() as f64),
            LbPolicy::LeastRequest { choice_count } => {
                let loads: Vec<u64> = (0..ready.len()).map(|i| handle(i).in_flight()).collect();
                LeastRequest::new(*choice_count).pick(&loads, &mut self.rng())
            }
            LbPolicy::P2cEwma { decay, .. } => {
                let now = self.now();
                p2c_by(ready.len(), &mut self.rng(), |i| handle(i).ewma_cost(now, *decay))
            }
        }?;
        Some(handle(chosen))
    }
}
