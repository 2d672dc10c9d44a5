//! Rolling restart: real grpc-js (Node) backends stop gracefully (GOAWAY, in-flight calls finish) and start again
//! on their ports, one after another, while calls stay in flight. No call may fail.
//!
//! Not grpcio's Python server: at shutdown it cancels the calls its transport accepted but its application had
//! not yet taken (status CANCELLED), and a gRPC C-core client loses those calls just as any client does.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mesh_tests::load::{self, Run};
use mesh_tests::peers::{self, Peer};
use mesh_tonic::Channel;

fn backend(port: u16) -> Peer {
    let port = port.to_string();
    peers::node_grpc_server(&["--port", &port, "--delay-ms", "5"]).unwrap()
}

/// Calls from `concurrency` workers until `stop` is set.
async fn load_until(channel: Channel, concurrency: usize, stop: Arc<AtomicBool>) -> Run {
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (channel, stop) = (channel.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut run = Run::default();
            while !stop.load(Ordering::Relaxed) {
                match load::call(&channel, &[]).await {
                    Ok(addr) => *run.by_endpoint.entry(addr).or_default() += 1,
                    Err(status) => run.failures.push(format!("{status:?}")),
                }
            }
            run
        }));
    }
    Run::gather(workers).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_grpc_js_backends_fails_no_call() {
    let mut backends: Vec<Option<Peer>> = (0..3).map(|_| Some(backend(0))).collect();
    let addrs: Vec<_> = backends.iter().flatten().map(|b| b.addr).collect();
    let target = format!("static:///{}", addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(","));
    let channel = Channel::builder(target).lb("round_robin".parse().unwrap()).timeout(Duration::from_secs(10)).build().unwrap();
    let warm = load::drive(&channel, 300, 8, |_| {}).await;
    assert!(warm.failures.is_empty(), "{:?}", warm.failures);

    let stop = Arc::new(AtomicBool::new(false));
    let running = tokio::spawn(load_until(channel.clone(), 8, stop.clone()));
    for (slot, addr) in backends.iter_mut().zip(&addrs) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (mut old, port) = (slot.take().unwrap(), addr.port());
        // Graceful stop, then a new process on the same port once the old one has gone.
        *slot = Some(
            tokio::task::spawn_blocking(move || {
                old.terminate(Duration::from_secs(15)).unwrap();
                backend(port)
            })
            .await
            .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let during = running.await.unwrap();
    let calls: u64 = during.by_endpoint.values().sum();
    assert!(during.failures.is_empty(), "{} of {} calls failed during the restart: {:?}", during.failures.len(), calls, during.failures);
    assert!(calls >= 500, "only {calls} calls ran during the restart");

    // Every restarted backend takes traffic again.
    let after = load::drive(&channel, 300, 8, |_| {}).await;
    assert!(after.failures.is_empty(), "{:?}", after.failures);
    for addr in &addrs {
        assert!(
            after.by_endpoint.get(addr).copied().unwrap_or(0) >= 50,
            "{addr} got too little after its restart: {:?}",
            after.by_endpoint
        );
    }
}
