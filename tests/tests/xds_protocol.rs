//! xds-client protocol behaviour against the scripted ADS server (real gRPC
//! on 127.0.0.1).

use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::cluster::LbPolicy as PbLbPolicy;
use envoy_types::pb::google::protobuf::Any;
use mesh_tests::ads::{AdsServer, build, type_url};
use mesh_tests::certs::TestPki;
use tonic::transport::ServerTlsConfig;
use xds_client::bootstrap::{ChannelCreds, XdsServer};
use xds_client::resource::{ClusterResource, EndpointsResource, ListenerResource, RouteSource};
use xds_client::{Bootstrap, ResourceStatus, Watch, XdsClient, XdsClientConfig, XdsResource};

const WAIT: Duration = Duration::from_secs(10);

fn server(uri: String, features: &[&str]) -> XdsServer {
    XdsServer { server_uri: uri, channel_creds: ChannelCreds::Insecure, server_features: features.iter().map(|f| f.to_string()).collect() }
}

fn client_for(servers: Vec<XdsServer>, config: XdsClientConfig) -> XdsClient {
    let mut bootstrap = Bootstrap::for_server("unused", "test-node");
    bootstrap.servers = servers;
    XdsClient::new(bootstrap, config)
}

fn quick() -> XdsClientConfig {
    XdsClientConfig {
        backoff_base: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
        primary_retry: Duration::from_millis(300),
        connect_timeout: Duration::from_secs(1),
        ..XdsClientConfig::default()
    }
}

/// Waits until the watch's state satisfies `f`.
async fn until<T: XdsResource>(w: &mut Watch<T>, what: &str, f: impl Fn(&xds_client::WatchState) -> bool) -> xds_client::WatchState {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let state = w.state();
        if f(&state) {
            return state;
        }
        if tokio::time::timeout_at(deadline, w.changed()).await.is_err() {
            panic!("timed out waiting for {what} on {}; last state {state:?}", w.name());
        }
    }
}

fn rds_name(w: &Watch<ListenerResource>) -> String {
    match &w.value().expect("listener value").route {
        RouteSource::Rds(name) => name.clone(),
        RouteSource::Inline(_) => panic!("expected RDS"),
    }
}

fn garbage() -> Any {
    Any { type_url: type_url::LISTENER.into(), value: vec![0xff, 0xff, 0xff] }
}

#[tokio::test]
async fn sotw_acks_with_version_and_nonce_and_nacks_keeping_the_last_good_value() {
    let ads = AdsServer::start().await.unwrap();
    ads.set(type_url::LISTENER, "greeter", build::listener("greeter", "routes-v1"));
    let client = client_for(vec![server(ads.uri(), &["xds_v3"])], quick());
    let mut lds: Watch<ListenerResource> = client.watch("greeter");
    until(&mut lds, "ACKED", |s| s.status == ResourceStatus::Acked).await;
    assert_eq!(rds_name(&lds), "routes-v1");

    // The ACK names the version and the nonce of the response it answers.
    let ack = ads.wait_for_ack(type_url::LISTENER, "1", WAIT).await.unwrap();
    let sent = ads.sent().into_iter().find(|s| s.type_url == type_url::LISTENER && s.version == "1").unwrap();
    assert_eq!(ack.response_nonce, sent.nonce);
    assert_eq!(ack.resource_names, vec!["greeter".to_owned()]);

    // A bad listener that still has a readable name: the NACK keeps the last
    // accepted version, names the resource and why; the value stays (A88).
    let mut bad = build::listener_proto("greeter", "routes-v2");
    bad.api_listener = None;
    ads.set(type_url::LISTENER, "greeter", build::pack(bad));
    let nack = ads.wait_for_nack(type_url::LISTENER, WAIT).await.unwrap();
    let sent2 = ads.sent().into_iter().find(|s| s.type_url == type_url::LISTENER && s.version == "2").unwrap();
    assert_eq!(nack.version_info, "1", "a NACK carries the last accepted version");
    assert_eq!(nack.response_nonce, sent2.nonce);
    let detail = nack.error_detail.unwrap();
    assert!(detail.contains("greeter") && detail.contains("api_listener"), "{detail}");
    let state = until(&mut lds, "NACKED", |s| s.status == ResourceStatus::Nacked).await;
    assert!(state.error.unwrap().contains("api_listener"));
    assert_eq!(rds_name(&lds), "routes-v1", "the last good value keeps serving");

    // Bytes that do not even decode are rejected without a name.
    ads.set(type_url::LISTENER, "greeter", garbage());
    ads.wait_for(|r| r.iter().filter(|r| r.is_nack()).count() >= 2, WAIT).await.unwrap();
    assert_eq!(rds_name(&lds), "routes-v1");

    // A good version is ACKed again.
    let v = ads.set(type_url::LISTENER, "greeter", build::listener("greeter", "routes-v4"));
    ads.wait_for_ack(type_url::LISTENER, &v, WAIT).await.unwrap();
    until(&mut lds, "new value", |s| s.status == ResourceStatus::Acked && s.version == v).await;
    assert_eq!(rds_name(&lds), "routes-v4");
}

#[tokio::test]
async fn partial_nack_keeps_the_valid_resources_of_the_same_response() {
    let ads = AdsServer::start().await.unwrap();
    let mut bad = build::cluster_eds_proto("bad", "round_robin");
    bad.lb_policy = PbLbPolicy::Maglev as i32;
    ads.set_many(type_url::CLUSTER, [("good", build::cluster_eds("good", "round_robin")), ("bad", build::pack(bad))]);
    // A short does-not-exist timer: a resource NACKed on arrival exists, so the timer must not turn it into
    // DOES_NOT_EXIST (checked at the end).
    let config = XdsClientConfig { does_not_exist_timeout: Duration::from_millis(300), ..quick() };
    let client = client_for(vec![server(ads.uri(), &[])], config);
    let mut good: Watch<ClusterResource> = client.watch("good");
    let mut bad: Watch<ClusterResource> = client.watch("bad");
    until(&mut good, "good ACKED", |s| s.status == ResourceStatus::Acked).await;
    let state = until(&mut bad, "bad NACKED", |s| s.status == ResourceStatus::Nacked).await;
    assert!(state.value.is_none());
    let nack = ads.wait_for_nack(type_url::CLUSTER, WAIT).await.unwrap();
    let detail = nack.error_detail.unwrap();
    assert!(detail.contains("bad") && !detail.contains("good:"), "{detail}");
    assert_eq!(good.value().unwrap().eds_service_name(), Some("good"));
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(bad.state().status, ResourceStatus::Nacked, "the timer was cancelled when the resource arrived");
}

#[tokio::test]
async fn sotw_deletes_missing_cds_but_not_eds_and_keeps_cached_values_by_default() {
    let ads = AdsServer::start().await.unwrap();
    ads.set(type_url::CLUSTER, "c1", build::cluster_eds("c1", "round_robin"));
    ads.set(type_url::CLUSTER, "c2", build::cluster_eds("c2", "round_robin"));
    ads.set(type_url::ENDPOINT, "c1", build::endpoints("c1", &["127.0.0.1:1001".parse().unwrap()]));
    ads.set(type_url::ENDPOINT, "c2", build::endpoints("c2", &["127.0.0.1:1002".parse().unwrap()]));
    for (fail_on_data_errors, expect) in [(false, ResourceStatus::Deleted), (true, ResourceStatus::DoesNotExist)] {
        let client = client_for(vec![server(ads.uri(), &[])], XdsClientConfig { fail_on_data_errors, ..quick() });
        let mut c1: Watch<ClusterResource> = client.watch("c1");
        let mut c2: Watch<ClusterResource> = client.watch("c2");
        let mut e1: Watch<EndpointsResource> = client.watch("c1");
        let mut e2: Watch<EndpointsResource> = client.watch("c2");
        for w in [&mut c1, &mut c2] {
            until(w, "ACKED", |s| s.status == ResourceStatus::Acked).await;
        }
        for w in [&mut e1, &mut e2] {
            until(w, "ACKED", |s| s.status == ResourceStatus::Acked).await;
        }
        ads.remove(type_url::CLUSTER, "c2");
        ads.remove(type_url::ENDPOINT, "c2");
        let state = until(&mut c2, "deletion", |s| s.status == expect).await;
        assert_eq!(state.value.is_some(), !fail_on_data_errors, "cached value kept unless fail_on_data_errors");
        assert_eq!(c1.state().status, ResourceStatus::Acked);
        // An EDS resource missing from a SotW response is not deleted.
        ads.set(type_url::ENDPOINT, "c1", build::endpoints("c1", &["127.0.0.1:1003".parse().unwrap()]));
        until(&mut e1, "EDS update", |s| s.value.is_some() && s.version == ads.version(type_url::ENDPOINT)).await;
        assert_eq!(e2.state().status, ResourceStatus::Acked, "EDS absence is not deletion in SotW");
        assert!(e2.value().is_some());
        // Restore for the next round.
        ads.set(type_url::CLUSTER, "c2", build::cluster_eds("c2", "round_robin"));
        ads.set(type_url::ENDPOINT, "c2", build::endpoints("c2", &["127.0.0.1:1002".parse().unwrap()]));
    }
}

#[tokio::test]
async fn sotw_absence_of_a_cds_resource_never_received_waits_for_the_does_not_exist_timer() {
    // A SotW response without a resource that never had a value may answer a request sent before it was
    // subscribed, so it is not a deletion: the resource stays requested until its timer fires (gRPC's rule).
    let ads = AdsServer::start().await.unwrap();
    ads.set(type_url::CLUSTER, "c1", build::cluster_eds("c1", "round_robin"));
    let config = XdsClientConfig { does_not_exist_timeout: Duration::from_secs(5), ..quick() };
    let client = client_for(vec![server(ads.uri(), &[])], config);
    let mut c1: Watch<ClusterResource> = client.watch("c1");
    let mut later: Watch<ClusterResource> = client.watch("later");
    until(&mut c1, "ACKED", |s| s.status == ResourceStatus::Acked).await;
    // The server has the ACK of a response to a request naming both.
    ads.wait_for(|r| r.iter().any(|r| r.type_url == type_url::CLUSTER && r.is_ack() && r.resource_names.len() == 2), WAIT).await.unwrap();
    assert_eq!(later.state().status, ResourceStatus::Requested, "absence from the response is not does-not-exist");
    until(&mut later, "DOES_NOT_EXIST from the timer", |s| s.status == ResourceStatus::DoesNotExist).await;
    // It still arrives when the server gets it.
    ads.set(type_url::CLUSTER, "later", build::cluster_eds("later", "round_robin"));
    until(&mut later, "ACKED", |s| s.status == ResourceStatus::Acked).await;
}

#[tokio::test]
async fn delta_subscribes_updates_and_removes() {
    let ads = AdsServer::start().await.unwrap();
    ads.set(type_url::CLUSTER, "c1", build::cluster_eds("c1", "least_request"));
    let client = client_for(vec![server(ads.uri(), &["delta_ads"])], quick());
    let mut c1: Watch<ClusterResource> = client.watch("c1");
    until(&mut c1, "ACKED", |s| s.status == ResourceStatus::Acked).await;
    assert_eq!(c1.value().unwrap().cluster.lb.name(), "least_request");
    let requests = ads.wait_for(|r| r.iter().any(|r| r.delta && r.is_ack()), WAIT).await.unwrap();
    assert!(requests.iter().all(|r| r.delta), "delta stream only");
    assert!(requests.iter().any(|r| r.resource_names == vec!["c1".to_owned()]), "subscribed by name");

    ads.set(type_url::CLUSTER, "c1", build::cluster_eds("c1", "ring_hash"));
    until(&mut c1, "update", |s| c1_lb(s) == "ring_hash").await;

    ads.remove(type_url::CLUSTER, "c1");
    until(&mut c1, "removed", |s| s.status == ResourceStatus::Deleted).await;
    assert!(ads.sent().iter().any(|s| s.removed == vec!["c1".to_owned()]));

    // Unsubscribe when the last watch goes.
    drop(c1);
    ads.wait_for(|r| r.iter().any(|r| r.unsubscribe == vec!["c1".to_owned()]), WAIT).await.unwrap();
}

fn c1_lb(state: &xds_client::WatchState) -> &'static str {
    match state.value.as_deref() {
        Some(xds_client::resource::Resource::Cluster(c)) => c.cluster.lb.name(),
        _ => "",
    }
}

#[tokio::test]
async fn does_not_exist_timer_fires_only_while_connected() {
    let ads = AdsServer::start().await.unwrap();
    let config = XdsClientConfig { does_not_exist_timeout: Duration::from_millis(300), ..quick() };
    let client = client_for(vec![server(ads.uri(), &[])], config.clone());
    let mut missing: Watch<EndpointsResource> = client.watch("nobody");
    let state = until(&mut missing, "DOES_NOT_EXIST", |s| s.status == ResourceStatus::DoesNotExist).await;
    assert!(state.value.is_none());

    // Nothing listens here: the stream never opens, so the timer never starts.
    let port = mesh_tests::peers::free_port().unwrap();
    let offline = client_for(vec![server(format!("127.0.0.1:{port}"), &[])], config);
    let mut w: Watch<EndpointsResource> = offline.watch("nobody");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(w.state().status, ResourceStatus::Requested, "no does-not-exist while the stream is down");
}

#[tokio::test]
async fn reconnects_and_resubscribes_keeping_the_cache_meanwhile() {
    let mut ads = AdsServer::start().await.unwrap();
    ads.set(type_url::LISTENER, "greeter", build::listener("greeter", "routes-v1"));
    ads.set(type_url::CLUSTER, "c1", build::cluster_eds("c1", "round_robin"));
    let client = client_for(vec![server(ads.uri(), &[])], quick());
    let mut lds: Watch<ListenerResource> = client.watch("greeter");
    let mut cds: Watch<ClusterResource> = client.watch("c1");
    until(&mut lds, "ACKED", |s| s.status == ResourceStatus::Acked).await;
    until(&mut cds, "ACKED", |s| s.status == ResourceStatus::Acked).await;
    let first_stream = ads.requests().last().unwrap().stream_id;

    ads.stop().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rds_name(&lds), "routes-v1", "the cache serves while the server is down");
    assert!(client.connected_server().is_none());

    ads.restart().await.unwrap();
    let requests = ads
        .wait_for(
            |r| {
                let on_new = |t: &str| r.iter().any(|r| r.stream_id > first_stream && r.type_url == t && !r.resource_names.is_empty());
                on_new(type_url::LISTENER) && on_new(type_url::CLUSTER)
            },
            WAIT,
        )
        .await
        .unwrap();
    let resubscribe = requests.iter().find(|r| r.stream_id > first_stream && r.type_url == type_url::LISTENER).unwrap();
    assert_eq!(resubscribe.resource_names, vec!["greeter".to_owned()]);
    assert_eq!(resubscribe.version_info, "1", "resubscription tells the server what we hold");
    assert_eq!(resubscribe.node_id.as_deref(), Some("test-node"), "the first request of a stream carries the node");
}

#[tokio::test]
async fn fallback_server_is_used_only_while_the_primary_is_down() {
    let mut primary = AdsServer::start().await.unwrap();
    let fallback = AdsServer::start().await.unwrap();
    primary.set(type_url::LISTENER, "greeter", build::listener("greeter", "from-primary"));
    fallback.set(type_url::LISTENER, "greeter", build::listener("greeter", "from-fallback"));
    let (primary_uri, fallback_uri) = (primary.uri(), fallback.uri());
    let servers = || vec![server(primary_uri.clone(), &[]), server(fallback_uri.clone(), &[])];

    // Primary up: the fallback is never contacted.
    let client = client_for(servers(), quick());
    let mut lds: Watch<ListenerResource> = client.watch("greeter");
    until(&mut lds, "ACKED", |s| s.status == ResourceStatus::Acked).await;
    assert_eq!(rds_name(&lds), "from-primary");
    drop((lds, client));

    // Primary down: the fallback serves; when the primary returns, the client goes back.
    primary.stop().await;
    let client = client_for(servers(), quick());
    let mut lds: Watch<ListenerResource> = client.watch("greeter");
    until(&mut lds, "fallback value", |s| s.status == ResourceStatus::Acked).await;
    assert_eq!(rds_name(&lds), "from-fallback");
    assert_eq!(client.connected_server(), Some(fallback.uri()));
    primary.restart().await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while client.connected_server() != Some(primary_uri.clone()) || rds_name(&lds) != "from-primary" {
        assert!(tokio::time::Instant::now() < deadline, "client never returned to the primary");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fallback.wait_for(|_| fallback.connections() == 0, WAIT).await.unwrap();
    assert!(fallback.requests().iter().all(|r| r.stream_id == 1), "one fallback stream, only while the primary was down");
}

#[tokio::test]
async fn ignore_resource_deletion_keeps_values_even_when_failing_on_data_errors() {
    let ads = AdsServer::start().await.unwrap();
    ads.set(type_url::CLUSTER, "c1", build::cluster_eds("c1", "round_robin"));
    let config = XdsClientConfig { fail_on_data_errors: true, ..quick() };
    let client = client_for(vec![server(ads.uri(), &["ignore_resource_deletion"])], config);
    let mut c1: Watch<ClusterResource> = client.watch("c1");
    until(&mut c1, "ACKED", |s| s.status == ResourceStatus::Acked).await;
    ads.remove(type_url::CLUSTER, "c1");
    let state = until(&mut c1, "deleted", |s| s.status == ResourceStatus::Deleted).await;
    assert!(state.value.is_some(), "A53: the server asked us to ignore deletions");
}

#[tokio::test]
async fn tls_channel_creds_verify_the_server_and_present_the_client_certificate() {
    // The bootstrap's `tls` channel credentials (A65 files): the client verifies the control plane against
    // the CA file and presents its certificate, so a server requiring mutual TLS serves it. A client trusting
    // another CA, one without a certificate, and a plaintext one get nothing.
    let pki = TestPki::new().unwrap();
    let tls = ServerTlsConfig::new().identity(pki.server_identity().unwrap()).client_ca_root(pki.ca_certificate().unwrap());
    let ads = AdsServer::start_tls(tls).await.unwrap();
    ads.set(type_url::CLUSTER, "c1", build::cluster_eds("c1", "round_robin"));
    let file = |p: &std::path::Path| Some(p.to_string_lossy().into_owned());
    let creds = |ca: &std::path::Path, with_cert: bool| ChannelCreds::Tls {
        ca_certificate_file: file(ca),
        certificate_file: with_cert.then(|| file(&pki.client.0)).flatten(),
        private_key_file: with_cert.then(|| file(&pki.client.1)).flatten(),
    };
    let client = |channel_creds: ChannelCreds| {
        // A bare address: the scheme follows the credentials.
        let server = XdsServer { server_uri: ads.addr().to_string(), channel_creds, server_features: vec![] };
        client_for(vec![server], quick())
    };
    let rejected = [client(creds(&pki.other_ca, true)), client(creds(&pki.ca, false)), client(ChannelCreds::Insecure)];
    let mut rejected: Vec<Watch<ClusterResource>> = rejected.iter().map(|c| c.watch("c1")).collect();
    let trusted = client(creds(&pki.ca, true));
    let mut c1: Watch<ClusterResource> = trusted.watch("c1");
    until(&mut c1, "ACKED over mutual TLS", |s| s.status == ResourceStatus::Acked).await;
    // The others have been retrying (backoff ≤ 200 ms) all along; give them a few more tries.
    tokio::time::sleep(Duration::from_millis(600)).await;
    for (w, case) in rejected.iter_mut().zip(["server certificate from another CA", "no client certificate", "plaintext"]) {
        assert_eq!(w.state().status, ResourceStatus::Requested, "{case}: must not get config");
    }
}

#[tokio::test]
async fn unix_socket_server_uri_as_istio_agent_bootstraps_name_it() {
    // Istio's agent serves proxyless gRPC on a Unix socket and writes `unix:///etc/istio/proxy/XDS` as the
    // server URI; both `unix:///abs` and `unix:path` forms connect.
    let dir = mesh_tests::peers::TempDir::new("uds").unwrap();
    let path = dir.0.join("XDS");
    let ads = AdsServer::start_unix(&path, None).await.unwrap();
    ads.set(type_url::CLUSTER, "c1", build::cluster_eds("c1", "least_request"));
    for uri in [format!("unix://{}", path.display()), format!("unix:{}", path.display())] {
        let client = client_for(vec![server(uri.clone(), &[])], quick());
        let mut c1: Watch<ClusterResource> = client.watch("c1");
        let state = until(&mut c1, &format!("ACKED over {uri}"), |s| s.status == ResourceStatus::Acked).await;
        assert!(state.value.is_some());
    }
}

#[tokio::test]
async fn tls_channel_creds_are_never_downgraded_to_plaintext() {
    // TLS credentials over a Unix socket speak TLS (the server below speaks nothing else), and TLS
    // credentials with an explicit http:// URI are refused rather than sent in plaintext.
    let pki = TestPki::new().unwrap();
    let dir = mesh_tests::peers::TempDir::new("uds-tls").unwrap();
    let path = dir.0.join("XDS");
    let tls = ServerTlsConfig::new().identity(pki.server_identity().unwrap());
    let ads = AdsServer::start_unix(&path, Some(tls)).await.unwrap();
    ads.set(type_url::CLUSTER, "c1", build::cluster_eds("c1", "round_robin"));
    let creds = ChannelCreds::Tls {
        ca_certificate_file: Some(pki.ca.to_string_lossy().into_owned()),
        certificate_file: None,
        private_key_file: None,
    };
    let over_unix = XdsServer { server_uri: format!("unix://{}", path.display()), channel_creds: creds.clone(), server_features: vec![] };
    let client = client_for(vec![over_unix], quick());
    let mut c1: Watch<ClusterResource> = client.watch("c1");
    until(&mut c1, "ACKED over TLS on a Unix socket", |s| s.status == ResourceStatus::Acked).await;

    let plain = AdsServer::start().await.unwrap();
    plain.set(type_url::CLUSTER, "c1", build::cluster_eds("c1", "round_robin"));
    let downgraded = client_for(vec![XdsServer { server_uri: plain.uri(), channel_creds: creds, server_features: vec![] }], quick());
    let mut w: Watch<ClusterResource> = downgraded.watch("c1");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(w.state().status, ResourceStatus::Requested, "TLS creds with http:// must not connect in plaintext");
    assert!(plain.requests().is_empty(), "nothing reached the plaintext server");
}
