//! The router on tokio's paused clock over the fake connector: tables published and swapped while calls are
//! in flight, route policies, routing errors, clusters rebuilt exactly when their target changes.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use mesh_core::policy::{RetryBudget, RoutePolicies};
use mesh_core::{Endpoint, PathMatch, Route, RouteAction, RouteMatch, WeightedCluster};
use tower::ServiceExt;

use super::{Publisher, Router, single_route};
use crate::Error;
use crate::balance::{BalancerConfig, ServedBy};
use crate::cluster::{ClusterTarget, NewCluster, SameConnector, Source, StandardDiscovery};
use crate::testing::{FakeNet, Peer, addr};

type Body = Empty<Bytes>;

fn publisher(net: &FakeNet) -> (Publisher<Body, SameConnector<FakeNet>>, Router<Body>) {
    let new_cluster = NewCluster::new(Arc::new(StandardDiscovery), SameConnector(net.clone()));
    Publisher::new("test:///routed", "the test", Duration::from_secs(2), new_cluster, None)
}

fn cluster(name: &str, ports: &[u16]) -> ClusterTarget {
    ClusterTarget {
        name: name.to_owned(),
        balancer: BalancerConfig::default(),
        source: Source::Static(ports.iter().map(|&p| Endpoint::new(addr(p))).collect()),
        breakers: Default::default(),
        adaptive: None,
    }
}

/// Matches requests for exactly `path`.
fn exact(path: &str) -> RouteMatch {
    RouteMatch { path: PathMatch::Exact(path.into()), ..RouteMatch::any() }
}

/// Sends every request to `cluster`.
fn to(cluster: &str) -> RouteAction {
    RouteAction::Clusters(vec![WeightedCluster { cluster: cluster.into(), weight: 1 }])
}

async fn call(router: &Router<Body>, path: &str) -> Result<std::net::SocketAddr, Error> {
    let request = http::Request::post(format!("http://routed{path}")).body(Empty::new()).unwrap();
    let response = router.clone().oneshot(request).await?;
    let served_by = response.extensions().get::<ServedBy>().unwrap().0;
    let body = response.into_body().collect().await?.to_bytes();
    assert_eq!(body, served_by.to_string(), "the reply comes from the endpoint named in ServedBy");
    Ok(served_by)
}

#[tokio::test(start_paused = true)]
async fn a_table_swapped_while_calls_are_in_flight_takes_the_next_calls_and_the_old_ones_finish() {
    let net = FakeNet::default();
    net.set(addr(1), Peer::Up { delay: Duration::from_secs(1) });
    net.set(addr(2), Peer::Up { delay: Duration::ZERO });
    let (mut publisher, router) = publisher(&net);
    publisher.cluster(&cluster("a", &[1]));
    publisher.publish(&[single_route("a", RoutePolicies::default())]);
    let in_flight: Vec<_> = (0..5)
        .map(|_| {
            let router = router.clone();
            tokio::spawn(async move { call(&router, "/pkg.Svc/Slow").await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    publisher.cluster(&cluster("b", &[2]));
    publisher.publish(&[single_route("b", RoutePolicies::default())]);
    assert!(!publisher.has_cluster("a"), "a cluster no route names is dropped from the publisher");
    assert_eq!(call(&router, "/pkg.Svc/Fast").await.unwrap(), addr(2), "the new table takes the next call");
    for call in in_flight {
        assert_eq!(call.await.unwrap().unwrap(), addr(1), "a call in flight finishes on the cluster it started on");
    }
    assert_eq!(router.clusters().iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>(), ["b"]);
}

#[tokio::test(start_paused = true)]
async fn a_call_waiting_for_an_endpoint_of_a_replaced_cluster_still_gets_one() {
    let net = FakeNet::default();
    net.set(addr(1), Peer::SlowConnect { connect: Duration::from_millis(500) });
    net.set(addr(2), Peer::Up { delay: Duration::ZERO });
    let (mut publisher, router) = publisher(&net);
    publisher.cluster(&cluster("a", &[1]));
    publisher.publish(&[single_route("a", RoutePolicies::default())]);
    let waiting = tokio::spawn({
        let router = router.clone();
        async move { call(&router, "/x").await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    publisher.cluster(&cluster("b", &[2]));
    publisher.publish(&[single_route("b", RoutePolicies::default())]);
    assert!(!publisher.has_cluster("a"), "nothing but the waiting call holds cluster a now");
    let started = tokio::time::Instant::now();
    assert_eq!(waiting.await.unwrap().unwrap(), addr(1), "the waiting call keeps its cluster running until it is served");
    assert_eq!(started.elapsed(), Duration::from_millis(400), "it was served once the endpoint connected");
}

#[tokio::test(start_paused = true)]
async fn routes_match_in_order_and_a_route_timeout_ends_the_call() {
    let net = FakeNet::default();
    net.set(addr(1), Peer::Up { delay: Duration::from_secs(5) });
    net.set(addr(2), Peer::Up { delay: Duration::ZERO });
    let (mut publisher, router) = publisher(&net);
    publisher.cluster(&cluster("slow", &[1]));
    publisher.cluster(&cluster("fast", &[2]));
    let timeout = RoutePolicies { timeout: Some(Duration::from_millis(300)), ..RoutePolicies::default() };
    publisher.publish(&[
        Route { name: String::new(), matcher: exact("/slow"), action: to("slow"), policies: timeout },
        Route { name: String::new(), matcher: exact("/gone"), action: to("deleted"), policies: RoutePolicies::default() },
        Route { name: String::new(), matcher: exact("/off"), action: RouteAction::NonForwarding, policies: RoutePolicies::default() },
        Route { name: String::new(), matcher: exact("/fast"), action: to("fast"), policies: RoutePolicies::default() },
    ]);
    let started = tokio::time::Instant::now();
    let timed_out = call(&router, "/slow").await.unwrap_err();
    assert!(matches!(timed_out, Error::RouteTimeout { limit, .. } if limit == Duration::from_millis(300)), "{timed_out}");
    assert_eq!(started.elapsed(), Duration::from_millis(300), "the route timeout, not the server, ended the call");
    assert_eq!(timed_out.grpc_code(), mesh_core::GrpcCode::DeadlineExceeded);
    assert_eq!(call(&router, "/fast").await.unwrap(), addr(2));
    let missing = call(&router, "/gone").await.unwrap_err();
    assert!(matches!(&missing, Error::ClusterNotFound { cluster, .. } if cluster == "deleted"), "{missing}");
    assert!(matches!(call(&router, "/off").await.unwrap_err(), Error::NonForwarding { .. }));
    let unrouted = call(&router, "/other").await.unwrap_err();
    assert!(matches!(&unrouted, Error::NoRoute { path, .. } if path == "/other"), "{unrouted}");
    assert!(unrouted.to_string().contains("test:///routed"), "the error names the target: {unrouted}");
}

#[tokio::test(start_paused = true)]
async fn a_call_waits_for_the_first_table_and_fails_unavailable_without_one() {
    let net = FakeNet::default();
    net.set(addr(1), Peer::Up { delay: Duration::ZERO });
    let (mut publisher, router) = publisher(&net);
    let started = tokio::time::Instant::now();
    let error = call(&router, "/x").await.unwrap_err();
    assert!(matches!(error, Error::NoConfig { waited, .. } if waited == Duration::from_secs(2)), "{error}");
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    let waiting = tokio::spawn({
        let router = router.clone();
        async move { call(&router, "/x").await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    publisher.cluster(&cluster("a", &[1]));
    publisher.publish(&[single_route("a", RoutePolicies::default())]);
    assert_eq!(waiting.await.unwrap().unwrap(), addr(1), "a waiting call goes once the table arrives");
}

#[tokio::test(start_paused = true)]
async fn a_cluster_is_rebuilt_exactly_when_its_target_changes_and_the_replacement_takes_over_once_ready() {
    let net = FakeNet::default();
    net.set(addr(1), Peer::Up { delay: Duration::ZERO });
    net.set(addr(2), Peer::Up { delay: Duration::ZERO });
    let (mut publisher, router) = publisher(&net);
    let routes = [single_route("a", RoutePolicies::default())];
    publisher.cluster(&cluster("a", &[1]));
    publisher.publish(&routes);
    assert_eq!(call(&router, "/x").await.unwrap(), addr(1));
    // The same target again builds nothing: no new connection.
    publisher.cluster(&cluster("a", &[1]));
    publisher.publish(&routes);
    assert_eq!(call(&router, "/x").await.unwrap(), addr(1));
    assert_eq!(net.attempts(addr(1)), 1, "an unchanged target keeps its cluster and connections");
    // A changed target builds a replacement; the current cluster serves until the replacement can.
    let moved = cluster("a", &[2]);
    publisher.cluster(&moved);
    publisher.publish(&routes);
    assert_eq!(call(&router, "/x").await.unwrap(), addr(1), "the old cluster serves while its replacement warms up");
    tokio::time::sleep(Duration::from_millis(10)).await;
    publisher.cluster(&moved);
    publisher.publish(&routes);
    assert_eq!(call(&router, "/x").await.unwrap(), addr(2), "the replacement took over once it could serve");
    let mut settings = moved.clone();
    settings.balancer.lb = "p2c_ewma".parse().unwrap();
    publisher.cluster(&settings);
    tokio::time::sleep(Duration::from_millis(10)).await;
    publisher.cluster(&settings);
    publisher.publish(&routes);
    assert_eq!(net.attempts(addr(2)), 2, "a changed setting (the LB policy) rebuilds the cluster: {:?}", router.endpoints());
}

#[tokio::test(start_paused = true)]
async fn a_weighted_split_sends_each_cluster_its_share() {
    let net = FakeNet::default();
    net.set(addr(1), Peer::Up { delay: Duration::ZERO });
    net.set(addr(2), Peer::Up { delay: Duration::ZERO });
    let (mut publisher, router) = publisher(&net);
    publisher.cluster(&cluster("one", &[1]));
    publisher.cluster(&cluster("three", &[2]));
    let split = vec![WeightedCluster { cluster: "one".into(), weight: 1 }, WeightedCluster { cluster: "three".into(), weight: 3 }];
    publisher.publish(&[Route {
        name: String::new(),
        matcher: RouteMatch::any(),
        action: RouteAction::Clusters(split),
        policies: RoutePolicies::default(),
    }]);
    let mut on_one = 0;
    for _ in 0..2000 {
        if call(&router, "/x").await.unwrap() == addr(1) {
            on_one += 1;
        }
    }
    assert!((400..600).contains(&on_one), "weight 1 of 4 takes a quarter of 2,000 calls: {on_one}");
}

fn with_retry(attempts: u32) -> RoutePolicies {
    let retry = mesh_core::policy::RetryPolicy {
        max_attempts: attempts,
        retry_on: vec![mesh_core::GrpcCode::Unavailable],
        ..mesh_core::policy::RetryPolicy::default()
    };
    RoutePolicies { retry: Some(retry), ..RoutePolicies::default() }
}

/// Cluster `a`, round robin over a failing endpoint (503s, port 1) and a healthy one (port 2).
fn failing_and_up() -> (FakeNet, Publisher<Body, SameConnector<FakeNet>>, Router<Body>) {
    let net = FakeNet::default();
    net.set(addr(1), Peer::Failing);
    net.set(addr(2), Peer::Up { delay: Duration::ZERO });
    let (mut publisher, router) = publisher(&net);
    let mut target = cluster("a", &[1, 2]);
    target.balancer.lb = "round_robin".parse().unwrap();
    publisher.cluster(&target);
    (net, publisher, router)
}

#[tokio::test(start_paused = true)]
async fn a_route_retry_policy_sends_a_failed_call_again_on_another_endpoint() {
    let (_net, mut publisher, router) = failing_and_up();
    publisher.publish(&[single_route("a", with_retry(2))]);
    tokio::time::sleep(Duration::from_millis(10)).await;
    for _ in 0..20 {
        assert_eq!(call(&router, "/x").await.unwrap(), addr(2), "a 503 (UNAVAILABLE) is retried on the other endpoint");
    }
    let failures: u32 = router.endpoints().iter().map(|e| e.failures).sum();
    assert!(failures > 0, "the failing endpoint was tried, and its failures counted: {:?}", router.endpoints());

    // Without a retry policy the same calls fail half the time.
    publisher.publish(&[single_route("a", RoutePolicies::default())]);
    let mut failed = 0;
    for _ in 0..20 {
        let response = router.clone().oneshot(http::Request::new(Empty::new())).await.unwrap();
        if response.status() == http::StatusCode::SERVICE_UNAVAILABLE {
            failed += 1;
        }
    }
    assert_eq!(failed, 10, "round robin sends every other call to the failing endpoint");
}

#[tokio::test(start_paused = true)]
async fn retries_stay_within_the_clusters_budget_when_every_endpoint_fails() {
    let net = FakeNet::default();
    net.set(addr(1), Peer::Failing);
    net.set(addr(2), Peer::Failing);
    let (mut publisher, router) = publisher(&net);
    let mut target = cluster("a", &[1, 2]);
    // Half the calls, and no floor: the budget alone bounds the retries.
    target.breakers.retry_budget = Some(RetryBudget { ratio: 0.5, min_per_second: 0, ..RetryBudget::default() });
    publisher.cluster(&target);
    publisher.publish(&[single_route("a", with_retry(5))]);
    tokio::time::sleep(Duration::from_millis(10)).await;
    let calls = 200;
    for i in 0..calls {
        let response = router.clone().oneshot(http::Request::new(Empty::new())).await.unwrap();
        assert_eq!(response.status(), http::StatusCode::SERVICE_UNAVAILABLE, "the last attempt's answer reaches the caller");
        if i == calls / 2 {
            // A new table (an xDS update) keeps the cluster, and with it the budget and its counts.
            publisher.publish(&[single_route("a", with_retry(5))]);
        }
    }
    let attempts: u64 = router.endpoints().iter().map(|e| u64::from(e.failures)).sum();
    let retries = attempts - calls;
    assert!((calls * 2 / 5..=calls / 2).contains(&retries), "retries are half the calls: {retries} for {calls} calls");
    let counts = router.counts();
    assert_eq!(counts.len(), 1, "{counts:?}");
    assert_eq!(counts[0].1.retries, retries, "each retry is counted on the cluster: {counts:?}");
    assert!(counts[0].1.retry_budget_exhausted >= calls / 2, "the budget turned retries away: {counts:?}");
}

#[tokio::test(start_paused = true)]
async fn the_default_budget_allows_a_fifth_of_calls_plus_a_floor() {
    let net = FakeNet::default();
    net.set(addr(1), Peer::Failing);
    let (mut publisher, router) = publisher(&net);
    publisher.cluster(&cluster("a", &[1]));
    publisher.publish(&[single_route("a", with_retry(5))]);
    tokio::time::sleep(Duration::from_millis(10)).await;
    let calls = 200;
    for _ in 0..calls {
        router.clone().oneshot(http::Request::new(Empty::new())).await.unwrap();
    }
    let retries = router.counts()[0].1.retries;
    // 20% of calls, plus a floor of 3 retries a second over the 10 s window.
    assert!(retries > calls / 5, "the floor adds to the share: {retries}");
    assert!(retries <= calls / 5 + 3 * 10, "retries stay within the budget: {retries} retries for {calls} calls");
}

#[tokio::test(start_paused = true)]
async fn a_retry_waits_a_full_jitter_backoff_capped_by_the_policy() {
    let net = FakeNet::default();
    net.set(addr(1), Peer::Failing);
    let (mut publisher, router) = publisher(&net);
    let mut target = cluster("a", &[1]);
    // Room for every retry: three per call.
    target.breakers.retry_budget = Some(RetryBudget { min_per_second: 100, ..RetryBudget::default() });
    publisher.cluster(&target);
    publisher.publish(&[single_route("a", with_retry(4))]);
    tokio::time::sleep(Duration::from_millis(10)).await;
    for _ in 0..20 {
        let started = tokio::time::Instant::now();
        let response = router.clone().oneshot(http::Request::new(Empty::new())).await.unwrap();
        assert_eq!(response.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        // Three backoffs: under 25, 50 and 100 ms (base 25 ms doubling, cap 250 ms).
        assert!(started.elapsed() < Duration::from_millis(175), "{:?}", started.elapsed());
    }
    let attempts: u32 = router.endpoints().iter().map(|e| e.failures).sum();
    assert_eq!(attempts, 80, "four attempts per call");
}

#[tokio::test(start_paused = true)]
async fn a_per_try_timeout_ends_a_slow_attempt_and_the_retry_goes_elsewhere() {
    let net = FakeNet::default();
    net.set(addr(1), Peer::Up { delay: Duration::from_secs(5) });
    net.set(addr(2), Peer::Up { delay: Duration::ZERO });
    let (mut publisher, router) = publisher(&net);
    let mut target = cluster("a", &[1, 2]);
    target.balancer.lb = "round_robin".parse().unwrap();
    publisher.cluster(&target);
    let mut policies = with_retry(2);
    if let Some(retry) = policies.retry.as_mut() {
        retry.per_try_timeout = Some(Duration::from_millis(200));
    }
    publisher.publish(&[single_route("a", policies)]);
    tokio::time::sleep(Duration::from_millis(10)).await;
    for _ in 0..6 {
        let started = tokio::time::Instant::now();
        assert_eq!(call(&router, "/x").await.unwrap(), addr(2), "the slow endpoint's attempt was cut and retried");
        assert!(started.elapsed() < Duration::from_millis(300), "at most one per-try timeout and a backoff: {:?}", started.elapsed());
    }
    // With one attempt only, the per-try timeout is the call's end.
    let mut single = with_retry(1);
    if let Some(retry) = single.retry.as_mut() {
        retry.per_try_timeout = Some(Duration::from_millis(200));
    }
    publisher.publish(&[single_route("a", single)]);
    let mut timed_out = 0;
    for _ in 0..4 {
        if let Err(Error::AttemptTimeout { limit }) = call(&router, "/x").await {
            assert_eq!(limit, Duration::from_millis(200));
            timed_out += 1;
        }
    }
    assert_eq!(timed_out, 2, "every other call hits the slow endpoint");
}

#[tokio::test(start_paused = true)]
async fn a_circuit_breaker_fails_calls_over_max_requests_at_once_and_frees_places_as_calls_end() {
    let net = FakeNet::default();
    net.set(addr(1), Peer::Up { delay: Duration::from_secs(1) });
    let (mut publisher, router) = publisher(&net);
    let mut target = cluster("a", &[1]);
    target.breakers.max_requests = 2;
    publisher.cluster(&target);
    // Retries on UNAVAILABLE would not hide an overflow: it is never retried.
    publisher.publish(&[single_route("a", with_retry(3))]);
    tokio::time::sleep(Duration::from_millis(10)).await;
    let held: Vec<_> = (0..2)
        .map(|_| {
            let router = router.clone();
            tokio::spawn(async move { call(&router, "/x").await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = tokio::time::Instant::now();
    let overflow = call(&router, "/x").await.unwrap_err();
    assert!(matches!(&overflow, Error::Overflow { cluster, limit: 2 } if cluster == "a"), "{overflow}");
    assert_eq!(started.elapsed(), Duration::ZERO, "the overflow fails at once");
    assert_eq!(overflow.grpc_code(), mesh_core::GrpcCode::Unavailable);
    for call in held {
        assert_eq!(call.await.unwrap().unwrap(), addr(1));
    }
    assert_eq!(call(&router, "/x").await.unwrap(), addr(1), "places free as calls end");
    assert_eq!(net.served.load(std::sync::atomic::Ordering::SeqCst), 3, "the overflow never reached the server");
}

#[tokio::test(start_paused = true)]
async fn the_callers_grpc_timeout_ends_the_call_and_each_retry_sends_the_time_left() {
    let net = FakeNet::default();
    net.set(addr(1), Peer::Failing);
    net.set(addr(2), Peer::Up { delay: Duration::from_secs(5) });
    let (mut publisher, router) = publisher(&net);
    publisher.cluster(&cluster("failing", &[1]));
    publisher.cluster(&cluster("slow", &[2]));
    publisher.publish(&[
        Route { name: String::new(), matcher: exact("/failing"), action: to("failing"), policies: with_retry(3) },
        Route { name: String::new(), matcher: exact("/slow"), action: to("slow"), policies: RoutePolicies::default() },
    ]);
    tokio::time::sleep(Duration::from_millis(10)).await;
    let with_timeout = |path: &str, timeout: &'static str| {
        http::Request::post(format!("http://routed{path}")).header("grpc-timeout", timeout).body(Empty::new()).unwrap()
    };

    let started = tokio::time::Instant::now();
    let error = router.clone().oneshot(with_timeout("/slow", "300m")).await.unwrap_err();
    assert!(matches!(error, Error::Deadline { limit, .. } if limit == Duration::from_millis(300)), "{error}");
    assert_eq!(started.elapsed(), Duration::from_millis(300), "the caller's deadline ended the call");
    assert_eq!(error.grpc_code(), mesh_core::GrpcCode::DeadlineExceeded);

    net.timeouts.lock().unwrap().clear();
    let response = router.clone().oneshot(with_timeout("/failing", "1S")).await.unwrap();
    assert_eq!(response.status(), http::StatusCode::SERVICE_UNAVAILABLE);
    let seen = net.timeouts.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "three attempts: {seen:?}");
    assert_eq!(seen[0], Some(Duration::from_secs(1)), "the first attempt carries the caller's header as sent");
    for pair in seen.windows(2) {
        let (before, after) = (pair[0].unwrap(), pair[1].unwrap());
        assert!(after < before && after > Duration::from_millis(500), "each retry sends the time left: {seen:?}");
    }
}

fn with_fault(fault: mesh_core::policy::FaultInjection) -> RoutePolicies {
    RoutePolicies { fault: Some(fault), ..RoutePolicies::default() }
}

#[tokio::test(start_paused = true)]
async fn a_route_fault_delays_then_aborts_its_share_of_calls_before_they_leave() {
    use mesh_core::policy::{FaultAbort, FaultDelay, FaultInjection};
    let net = FakeNet::default();
    net.set(addr(1), Peer::Up { delay: Duration::ZERO });
    let (mut publisher, router) = publisher(&net);
    publisher.cluster(&cluster("a", &[1]));
    let delay = FaultDelay { fixed: Some(Duration::from_secs(1)), per_million: 1_000_000 };
    let abort = FaultAbort { code: Some(mesh_core::GrpcCode::ResourceExhausted), per_million: 250_000 };
    publisher.publish(&[single_route("a", with_fault(FaultInjection { delay: Some(delay), abort: Some(abort), ..Default::default() }))]);
    tokio::time::sleep(Duration::from_millis(10)).await;
    let served_before = net.served.load(std::sync::atomic::Ordering::SeqCst);
    let (mut aborted, calls) = (0, 400);
    for _ in 0..calls {
        let started = tokio::time::Instant::now();
        match call(&router, "/x").await {
            Ok(_) => {}
            Err(error) => {
                assert_eq!(error.grpc_code(), mesh_core::GrpcCode::ResourceExhausted, "{error}");
                assert!(error.to_string().contains("fault injected"), "{error}");
                aborted += 1;
            }
        }
        assert_eq!(started.elapsed(), Duration::from_secs(1), "every call is delayed first");
    }
    assert!((70..130).contains(&aborted), "a quarter of 400 calls are aborted: {aborted}");
    let served = net.served.load(std::sync::atomic::Ordering::SeqCst) - served_before;
    assert_eq!(served, calls - aborted, "an aborted call never reaches the server");
    let counts = router.target_counts();
    assert_eq!((counts.fault_delays, counts.fault_aborts), (calls as u64, aborted as u64), "each fault is counted: {counts:?}");
}

#[tokio::test(start_paused = true)]
async fn header_controlled_faults_follow_the_request_headers_and_max_active_faults_bounds_them() {
    use mesh_core::policy::{FaultAbort, FaultDelay, FaultInjection};
    let net = FakeNet::default();
    net.set(addr(1), Peer::Up { delay: Duration::ZERO });
    let (mut publisher, router) = publisher(&net);
    publisher.cluster(&cluster("a", &[1]));
    let fault = FaultInjection {
        delay: Some(FaultDelay { fixed: None, per_million: 1_000_000 }),
        abort: Some(FaultAbort { code: None, per_million: 1_000_000 }),
        max_active_faults: Some(2),
        ..Default::default()
    };
    publisher.publish(&[single_route("a", with_fault(fault))]);
    tokio::time::sleep(Duration::from_millis(10)).await;
    let send = |headers: &[(&'static str, &str)]| {
        let mut request = http::Request::post("http://routed/x").body(Empty::new()).unwrap();
        for (name, value) in headers {
            request.headers_mut().insert(*name, value.parse().unwrap());
        }
        router.clone().oneshot(request)
    };
    assert!(send(&[]).await.is_ok(), "without the headers nothing is injected");
    let error = send(&[("x-envoy-fault-abort-grpc-request", "14")]).await.unwrap_err();
    assert_eq!(error.grpc_code(), mesh_core::GrpcCode::Unavailable);
    let error = send(&[("x-envoy-fault-abort-request", "429")]).await.unwrap_err();
    assert_eq!(error.grpc_code(), mesh_core::GrpcCode::Unavailable, "HTTP 429 reads as UNAVAILABLE (gRPC's table)");
    let none = send(&[("x-envoy-fault-abort-grpc-request", "14"), ("x-envoy-fault-abort-request-percentage", "0")]).await;
    assert!(none.is_ok(), "the percentage header lowers the share to nothing");
    // Three delayed calls at once, two faults allowed: the third goes undelayed.
    let started = tokio::time::Instant::now();
    let delayed = [("x-envoy-fault-delay-request", "500")];
    let (a, b, c) = tokio::join!(
        async { send(&delayed).await.map(|_| started.elapsed()) },
        async { send(&delayed).await.map(|_| started.elapsed()) },
        async {
            tokio::task::yield_now().await;
            send(&delayed).await.map(|_| started.elapsed())
        }
    );
    let mut took = [a.unwrap(), b.unwrap(), c.unwrap()];
    took.sort();
    assert_eq!(took, [Duration::ZERO, Duration::from_millis(500), Duration::from_millis(500)]);
    assert_eq!(router.target_counts().fault_overflows, 1, "the fault past max_active_faults is counted");
}

#[tokio::test(start_paused = true)]
async fn a_rate_limited_route_turns_away_calls_over_its_bucket_and_a_new_table_keeps_the_bucket() {
    let net = FakeNet::default();
    net.set(addr(1), Peer::Up { delay: Duration::ZERO });
    let (mut publisher, router) = publisher(&net);
    publisher.cluster(&cluster("a", &[1]));
    let limit = mesh_core::policy::RateLimit { max_tokens: 5, tokens_per_fill: 5, fill_interval: Duration::from_secs(1) };
    let routes = [single_route("a", RoutePolicies { rate_limit: Some(limit.clone()), ..RoutePolicies::default() })];
    publisher.publish(&routes);
    let results = async || {
        let mut limited = Vec::new();
        for _ in 0..10 {
            match call(&router, "/x").await {
                Ok(_) => {}
                Err(Error::RateLimited { retry_after, .. }) => limited.push(retry_after),
                Err(other) => panic!("{other}"),
            }
        }
        limited
    };
    let limited = results().await;
    assert_eq!(limited.len(), 5, "a bucket of 5: {limited:?}");
    assert!(limited.iter().all(|&after| after <= Duration::from_millis(200)), "one token every 200 ms: {limited:?}");
    let error = Error::RateLimited { target: String::new(), limit: Box::new(limit.clone()), retry_after: Duration::ZERO };
    assert_eq!(error.grpc_code(), mesh_core::GrpcCode::ResourceExhausted);
    // A new table with the same limit keeps the drained bucket.
    publisher.publish(&routes);
    assert!(matches!(call(&router, "/x").await, Err(Error::RateLimited { .. })), "the bucket was not refilled by the new table");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(results().await.len(), 5, "refilled after the fill interval");
    assert_eq!(router.target_counts().rate_limited, 11, "every call turned away is counted");
}

#[tokio::test(start_paused = true)]
async fn a_hedged_route_sends_a_second_attempt_after_the_delay_and_the_first_answer_wins() {
    let net = FakeNet::default();
    net.set(addr(1), Peer::Up { delay: Duration::from_secs(1) });
    net.set(addr(2), Peer::Up { delay: Duration::ZERO });
    let (mut publisher, router) = publisher(&net);
    let mut target = cluster("a", &[1, 2]);
    target.balancer.lb = "round_robin".parse().unwrap();
    target.breakers.retry_budget = Some(RetryBudget { ratio: 1.0, ..RetryBudget::default() });
    publisher.cluster(&target);
    let hedge = mesh_core::policy::HedgePolicy { max_attempts: 2, delay: Duration::from_millis(100), non_fatal: vec![] };
    publisher.publish(&[single_route("a", RoutePolicies { hedge: Some(hedge), ..RoutePolicies::default() })]);
    tokio::time::sleep(Duration::from_millis(10)).await;
    let mut hedged = 0;
    for _ in 0..20 {
        let started = tokio::time::Instant::now();
        assert_eq!(call(&router, "/x").await.unwrap(), addr(2), "the fast endpoint's answer wins");
        let took = started.elapsed();
        assert!(took == Duration::ZERO || took == Duration::from_millis(100), "answered at once, or by the hedge: {took:?}");
        hedged += u64::from(took > Duration::ZERO);
    }
    assert_eq!(router.counts()[0].1.hedges, hedged, "each hedge is counted");
    // Round robin over two endpoints with two picks a hedged call: every first attempt lands on the slow one.
    assert_eq!(hedged, 20, "every call was hedged");
    // The slow attempts lost and were cancelled: none of them was answered.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(net.served.load(std::sync::atomic::Ordering::SeqCst), 20, "only the winners were served");
}

#[tokio::test(start_paused = true)]
async fn without_a_retry_budget_max_retries_caps_the_retries_in_flight() {
    let net = FakeNet::default();
    net.set(addr(1), Peer::Failing);
    let (mut publisher, router) = publisher(&net);
    let mut target = cluster("a", &[1]);
    target.breakers.max_retries = 1;
    publisher.cluster(&target);
    publisher.publish(&[single_route("a", with_retry(2))]);
    tokio::time::sleep(Duration::from_millis(10)).await;
    let calls = (0..10).map(|_| router.clone().oneshot(http::Request::new(Empty::new())));
    for response in futures_util::future::join_all(calls).await {
        assert_eq!(response.unwrap().status(), http::StatusCode::SERVICE_UNAVAILABLE);
    }
    let counts = router.counts()[0].1;
    assert_eq!((counts.retries, counts.retry_overflows), (1, 9), "ten failures at once, one retry allowed in flight: {counts:?}");
}

#[tokio::test(start_paused = true)]
async fn envoys_http_conditions_retry_a_plain_http_error_answer() {
    let (_net, mut publisher, router) = failing_and_up();
    let mut http_retry_on = mesh_core::policy::HttpRetryOn::default();
    assert!(http_retry_on.set("gateway-error"));
    let retry = mesh_core::policy::RetryPolicy { max_attempts: 2, retry_on: vec![], http_retry_on, ..Default::default() };
    publisher.publish(&[single_route("a", RoutePolicies { retry: Some(retry), ..RoutePolicies::default() })]);
    tokio::time::sleep(Duration::from_millis(10)).await;
    for _ in 0..10 {
        assert_eq!(call(&router, "/x").await.unwrap(), addr(2), "a 503 is a gateway error: retried on the other endpoint");
    }
    assert!(router.counts()[0].1.retries >= 4, "{:?}", router.counts());
}

#[tokio::test(start_paused = true)]
async fn a_mirrored_route_copies_its_share_to_the_shadow_without_waiting_for_it() {
    let net = FakeNet::default();
    net.set(addr(1), Peer::Up { delay: Duration::ZERO });
    // The shadow is slow: the calls must not wait for it.
    net.set(addr(2), Peer::Up { delay: Duration::from_secs(1) });
    let (mut publisher, router) = publisher(&net);
    publisher.cluster(&cluster("a", &[1]));
    publisher.cluster(&cluster("shadow", &[2]));
    let mirror = |per_million| mesh_core::policy::Mirror { cluster: "shadow".into(), per_million, shadow_host: true };
    publisher.publish(&[single_route("a", RoutePolicies { mirrors: vec![mirror(1_000_000)], ..RoutePolicies::default() })]);
    let started = tokio::time::Instant::now();
    for _ in 0..10 {
        assert_eq!(call(&router, "/x").await.unwrap(), addr(1), "the answer is the call's own");
    }
    assert_eq!(started.elapsed(), Duration::ZERO, "no call waited for its copy");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let seen = net.authorities.lock().unwrap().clone();
    let shadowed: Vec<&String> = seen.iter().filter(|(a, _)| *a == addr(2)).map(|(_, authority)| authority).collect();
    assert_eq!(shadowed.len(), 10, "every call copied: {seen:?}");
    assert!(shadowed.iter().all(|a| *a == "routed-shadow"), "the copy's host says it is one: {shadowed:?}");
    assert!(seen.iter().filter(|(a, _)| *a == addr(1)).all(|(_, a)| a == "routed"), "the call's own host is unchanged");
    assert_eq!(router.target_counts().mirrored, 10);

    // A share: about that many calls copied.
    publisher.publish(&[single_route("a", RoutePolicies { mirrors: vec![mirror(250_000)], ..RoutePolicies::default() })]);
    for _ in 0..400 {
        call(&router, "/x").await.unwrap();
    }
    let copied = router.target_counts().mirrored - 10;
    assert!((60..=140).contains(&copied), "25% of 400 calls copied, not {copied}");

    // A mirror to a cluster the table lacks sends nothing and counts the skip; the calls still succeed.
    let lost = mesh_core::policy::Mirror { cluster: "gone".into(), ..mirror(1_000_000) };
    publisher.publish(&[single_route("a", RoutePolicies { mirrors: vec![lost], ..RoutePolicies::default() })]);
    call(&router, "/x").await.unwrap();
    assert_eq!(router.target_counts().mirrors_skipped, 1);
}

#[tokio::test(start_paused = true)]
async fn a_route_with_a_runtime_fraction_takes_its_share_and_the_rest_fall_through() {
    let net = FakeNet::default();
    net.set(addr(1), Peer::Up { delay: Duration::ZERO });
    net.set(addr(2), Peer::Up { delay: Duration::ZERO });
    let (mut publisher, router) = publisher(&net);
    publisher.cluster(&cluster("a", &[1]));
    publisher.cluster(&cluster("b", &[2]));
    let some = Route {
        name: String::new(),
        matcher: RouteMatch { fraction: Some(300_000), ..RouteMatch::any() },
        action: to("a"),
        policies: RoutePolicies::default(),
    };
    publisher.publish(&[some, single_route("b", RoutePolicies::default())]);
    let mut to_a = 0;
    for _ in 0..500 {
        to_a += u32::from(call(&router, "/x").await.unwrap() == addr(1));
    }
    assert!((110..=190).contains(&to_a), "30% of 500 calls take the first route, not {to_a}");
}

#[tokio::test(start_paused = true)]
async fn an_adaptive_limit_grows_while_latency_stays_low_and_sheds_once_it_rises() {
    use mesh_core::policy::{AdaptiveConcurrency, MinRtt};
    let net = FakeNet::default();
    net.set(addr(1), Peer::Up { delay: Duration::from_millis(50) });
    let (mut publisher, router) = publisher(&net);
    let mut target = cluster("a", &[1]);
    let config = AdaptiveConcurrency {
        min_rtt: MinRtt::Fixed(Duration::from_millis(100)),
        min_limit: 2,
        max_limit: 50,
        ..AdaptiveConcurrency::default()
    };
    target.adaptive = Some(config);
    publisher.cluster(&target);
    publisher.publish(&[single_route("a", RoutePolicies::default())]);
    let burst = async |n: usize| {
        let calls: Vec<_> = (0..n)
            .map(|_| {
                let router = router.clone();
                tokio::spawn(async move { call(&router, "/x").await })
            })
            .collect();
        let mut shed = 0;
        for call in calls {
            match call.await.unwrap() {
                Ok(_) => {}
                Err(error @ Error::ConcurrencyLimited { .. }) => {
                    assert_eq!(error.grpc_code(), mesh_core::GrpcCode::ResourceExhausted, "{error}");
                    shed += 1;
                }
                Err(other) => panic!("{other}"),
            }
        }
        shed
    };
    assert_eq!(burst(10).await, 8, "the limit starts at min_limit");
    // Answers at half the no-load latency: the limit grows every update interval.
    for _ in 0..6 {
        call(&router, "/x").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(burst(10).await, 0, "the grown limit takes the whole burst");
    // The backend slows to ten times the no-load latency: the limit falls back to its floor.
    net.set(addr(1), Peer::Up { delay: Duration::from_secs(1) });
    net.cut(addr(1));
    for _ in 0..10 {
        let _ = call(&router, "/x").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(burst(10).await, 8, "back at min_limit once calls queue");
    assert_eq!(router.counts()[0].1.adaptive_shed, 16, "each call turned away is counted");
}
