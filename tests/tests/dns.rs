//! DNS discovery against a real dnsmasq started by the test.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use mesh_tests::echo::{EchoServer, METHOD};
use mesh_tests::peers::{Dnsmasq, free_port};
use mesh_tonic::codec::BytesCodec;
use mesh_tonic::{Channel, ServedBy};
use mesh_tower::discover::dns::DnsConfig;
use tonic::codegen::http::uri::PathAndQuery;

async fn call(channel: &Channel) -> Result<SocketAddr, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await?;
    let response = grpc.unary(tonic::Request::new(Bytes::new()), PathAndQuery::from_static(METHOD), BytesCodec).await?;
    Ok(response.extensions().get::<ServedBy>().expect("ServedBy").0)
}

fn quick_dns() -> DnsConfig {
    DnsConfig { min_refresh: Duration::from_millis(500), ..DnsConfig::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_records_are_followed_and_a_changed_record_is_picked_up_within_its_ttl() {
    // Three servers on the same port of three loopback addresses.
    let port = free_port().unwrap();
    let mut servers = Vec::new();
    for ip in ["127.0.0.1", "127.0.0.2", "127.0.0.3"] {
        servers.push(EchoServer::start_on(format!("{ip}:{port}").parse().unwrap(), Duration::ZERO).await.unwrap());
    }
    let addr = |i: usize| servers[i].addr;
    let dns = Dnsmasq::start(&[("127.0.0.1", "greeter.test"), ("127.0.0.2", "greeter.test")], &[]).unwrap();
    let target = format!("dns://{}/greeter.test:{port}", dns.addr);
    let channel = Channel::builder(&target).dns_config(quick_dns()).timeout(Duration::from_secs(5)).build().unwrap();

    let mut seen = BTreeSet::new();
    for _ in 0..200 {
        seen.insert(call(&channel).await.unwrap());
    }
    assert_eq!(seen, BTreeSet::from([addr(0), addr(1)]));

    // Change one record (TTL 1 s): .1 goes, .3 comes. Calls keep succeeding.
    dns.set_hosts(&[("127.0.0.3", "greeter.test"), ("127.0.0.2", "greeter.test")]).unwrap();
    let changed_at = tokio::time::Instant::now();
    let mut switched = None;
    while changed_at.elapsed() < Duration::from_secs(10) {
        let recent: BTreeSet<_> = {
            let mut s = BTreeSet::new();
            for _ in 0..50 {
                s.insert(call(&channel).await.expect("no call may fail while DNS changes"));
            }
            s
        };
        if recent == BTreeSet::from([addr(1), addr(2)]) {
            switched = Some(changed_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let switched = switched.expect("the changed record was never picked up");
    // TTL 1 s, plus one refresh interval and connection setup.
    assert!(switched < Duration::from_secs(4), "took {switched:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_records_give_ports_and_targets() {
    let a = EchoServer::start(Duration::ZERO).await.unwrap();
    let b = EchoServer::start(Duration::ZERO).await.unwrap();
    let srv_a = format!("_grpc._tcp.greeter.test,a.greeter.test,{},0,10", a.addr.port());
    let srv_b = format!("_grpc._tcp.greeter.test,b.greeter.test,{},0,10", b.addr.port());
    let dns = Dnsmasq::start(&[("127.0.0.1", "a.greeter.test"), ("127.0.0.1", "b.greeter.test")], &[&srv_a, &srv_b]).unwrap();
    let channel = Channel::builder(format!("dns://{}/_grpc._tcp.greeter.test", dns.addr))
        .dns_config(quick_dns())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut seen = BTreeSet::new();
    for _ in 0..100 {
        seen.insert(call(&channel).await.unwrap());
    }
    assert_eq!(seen, BTreeSet::from([a.addr, b.addr]));
    let endpoints = channel.endpoints();
    assert!(endpoints.iter().all(|e| e.endpoint.weight == 10), "SRV weight carried: {endpoints:?}");
}
