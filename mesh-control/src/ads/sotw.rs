//! State of the World ADS (`StreamAggregatedResources`).

use std::collections::{BTreeSet, HashMap};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use tonic::Status;

use super::snapshot::{Published, version_string};
use super::status::{Nack, Protocol};
use super::{Handler, StreamInfo, is_full_state, type_state, view};

/// A SotW stream.
#[derive(Debug)]
pub(super) struct Sotw {
    stream: StreamInfo,
    /// In sending order.
    types: Vec<TypeState>,
}

/// One type on a stream.
#[derive(Debug)]
struct TypeState {
    type_url: String,
    /// Full-state responses (listeners, clusters).
    full: bool,
    names: BTreeSet<String>,
    wildcard: bool,
    /// The first request had no names: wildcard until a request names some.
    legacy_wildcard: bool,
    /// The last response's nonce (requests naming another are stale) and version.
    nonce: Option<String>,
    version: String,
    /// Name → version (hash) of each resource in the last response.
    sent: HashMap<String, u64>,
    /// The type version last looked at, unless the subscription changed since.
    evaluated: Option<u64>,
    /// The last nonce NACKed, so a NACK repeated on later requests is logged once.
    nacked: Option<String>,
}

impl TypeState {
    fn new(type_url: String) -> Self {
        Self {
            full: is_full_state(&type_url),
            type_url,
            names: BTreeSet::new(),
            wildcard: false,
            legacy_wildcard: false,
            nonce: None,
            version: String::new(),
            sent: HashMap::new(),
            evaluated: None,
            nacked: None,
        }
    }

    /// Applies a request's `resource_names` (`first`: the type's first request). Returns whether the subscription
    /// changed and whether a response is due even if nothing differs.
    fn subscribe(&mut self, first: bool, resource_names: Vec<String>) -> (bool, bool) {
        if first && self.full && resource_names.is_empty() {
            self.legacy_wildcard = true;
        }
        if !resource_names.is_empty() {
            self.legacy_wildcard = false;
        }
        let mut names: BTreeSet<String> = resource_names.into_iter().collect();
        let wildcard = names.remove("*") || self.legacy_wildcard;
        if !first && wildcard == self.wildcard && names == self.names {
            return (false, false);
        }
        let added = (wildcard && !self.wildcard) || names.iter().any(|name| !self.names.contains(name));
        // Forget what left the subscription, and what is newly requested: the client must get that again even if
        // it was sent before (as part of a wildcard).
        self.sent.retain(|name, _| (wildcard || names.contains(name)) && (!names.contains(name) || self.names.contains(name)));
        self.wildcard = wildcard;
        self.names = names;
        self.evaluated = None;
        (true, self.full && (first || added))
    }

    /// Queues a response if what the stream should see differs from what it was last sent (or if `force`).
    fn respond(&mut self, stream: &mut StreamInfo, snapshot: &Published, force: bool, out: &mut Vec<DiscoveryResponse>) {
        let type_version = snapshot.version(&self.type_url);
        if !force && self.evaluated == Some(type_version) {
            return;
        }
        self.evaluated = Some(type_version);
        let view = view(snapshot, &self.type_url, self.wildcard, &self.names);
        let changed = view.iter().any(|(name, entry)| self.sent.get(*name) != Some(&entry.hash));
        // Otherwise every resource in view was sent as is: anything else sent is gone.
        let gone = !changed && self.sent.len() > view.len();
        let send = force || changed || (gone && self.full);
        if send || gone {
            // A route or endpoint that is gone is not sent (absence says nothing), only forgotten.
            self.sent = view.iter().map(|(name, entry)| ((*name).clone(), entry.hash)).collect();
        }
        if !send {
            return;
        }
        let nonce = stream.nonce();
        self.version = version_string(type_version);
        self.nonce = Some(nonce.clone());
        tracing::debug!(node = %stream.node_id, type_url = %self.type_url, version = %self.version, %nonce, resources = view.len(), "ADS response");
        stream.status.update(&self.type_url, |status| {
            status.sent_version = Some(self.version.clone());
            status.sent_nonce = Some(nonce.clone());
        });
        out.push(DiscoveryResponse {
            version_info: self.version.clone(),
            resources: view.iter().map(|(_, entry)| entry.any.clone()).collect(),
            type_url: self.type_url.clone(),
            nonce,
            ..Default::default()
        });
    }
}

impl Handler for Sotw {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    const PROTOCOL: Protocol = Protocol::Sotw;

    fn new(stream: StreamInfo) -> Self {
        Self { stream, types: Vec::new() }
    }

    fn node(request: &DiscoveryRequest) -> Option<&Node> {
        request.node.as_ref()
    }

    fn on_request(&mut self, request: DiscoveryRequest, snapshot: &Published, out: &mut Vec<DiscoveryResponse>) -> Result<(), Status> {
        if request.type_url.is_empty() {
            return Err(Status::invalid_argument("ADS requests must set type_url"));
        }
        let (state, first) =
            type_state(&mut self.types, &request.type_url, |state| &state.type_url, || TypeState::new(request.type_url.clone()));
        let stream = &mut self.stream;
        if !request.response_nonce.is_empty()
            && let Some(nonce) = &state.nonce
        {
            if request.response_nonce != *nonce {
                tracing::debug!(node = %stream.node_id, type_url = %state.type_url, nonce = %request.response_nonce, "stale ADS request ignored");
                return Ok(());
            }
            match &request.error_detail {
                None => stream.status.update(&state.type_url, |status| {
                    status.acked_version = Some(state.version.clone());
                    status.acked_nonce = Some(nonce.clone());
                }),
                Some(error) if state.nacked.as_ref() != Some(nonce) => {
                    tracing::warn!(node = %stream.node_id, type_url = %state.type_url, version = %state.version, %nonce, error = %error.message, "xDS client rejected a response (NACK)");
                    state.nacked = Some(nonce.clone());
                    let nack = Nack {
                        version: state.version.clone(),
                        nonce: nonce.clone(),
                        error: error.message.clone(),
                        at: std::time::SystemTime::now(),
                    };
                    stream.status.update(&state.type_url, |status| status.last_nack = Some(nack));
                }
                Some(_) => {}
            }
        }
        let (changed, force) = state.subscribe(first, request.resource_names);
        if changed {
            stream.status.update(&state.type_url, |status| {
                status.wildcard = state.wildcard;
                status.names = state.names.iter().cloned().collect();
            });
        }
        state.respond(stream, snapshot, force, out);
        Ok(())
    }

    fn on_snapshot(&mut self, snapshot: &Published, out: &mut Vec<DiscoveryResponse>) {
        for state in &mut self.types {
            state.respond(&mut self.stream, snapshot, false, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::future::join_all;

    use super::super::testing::{SotwStream, connect, endpoints, names, node, serve, snapshot, wait_status};
    use super::super::type_url::{CLUSTER, ENDPOINT, LISTENER};
    use super::super::{Protocol, SnapshotCache, StreamStatus, TypeStatus};

    fn type_status<'a>(stream: &'a StreamStatus, type_url: &str) -> &'a TypeStatus {
        stream.types.get(type_url).unwrap_or_else(|| panic!("no {type_url} in {stream:?}"))
    }

    /// The status of the only stream whose node id is `id`, once `predicate` holds for it.
    async fn stream_status(cache: &SnapshotCache, id: &str, predicate: impl Fn(&StreamStatus) -> bool) -> StreamStatus {
        let status = wait_status(cache, id, |status| status.streams.iter().any(|s| s.node_id == id && predicate(s))).await;
        status.streams.into_iter().find(|s| s.node_id == id).unwrap()
    }

    #[tokio::test]
    async fn wildcard_cds_gets_all_clusters_and_an_ack_gets_nothing() {
        let cache = SnapshotCache::by_cluster();
        cache.set_default(snapshot(&[("a", "1"), ("b", "1")], &[("a", 1)]));
        let mut client = connect(serve(&cache).await).await;
        let mut stream = SotwStream::open(&mut client).await;

        stream.request(Some(&node("n1", "")), CLUSTER, &[], None);
        let cds = stream.recv().await;
        assert_eq!((cds.type_url.as_str(), names(&cds)), (CLUSTER, vec!["a".to_owned(), "b".to_owned()]));
        assert!(!cds.version_info.is_empty() && !cds.nonce.is_empty());

        stream.request(None, CLUSTER, &[], Some(&cds));
        let status = stream_status(&cache, "n1", |s| type_status(s, CLUSTER).acked_nonce.as_ref() == Some(&cds.nonce)).await;
        assert_eq!((status.key.as_str(), status.protocol), ("", Protocol::Sotw));
        let cds_status = type_status(&status, CLUSTER);
        assert!(cds_status.wildcard && cds_status.names.is_empty());
        assert_eq!(cds_status.acked_version.as_ref(), Some(&cds.version_info));

        // Whatever the ACK caused would come first.
        stream.request(None, ENDPOINT, &["a"], None);
        let eds = stream.recv().await;
        assert_eq!((eds.type_url.as_str(), names(&eds)), (ENDPOINT, vec!["a".to_owned()]));
    }

    #[tokio::test]
    async fn an_endpoint_change_goes_only_to_its_subscribers() {
        let cache = SnapshotCache::by_cluster();
        cache.set_default(snapshot(&[], &[("a", 1), ("b", 2)]));
        let mut client = connect(serve(&cache).await).await;
        let (mut on_a, mut on_b) = (SotwStream::open(&mut client).await, SotwStream::open(&mut client).await);
        on_a.request(Some(&node("on-a", "")), ENDPOINT, &["a"], None);
        on_b.request(Some(&node("on-b", "")), ENDPOINT, &["b"], None);
        let (a1, b1) = (on_a.recv().await, on_b.recv().await);
        assert_eq!((names(&a1), names(&b1)), (vec!["a".to_owned()], vec!["b".to_owned()]));
        on_a.request(None, ENDPOINT, &["a"], Some(&a1));
        on_b.request(None, ENDPOINT, &["b"], Some(&b1));

        cache.set_default(snapshot(&[], &[("a", 1), ("b", 3)]));
        let b2 = on_b.recv().await;
        assert_eq!(b2.resources, vec![endpoints("b", 3)]);
        assert_ne!(b2.version_info, b1.version_info);

        // The next thing on_a sees is its own change, not the one to b.
        cache.set_default(snapshot(&[], &[("a", 4), ("b", 3)]));
        assert_eq!(on_a.recv().await.resources, vec![endpoints("a", 4)]);
    }

    #[tokio::test]
    async fn removals_are_absences_in_cds_and_silent_in_eds() {
        let cache = SnapshotCache::by_cluster();
        cache.set_default(snapshot(&[("a", "1"), ("b", "1")], &[("a", 1), ("b", 2)]));
        let mut client = connect(serve(&cache).await).await;
        let mut stream = SotwStream::open(&mut client).await;
        stream.request(Some(&node("n1", "")), CLUSTER, &[], None);
        let cds = stream.recv().await;
        stream.request(None, CLUSTER, &[], Some(&cds));
        stream.request(None, ENDPOINT, &["a", "b"], None);
        let eds = stream.recv().await;
        assert_eq!(names(&eds), ["a", "b"]);
        stream.request(None, ENDPOINT, &["a", "b"], Some(&eds));

        cache.set_default(snapshot(&[("a", "1")], &[("a", 1)]));
        let cds2 = stream.recv().await;
        assert_eq!((cds2.type_url.as_str(), names(&cds2)), (CLUSTER, vec!["a".to_owned()]));
        assert_ne!(cds2.version_info, cds.version_info);

        // No EDS response for b's removal: the next one is a's change.
        cache.set_default(snapshot(&[("a", "1")], &[("a", 5)]));
        let eds2 = stream.recv().await;
        assert_eq!((eds2.type_url.as_str(), eds2.resources), (ENDPOINT, vec![endpoints("a", 5)]));

        // b coming back is sent (what a client subscribes to may spring into existence at any time).
        cache.set_default(snapshot(&[("a", "1")], &[("a", 5), ("b", 2)]));
        assert_eq!(names(&stream.recv().await), ["a", "b"]);
    }

    #[tokio::test]
    async fn a_nack_is_recorded_and_not_answered() {
        let cache = SnapshotCache::by_cluster();
        cache.set_default(snapshot(&[("a", "1")], &[]));
        let mut client = connect(serve(&cache).await).await;
        let mut stream = SotwStream::open(&mut client).await;
        stream.request(Some(&node("n1", "c1")), CLUSTER, &[], None);
        let cds = stream.recv().await;

        stream.nack(&cds, &[], "bad cluster a");
        let status = stream_status(&cache, "n1", |s| type_status(s, CLUSTER).last_nack.is_some()).await;
        let cds_status = type_status(&status, CLUSTER);
        let nack = cds_status.last_nack.as_ref().unwrap();
        assert_eq!((nack.error.as_str(), &nack.nonce, &nack.version), ("bad cluster a", &cds.nonce, &cds.version_info));
        assert_eq!(cds_status.acked_nonce, None);
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["types"][CLUSTER]["last_nack"]["error"], "bad cluster a");
        assert_eq!(json["protocol"], "sotw");
        assert!(json["types"][CLUSTER]["last_nack"]["at_ms"].as_u64().unwrap() > 0);

        // No resend: the next response is the next change.
        cache.set_default(snapshot(&[("a", "2")], &[]));
        let cds2 = stream.recv().await;
        assert_ne!(cds2.nonce, cds.nonce);
        assert_eq!(names(&cds2), ["a"]);
        assert_ne!(cds2.resources, cds.resources);
        stream.request(None, CLUSTER, &[], Some(&cds2));
        let status = stream_status(&cache, "n1", |s| type_status(s, CLUSTER).acked_nonce.as_ref() == Some(&cds2.nonce)).await;
        assert_eq!(type_status(&status, CLUSTER).last_nack.as_ref().unwrap().nonce, cds.nonce);
    }

    #[tokio::test]
    async fn a_stale_nonce_is_ignored() {
        let cache = SnapshotCache::by_cluster();
        cache.set_default(snapshot(&[], &[("a", 1), ("b", 2)]));
        let mut client = connect(serve(&cache).await).await;
        let mut stream = SotwStream::open(&mut client).await;
        stream.request(Some(&node("n1", "")), ENDPOINT, &["a"], None);
        let first = stream.recv().await;
        cache.set_default(snapshot(&[], &[("a", 10), ("b", 2)]));
        let second = stream.recv().await;

        // Names b as well, but answers the first response: ignored.
        stream.request(None, ENDPOINT, &["a", "b"], Some(&first));
        stream.request(None, ENDPOINT, &["a"], Some(&second));
        let status = stream_status(&cache, "n1", |s| type_status(s, ENDPOINT).acked_nonce.as_ref() == Some(&second.nonce)).await;
        assert_eq!(type_status(&status, ENDPOINT).names, ["a"]);

        cache.set_default(snapshot(&[], &[("a", 11), ("b", 2)]));
        assert_eq!(stream.recv().await.resources, vec![endpoints("a", 11)]);
    }

    #[tokio::test]
    async fn a_new_stream_starts_from_nothing() {
        let cache = SnapshotCache::by_cluster();
        cache.set_default(snapshot(&[("a", "1")], &[]));
        let mut client = connect(serve(&cache).await).await;
        let mut stream = SotwStream::open(&mut client).await;
        stream.request(Some(&node("n1", "")), CLUSTER, &[], None);
        let cds = stream.recv().await;
        drop(stream);

        // Reconnecting with the version (and nonce) it had.
        let mut stream = SotwStream::open(&mut client).await;
        stream.request(Some(&node("n1", "")), CLUSTER, &[], Some(&cds));
        let again = stream.recv().await;
        assert_eq!((again.resources, again.version_info), (cds.resources, cds.version_info));
    }

    #[tokio::test]
    async fn names_that_do_not_exist() {
        let cache = SnapshotCache::by_cluster();
        cache.set_default(snapshot(&[("a", "1")], &[]));
        let mut client = connect(serve(&cache).await).await;
        let mut stream = SotwStream::open(&mut client).await;

        // Listeners and clusters: a response with those that exist, even none.
        stream.request(Some(&node("n1", "")), CLUSTER, &["a", "x"], None);
        let cds = stream.recv().await;
        assert_eq!(names(&cds), ["a"]);
        stream.request(None, LISTENER, &["l"], None);
        let lds = stream.recv().await;
        assert_eq!((lds.type_url.as_str(), lds.resources.len()), (LISTENER, 0));
        // Adding a missing name gets a response again.
        stream.request(None, CLUSTER, &["a", "x", "y"], Some(&cds));
        let cds2 = stream.recv().await;
        assert_eq!(names(&cds2), ["a"]);
        assert_ne!(cds2.nonce, cds.nonce);

        // Endpoints and unknown types: nothing until they exist.
        stream.request(None, ENDPOINT, &["x"], None);
        stream.request(None, "type.googleapis.com/example.Unknown", &["x"], None);
        stream.request(None, "type.googleapis.com/example.Wild", &["*"], None);
        cache.set_default(snapshot(&[("a", "1")], &[("x", 7)]));
        let eds = stream.recv().await;
        assert_eq!((eds.type_url.as_str(), eds.resources), (ENDPOINT, vec![endpoints("x", 7)]));
    }

    #[tokio::test]
    async fn a_request_without_type_url_ends_the_stream() {
        let cache = SnapshotCache::by_cluster();
        let mut client = connect(serve(&cache).await).await;
        let mut stream = SotwStream::open(&mut client).await;
        stream.request(Some(&node("n1", "")), "", &[], None);
        assert_eq!(stream.recv_error().await.code(), tonic::Code::InvalidArgument);
        wait_status(&cache, "the stream to go", |status| status.streams.is_empty()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_thousand_streams_all_get_an_update() {
        const CONNECTIONS: usize = 8;
        const STREAMS_PER_CONNECTION: usize = 125;
        let cache = SnapshotCache::by_cluster();
        cache.set_default(snapshot(&[("a", "1")], &[]));
        let addr = serve(&cache).await;
        let mut streams = Vec::new();
        for _ in 0..CONNECTIONS {
            let mut client = connect(addr).await;
            for _ in 0..STREAMS_PER_CONNECTION {
                let stream = SotwStream::open(&mut client).await;
                stream.request(Some(&node(&format!("n{}", streams.len()), "")), CLUSTER, &[], None);
                streams.push(stream);
            }
        }
        let first = join_all(streams.iter_mut().map(SotwStream::recv)).await;
        assert!(first.iter().all(|cds| names(cds) == ["a"]));
        for (stream, cds) in streams.iter().zip(&first) {
            stream.request(None, CLUSTER, &[], Some(cds));
        }
        assert_eq!(cache.status().streams.len(), CONNECTIONS * STREAMS_PER_CONNECTION);

        cache.set_default(snapshot(&[("a", "1"), ("b", "1")], &[]));
        let updates = join_all(streams.iter_mut().map(SotwStream::recv)).await;
        assert_eq!(updates.len(), CONNECTIONS * STREAMS_PER_CONNECTION);
        assert!(updates.iter().all(|cds| names(cds) == ["a", "b"]));
    }
}
