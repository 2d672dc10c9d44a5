//! Choosing an endpoint for one request, and the request path itself.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use mesh_core::LbPolicy;
use mesh_core::lb::{LeastRequest, Random, SplitMix64, hash_key, p2c_by, pick_priority};
use mesh_core::policy::HashPolicy;

use super::body::{Counting, InFlight, ResponseBody};
use super::endpoint::{ConnState, Handle};
use super::{RequestBody, RequestHash, ServedBy, Snapshot, State, lock};
use crate::connect::Connect;
use crate::{Error, Result};

impl<B: RequestBody, C: Connect> State<B, C> {
    /// Sends one request: pick, send, re-pick when the connection was closed
    /// before the request was written, wait when nothing is ready.
    pub(super) async fn call(self: Arc<Self>, mut request: http::Request<B>) -> Result<http::Response<ResponseBody>> {
        let hash = self.request_hash(&request);
        let decay = match self.config.lb {
            LbPolicy::P2cEwma { decay, .. } => Some(decay),
            _ => None,
        };
        // Set when the call first has to wait: (receiver, start, deadline).
        let mut waiting: Option<(tokio::sync::watch::Receiver<u64>, Instant, tokio::time::Instant)> = None;
        loop {
            // Pick under the snapshot's read lock, taking only the chosen handle: one reference-count
            // increment and decrement fewer per call than cloning the snapshot (shared atomics that every
            // concurrent call bounces between cores).
            let picked = {
                let snapshot = self.snapshot.read().unwrap_or_else(|e| e.into_inner());
                self.pick(&snapshot, hash).cloned().ok_or((snapshot.all_failed, snapshot.endpoints.len()))
            };
            let (all_failed, known) = match picked {
                Ok(handle) => {
                    let sent = if decay.is_some() { self.now() } else { Default::default() };
                    let response = match handle.send(request) {
                        Ok(response) => response,
                        Err(unsent) => {
                            // Raced with a disconnect: the next snapshot will not offer it.
                            request = unsent;
                            self.mark_broken(&handle);
                            continue;
                        }
                    };
                    let counting = Counting::begin(&handle);
                    match response.await {
                        Ok(response) => {
                            if let Some(decay) = decay {
                                let now = self.now();
                                handle.observe(now.saturating_sub(sent), now, decay);
                            }
                            let (mut parts, body) = response.into_parts();
                            parts.extensions.insert(ServedBy(handle.addr()));
                            counting.disarm();
                            return Ok(http::Response::from_parts(parts, ResponseBody::new(body, InFlight::started(handle))));
                        }
                        Err(mut error) => match error.take_message() {
                            Some(unsent) => {
                                tracing::debug!(target_name = %self.target, addr = %handle.addr(), "connection closed before send; re-picking");
                                request = unsent;
                                drop(counting);
                                self.mark_broken(&handle);
                                continue;
                            }
                            None => return Err(Error::Upstream { addr: handle.addr(), source: error.into_error() }),
                        },
                    }
                }
                Err(unpicked) => unpicked,
            };
            if all_failed {
                return Err(Error::AllEndpointsFailed {
                    target: self.target.clone(),
                    count: known,
                    last_error: lock(&self.last_error).clone(),
                });
            }
            // Subscribe before re-reading the snapshot so no change is missed.
            let Some((rx, started, deadline)) = waiting.as_mut() else {
                let started = Instant::now();
                let deadline = tokio::time::Instant::from_std(started + self.config.ready_timeout);
                waiting = Some((self.changed.subscribe(), started, deadline));
                continue;
            };
            if tokio::time::timeout_at(*deadline, rx.changed()).await.is_err() {
                return Err(Error::NoReadyEndpoint { target: self.target.clone(), waited: started.elapsed(), known });
            }
        }
    }

    fn request_hash(&self, request: &http::Request<B>) -> Option<u64> {
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

    fn rng(&self) -> SplitMix64 {
        SplitMix64::new(self.seed.fetch_add(1, Ordering::Relaxed))
    }

    /// Picks a ready endpoint by the configured policy.
    fn pick<'s>(&self, snapshot: &'s Snapshot<B>, hash: Option<u64>) -> Option<&'s Arc<Handle<B>>> {
        if let (Some(ring), Some(hash)) = (&snapshot.ring, hash) {
            // gRPC's ring-hash pick (A42): take the first endpoint on the ring
            // that has not failed; if it is still connecting (or connected but
            // not yet in this snapshot), wait for it rather than spill its
            // keys onto a neighbour.
            let candidate = |i: usize| {
                let (endpoint, handle) = &snapshot.endpoints[i];
                snapshot.ready[i] || (handle.state() != ConnState::TransientFailure && endpoint.health.is_routable())
            };
            let index = *ring.pick_where(hash, |&i| candidate(i))?;
            return snapshot.ready[index].then(|| &snapshot.endpoints[index].1);
        }
        let level = match snapshot.levels.len() {
            0 => return None,
            1 => 0,
            _ => pick_priority(&snapshot.priority_load, &mut self.rng())?,
        };
        let ready = &snapshot.levels[level];
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
