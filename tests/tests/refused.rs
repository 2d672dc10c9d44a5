//! Transparent retry (gRPC A6): a request the server turned away unprocessed goes again at once, on another
//! endpoint where there is one; a request that reached the server is never sent twice. The refusing server is
//! scripted ([`ScriptedServer`]) so each failure mode happens every time, not by chance.

use std::time::Duration;

use mesh_tests::echo::EchoServer;
use mesh_tests::h2script::{Act, ScriptedServer};
use mesh_tests::load;
use mesh_tonic::Channel;

fn balanced(addrs: &[std::net::SocketAddr]) -> Channel {
    let target = format!("static:///{}", addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(","));
    Channel::builder(target).lb("round_robin".parse().unwrap()).timeout(Duration::from_secs(5)).build().unwrap()
}

/// `n` calls one after another; every one must succeed. Returns how many each server answered.
async fn calls(channel: &Channel, n: u64) -> std::collections::BTreeMap<std::net::SocketAddr, u64> {
    let run = load::drive(channel, n, 1, |_| {}).await;
    assert!(run.failures.is_empty(), "{:?}", run.failures);
    run.by_endpoint
}

#[tokio::test]
async fn refused_streams_are_resent_to_another_endpoint_and_processed_once() {
    let refuser = ScriptedServer::start(|_| Act::Refuse).await.unwrap();
    let echo = EchoServer::start(Duration::ZERO).await.unwrap();
    let channel = balanced(&[refuser.addr, echo.addr]);
    let served = calls(&channel, 20).await;
    assert_eq!(served.get(&echo.addr), Some(&20), "{served:?}");
    assert_eq!(echo.calls(), 20, "each call reached the answering server once");
    assert!(refuser.requests() >= 5, "round robin sends about half the first attempts to the refuser: {}", refuser.requests());
    assert_eq!(refuser.answered(), 0);
}

#[tokio::test]
async fn a_goaway_mid_run_resends_the_streams_above_its_last_id_and_nothing_else() {
    // Answers two requests per connection, then sends GOAWAY naming the second as the last processed: the
    // third (already sent) is refused and must go again; the first two must not.
    let goaway = ScriptedServer::start(|n| if n % 3 == 2 { Act::GoAway } else { Act::Answer }).await.unwrap();
    let echo = EchoServer::start(Duration::ZERO).await.unwrap();
    let channel = balanced(&[goaway.addr, echo.addr]);
    let served = calls(&channel, 40).await;
    let total: u64 = served.values().sum();
    assert_eq!(total, 40);
    let refused = goaway.requests() - goaway.answered();
    assert!(refused >= 1 && goaway.answered() >= 2, "answered {} and refused {refused} by GOAWAY", goaway.answered());
    assert_eq!(served.get(&goaway.addr).copied().unwrap_or(0), goaway.answered(), "{served:?}");
    assert_eq!(echo.calls() + goaway.answered(), 40, "no request was processed twice");
}

#[tokio::test]
async fn a_connection_going_away_before_the_write_sends_the_request_elsewhere() {
    // GOAWAY with last stream id 0 on the first request of every connection: no request is ever processed there.
    let closing = ScriptedServer::start(|_| Act::GoAway).await.unwrap();
    let echo = EchoServer::start(Duration::ZERO).await.unwrap();
    let channel = balanced(&[closing.addr, echo.addr]);
    let served = calls(&channel, 20).await;
    assert_eq!(served.get(&echo.addr), Some(&20), "{served:?}");
    assert_eq!(echo.calls(), 20);
    assert!(closing.requests() >= 1);
}

#[tokio::test]
async fn a_request_reset_after_it_reached_the_server_is_not_resent() {
    let resetter = ScriptedServer::start(|_| Act::Reset).await.unwrap();
    let channel = balanced(&[resetter.addr]);
    let failed = load::call(&channel, &[]).await.expect_err("a reset request fails");
    assert_eq!(resetter.requests(), 1, "sent once: {failed:?}");
    // The same for a server that answers nothing: no resend goes to another endpoint either.
    let echo = EchoServer::start(Duration::ZERO).await.unwrap();
    let resetter = ScriptedServer::start(|_| Act::Reset).await.unwrap();
    let channel = balanced(&[resetter.addr, echo.addr]);
    let run = load::drive(&channel, 10, 1, |_| {}).await;
    assert_eq!(run.failures.len() as u64, resetter.requests(), "every request the resetter read failed: {:?}", run.failures);
    assert_eq!(echo.calls() + resetter.requests(), 10, "and none was sent again");
}
