//! `xds:///` end to end: the scripted ADS server drives routing, weighted
//! splits and endpoints for meshctl, for our channel, and for a real grpcio
//! (C-core) proxyless client.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_tests::ads::{AdsServer, build, type_url};
use mesh_tests::echo::{EchoServer, METHOD};
use mesh_tests::load::{call, drive};
use mesh_tests::peers;
use mesh_tonic::Channel;
use serde_json::Value;
use xds_client::{Bootstrap, XdsClient, XdsClientConfig};

/// Listener `greeter` → routes → clusters `greeter-a`/`greeter-b` by weight.
fn publish_greeter(ads: &AdsServer, a: &[SocketAddr], b: &[SocketAddr], weights: (u32, u32)) {
    ads.set(type_url::CLUSTER, "greeter-a", build::cluster_eds("greeter-a", "round_robin"));
    ads.set(type_url::CLUSTER, "greeter-b", build::cluster_eds("greeter-b", "round_robin"));
    ads.set(type_url::ENDPOINT, "greeter-a", build::endpoints("greeter-a", a));
    ads.set(type_url::ENDPOINT, "greeter-b", build::endpoints("greeter-b", b));
    ads.set(
        type_url::ROUTE,
        "greeter-routes",
        build::route_config("greeter-routes", &["greeter"], &[("greeter-a", weights.0), ("greeter-b", weights.1)]),
    );
    ads.set(type_url::LISTENER, "greeter", build::listener("greeter", "greeter-routes"));
}

async fn servers(n: usize) -> Vec<EchoServer> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(EchoServer::start(Duration::ZERO).await.unwrap());
    }
    v
}

fn xds_channel(ads: &AdsServer) -> Channel {
    xds_channel_with(ads, &[])
}

/// An `xds:///greeter` channel whose bootstrap lists `features` (e.g. `delta_ads`).
fn xds_channel_with(ads: &AdsServer, features: &[&str]) -> Channel {
    let mut bootstrap = Bootstrap::for_server(ads.addr().to_string(), "mesh-test");
    bootstrap.servers[0].server_features.extend(features.iter().map(|f| f.to_string()));
    let client = XdsClient::new(bootstrap, XdsClientConfig::default());
    Channel::builder("xds:///greeter").timeout(Duration::from_secs(10)).build_xds(client, "greeter").unwrap()
}

/// The 80/20 greeter mesh over three echo servers: two in cluster a, one in b.
async fn greeter_80_20() -> (AdsServer, Vec<EchoServer>, [SocketAddr; 2], [SocketAddr; 1]) {
    let ads = AdsServer::start().await.unwrap();
    let s = servers(3).await;
    let (a, b) = ([s[0].addr, s[1].addr], [s[2].addr]);
    publish_greeter(&ads, &a, &b, (80, 20));
    (ads, s, a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshctl_call_xds_target_follows_the_80_20_split() {
    let (ads, _servers, a, _b) = greeter_80_20().await;
    let (_dir, bootstrap) = peers::write_bootstrap(ads.addr(), &["xds_v3"]).unwrap();
    let summary = peers::meshctl_xds_call(&bootstrap, "xds:///greeter", METHOD, 1000).await;
    let to_a: u64 = a.iter().map(|x| summary["by_endpoint"][x.to_string()].as_u64().unwrap_or(0)).sum();
    assert!((750..=850).contains(&to_a), "cluster a (weight 80) got {to_a} of 1000: {summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshctl_xds_dump_shows_every_resource_with_status_and_errors() {
    let ads = AdsServer::start().await.unwrap();
    let s = servers(1).await;
    publish_greeter(&ads, &[s[0].addr], &[s[0].addr], (50, 50));
    // greeter-b's endpoints are invalid (port 0): NACKed with a reason.
    let mut bad = build::endpoints_proto("greeter-b", &[(s[0].addr, 1)]);
    if let Some(envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier::Endpoint(e)) =
        bad.endpoints[0].lb_endpoints[0].host_identifier.as_mut()
        && let Some(envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(sa)) =
            e.address.as_mut().and_then(|a| a.address.as_mut())
    {
        sa.port_specifier = Some(envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(0));
    }
    ads.set(type_url::ENDPOINT, "greeter-b", build::pack(bad));
    let (_dir, bootstrap) = peers::write_bootstrap(ads.addr(), &["xds_v3"]).unwrap();
    let bootstrap = bootstrap.to_str().unwrap().to_owned();
    let args = ["xds-dump", "--target", "xds:///greeter", "--wait-ms", "5000"];
    let (code, stdout, stderr) =
        tokio::task::spawn_blocking(move || peers::meshctl_with_env(&args, &[("GRPC_XDS_BOOTSTRAP", &bootstrap)])).await.unwrap().unwrap();
    assert_eq!(code, 0, "{stdout} {stderr}");
    let dump: Value = serde_json::from_str(stdout.trim()).unwrap();
    let find = |ty: &str, name: &str| {
        dump["resources"].as_array().unwrap().iter().find(|r| r["type"] == ty && r["name"] == name).cloned().unwrap_or(Value::Null)
    };
    assert_eq!(find("LDS", "greeter")["status"], "ACKED", "{dump}");
    assert_eq!(find("RDS", "greeter-routes")["status"], "ACKED", "{dump}");
    assert_eq!(find("CDS", "greeter-a")["status"], "ACKED", "{dump}");
    assert_eq!(find("EDS", "greeter-a")["status"], "ACKED", "{dump}");
    let nacked = find("EDS", "greeter-b");
    assert_eq!(nacked["status"], "NACKED", "{dump}");
    assert!(nacked["error"].as_str().unwrap().contains("port"), "{dump}");
    assert_eq!(dump["server"], ads.addr().to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_moved_by_the_control_plane_fail_no_call() {
    let ads = AdsServer::start().await.unwrap();
    let s = servers(4).await;
    let pool: Vec<SocketAddr> = s.iter().map(|x| x.addr).collect();
    publish_greeter(&ads, &pool[0..1], &pool[3..4], (50, 50));
    let channel = xds_channel(&ads);
    call(&channel, &[]).await.expect("first call after config arrives");
    let ads = Arc::new(ads);
    let script = {
        let (ads, pool) = (ads.clone(), pool.clone());
        move |done: u64| {
            if done.is_multiple_of(150) && done < 2000 {
                // Rotate cluster a over the first three servers, one to two at a time.
                let step = (done / 150) as usize;
                let next: Vec<SocketAddr> = (0..1 + step % 2).map(|i| pool[(step + i) % 3]).collect();
                ads.set(type_url::ENDPOINT, "greeter-a", build::endpoints("greeter-a", &next));
            }
        }
    };
    let run = drive(&channel, 2000, 8, script).await;
    assert!(run.failures.is_empty(), "{} failed: {:?}", run.failures.len(), &run.failures[..run.failures.len().min(5)]);
    assert!(pool[0..3].iter().all(|a| run.by_endpoint.contains_key(a)), "every server of cluster a served at some point: {run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_killed_mid_run_fails_no_call_to_healthy_backends() {
    let mut ads = AdsServer::start().await.unwrap();
    let s = servers(2).await;
    let (a, b) = ([s[0].addr], [s[1].addr]);
    publish_greeter(&ads, &a, &b, (80, 20));
    let channel = xds_channel(&ads);
    let before = drive(&channel, 300, 8, |_| {}).await;
    assert!(before.failures.is_empty(), "{:?}", before.failures);
    ads.stop().await;
    let after = drive(&channel, 1000, 8, |_| {}).await;
    assert!(
        after.failures.is_empty(),
        "{} failed after the control plane died: {:?}",
        after.failures.len(),
        &after.failures[..after.failures.len().min(5)]
    );
    let share_a = after.share(&a);
    assert!((0.75..=0.85).contains(&share_a), "split kept from the last config: {share_a:.3} {after:?} (before {before:?})");
}

#[tokio::test]
async fn unreachable_control_plane_fails_calls_unavailable_naming_the_server() {
    let port = peers::free_port().unwrap();
    let server = format!("127.0.0.1:{port}");
    let client = XdsClient::new(Bootstrap::for_server(server.clone(), "mesh-test"), XdsClientConfig::default());
    let channel = Channel::builder("xds:///greeter").ready_timeout(Duration::from_millis(500)).build_xds(client, "greeter").unwrap();
    let status = call(&channel, &[]).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(status.message().contains(&server) && status.message().contains("xds:///greeter"), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_proxyless_client_and_ours_see_the_same_routing() {
    let (ads, _servers, a, _b) = greeter_80_20().await;
    let (_dir, bootstrap) = peers::write_bootstrap(ads.addr(), &["xds_v3"]).unwrap();

    let theirs =
        tokio::task::spawn_blocking(move || peers::python_xds_client(&bootstrap, "xds:///greeter", METHOD, 1000)).await.unwrap().unwrap();
    assert_eq!(theirs["ok"], 1000, "{theirs}");
    let theirs_by: BTreeMap<SocketAddr, u64> =
        theirs["by_response"].as_object().unwrap().iter().map(|(k, v)| (k.parse().unwrap(), v.as_u64().unwrap())).collect();

    let channel = xds_channel(&ads);
    let ours = tokio::time::timeout(Duration::from_secs(60), drive(&channel, 1000, 1, |_| {})).await.expect("our client finishes");
    assert!(ours.failures.is_empty(), "{:?}", ours.failures);
    let ours_by = ours.by_endpoint;

    let keys = |m: &BTreeMap<SocketAddr, u64>| m.keys().copied().collect::<Vec<_>>();
    assert_eq!(keys(&theirs_by), keys(&ours_by), "both reach the same endpoints");
    for (name, by) in [("grpcio", &theirs_by), ("ours", &ours_by)] {
        let total: u64 = by.values().sum();
        let share_a = a.iter().map(|x| by.get(x).copied().unwrap_or(0)).sum::<u64>() as f64 / total as f64;
        assert!((0.75..=0.85).contains(&share_a), "{name}: cluster a share {share_a:.3}: {by:?}");
    }
    // Round robin inside cluster a: both spread it evenly.
    for by in [&theirs_by, &ours_by] {
        let (x, y) = (by[&a[0]] as f64, by[&a[1]] as f64);
        assert!((x / (x + y) - 0.5).abs() < 0.1, "{by:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_to_an_unknown_cluster_is_not_used_until_the_cluster_arrives() {
    for features in [&["delta_ads"][..], &[]] {
        route_waits_for_its_cluster(features).await;
    }
}

/// One run of the A74 check over delta (`delta_ads`) or SotW (no features).
async fn route_waits_for_its_cluster(features: &[&str]) {
    // A74: the router switches to a new route table only once every cluster
    // it names is known, so no call fails in between. Over SotW too: a CDS
    // response without the cluster is no proof it does not exist; only its
    // does-not-exist timer is (calls routed to a cluster that does not
    // exist fail UNAVAILABLE, as in gRPC).
    let ads = AdsServer::start().await.unwrap();
    let s = servers(2).await;
    let (a, c) = ([s[0].addr], [s[1].addr]);
    publish_greeter(&ads, &a, &a, (100, 0));
    let channel = xds_channel_with(&ads, features);
    let first = drive(&channel, 100, 4, |_| {}).await;
    assert!(first.failures.is_empty(), "{:?}", first.failures);

    // Routes now split to greeter-c, which the control plane has not sent.
    ads.set(
        type_url::ROUTE,
        "greeter-routes",
        build::route_config("greeter-routes", &["greeter"], &[("greeter-a", 50), ("greeter-c", 50)]),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let waiting = drive(&channel, 300, 4, |_| {}).await;
    assert!(
        waiting.failures.is_empty(),
        "calls failed while a cluster was missing: {:?}",
        &waiting.failures[..waiting.failures.len().min(5)]
    );
    assert_eq!(waiting.share(&a), 1.0, "the old table keeps serving: {waiting:?}");

    // The cluster arrives: the new table takes over.
    ads.set(type_url::ENDPOINT, "greeter-c", build::endpoints("greeter-c", &c));
    ads.set(type_url::CLUSTER, "greeter-c", build::cluster_eds("greeter-c", "round_robin"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let run = drive(&channel, 200, 4, |_| {}).await;
        assert!(run.failures.is_empty(), "{:?}", run.failures);
        if (0.35..=0.65).contains(&run.share(&c)) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the split never reached greeter-c: {run:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_dns_cluster_resolves_its_host_name_and_serves_calls() {
    // LOGICAL_DNS: the client resolves the cluster's one host name (here `localhost`, from the hosts file
    // through the system resolver) and balances over the answers, re-resolving at their TTL.
    let ads = AdsServer::start().await.unwrap();
    let s = servers(1).await;
    ads.set(type_url::CLUSTER, "greeter-a", build::cluster_logical_dns("greeter-a", "localhost", s[0].addr.port()));
    ads.set(type_url::ROUTE, "greeter-routes", build::route_config("greeter-routes", &["greeter"], &[("greeter-a", 1)]));
    ads.set(type_url::LISTENER, "greeter", build::listener("greeter", "greeter-routes"));
    let run = drive(&xds_channel(&ads), 50, 4, |_| {}).await;
    assert!(run.failures.is_empty(), "{:?}", run.failures);
    assert_eq!(run.share(&[s[0].addr]), 1.0, "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_hash_policy_pins_each_header_value_to_one_ring_hash_endpoint() {
    // RING_HASH hashes what the route's hash_policy names (here the `x-user` header), as gRPC (A42) and Envoy do.
    use envoy_types::pb::envoy::config::route::v3::route_action::{HashPolicy, hash_policy};
    let ads = AdsServer::start().await.unwrap();
    let s = servers(3).await;
    let addrs: Vec<SocketAddr> = s.iter().map(|s| s.addr).collect();
    let by_user = HashPolicy {
        policy_specifier: Some(hash_policy::PolicySpecifier::Header(hash_policy::Header {
            header_name: "x-user".into(),
            ..Default::default()
        })),
        ..Default::default()
    };
    publish_hashed(&ads, &addrs, vec![by_user]);
    let channel = xds_channel(&ads);
    let mut owner: BTreeMap<String, SocketAddr> = BTreeMap::new();
    for round in 0..20 {
        for user in 0..30 {
            let user = format!("user-{user}");
            let served = call(&channel, &[("x-user", user.clone())]).await.unwrap();
            let first = *owner.entry(user.clone()).or_insert(served);
            assert_eq!(served, first, "{user} moved in round {round}");
        }
    }
    let used: std::collections::BTreeSet<SocketAddr> = owner.values().copied().collect();
    assert!(used.len() >= 2, "30 users all hashed to {used:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_timeout_fails_slow_calls_deadline_exceeded() {
    use envoy_types::pb::envoy::config::route::v3::route::Action;
    let ads = AdsServer::start().await.unwrap();
    let slow = EchoServer::start(Duration::from_secs(3)).await.unwrap();
    ads.set(type_url::CLUSTER, "greeter-a", build::cluster_eds("greeter-a", "round_robin"));
    ads.set(type_url::ENDPOINT, "greeter-a", build::endpoints("greeter-a", &[slow.addr]));
    let mut routes = build::route_config_proto("greeter-routes", &["greeter"], &[("greeter-a", 1)]);
    let Some(Action::Route(action)) = routes.virtual_hosts[0].routes[0].action.as_mut() else { panic!("a route action") };
    action.timeout = Some(envoy_types::pb::google::protobuf::Duration { seconds: 0, nanos: 200_000_000 });
    ads.set(type_url::ROUTE, "greeter-routes", build::pack(routes));
    ads.set(type_url::LISTENER, "greeter", build::listener("greeter", "greeter-routes"));
    let status = call(&xds_channel(&ads), &[]).await.expect_err("a 3 s call under a 200 ms route timeout");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("route timeout 200ms"), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_rebuilt_for_a_new_eds_name_keeps_serving_until_the_new_endpoints_arrive() {
    // A CDS change that needs a new balancer (here the EDS service name) keeps the old balancer serving
    // until the new one can: no call waits on an empty set meanwhile.
    let ads = AdsServer::start().await.unwrap();
    let s = servers(2).await;
    let (old, new) = ([s[0].addr], [s[1].addr]);
    let with_eds_name = |eds: &str| {
        let mut cluster = build::cluster_eds_proto("greeter-a", "round_robin");
        if let Some(config) = cluster.eds_cluster_config.as_mut() {
            eds.clone_into(&mut config.service_name);
        }
        build::pack(cluster)
    };
    ads.set(type_url::CLUSTER, "greeter-a", with_eds_name("a-v1"));
    ads.set(type_url::ENDPOINT, "a-v1", build::endpoints("a-v1", &old));
    ads.set(type_url::ROUTE, "greeter-routes", build::route_config("greeter-routes", &["greeter"], &[("greeter-a", 1)]));
    ads.set(type_url::LISTENER, "greeter", build::listener("greeter", "greeter-routes"));
    let channel = Channel::builder("xds:///greeter")
        .timeout(Duration::from_secs(10))
        .build_xds(XdsClient::new(Bootstrap::for_server(ads.addr().to_string(), "mesh-test"), XdsClientConfig::default()), "greeter")
        .unwrap();
    let first = drive(&channel, 100, 4, |_| {}).await;
    assert!(first.failures.is_empty() && first.share(&old) == 1.0, "{first:?}");

    ads.set(type_url::CLUSTER, "greeter-a", with_eds_name("a-v2"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Each call would otherwise wait up to its 10 s timeout: a short per-call limit makes waiting a failure.
    let meanwhile = tokio::time::timeout(Duration::from_secs(5), drive(&channel, 200, 4, |_| {})).await.expect("calls do not wait");
    assert!(meanwhile.failures.is_empty(), "{:?}", meanwhile.failures);
    assert_eq!(meanwhile.share(&old), 1.0, "the old balancer serves until a-v2 arrives: {meanwhile:?}");

    ads.set(type_url::ENDPOINT, "a-v2", build::endpoints("a-v2", &new));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let run = drive(&channel, 50, 4, |_| {}).await;
        assert!(run.failures.is_empty(), "{:?}", run.failures);
        if run.share(&new) == 1.0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never moved to a-v2: {run:?}");
    }
}

/// Publishes `greeter` → ring-hash cluster `greeter-a` over `addrs`, with the route's `hash_policy`.
fn publish_hashed(
    ads: &AdsServer,
    addrs: &[SocketAddr],
    policies: Vec<envoy_types::pb::envoy::config::route::v3::route_action::HashPolicy>,
) {
    use envoy_types::pb::envoy::config::route::v3::route::Action;
    ads.set(type_url::CLUSTER, "greeter-a", build::cluster_eds("greeter-a", "ring_hash"));
    ads.set(type_url::ENDPOINT, "greeter-a", build::endpoints("greeter-a", addrs));
    let mut routes = build::route_config_proto("greeter-routes", &["greeter"], &[("greeter-a", 1)]);
    if let Some(Action::Route(action)) = routes.virtual_hosts[0].routes[0].action.as_mut() {
        action.hash_policy = policies;
    }
    ads.set(type_url::ROUTE, "greeter-routes", build::pack(routes));
    ads.set(type_url::LISTENER, "greeter", build::listener("greeter", "greeter-routes"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminal_hash_policies_end_the_list_and_channel_id_pins_a_channel() {
    use envoy_types::pb::envoy::config::route::v3::route_action::{HashPolicy, hash_policy};
    let header = |name: &str, terminal: bool| HashPolicy {
        policy_specifier: Some(hash_policy::PolicySpecifier::Header(hash_policy::Header {
            header_name: name.into(),
            ..Default::default()
        })),
        terminal,
    };
    let s = servers(3).await;
    let addrs: Vec<SocketAddr> = s.iter().map(|s| s.addr).collect();

    // `x-user` is terminal: once it hashes, `x-request` is not folded in, so a user sticks to one endpoint
    // whatever its requests carry.
    let ads = AdsServer::start().await.unwrap();
    publish_hashed(&ads, &addrs, vec![header("x-user", true), header("x-request", false)]);
    let channel = xds_channel(&ads);
    for user in 0..10 {
        let mut served = std::collections::BTreeSet::new();
        for request in 0..20 {
            served.insert(call(&channel, &[("x-user", format!("u{user}")), ("x-request", format!("r{request}"))]).await.unwrap());
        }
        assert_eq!(served.len(), 1, "user u{user} spread over {served:?}");
    }

    // `io.grpc.channel_id`: every call of a channel goes to one endpoint; channels spread.
    let ads = AdsServer::start().await.unwrap();
    let channel_id = HashPolicy {
        policy_specifier: Some(hash_policy::PolicySpecifier::FilterState(hash_policy::FilterState { key: "io.grpc.channel_id".into() })),
        terminal: false,
    };
    publish_hashed(&ads, &addrs, vec![channel_id]);
    let mut used = std::collections::BTreeSet::new();
    for _ in 0..12 {
        let channel = xds_channel(&ads);
        let mut served = std::collections::BTreeSet::new();
        for _ in 0..10 {
            served.insert(call(&channel, &[]).await.unwrap());
        }
        assert_eq!(served.len(), 1, "one channel spread over {served:?}");
        used.extend(served);
    }
    assert!(used.len() >= 2, "12 channels all hashed to {used:?}");
}

/// Cluster `greeter` alone behind the listener, its endpoints as `assignment` says.
fn publish_one_cluster(ads: &AdsServer, assignment: envoy_types::pb::google::protobuf::Any) {
    ads.set(type_url::CLUSTER, "greeter-a", build::cluster_eds("greeter-a", "round_robin"));
    ads.set(type_url::ENDPOINT, "greeter-a", assignment);
    ads.set(type_url::ROUTE, "greeter-routes", build::route_config("greeter-routes", &["greeter"], &[("greeter-a", 1)]));
    ads.set(type_url::LISTENER, "greeter", build::listener("greeter", "greeter-routes"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eds_locality_weights_1_2_1_split_calls_1_2_1() {
    let ads = AdsServer::start().await.unwrap();
    let s = servers(4).await;
    // Zone a has two endpoints and weight 1, zone b one endpoint and weight 2: the localities' weights, not their
    // endpoint counts, set the shares (round robin over the four endpoints would give a half, a quarter, a quarter).
    let (a, b, c) = ([s[0].addr, s[1].addr], [s[2].addr], [s[3].addr]);
    publish_one_cluster(&ads, build::endpoints_by_locality("greeter-a", &[("a", 1, &a), ("b", 2, &b), ("c", 1, &c)], &[]));
    let channel = xds_channel(&ads);
    let run = drive(&channel, 3000, 4, |_| {}).await;
    assert!(run.failures.is_empty(), "{:?}", run.failures);
    for (zone, addrs, want) in [("a", &a[..], 0.25), ("b", &b[..], 0.5), ("c", &c[..], 0.25)] {
        let share = run.share(addrs);
        assert!((share - want).abs() <= 0.05, "zone {zone}: {share:.3} of 3000 calls, want {want} ± 0.05: {:?}", run.by_endpoint);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eds_drop_overloads_drop_their_share_with_unavailable_naming_the_category() {
    let ads = AdsServer::start().await.unwrap();
    let s = servers(1).await;
    publish_one_cluster(&ads, build::endpoints_by_locality("greeter-a", &[("a", 1, &[s[0].addr])], &[("throttle", 100_000)]));
    let channel = xds_channel(&ads);
    let run = drive(&channel, 3000, 4, |_| {}).await;
    let dropped = run.failures.len() as f64 / 3000.0;
    assert!((dropped - 0.10).abs() <= 0.02, "dropped {dropped:.3} of 3000 calls, want 0.10 ± 0.02");
    for failure in &run.failures {
        assert!(failure.starts_with("Unavailable: ") && failure.contains("drop category \"throttle\""), "{failure}");
    }
}
