//! A request's hash under its route's hash policies, for ring-hash clusters.

use std::sync::atomic::{AtomicU64, Ordering};

use mesh_core::lb::{Random, SplitMix64, hash_key};
use mesh_core::policy::{HashPolicy, RouteHash};

/// A random id per channel (the clock's nanoseconds and a process-wide counter, mixed).
pub(crate) fn random_channel_id() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    SplitMix64::new(nanos ^ COUNTER.fetch_add(1, Ordering::Relaxed).rotate_left(32)).next_u64()
}

/// The hash of a request under a route's hash policies (gRPC's A42 and Envoy's combination: each policy
/// that yields a value folds it in as `rotl(hash, 1) ^ value`, and a terminal one that yields a value ends
/// the list; a repeated header is hashed as its values joined by `,`; binary `-bin` headers are skipped;
/// the channel id is this channel's own random number). `None` when the route has no hash policy (the
/// balancer then hashes by its own); a random hash when it has some but none applies to this request.
pub(crate) fn route_hash<B>(policies: &[RouteHash], request: &http::Request<B>, channel_id: u64, seed: &AtomicU64) -> Option<u64> {
    if policies.is_empty() {
        return None;
    }
    let mut hash: Option<u64> = None;
    for RouteHash { policy, terminal } in policies {
        let value = match policy {
            HashPolicy::Header(name) if name.ends_with("-bin") => None,
            HashPolicy::Header(name) => {
                let mut values = request.headers().get_all(name).iter().map(|v| v.as_bytes());
                values.next().map(|first| match values.next() {
                    // The usual case, a single value: hashed in place, no per-request allocation.
                    None => hash_key(first),
                    Some(second) => {
                        let mut joined = first.to_vec();
                        for more in std::iter::once(second).chain(values) {
                            joined.push(b',');
                            joined.extend_from_slice(more);
                        }
                        hash_key(&joined)
                    }
                })
            }
            HashPolicy::ChannelId => Some(channel_id),
        };
        if let Some(value) = value {
            hash = Some(hash.map_or(value, |h| h.rotate_left(1) ^ value));
            if *terminal {
                break;
            }
        }
    }
    Some(hash.unwrap_or_else(|| SplitMix64::new(seed.fetch_add(1, Ordering::Relaxed)).next_u64()))
}
