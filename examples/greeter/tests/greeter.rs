//! The example's client, through the mesh channel, against three real
//! greeter servers on loopback.

use std::collections::HashMap;
use std::time::Duration;

use greeter_example::{GreeterClient, GreeterServer, HelloRequest};
use mesh_tonic::{Channel, ServedBy};

#[tokio::test]
async fn client_reaches_all_three_servers() -> anyhow::Result<()> {
    let mut addrs = Vec::new();
    for _ in 0..3 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        addrs.push(addr);
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tokio::spawn(tonic::transport::Server::builder().add_service(GreeterServer::new(addr.to_string())).serve_with_incoming(incoming));
    }
    let target = format!("static:///{}", addrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(","));
    let channel = Channel::builder(target).lb(mesh_core::LbPolicy::RoundRobin).timeout(Duration::from_secs(5)).build()?;
    let mut client = GreeterClient::new(channel);

    let mut served = HashMap::new();
    for i in 0..30 {
        let response = client.say_hello(HelloRequest { name: format!("n{i}") }).await?;
        let by = response.extensions().get::<ServedBy>().expect("ServedBy extension").0;
        let message = response.into_inner().message;
        assert_eq!(message, format!("Hello n{i} from {by}"));
        *served.entry(by).or_insert(0) += 1;
    }
    assert_eq!(served.len(), 3, "{served:?}");
    // Round robin over three ready servers. The first calls may see fewer
    // ready endpoints, so allow a little slack.
    assert!(served.values().all(|&n| (8..=12).contains(&n)), "{served:?}");
    Ok(())
}
