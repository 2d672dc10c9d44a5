//! Incremental ADS (`DeltaAggregatedResources`).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::SystemTime;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use tonic::Status;

use super::snapshot::{Published, version_string};
use super::status::{Nack, Protocol};
use super::{Handler, StreamInfo, is_full_state, type_state, view};

/// Responses remembered per type for ACK/NACK (an answer to an older one only counts as stale).
const PENDING_NONCES: usize = 16;

/// A delta stream.
#[derive(Debug)]
pub(super) struct Delta {
    stream: StreamInfo,
    /// In sending order.
    types: Vec<TypeState>,
}

/// One type on a stream.
#[derive(Debug)]
struct TypeState {
    type_url: String,
    names: BTreeSet<String>,
    wildcard: bool,
    /// Name → version the client has (sent, or declared in `initial_resource_versions`); `""` forces a send.
    known: HashMap<String, String>,
    /// Subscribed names already reported as not existing (in `removed_resources`), so each is reported once.
    absent: BTreeSet<String>,
    /// Recent responses not yet answered: (nonce, version), oldest first.
    pending: VecDeque<(String, String)>,
    /// The type version last looked at, unless the subscription changed since.
    evaluated: Option<u64>,
}

impl TypeState {
    fn new(type_url: String) -> Self {
        Self {
            type_url,
            names: BTreeSet::new(),
            wildcard: false,
            known: HashMap::new(),
            absent: BTreeSet::new(),
            pending: VecDeque::new(),
            evaluated: None,
        }
    }

    /// Applies a request's subscription changes (`first`: the type's first request). Returns whether the
    /// subscription (names or wildcard) changed.
    fn subscribe(&mut self, first: bool, request: &mut DeltaDiscoveryRequest) -> bool {
        let subscribe = std::mem::take(&mut request.resource_names_subscribe);
        let unsubscribe = std::mem::take(&mut request.resource_names_unsubscribe);
        let mut changed = first;
        if first {
            self.wildcard = is_full_state(&self.type_url) && subscribe.is_empty();
            self.known = std::mem::take(&mut request.initial_resource_versions).into_iter().collect();
        } else if subscribe.is_empty() && unsubscribe.is_empty() {
            return false;
        }
        // Whatever the outcome, what the client should have is looked at again.
        self.evaluated = None;
        for name in subscribe {
            if name == "*" {
                changed |= !self.wildcard;
                self.wildcard = true;
                continue;
            }
            // Sent even if the client should have it: it may have dropped it. Likewise told again if it is absent.
            if !first {
                self.known.remove(&name);
            }
            self.absent.remove(&name);
            changed |= self.names.insert(name);
        }
        for name in unsubscribe {
            if name == "*" {
                changed |= self.wildcard;
                self.wildcard = false;
            } else if self.names.remove(&name) {
                changed = true;
                self.absent.remove(&name);
                if !self.wildcard {
                    self.known.remove(&name);
                } else if let Some(version) = self.known.get_mut(&name) {
                    // Still in the wildcard: sent again, so the client knows to keep it.
                    version.clear();
                }
            }
        }
        if !self.wildcard {
            let names = &self.names;
            self.known.retain(|name, _| names.contains(name));
        }
        changed
    }

    /// Queues a response with what is new, changed or gone for the client, if anything.
    fn respond(&mut self, stream: &mut StreamInfo, snapshot: &Published, out: &mut Vec<DeltaDiscoveryResponse>) {
        let type_version = snapshot.version(&self.type_url);
        if self.evaluated == Some(type_version) {
            return;
        }
        self.evaluated = Some(type_version);
        let resources: Vec<Resource> = view(snapshot, &self.type_url, self.wildcard, &self.names)
            .into_iter()
            .filter(|(name, entry)| self.known.get(*name) != Some(&entry.version))
            .map(|(name, entry)| Resource {
                name: name.clone(),
                version: entry.version.clone(),
                resource: Some(entry.any.clone()),
                ..Default::default()
            })
            .collect();
        let all = snapshot.resources(&self.type_url);
        let exists = |name: &String| all.is_some_and(|all| all.contains_key(name));
        let mut removed: Vec<String> = self.known.keys().filter(|name| !exists(name)).cloned().collect();
        // A subscribed name that does not exist is named in removed_resources once, so the client need not wait
        // for its does-not-exist timer (the xDS protocol's "knowing when a requested resource does not exist").
        let missing: Vec<String> = self
            .names
            .iter()
            .filter(|name| !exists(name) && !self.known.contains_key(*name) && !self.absent.contains(*name))
            .cloned()
            .collect();
        self.absent.extend(missing.iter().cloned());
        removed.extend(missing);
        if resources.is_empty() && removed.is_empty() {
            return;
        }
        removed.sort_unstable();
        removed.dedup();
        for resource in &resources {
            self.absent.remove(&resource.name);
            self.known.insert(resource.name.clone(), resource.version.clone());
        }
        for name in &removed {
            self.known.remove(name);
            if self.names.contains(name) {
                self.absent.insert(name.clone());
            }
        }
        let nonce = stream.nonce();
        let version = version_string(type_version);
        if self.pending.len() == PENDING_NONCES {
            self.pending.pop_front();
        }
        self.pending.push_back((nonce.clone(), version.clone()));
        tracing::debug!(
            node = %stream.node_id, type_url = %self.type_url, %version, %nonce, resources = resources.len(), removed = removed.len(),
            "ADS delta response"
        );
        stream.status.update(&self.type_url, |status| {
            status.sent_version = Some(version.clone());
            status.sent_nonce = Some(nonce.clone());
        });
        out.push(DeltaDiscoveryResponse {
            system_version_info: version,
            resources,
            type_url: self.type_url.clone(),
            removed_resources: removed,
            nonce,
            ..Default::default()
        });
    }
}

impl Handler for Delta {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    const PROTOCOL: Protocol = Protocol::Delta;

    fn new(stream: StreamInfo) -> Self {
        Self { stream, types: Vec::new() }
    }

    fn node(request: &DeltaDiscoveryRequest) -> Option<&Node> {
        request.node.as_ref()
    }

    fn on_request(
        &mut self,
        mut request: DeltaDiscoveryRequest,
        snapshot: &Published,
        out: &mut Vec<DeltaDiscoveryResponse>,
    ) -> Result<(), Status> {
        if request.type_url.is_empty() {
            return Err(Status::invalid_argument("ADS requests must set type_url"));
        }
        let (state, first) =
            type_state(&mut self.types, &request.type_url, |state| &state.type_url, || TypeState::new(request.type_url.clone()));
        let stream = &mut self.stream;
        if !request.response_nonce.is_empty() {
            match state.pending.iter().position(|(nonce, _)| *nonce == request.response_nonce) {
                None => {
                    tracing::debug!(node = %stream.node_id, type_url = %state.type_url, nonce = %request.response_nonce, "ADS request answers an unknown nonce");
                }
                Some(at) => {
                    // Answering a response answers the ones before it too.
                    let (nonce, version) = state.pending.drain(..=at).next_back().unwrap_or_default();
                    match &request.error_detail {
                        None => stream.status.update(&state.type_url, |status| {
                            status.acked_version = Some(version);
                            status.acked_nonce = Some(nonce);
                        }),
                        Some(error) => {
                            tracing::warn!(node = %stream.node_id, type_url = %state.type_url, %version, %nonce, error = %error.message, "xDS client rejected a response (NACK)");
                            let nack = Nack { version, nonce, error: error.message.clone(), at: SystemTime::now() };
                            stream.status.update(&state.type_url, |status| status.last_nack = Some(nack));
                        }
                    }
                }
            }
        }
        if state.subscribe(first, &mut request) {
            stream.status.update(&state.type_url, |status| {
                status.wildcard = state.wildcard;
                status.names = state.names.iter().cloned().collect();
            });
        }
        state.respond(stream, snapshot, out);
        Ok(())
    }

    fn on_snapshot(&mut self, snapshot: &Published, out: &mut Vec<DeltaDiscoveryResponse>) {
        for state in &mut self.types {
            state.respond(&mut self.stream, snapshot, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};

    use super::super::testing::{DeltaStream, cluster, connect, delta_names, endpoints, error, node, serve, snapshot, wait_status};
    use super::super::type_url::{CLUSTER, ENDPOINT};
    use super::super::{Protocol, SnapshotCache};

    fn versions(response: &DeltaDiscoveryResponse) -> HashMap<String, String> {
        response.resources.iter().map(|resource| (resource.name.clone(), resource.version.clone())).collect()
    }

    /// A subscribed name that does not exist is named in removed_resources, once; when it appears it is sent.
    #[tokio::test]
    async fn names_that_do_not_exist_are_reported_once() {
        let cache = SnapshotCache::by_cluster();
        cache.set_default(snapshot(&[("a", "1")], &[("a", 1)]));
        let mut client = connect(serve(&cache).await).await;
        let mut stream = DeltaStream::open(&mut client).await;
        stream.subscribe(Some(&node("n1", "")), ENDPOINT, &["a", "zzz"]);
        let first = stream.recv().await;
        assert_eq!((delta_names(&first), first.removed_resources.clone()), (vec!["a".to_owned()], vec!["zzz".to_owned()]));
        stream.ack(&first);
        // Another change: zzz is not reported again.
        cache.set_default(snapshot(&[("a", "1")], &[("a", 2)]));
        let second = stream.recv().await;
        assert_eq!((delta_names(&second), second.removed_resources.len()), (vec!["a".to_owned()], 0));
        stream.ack(&second);
        // It appears: sent. It goes: removed once; a later change does not repeat it.
        cache.set_default(snapshot(&[("a", "1")], &[("a", 2), ("zzz", 3)]));
        assert_eq!(delta_names(&stream.recv().await), ["zzz"]);
        cache.set_default(snapshot(&[("a", "1")], &[("a", 2)]));
        assert_eq!(stream.recv().await.removed_resources, ["zzz"]);
        cache.set_default(snapshot(&[("a", "1")], &[("a", 4)]));
        let last = stream.recv().await;
        assert_eq!((delta_names(&last), last.removed_resources.len()), (vec!["a".to_owned()], 0));
    }

    #[tokio::test]
    async fn wildcard_clusters_and_named_endpoints() {
        let cache = SnapshotCache::by_cluster();
        cache.set_default(snapshot(&[("a", "1"), ("b", "1")], &[("a", 1), ("b", 2)]));
        let mut client = connect(serve(&cache).await).await;
        let mut stream = DeltaStream::open(&mut client).await;

        stream.subscribe(Some(&node("n1", "")), CLUSTER, &[]);
        let cds = stream.recv().await;
        assert_eq!((cds.type_url.as_str(), delta_names(&cds)), (CLUSTER, vec!["a".to_owned(), "b".to_owned()]));
        assert!(cds.removed_resources.is_empty() && !cds.nonce.is_empty());
        stream.ack(&cds);
        stream.subscribe(None, ENDPOINT, &["a", "b"]);
        let eds = stream.recv().await;
        assert_eq!(delta_names(&eds), ["a", "b"]);
        stream.ack(&eds);

        // One of two changes: only that one.
        cache.set_default(snapshot(&[("a", "1"), ("b", "1")], &[("a", 3), ("b", 2)]));
        let eds2 = stream.recv().await;
        assert_eq!((eds2.type_url.as_str(), delta_names(&eds2)), (ENDPOINT, vec!["a".to_owned()]));
        assert_eq!(eds2.resources[0].resource.as_ref(), Some(&endpoints("a", 3)));
        assert_ne!(eds2.resources[0].version, versions(&eds)["a"]);
        assert!(eds2.removed_resources.is_empty());
        stream.ack(&eds2);

        // Removals, clusters first.
        cache.set_default(snapshot(&[("a", "1")], &[("a", 3)]));
        let cds2 = stream.recv().await;
        assert_eq!((cds2.type_url.as_str(), cds2.resources.len(), &cds2.removed_resources[..]), (CLUSTER, 0, &["b".to_owned()][..]));
        let eds3 = stream.recv().await;
        assert_eq!((eds3.type_url.as_str(), eds3.resources.len(), &eds3.removed_resources[..]), (ENDPOINT, 0, &["b".to_owned()][..]));
        stream.ack(&cds2);
        stream.ack(&eds3);
        let status = wait_status(&cache, "ACKs", |status| {
            status.streams.iter().any(|s| s.types.get(ENDPOINT).and_then(|t| t.acked_nonce.as_ref()) == Some(&eds3.nonce))
        })
        .await;
        let stream_status = &status.streams[0];
        assert_eq!(stream_status.protocol, Protocol::Delta);
        assert!(stream_status.types[CLUSTER].wildcard);
        assert_eq!(stream_status.types[ENDPOINT].names, ["a", "b"]);

        // Unsubscribing is not a removal; resubscribing sends it again.
        stream.send(DeltaDiscoveryRequest {
            type_url: ENDPOINT.to_owned(),
            resource_names_unsubscribe: vec!["a".to_owned()],
            ..Default::default()
        });
        stream.subscribe(None, ENDPOINT, &["a"]);
        let eds4 = stream.recv().await;
        assert_eq!((delta_names(&eds4), eds4.removed_resources.len()), (vec!["a".to_owned()], 0));
        // So does subscribing to what the client should already have.
        stream.subscribe(None, ENDPOINT, &["a"]);
        assert_eq!(delta_names(&stream.recv().await), ["a"]);
    }

    #[tokio::test]
    async fn a_nack_is_recorded_and_not_answered() {
        let cache = SnapshotCache::by_cluster();
        cache.set_default(snapshot(&[("a", "1")], &[]));
        let mut client = connect(serve(&cache).await).await;
        let mut stream = DeltaStream::open(&mut client).await;
        stream.subscribe(Some(&node("n1", "")), CLUSTER, &[]);
        let cds = stream.recv().await;
        stream.send(DeltaDiscoveryRequest {
            type_url: CLUSTER.to_owned(),
            response_nonce: cds.nonce.clone(),
            error_detail: error("no good"),
            ..Default::default()
        });
        let status = wait_status(&cache, "the NACK", |status| status.streams.iter().any(|s| s.types[CLUSTER].last_nack.is_some())).await;
        let nack = status.streams[0].types[CLUSTER].last_nack.clone().unwrap();
        assert_eq!((nack.error.as_str(), nack.nonce, nack.version), ("no good", cds.nonce.clone(), cds.system_version_info));

        cache.set_default(snapshot(&[("a", "1"), ("b", "1")], &[]));
        let cds2 = stream.recv().await;
        assert_eq!((delta_names(&cds2), cds2.resources[0].resource.as_ref()), (vec!["b".to_owned()], Some(&cluster("b", "1"))));
    }

    #[tokio::test]
    async fn initial_resource_versions_prevent_resends() {
        let cache = SnapshotCache::by_cluster();
        cache.set_default(snapshot(&[("a", "1")], &[("a", 1), ("b", 2), ("c", 3)]));
        let mut client = connect(serve(&cache).await).await;
        let mut stream = DeltaStream::open(&mut client).await;
        stream.subscribe(Some(&node("n1", "")), CLUSTER, &[]);
        let cds = stream.recv().await;
        stream.subscribe(None, ENDPOINT, &["a", "b", "c"]);
        let eds = stream.recv().await;
        drop(stream);

        // While away: b changes, c goes.
        cache.set_default(snapshot(&[("a", "1")], &[("a", 1), ("b", 20)]));
        let mut stream = DeltaStream::open(&mut client).await;
        stream.send(DeltaDiscoveryRequest {
            node: Some(node("n1", "")),
            type_url: CLUSTER.to_owned(),
            initial_resource_versions: versions(&cds),
            ..Default::default()
        });
        stream.send(DeltaDiscoveryRequest {
            type_url: ENDPOINT.to_owned(),
            resource_names_subscribe: vec!["a".to_owned(), "b".to_owned(), "c".to_owned()],
            initial_resource_versions: versions(&eds),
            ..Default::default()
        });
        // Clusters are up to date, so the first response is for endpoints.
        let eds2 = stream.recv().await;
        assert_eq!(eds2.type_url, ENDPOINT);
        assert_eq!((delta_names(&eds2), eds2.removed_resources), (vec!["b".to_owned()], vec!["c".to_owned()]));
    }
}
