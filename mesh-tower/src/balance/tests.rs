//! The balancer on tokio's paused clock, over a fake connector: in-memory connections to in-process HTTP/2
//! servers, no sockets and no real sleeps. Backoff, waiting and draining take virtual time only.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use mesh_core::Endpoint;
use mesh_core::outlier::Reason;
use tower::ServiceExt;

use super::{Balancer, BalancerConfig, ConnState, RequestHash, ServedBy};
use crate::Error;
use crate::connect::{Connect, EndpointTarget};
use crate::discover::{self, Change};
use crate::testing::{FakeNet, Peer, addr};

fn balancer(net: &FakeNet, ports: &[u16]) -> (Balancer<Empty<Bytes>, FakeNet>, discover::ChangeSender) {
    let (tx, source) = discover::channel();
    tx.send(Change::reset(ports.iter().map(|&p| Endpoint::new(addr(p)))));
    let config = BalancerConfig { lb: "round_robin".parse().unwrap(), ..BalancerConfig::default() };
    (Balancer::with_connector("fake", source, config, net.clone()), tx)
}

async fn call(balancer: &Balancer<Empty<Bytes>, FakeNet>) -> Result<SocketAddr, Error> {
    let response = balancer.clone().oneshot(http::Request::new(Empty::new())).await?;
    let served_by = response.extensions().get::<ServedBy>().unwrap().0;
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, served_by.to_string(), "the reply comes from the endpoint named in ServedBy");
    Ok(served_by)
}

async fn until_state(balancer: &Balancer<Empty<Bytes>, FakeNet>, at: SocketAddr, state: ConnState) {
    let mut updates = balancer.updates();
    while !balancer.endpoints().iter().any(|e| e.endpoint.addr == at && e.state == state) {
        updates.changed().await.unwrap();
    }
}

/// Envoy's `max_pending_requests`: while the only endpoint connects, two calls wait and the third fails at
/// once, never retried, counted as an overflow; the two are served once it is ready, and calls that find it
/// ready take no place.
#[tokio::test(start_paused = true)]
async fn calls_beyond_max_pending_requests_fail_at_once_while_the_rest_wait() {
    let net = FakeNet::default();
    net.set(addr(1), Peer::SlowConnect { connect: Duration::from_millis(500) });
    let (tx, source) = discover::channel();
    tx.send(Change::reset([Endpoint::new(addr(1))]));
    let config = BalancerConfig { max_pending_requests: Some(2), ..BalancerConfig::default() };
    let balancer = Balancer::with_connector("fake", source, config, net.clone());
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let balancer = balancer.clone();
            tokio::spawn(async move { call(&balancer).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = tokio::time::Instant::now();
    let overflow = call(&balancer).await.unwrap_err();
    assert!(matches!(&overflow, Error::PendingOverflow { cluster, limit: 2 } if cluster == "fake"), "{overflow}");
    assert_eq!(started.elapsed(), Duration::ZERO, "it fails at once");
    assert_eq!(overflow.grpc_code(), mesh_core::GrpcCode::Unavailable);
    for call in waiting {
        assert_eq!(call.await.unwrap().unwrap(), addr(1), "the calls within the cap wait and are served");
    }
    for _ in 0..5 {
        assert_eq!(call(&balancer).await.unwrap(), addr(1));
    }
    assert_eq!(balancer.stats().counts().overflows, 1);
}

/// Envoy's `max_requests`, in the balancer (gRPC A32): a call takes its place at its pick, so calls waiting for
/// a ready endpoint hold none, and each picked call holds one until its body ends.
#[tokio::test(start_paused = true)]
async fn max_requests_counts_calls_from_their_pick_until_their_body_ends() {
    let net = FakeNet::default();
    net.set(addr(1), Peer::SlowConnect { connect: Duration::from_millis(500) });
    let (tx, source) = discover::channel();
    tx.send(Change::reset([Endpoint::new(addr(1))]));
    let config = BalancerConfig { max_requests: Some(1), ..BalancerConfig::default() };
    let balancer = Balancer::with_connector("fake", source, config, net.clone());
    let gate = balancer.inner.state.breaker.clone().expect("max_requests installs the gate");
    let waiting: Vec<_> = (0..3)
        .map(|_| {
            let balancer = balancer.clone();
            tokio::spawn(async move { balancer.oneshot(http::Request::new(Empty::new())).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(gate.in_flight(), 0, "three calls wait for the endpoint and hold no place");
    let mut answers = Vec::new();
    let mut overflows = 0;
    for call in waiting {
        match call.await.unwrap() {
            Ok(response) => answers.push(response),
            Err(Error::Overflow { cluster, limit: 1 }) if cluster == "fake" => overflows += 1,
            Err(other) => panic!("{other}"),
        }
    }
    assert_eq!((answers.len(), overflows), (1, 2), "one is picked; the two picked after it, while it is open, overflow");
    assert_eq!(gate.in_flight(), 1, "the answered call holds its place until its body ends");
    answers.pop().unwrap().into_body().collect().await.unwrap();
    assert_eq!(gate.in_flight(), 0);
    assert_eq!(balancer.stats().counts().overflows, 2);
}

/// A pending place is given back when the call is picked, not when it ends: a call that waited and is now in
/// flight for 10 s leaves the one place to the next call that has to wait.
#[tokio::test(start_paused = true)]
async fn a_call_that_waited_gives_its_pending_place_back_once_it_is_sent() {
    let net = FakeNet::default();
    net.set(addr(1), Peer::Up { delay: Duration::from_secs(10) });
    net.set(addr(2), Peer::SlowConnect { connect: Duration::from_millis(500) });
    let (tx, source) = discover::channel();
    tx.send(Change::reset([Endpoint::new(addr(1))]));
    let config = BalancerConfig { max_pending_requests: Some(1), ..BalancerConfig::default() };
    let balancer = Balancer::with_connector("fake", source, config, net.clone());
    let slow = {
        let balancer = balancer.clone();
        tokio::spawn(async move {
            let response = balancer.oneshot(http::Request::new(Empty::new())).await.unwrap();
            let waited = response.extensions().get::<super::Delay>().is_some();
            (waited, response.extensions().get::<ServedBy>().unwrap().0)
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The slow call is in flight on addr(1); the set moves to addr(2), still connecting, so the next call waits.
    tx.send(Change::reset([Endpoint::new(addr(2))]));
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(call(&balancer).await.unwrap(), addr(2), "the place was free: the in-flight call does not hold it");
    let (waited, served) = slow.await.unwrap();
    assert!(waited, "the first call waited for its connection, so it held the place then");
    assert_eq!(served, addr(1));
}

#[tokio::test(start_paused = true)]
async fn a_refused_endpoint_backs_off_and_takes_traffic_once_it_comes_up() {
    let net = FakeNet::default();
    net.set(addr(1), Peer::Up { delay: Duration::ZERO });
    let (balancer, _tx) = balancer(&net, &[1, 2]);
    until_state(&balancer, addr(2), ConnState::TransientFailure).await;
    for _ in 0..10 {
        assert_eq!(call(&balancer).await.unwrap(), addr(1), "a failed endpoint gets no traffic");
    }
    // Ten virtual seconds of retries: backoff 250 ms × 1.6 per failure (±20%) is 6 or 7 attempts, not a spin.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let attempts = net.attempts(addr(2));
    assert!((5..=9).contains(&attempts), "{attempts} attempts in 10 s");
    net.set(addr(2), Peer::Up { delay: Duration::ZERO });
    until_state(&balancer, addr(2), ConnState::Ready).await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        seen.insert(call(&balancer).await.unwrap());
    }
    assert_eq!(seen.len(), 2, "both endpoints serve once the second is up");
}

#[tokio::test(start_paused = true)]
async fn with_nothing_ready_a_call_waits_the_ready_timeout_and_fails_fast_once_all_failed() {
    let net = FakeNet::default();
    let (tx, source) = discover::channel();
    let config = BalancerConfig::default();
    let balancer: Balancer<Empty<Bytes>, FakeNet> = Balancer::with_connector("fake", source, config.clone(), net.clone());
    // No endpoints at all: the call waits the whole ready timeout, in virtual time.
    let started = tokio::time::Instant::now();
    let waited = call(&balancer).await.unwrap_err();
    assert!(matches!(waited, Error::NoReadyEndpoint { known: 0, .. }), "{waited}");
    assert_eq!(started.elapsed(), config.ready_timeout);
    // Every known endpoint failed to connect: fail at once, naming the last error.
    tx.send(Change::reset([Endpoint::new(addr(1))]));
    until_state(&balancer, addr(1), ConnState::TransientFailure).await;
    let started = tokio::time::Instant::now();
    let failed = call(&balancer).await.unwrap_err();
    assert!(
        matches!(&failed, Error::AllEndpointsFailed { count: 1, last_error, .. } if last_error.to_string().contains("refused")),
        "{failed}"
    );
    assert_eq!(started.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_removed_endpoint_finishes_its_calls_and_takes_no_new_ones() {
    let net = FakeNet::default();
    net.set(addr(1), Peer::Up { delay: Duration::from_secs(3) });
    net.set(addr(2), Peer::Up { delay: Duration::ZERO });
    let (balancer, tx) = balancer(&net, &[1]);
    until_state(&balancer, addr(1), ConnState::Ready).await;
    let slow = tokio::spawn({
        let balancer = balancer.clone();
        async move { call(&balancer).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The set moves to endpoint 2 while the call on 1 is in flight.
    tx.send(Change::reset([Endpoint::new(addr(2))]));
    until_state(&balancer, addr(2), ConnState::Ready).await;
    assert!(!balancer.contains(addr(1)));
    for _ in 0..5 {
        assert_eq!(call(&balancer).await.unwrap(), addr(2));
    }
    assert_eq!(slow.await.unwrap().unwrap(), addr(1), "the drained call completes");
    assert_eq!(net.served.load(Ordering::SeqCst), 6);
}

#[tokio::test(start_paused = true)]
async fn the_connector_gets_each_endpoint_with_its_locality_and_the_clusters_tls_policy() {
    let net = FakeNet::default();
    net.set(addr(1), Peer::Up { delay: Duration::ZERO });
    let tls = mesh_core::policy::TlsPolicy {
        server_name: Some("greeter.mesh".to_owned()),
        allowed_identities: vec!["spiffe://mesh.local/ns/default/sa/greeter".to_owned()],
        ..Default::default()
    };
    let (tx, source) = discover::channel();
    let locality = Arc::new(mesh_core::Locality { region: "r".to_owned(), zone: "z1".to_owned(), sub_zone: String::new() });
    let mut endpoint = Endpoint::new(addr(1));
    endpoint.locality = Arc::clone(&locality);
    tx.send(Change::reset([endpoint]));
    let config = BalancerConfig { tls: Some(tls.clone()), ..BalancerConfig::default() };
    let balancer: Balancer<Empty<Bytes>, FakeNet> = Balancer::with_connector("fake", source, config, net.clone());
    assert_eq!(call(&balancer).await.unwrap(), addr(1));
    let targets = net.targets.lock().unwrap().clone();
    assert_eq!(targets.len(), 1, "{targets:?}");
    assert_eq!(targets[0].addr(), addr(1));
    assert_eq!(targets[0].endpoint.locality, locality);
    assert_eq!(targets[0].tls.as_deref(), Some(&tls));
}

#[tokio::test]
async fn plain_tcp_refuses_a_cluster_that_asks_for_tls() {
    let target = EndpointTarget {
        endpoint: Arc::new(Endpoint::new("127.0.0.1:1".parse().unwrap())),
        tls: Some(Arc::new(mesh_core::policy::TlsPolicy::default())),
    };
    let error = crate::connect::TcpConnector::new().connect(&target).await.expect_err("refused");
    assert_eq!(error.kind(), std::io::ErrorKind::Unsupported);
    assert!(error.to_string().contains("requires TLS"), "{error}");
}

#[tokio::test(start_paused = true)]
async fn endpoints_outside_every_weighted_locality_still_take_calls() {
    let net = FakeNet::default();
    net.set(addr(1), Peer::Up { delay: Duration::ZERO });
    net.set(addr(2), Peer::Up { delay: Duration::ZERO });
    let (tx, source) = discover::channel();
    let zone = |z: &str| mesh_core::Locality { region: "r".to_owned(), zone: z.to_owned(), sub_zone: String::new() };
    // The assignment weights zones a and b; its endpoints sit in zones c and d, so no locality has a weight.
    let endpoints = [(1, "c"), (2, "d")].map(|(port, z)| {
        let mut endpoint = Endpoint::new(addr(port));
        endpoint.locality = Arc::new(zone(z));
        Arc::new(endpoint)
    });
    let set = mesh_core::EndpointSet {
        endpoints: endpoints.to_vec(),
        locality_weights: [(zone("a"), 1), (zone("b"), 1)].into_iter().collect(),
        drop_overloads: Vec::new(),
    };
    tx.send(Change::Reset(set));
    let config = BalancerConfig { lb: "round_robin".parse().unwrap(), ..BalancerConfig::default() };
    let balancer: Balancer<Empty<Bytes>, FakeNet> = Balancer::with_connector("fake", source, config, net.clone());
    until_state(&balancer, addr(1), ConnState::Ready).await;
    until_state(&balancer, addr(2), ConnState::Ready).await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        seen.insert(call(&balancer).await.unwrap());
    }
    assert_eq!(seen.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn each_response_carries_its_connections_peer_identity_and_counts_as_its_endpoints_outcome() {
    use crate::classify::Outcome;
    use crate::connect::PeerIdentity;
    let net = FakeNet::default();
    net.set(addr(1), Peer::Up { delay: Duration::ZERO });
    net.set(addr(2), Peer::Failing);
    let spiffe = PeerIdentity("spiffe://mesh.local/ns/default/sa/greeter".into());
    net.identities.lock().unwrap().insert(addr(1), spiffe.clone());
    let (balancer, _tx) = balancer(&net, &[1, 2]);
    until_state(&balancer, addr(2), ConnState::Ready).await;
    until_state(&balancer, addr(1), ConnState::Ready).await;
    for _ in 0..10 {
        let response = balancer.clone().oneshot(http::Request::new(Empty::new())).await.unwrap();
        let served_by = response.extensions().get::<ServedBy>().unwrap().0;
        let peer = response.extensions().get::<PeerIdentity>().cloned();
        assert_eq!(peer, (served_by == addr(1)).then(|| spiffe.clone()), "the identity is the serving connection's own");
        let mut body = response.into_body();
        while body.frame().await.is_some() {}
        let expected = if served_by == addr(1) { Outcome::Http(200) } else { Outcome::Http(503) };
        assert_eq!(body.outcome(), Some(expected));
    }
    let counts: Vec<_> = balancer.endpoints().iter().map(|e| (e.endpoint.addr, e.successes, e.failures)).collect();
    assert_eq!(counts, [(addr(1), 5, 0), (addr(2), 0, 5)], "a 503 is its endpoint's failure, a 200 its success");
}

#[tokio::test(start_paused = true)]
async fn calls_picked_onto_a_connection_that_died_are_re_picked_and_none_fails() {
    let net = FakeNet::default();
    net.set(addr(1), Peer::Up { delay: Duration::ZERO });
    net.set(addr(2), Peer::Up { delay: Duration::ZERO });
    let (balancer, _tx) = balancer(&net, &[1, 2]);
    until_state(&balancer, addr(1), ConnState::Ready).await;
    until_state(&balancer, addr(2), ConnState::Ready).await;
    // Endpoint 1's server vanishes and will not come back; the balancer has not noticed yet.
    net.set(addr(1), Peer::Down);
    net.cut(addr(1));
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let balancer = balancer.clone();
            tokio::spawn(async move { call(&balancer).await })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap(), addr(2), "a call that found its connection gone went to the live endpoint");
    }
    until_state(&balancer, addr(1), ConnState::TransientFailure).await;
}

fn outlier_balancer(net: &FakeNet, ports: &[u16], outlier: mesh_core::policy::OutlierDetection) -> Balancer<Empty<Bytes>, FakeNet> {
    let (tx, source) = discover::channel();
    tx.send(Change::reset(ports.iter().map(|&p| Endpoint::new(addr(p)))));
    std::mem::forget(tx);
    let config = BalancerConfig { lb: "round_robin".parse().unwrap(), outlier_detection: Some(outlier), ..BalancerConfig::default() };
    Balancer::with_connector("fake", source, config, net.clone())
}

fn consecutive(threshold: u32, base: Duration) -> mesh_core::policy::OutlierDetection {
    mesh_core::policy::OutlierDetection {
        interval: Duration::from_secs(1),
        base_ejection_time: base,
        max_ejection_percent: 50,
        consecutive_5xx: Some(mesh_core::policy::Consecutive { threshold, enforcing: 100 }),
        success_rate: None,
        ..Default::default()
    }
}

/// Sends `n` calls; the endpoint of each answer, 503s included.
async fn served(balancer: &Balancer<Empty<Bytes>, FakeNet>, n: usize) -> Vec<SocketAddr> {
    let mut served = Vec::new();
    for _ in 0..n {
        let response = balancer.clone().oneshot(http::Request::new(Empty::new())).await.unwrap();
        served.push(response.extensions().get::<ServedBy>().unwrap().0);
        response.into_body().collect().await.unwrap();
    }
    served
}

fn ejected(balancer: &Balancer<Empty<Bytes>, FakeNet>) -> Vec<SocketAddr> {
    balancer.endpoints().into_iter().filter(|e| e.ejected).map(|e| e.endpoint.addr).collect()
}

#[tokio::test(start_paused = true)]
async fn consecutive_failures_eject_an_endpoint_at_once_until_its_ejection_time_is_up() {
    let net = FakeNet::default();
    net.set(addr(1), Peer::Failing);
    net.set(addr(2), Peer::Up { delay: Duration::ZERO });
    net.set(addr(3), Peer::Up { delay: Duration::ZERO });
    let balancer = outlier_balancer(&net, &[1, 2, 3], consecutive(3, Duration::from_secs(5)));
    for port in [1, 2, 3] {
        until_state(&balancer, addr(port), ConnState::Ready).await;
    }
    let run = served(&balancer, 30).await;
    let failed = run.iter().filter(|&&a| a == addr(1)).count();
    assert_eq!(failed, 3, "ejected at the third failure in a row: {run:?}");
    assert_eq!(ejected(&balancer), [addr(1)]);
    let counts = balancer.stats().counts();
    assert_eq!(counts.ejections, 1);
    assert_eq!((counts.outliers.ejected(Reason::Consecutive5xx), counts.outliers.detected(Reason::Consecutive5xx)), (1, 1));
    assert_eq!(counts.outliers.ejected(Reason::SuccessRate) + counts.outliers.overflows, 0);

    // Ejected at once (the calls take no virtual time) for 5 s; it returns at the interval that ends then.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    assert_eq!(ejected(&balancer), [addr(1)], "still out before its time is up");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(ejected(&balancer).is_empty(), "back after its ejection time");
    let run = served(&balancer, 30).await;
    assert_eq!(run.iter().filter(|&&a| a == addr(1)).count(), 3, "it gets traffic again, and is ejected again: {run:?}");
    // The second ejection lasts twice as long: 10 s.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(ejected(&balancer), [addr(1)], "the second ejection is longer");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(ejected(&balancer).is_empty());
    assert_eq!(balancer.stats().counts().ejections, 2);
}

/// A call under two caps (the adaptive limit over the breaker) holds both places until its body ends.
#[tokio::test(start_paused = true)]
async fn a_body_holds_every_place_it_is_given_until_it_ends() {
    use crate::breaker::Gate;
    let net = FakeNet::default();
    net.set(addr(1), Peer::Up { delay: Duration::ZERO });
    let (balancer, _tx) = balancer(&net, &[1]);
    until_state(&balancer, addr(1), ConnState::Ready).await;
    let stats = Arc::default();
    let (outer, inner) = (Gate::max_requests("a", 10, Arc::clone(&stats)), Gate::max_requests("a", 10, stats));
    let response = balancer.clone().oneshot(http::Request::new(Empty::new())).await.unwrap();
    let body = response.into_body().holding(inner.admit().unwrap()).holding(outer.admit().unwrap());
    assert_eq!((outer.in_flight(), inner.in_flight()), (1, 1), "both places are held while the body is open");
    body.collect().await.unwrap();
    assert_eq!((outer.in_flight(), inner.in_flight()), (0, 0), "both are given back when it ends");
}

/// Ring hash's keys leave an endpoint at the failure that ejects it, as round robin's picks do: the pick passes
/// over an endpoint ejected on the call path even while the snapshot still has it.
#[tokio::test(start_paused = true)]
async fn ring_hash_keys_leave_an_endpoint_at_the_failure_that_ejects_it() {
    let net = FakeNet::default();
    net.set(addr(1), Peer::Failing);
    net.set(addr(2), Peer::Up { delay: Duration::ZERO });
    net.set(addr(3), Peer::Up { delay: Duration::ZERO });
    let (tx, source) = discover::channel();
    tx.send(Change::reset([1, 2, 3].map(|p| Endpoint::new(addr(p)))));
    let config = BalancerConfig {
        lb: "ring_hash".parse().unwrap(),
        outlier_detection: Some(consecutive(3, Duration::from_secs(5))),
        ..BalancerConfig::default()
    };
    let balancer: Balancer<Empty<Bytes>, FakeNet> = Balancer::with_connector("fake", source, config, net.clone());
    for port in [1, 2, 3] {
        until_state(&balancer, addr(port), ConnState::Ready).await;
    }
    let call = |hash: u64| {
        let balancer = balancer.clone();
        async move {
            let mut request = http::Request::new(Empty::new());
            request.extensions_mut().insert(RequestHash(hash));
            let response = balancer.oneshot(request).await.unwrap();
            let served = response.extensions().get::<ServedBy>().unwrap().0;
            response.into_body().collect().await.unwrap();
            served
        }
    };
    // A key of endpoint 1's: the first key whose call it fails (calls the others answer leave its count alone).
    let mut hash = 0;
    while call(hash).await != addr(1) {
        hash += 1;
    }
    let mut run = vec![addr(1)];
    for _ in 0..20 {
        run.push(call(hash).await);
    }
    assert_eq!(run.iter().filter(|&&a| a == addr(1)).count(), 3, "the key moves at the third failure in a row: {run:?}");
    assert!(run[3..].windows(2).all(|w| w[0] == w[1]), "and stays on one neighbour: {run:?}");
    assert_eq!(ejected(&balancer), [addr(1)]);
    drop(tx);
}

/// A trip that is not always enforced is left to the detector's draw: with enforcing 0 the failing endpoint is
/// never taken out of the picks, not even between the trip and the detector's decision.
#[tokio::test(start_paused = true)]
async fn a_trip_never_enforced_keeps_the_endpoint_in_the_picks() {
    let net = FakeNet::default();
    net.set(addr(1), Peer::Failing);
    net.set(addr(2), Peer::Up { delay: Duration::ZERO });
    let mut config = consecutive(3, Duration::from_secs(5));
    config.consecutive_5xx = Some(mesh_core::policy::Consecutive { threshold: 3, enforcing: 0 });
    let balancer = outlier_balancer(&net, &[1, 2], config);
    for port in [1, 2] {
        until_state(&balancer, addr(port), ConnState::Ready).await;
    }
    let run = served(&balancer, 30).await;
    let failed = run.iter().filter(|&&a| a == addr(1)).count();
    assert!(failed >= 10, "round robin keeps sending it its share: {failed} of 30");
    assert!(ejected(&balancer).is_empty());
    let outliers = balancer.stats().counts().outliers;
    assert!(outliers.detected(Reason::Consecutive5xx) >= 3, "each bout of three is detected: {outliers:?}");
    assert_eq!(outliers.ejected(Reason::Consecutive5xx), 0);
}

#[tokio::test(start_paused = true)]
async fn max_ejection_percent_keeps_endpoints_serving_and_a_level_all_ejected_still_serves() {
    let net = FakeNet::default();
    for port in [1, 2, 3, 4] {
        net.set(addr(port), Peer::Failing);
    }
    let balancer = outlier_balancer(&net, &[1, 2, 3, 4], consecutive(2, Duration::from_secs(30)));
    for port in [1, 2, 3, 4] {
        until_state(&balancer, addr(port), ConnState::Ready).await;
    }
    served(&balancer, 40).await;
    assert_eq!(ejected(&balancer).len(), 2, "50% of four: {:?}", balancer.endpoints());
    let outliers = balancer.stats().counts().outliers;
    assert_eq!(outliers.ejected(Reason::Consecutive5xx), 2, "{outliers:?}");
    assert!(outliers.overflows >= 2, "the other two were detected and spared: {outliers:?}");
    assert_eq!(outliers.detected(Reason::Consecutive5xx), 2 + outliers.overflows, "{outliers:?}");

    let everything = mesh_core::policy::OutlierDetection { max_ejection_percent: 100, ..consecutive(2, Duration::from_secs(30)) };
    let balancer = outlier_balancer(&net, &[1, 2], everything);
    for port in [1, 2] {
        until_state(&balancer, addr(port), ConnState::Ready).await;
    }
    served(&balancer, 10).await;
    assert_eq!(ejected(&balancer).len(), 2);
    let run = served(&balancer, 4).await;
    assert_eq!(run.len(), 4, "with every endpoint ejected, calls still go to them rather than wait for none");
}

#[tokio::test(start_paused = true)]
async fn success_rate_ejects_the_outlier_at_the_interval() {
    let net = FakeNet::default();
    net.set(addr(1), Peer::Failing);
    for port in 2..=5 {
        net.set(addr(port), Peer::Up { delay: Duration::ZERO });
    }
    let rate = mesh_core::policy::SuccessRate { request_volume: 10, ..Default::default() };
    let config = mesh_core::policy::OutlierDetection {
        consecutive_5xx: None,
        success_rate: Some(rate),
        max_ejection_percent: 20,
        ..consecutive(5, Duration::from_secs(30))
    };
    let balancer = outlier_balancer(&net, &[1, 2, 3, 4, 5], config);
    for port in 1..=5 {
        until_state(&balancer, addr(port), ConnState::Ready).await;
    }
    // 100 calls, 20 on each: within the first interval, nothing is decided yet.
    served(&balancer, 100).await;
    assert!(ejected(&balancer).is_empty(), "no consecutive detection here");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Rates 0, 100, 100, 100, 100: mean 80, stdev 40, threshold 80 − 1.9 × 40 = 4.
    assert_eq!(ejected(&balancer), [addr(1)]);
    let outliers = balancer.stats().counts().outliers;
    assert_eq!((outliers.ejected(Reason::SuccessRate), outliers.detected(Reason::SuccessRate)), (1, 1), "{outliers:?}");
    assert_eq!(outliers.ejected(Reason::Consecutive5xx), 0);
    let run = served(&balancer, 20).await;
    assert!(!run.contains(&addr(1)), "{run:?}");
}
