//! Calls `SayHello` through the mesh channel and prints which server answered.
//!
//! `greeter-client [TARGET] [CALLS]`, e.g.
//! `greeter-client static:///127.0.0.1:50051,127.0.0.1:50052,127.0.0.1:50053 9`.

use std::time::Duration;

use greeter_example::{GreeterClient, HelloRequest};
use mesh_tonic::{Channel, ServedBy};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let target = args.next().unwrap_or_else(|| "static:///127.0.0.1:50051,127.0.0.1:50052,127.0.0.1:50053".into());
    let calls: usize = args.next().map(|n| n.parse()).transpose()?.unwrap_or(9);

    let channel = Channel::builder(target).lb("p2c_ewma".parse()?).timeout(Duration::from_secs(5)).build()?;
    let mut client = GreeterClient::new(channel);
    for i in 0..calls {
        let response = client.say_hello(HelloRequest { name: format!("call {i}") }).await?;
        let served_by = response.extensions().get::<ServedBy>().map(|s| s.0.to_string()).unwrap_or_default();
        println!("{} (endpoint {served_by})", response.into_inner().message);
    }
    Ok(())
}
