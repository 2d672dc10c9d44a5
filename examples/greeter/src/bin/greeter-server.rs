//! Serves `helloworld.Greeter` on 127.0.0.1:PORT (first argument, default 50051).

use greeter_example::GreeterServer;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let port: u16 = std::env::args().nth(1).map(|p| p.parse()).transpose()?.unwrap_or(50051);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    println!("greeter listening on {addr}");
    tonic::transport::Server::builder().add_service(GreeterServer::new(addr.to_string())).serve(addr).await?;
    Ok(())
}
