//! The embedded default: starts three greeter servers on 127.0.0.1, sends
//! 300 calls through the mesh channel (round robin) and prints how they spread.

use std::collections::BTreeMap;
use std::time::Duration;

use greeter_example::{GreeterClient, GreeterServer, HelloRequest};
use mesh_tonic::{Channel, ServedBy};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut addrs = Vec::new();
    for _ in 0..3 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        addrs.push(addr.to_string());
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tokio::spawn(tonic::transport::Server::builder().add_service(GreeterServer::new(addr.to_string())).serve_with_incoming(incoming));
    }
    let target = format!("static:///{}", addrs.join(","));
    println!("greeter servers: {}", addrs.join(", "));
    println!("mesh channel target: {target} (lb round_robin)");

    let channel = Channel::builder(&target).lb("round_robin".parse()?).timeout(Duration::from_secs(5)).build()?;
    let mut client = GreeterClient::new(channel);
    let mut by_endpoint = BTreeMap::new();
    for i in 0..300 {
        let response = client.say_hello(HelloRequest { name: format!("demo-{i}") }).await?;
        let served_by = response.extensions().get::<ServedBy>().map(|s| s.0.to_string()).unwrap_or_default();
        if i < 3 {
            println!("{}", response.into_inner().message);
        }
        *by_endpoint.entry(served_by).or_insert(0u32) += 1;
    }
    println!("\n{:<24} calls", "endpoint");
    for (endpoint, calls) in by_endpoint {
        println!("{endpoint:<24} {calls}");
    }
    Ok(())
}
