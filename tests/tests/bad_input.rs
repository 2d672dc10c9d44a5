//! Bad input gets a typed error and never a hang.

use std::time::Duration;

use bytes::Bytes;
use mesh_tests::echo::METHOD;
use mesh_tonic::codec::BytesCodec;
use mesh_tonic::{Channel, Error};
use mesh_tower::discover;
use tonic::Code;
use tonic::codegen::http::uri::PathAndQuery;

async fn call(channel: &Channel) -> Result<Bytes, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    let response = tokio::time::timeout(Duration::from_secs(20), async {
        grpc.ready().await?;
        grpc.unary(tonic::Request::new(Bytes::new()), PathAndQuery::from_static(METHOD), BytesCodec).await
    })
    .await
    .expect("a call must never hang");
    response.map(tonic::Response::into_inner)
}

#[tokio::test]
async fn unparseable_target_is_a_typed_error_naming_the_target() {
    for target in ["greeter:50051", "static:///not-an-address", "dns:///no-port", "gopher:///x"] {
        let err = Channel::from_target(target).unwrap_err();
        assert!(matches!(err, Error::InvalidTarget { target: ref t, .. } if t == target), "{target}: {err:?}");
        assert!(err.to_string().contains(target), "{err}");
    }
}

#[tokio::test]
async fn no_endpoints_waits_for_the_configured_time_then_fails_unavailable() {
    let (_tx, source) = discover::channel();
    let channel = Channel::builder("empty").ready_timeout(Duration::from_millis(300)).build_with("empty", source).unwrap();
    let started = tokio::time::Instant::now();
    let status = call(&channel).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("no ready endpoint for empty"), "{status:?}");
    assert!(started.elapsed() >= Duration::from_millis(300), "it must wait for endpoints before failing");
}

#[tokio::test]
async fn call_timeout_bounds_the_wait_for_endpoints() {
    let (_tx, source) = discover::channel();
    let channel = Channel::builder("empty").timeout(Duration::from_millis(200)).build_with("empty", source).unwrap();
    let status = call(&channel).await.unwrap_err();
    assert!(matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded), "{status:?}");
}

#[tokio::test]
async fn all_endpoints_refusing_fails_unavailable_naming_the_target() {
    // Two ports that were just free: nothing listens there.
    let ports = [mesh_tests::peers::free_port().unwrap(), mesh_tests::peers::free_port().unwrap()];
    let target = format!("static:///127.0.0.1:{},127.0.0.1:{}", ports[0], ports[1]);
    // A long wait: the failure must come from the refused connects, not the wait.
    let channel = Channel::builder(&target).ready_timeout(Duration::from_secs(60)).build().unwrap();
    let status = call(&channel).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains(&target), "{status:?}");
    assert!(status.message().contains("failed to connect"), "{status:?}");
}
