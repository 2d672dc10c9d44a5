//! Driving calls through a channel and tallying where they went.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use mesh_tonic::codec::BytesCodec;
use mesh_tonic::{Channel, ServedBy};
use tonic::codegen::http::uri::PathAndQuery;

use crate::echo::METHOD;

/// One echo call with extra metadata; returns the endpoint that served it
/// (checked against the reply, which is the server's own address).
pub async fn call(channel: &Channel, headers: &[(&'static str, String)]) -> Result<SocketAddr, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await?;
    let mut request = tonic::Request::new(Bytes::from_static(b"hi"));
    for (name, value) in headers {
        request.metadata_mut().insert(*name, value.parse().unwrap());
    }
    let response = grpc.unary(request, PathAndQuery::from_static(METHOD), BytesCodec).await?;
    let served_by = response.extensions().get::<ServedBy>().expect("ServedBy extension").0;
    assert_eq!(response.get_ref(), served_by.to_string().as_bytes(), "reply must come from the endpoint named in ServedBy");
    Ok(served_by)
}

/// Outcome of [`drive`].
#[derive(Debug, Default)]
pub struct Run {
    /// Calls served per endpoint.
    pub by_endpoint: BTreeMap<SocketAddr, u64>,
    /// Failed calls, as `Code: message`.
    pub failures: Vec<String>,
    /// Every call's latency, in the order calls ended per worker.
    pub latencies: Vec<std::time::Duration>,
}

/// One echo call through a proxy (Envoy): returns the backend that answered, read from the reply.
pub async fn call_via_proxy(channel: &Channel) -> Result<SocketAddr, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await?;
    let response = grpc.unary(tonic::Request::new(Bytes::from_static(b"hi")), PathAndQuery::from_static(METHOD), BytesCodec).await?;
    let reply = String::from_utf8_lossy(response.get_ref()).into_owned();
    reply.parse().map_err(|_| tonic::Status::internal(format!("reply {reply:?} is not an address")))
}

/// `n` calls with `concurrency` workers; `on_progress(done)` runs after each call.
pub async fn drive(channel: &Channel, n: u64, concurrency: usize, on_progress: impl Fn(u64) + Send + Sync + 'static) -> Run {
    drive_inner(channel, n, concurrency, false, on_progress).await
}

/// [`drive`] through a proxy: calls are tallied by the backend named in the reply ([`call_via_proxy`]).
pub async fn drive_via_proxy(channel: &Channel, n: u64, concurrency: usize) -> Run {
    drive_inner(channel, n, concurrency, true, |_| {}).await
}

async fn drive_inner(
    channel: &Channel,
    n: u64,
    concurrency: usize,
    proxied: bool,
    on_progress: impl Fn(u64) + Send + Sync + 'static,
) -> Run {
    let remaining = Arc::new(AtomicU64::new(n));
    let done = Arc::new(AtomicU64::new(0));
    let on_progress = Arc::new(on_progress);
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (channel, remaining, done, on_progress) = (channel.clone(), remaining.clone(), done.clone(), on_progress.clone());
        workers.push(tokio::spawn(async move {
            let mut run = Run::default();
            while remaining.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |r| r.checked_sub(1)).is_ok() {
                let started = std::time::Instant::now();
                let result = if proxied { call_via_proxy(&channel).await } else { call(&channel, &[]).await };
                run.latencies.push(started.elapsed());
                match result {
                    Ok(addr) => *run.by_endpoint.entry(addr).or_default() += 1,
                    Err(status) => run.failures.push(format!("{:?}: {}", status.code(), status.message())),
                }
                on_progress(done.fetch_add(1, Ordering::SeqCst) + 1);
            }
            run
        }));
    }
    Run::gather(workers).await
}

impl Run {
    /// The sum of the runs of `workers`.
    pub async fn gather(workers: Vec<tokio::task::JoinHandle<Run>>) -> Run {
        let mut total = Run::default();
        for worker in workers {
            let run = worker.await.expect("load worker");
            for (addr, n) in run.by_endpoint {
                *total.by_endpoint.entry(addr).or_default() += n;
            }
            total.failures.extend(run.failures);
            total.latencies.extend(run.latencies);
        }
        total
    }

    /// The latency at quantile `q` (0.99 for p99) of every call.
    pub fn percentile(&self, q: f64) -> std::time::Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        let index = ((sorted.len() as f64 * q) as usize).min(sorted.len().saturating_sub(1));
        sorted.get(index).copied().unwrap_or_default()
    }

    /// Share of calls served by `endpoints`.
    pub fn share(&self, endpoints: &[SocketAddr]) -> f64 {
        let total: u64 = self.by_endpoint.values().sum();
        endpoints.iter().map(|a| self.by_endpoint.get(a).copied().unwrap_or(0)).sum::<u64>() as f64 / total.max(1) as f64
    }
}
