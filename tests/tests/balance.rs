//! Load balancing against real tonic servers on 127.0.0.1.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use mesh_core::{Endpoint, LbPolicy};
use mesh_tests::echo::EchoServer;
use mesh_tests::load::{call, drive};
use mesh_tests::peers;
use mesh_tonic::Channel;
use mesh_tower::balance::ConnState;
use mesh_tower::discover::{self, Change};

async fn wait_ready(channel: &Channel, n: usize) {
    for _ in 0..500 {
        if channel.endpoints().iter().filter(|e| e.state == ConnState::Ready).count() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("endpoints never became ready: {:?}", channel.endpoints());
}

fn static_target(addrs: &[SocketAddr]) -> String {
    format!("static:///{}", addrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(","))
}

/// One echo call as a raw HTTP/2 request to `uri`: a gRPC message of two bytes.
fn echo_request(uri: &str) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    // A gRPC message: uncompressed flag, big-endian length, payload.
    let message = bytes::Bytes::from_static(&[0, 0, 0, 0, 2, b'h', b'i']);
    http::Request::post(uri)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Full::new(message))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_3000_calls_evenly_over_3_servers() {
    let servers = [
        EchoServer::start(Duration::ZERO).await.unwrap(),
        EchoServer::start(Duration::ZERO).await.unwrap(),
        EchoServer::start(Duration::ZERO).await.unwrap(),
    ];
    let addrs: Vec<_> = servers.iter().map(|s| s.addr).collect();
    let channel = Channel::builder(static_target(&addrs)).lb(LbPolicy::RoundRobin).build().unwrap();
    wait_ready(&channel, 3).await;
    let run = drive(&channel, 3000, 8, |_| {}).await;
    assert!(run.failures.is_empty(), "{:?}", run.failures);
    assert_eq!(run.by_endpoint.len(), 3);
    for (addr, n) in &run.by_endpoint {
        assert!((950..=1050).contains(n), "{addr} got {n} of 3000 calls: {:?}", run.by_endpoint);
    }
    // Each call was classified once, at its trailers' grpc-status, and counted on its endpoint.
    let endpoints = channel.endpoints();
    for e in &endpoints {
        assert_eq!((e.successes, e.failures), (run.by_endpoint[&e.endpoint.addr] as u32, 0), "{e:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_target_goes_through_a_route_whose_timeout_ends_slow_calls() {
    let slow = EchoServer::start(Duration::from_millis(400)).await.unwrap();
    let target = static_target(&[slow.addr]);
    let routed = Channel::builder(target.as_str()).route_timeout(Duration::from_millis(100)).build().unwrap();
    let status = call(&routed, &[]).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("route timeout 100ms exceeded") && status.message().contains(&target), "{status:?}");
    let plain = Channel::builder(target.as_str()).build().unwrap();
    assert_eq!(call(&plain, &[]).await.unwrap(), slow.addr, "without the route timeout the slow call succeeds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_targets_route_hash_policy_keeps_each_user_on_one_server() {
    use mesh_core::policy::{HashPolicy, RouteHash};
    let servers = [
        EchoServer::start(Duration::ZERO).await.unwrap(),
        EchoServer::start(Duration::ZERO).await.unwrap(),
        EchoServer::start(Duration::ZERO).await.unwrap(),
    ];
    let addrs: Vec<_> = servers.iter().map(|s| s.addr).collect();
    let channel = Channel::builder(static_target(&addrs))
        .lb("ring_hash".parse().unwrap())
        .hash_policy(vec![RouteHash { policy: HashPolicy::Header("x-user".into()), terminal: false }])
        .build()
        .unwrap();
    wait_ready(&channel, 3).await;
    let mut homes = HashMap::new();
    for user in 0..30 {
        let user = format!("user-{user}");
        let first = call(&channel, &[("x-user", user.clone())]).await.unwrap();
        for _ in 0..5 {
            assert_eq!(call(&channel, &[("x-user", user.clone())]).await.unwrap(), first, "{user} stays on one server");
        }
        homes.insert(user, first);
    }
    let used: std::collections::HashSet<_> = homes.values().collect();
    assert!(used.len() >= 2, "30 users hash onto more than one of 3 servers: {homes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_ewma_sends_most_calls_to_the_fast_servers() {
    let fast = Duration::from_millis(2);
    let mut servers = Vec::new();
    for _ in 0..3 {
        servers.push(EchoServer::start(fast).await.unwrap());
    }
    let slow = EchoServer::start(fast * 10).await.unwrap();
    let mut addrs: Vec<_> = servers.iter().map(|s| s.addr).collect();
    addrs.push(slow.addr);
    let channel = Channel::builder(static_target(&addrs)).lb(LbPolicy::p2c_ewma()).build().unwrap();
    wait_ready(&channel, 4).await;
    let run = drive(&channel, 2000, 8, |_| {}).await;
    assert!(run.failures.is_empty(), "{:?}", run.failures);
    let to_slow = run.by_endpoint.get(&slow.addr).copied().unwrap_or(0);
    let share_fast = 1.0 - to_slow as f64 / 2000.0;
    assert!(share_fast >= 0.80, "fast servers got {:.1}% (slow got {to_slow}): {:?}", share_fast * 100.0, run.by_endpoint);
}

/// One slow pod (Buoyant's benchmark shape, at test scale): five backends, one answering 200 ms late, the
/// others at 2 ms, at concurrency 16. P2C-EWMA keeps its tail off the slow pod and round robin does not: the
/// ordering of their p99s is asserted, not a time (BENCHMARKS.md has the numbers, from `bench-slowpod`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_slow_pod_p2c_ewma_has_a_lower_p99_than_round_robin() {
    let mut servers = Vec::new();
    for _ in 0..4 {
        servers.push(EchoServer::start(Duration::from_millis(2)).await.unwrap());
    }
    servers.push(EchoServer::start(Duration::from_millis(200)).await.unwrap());
    let addrs: Vec<_> = servers.iter().map(|s| s.addr).collect();
    let mut p99 = Vec::new();
    for lb in ["p2c_ewma", "round_robin"] {
        let channel = Channel::builder(static_target(&addrs)).lb(lb.parse().unwrap()).build().unwrap();
        wait_ready(&channel, 5).await;
        // 2,000 calls: the p99 is the 20th slowest, beyond the handful p2c_ewma sends the slow pod while it
        // learns its latency (with 800 it was the 8th, and a learning phase of 14 calls put p2c's p99 on it).
        let run = drive(&channel, 2000, 16, |_| {}).await;
        assert!(run.failures.is_empty(), "{lb}: {:?}", run.failures);
        p99.push((lb, run.percentile(0.99), run.by_endpoint.get(&addrs[4]).copied().unwrap_or(0)));
    }
    let [(_, p2c, p2c_slow), (_, rr, rr_slow)] = p99[..] else { unreachable!() };
    assert!(p2c < rr, "p2c_ewma's p99 is below round robin's with one slow pod: {p99:?}");
    assert!(p2c_slow * 10 < rr_slow, "p2c_ewma sends the slow pod a small share of what round robin does: {p99:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_added_and_removed_mid_run_fail_no_call() {
    let mut servers = Vec::new();
    for _ in 0..5 {
        servers.push(EchoServer::start(Duration::from_micros(200)).await.unwrap());
    }
    let addrs: Vec<_> = servers.iter().map(|s| s.addr).collect();
    let (tx, source) = discover::channel();
    tx.send(Change::reset([Endpoint::new(addrs[0]), Endpoint::new(addrs[1])]));
    let channel = Channel::builder("churn").lb(LbPolicy::p2c_ewma()).build_with("churn", source).unwrap();
    wait_ready(&channel, 2).await;
    // Every 200 calls: add the next server, remove the oldest still present.
    let script = {
        let addrs = addrs.clone();
        move |done: u64| {
            if done.is_multiple_of(200) && done < 2000 {
                let step = (done / 200) as usize;
                tx.send(Change::insert(Endpoint::new(addrs[(step + 1) % addrs.len()])));
                tx.send(Change::Remove(addrs[(step + 4) % addrs.len()]));
            }
        }
    };
    let run = drive(&channel, 2000, 8, script).await;
    assert!(run.failures.is_empty(), "{} failed calls: {:?}", run.failures.len(), &run.failures[..run.failures.len().min(5)]);
    assert_eq!(run.by_endpoint.values().sum::<u64>(), 2000);
    assert_eq!(run.by_endpoint.len(), 5, "every server took traffic at some point: {:?}", run.by_endpoint);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_server_causes_no_failed_call_once_its_connect_fails() {
    let bin = env!("CARGO_BIN_EXE_mesh-test-server");
    let mut procs = [peers::echo_process(bin, 0).unwrap(), peers::echo_process(bin, 0).unwrap(), peers::echo_process(bin, 0).unwrap()];
    let addrs: Vec<_> = procs.iter().map(|p| p.addr).collect();
    let channel = Channel::builder(static_target(&addrs)).lb(LbPolicy::RoundRobin).build().unwrap();
    wait_ready(&channel, 3).await;

    let before = drive(&channel, 500, 4, |_| {}).await;
    assert!(before.failures.is_empty(), "{:?}", before.failures);
    assert_eq!(before.by_endpoint.len(), 3);

    // SIGKILL one server between batches; discovery still lists it. Once the
    // balancer's reconnect to it has failed, no call may fail. (Calls in
    // flight on it at the instant it dies can fail, as in gRPC and Envoy
    // without a retry policy; retries are the retry layer's job.)
    let victim = procs[1].addr;
    procs[1].kill();
    let victim_state = || channel.endpoints().into_iter().find(|e| e.endpoint.addr == victim).unwrap().state;
    for _ in 0..500 {
        if victim_state() == ConnState::TransientFailure {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(victim_state(), ConnState::TransientFailure, "the reconnect to a killed server must fail");
    let after = drive(&channel, 1500, 4, |_| {}).await;
    assert!(
        after.failures.is_empty(),
        "{} failed calls after the kill: {:?}",
        after.failures.len(),
        &after.failures[..after.failures.len().min(5)]
    );
    assert_eq!(after.by_endpoint.values().sum::<u64>(), 1500);
    assert!(!after.by_endpoint.contains_key(&victim), "dead server served calls: {:?}", after.by_endpoint);
    assert_eq!(after.by_endpoint.len(), 2, "the two live servers take the load: {:?}", after.by_endpoint);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_hash_is_sticky_and_moves_about_one_nth_of_keys() {
    let mut servers = Vec::new();
    for _ in 0..4 {
        servers.push(EchoServer::start(Duration::ZERO).await.unwrap());
    }
    let addrs: Vec<_> = servers.iter().map(|s| s.addr).collect();
    let (tx, source) = discover::channel();
    tx.send(Change::reset(addrs.iter().map(|a| Endpoint::new(*a))));
    let channel = Channel::builder("ring").lb("ring_hash".parse().unwrap()).build_with("ring", source).unwrap();
    wait_ready(&channel, 4).await;

    // The same key lands on the same endpoint for 1,000 calls.
    let key = [("x-mesh-hash-key", "user-42".to_owned())];
    let first = call(&channel, &key).await.unwrap();
    for _ in 0..999 {
        assert_eq!(call(&channel, &key).await.unwrap(), first);
    }

    // 400 keys; remove one endpoint. Every key of the removed endpoint moves;
    // the ring keeps Envoy's (and gRPC's) rescaling to its minimum size, so a
    // few other keys move too: about 1/N in all, far from modulo hashing's
    // (N-1)/N. Matching Envoy's ring means a key lands on the same backend
    // from an Envoy sidecar, a gRPC client and ours.
    let mut before = HashMap::new();
    for k in 0..400 {
        before.insert(k, call(&channel, &[("x-mesh-hash-key", format!("key-{k}"))]).await.unwrap());
    }
    let removed = addrs[2];
    tx.send(Change::Remove(removed));
    for _ in 0..500 {
        if channel.endpoints().len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (mut moved, mut moved_elsewhere) = (0, 0);
    for k in 0..400 {
        let now = call(&channel, &[("x-mesh-hash-key", format!("key-{k}"))]).await.unwrap();
        assert_ne!(now, removed, "key-{k} still lands on the removed endpoint");
        if now != before[&k] {
            moved += 1;
            if before[&k] != removed {
                moved_elsewhere += 1;
            }
        }
    }
    let on_removed = before.values().filter(|a| **a == removed).count();
    assert!((60..=140).contains(&on_removed), "the removed endpoint held {on_removed} of 400 keys; expected about 1/4");
    let share = moved as f64 / 400.0;
    assert!((0.20..=0.45).contains(&share), "{moved} of 400 keys moved ({share:.2}); expected roughly 1/4");
    let stayed = 1.0 - moved_elsewhere as f64 / (400 - on_removed) as f64;
    assert!(stayed >= 0.75, "only {:.0}% of the other endpoints' keys stayed put", stayed * 100.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_endpoint_drains_its_calls_in_flight() {
    let slow = EchoServer::start(Duration::from_millis(500)).await.unwrap();
    let other = EchoServer::start(Duration::ZERO).await.unwrap();
    let (tx, source) = discover::channel();
    tx.send(Change::reset([Endpoint::new(slow.addr)]));
    let channel = Channel::builder("drain").build_with("drain", source).unwrap();
    wait_ready(&channel, 1).await;

    // Calls in flight on the slow endpoint when discovery removes it.
    let in_flight: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn({
                let channel = channel.clone();
                async move { call(&channel, &[]).await }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    tx.send(Change::reset([Endpoint::new(other.addr)]));
    for call in in_flight {
        assert_eq!(call.await.unwrap().expect("an in-flight call survives its endpoint's removal"), slow.addr);
    }
    // New calls go to the remaining endpoint only.
    wait_ready(&channel, 1).await;
    for _ in 0..10 {
        assert_eq!(call(&channel, &[]).await.unwrap(), other.addr);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_retries_after_backoff_and_reconnects_when_its_server_returns() {
    // Down at first: its connect fails and it is retried after the backoff (no task waits for it: the
    // balancer's connection manager keeps a timer), so it becomes ready once a server listens. Then the
    // server goes away and comes back on the same address: the endpoint reconnects.
    let port = peers::free_port().unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let channel = Channel::builder(static_target(&[addr])).build().unwrap();
    let state = || channel.endpoints().first().map(|e| e.state);
    let until = async |done: &dyn Fn() -> bool| {
        for _ in 0..500 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    until(&|| state() == Some(ConnState::TransientFailure)).await;
    assert_eq!(state(), Some(ConnState::TransientFailure), "nothing listens yet");
    let server = EchoServer::start_on(addr, Duration::ZERO).await.unwrap();
    wait_ready(&channel, 1).await;
    assert_eq!(call(&channel, &[]).await.unwrap(), addr);

    drop(server);
    until(&|| state() != Some(ConnState::Ready)).await;
    assert_ne!(state(), Some(ConnState::Ready), "the connection closed with its server");
    let _back = EchoServer::start_on(addr, Duration::ZERO).await.unwrap();
    wait_ready(&channel, 1).await;
    assert_eq!(call(&channel, &[]).await.unwrap(), addr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_counts_in_flight_until_its_response_ends_with_trailers() {
    use http_body_util::BodyExt;
    use mesh_tower::balance::{Balancer, BalancerConfig};
    use tower::ServiceExt;

    let server = EchoServer::start(Duration::ZERO).await.unwrap();
    let balancer = Balancer::new("in-flight", discover::fixed(vec![Endpoint::new(server.addr)]), BalancerConfig::default());
    let in_flight = || balancer.endpoints().iter().map(|e| e.in_flight).sum::<u64>();
    let request = echo_request(&format!("http://{}{}", server.addr, mesh_tests::echo::METHOD));
    let response = balancer.clone().oneshot(request).await.unwrap();
    assert_eq!(in_flight(), 1, "the call is in flight while its response body is unread");
    let mut body = response.into_body();
    let data = body.frame().await.unwrap().unwrap();
    assert!(data.is_data());
    assert_eq!(in_flight(), 1, "the call is in flight until its body ends");
    let trailers = body.frame().await.unwrap().unwrap();
    assert!(trailers.is_trailers(), "an echo reply ends with trailers");
    // The body is still alive: the trailers alone end the call.
    assert_eq!(in_flight(), 0, "trailers are the last frame: the call is no longer in flight");
    drop(body);
    assert_eq!(in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_served_with_or_without_a_reserved_place_in_the_queue() {
    use tower::{Service, ServiceExt};

    let server = EchoServer::start(Duration::ZERO).await.unwrap();
    let mut channel = Channel::builder(static_target(&[server.addr])).build().unwrap();
    wait_ready(&channel, 1).await;
    // Path-only, as generated clients send it: the channel adds scheme and authority.
    let request = || echo_request(mesh_tests::echo::METHOD).map(tonic::body::Body::new);
    let served = |response: http::Response<_>| response.extensions().get::<mesh_tonic::ServedBy>().map(|s| s.0);

    // Polled ready: the call goes through the queue.
    channel.ready().await.unwrap();
    // A clone does not inherit the reservation, and a call made without one runs directly.
    let mut clone = channel.clone();
    assert_eq!(served(clone.call(request()).await.unwrap()), Some(server.addr));
    assert_eq!(served(channel.call(request()).await.unwrap()), Some(server.addr));
    // The reservation was used up: the next call without poll_ready runs directly too.
    assert_eq!(served(channel.call(request()).await.unwrap()), Some(server.addr));
    // Many reserved calls at once, more than the queue holds waiting.
    let calls = (0..2000).map(|_| channel.clone().oneshot(request()));
    let responses = futures_util::future::join_all(calls).await;
    assert!(responses.into_iter().all(|r| served(r.unwrap()) == Some(server.addr)));
}
