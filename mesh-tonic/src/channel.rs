use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use mesh_core::{Endpoint, LbPolicy};
use mesh_tower::balance::{Balancer, BalancerConfig, EndpointStatus, ResponseBody};
use mesh_tower::discover::dns::{DnsConfig, HickoryResolver, dns};
use mesh_tower::discover::{self, Discover};
use tonic::Status;
use tonic::body::Body;
use tower::buffer::Buffer;

use crate::xds::XdsRouter;
use crate::{Error, Result, Target};

/// A load-balanced gRPC channel: use it wherever a tonic `Channel` goes.
///
/// Cloning is cheap; clones share connections. Calls reach the balancer
/// through a queue served by one task, as a tonic `Channel`'s do (see
/// DESIGN.md). Generated clients poll it ready before each call, which
/// reserves a place in the queue; a call made without that skips the queue
/// and runs in the caller's task.
#[derive(Debug)]
pub struct Channel {
    /// Also called directly by a call made without `poll_ready`, and kept for
    /// inspection ([`Channel::endpoints`], [`Channel::get_ref`]).
    inner: Inner,
    queue: Buffer<http::Request<Body>, Call>,
    /// `poll_ready` reserved a place in the queue for the next call.
    reserved: bool,
    authority: Authority,
    timeout: Option<Duration>,
}

impl Clone for Channel {
    fn clone(&self) -> Self {
        // A reservation belongs to the clone that made it.
        Channel {
            reserved: false,
            inner: self.inner.clone(),
            queue: self.queue.clone(),
            authority: self.authority.clone(),
            timeout: self.timeout,
        }
    }
}

/// Bound of the queue in front of the balancer: callers past it wait in `poll_ready` (tonic's default).
const QUEUE: usize = 1024;

#[derive(Clone, Debug)]
enum Inner {
    /// One cluster: static or DNS discovery.
    Balancer(Balancer<Body>),
    /// Routed by xDS.
    Xds(XdsRouter),
}

impl tower::Service<http::Request<Body>> for Inner {
    type Response = http::Response<ResponseBody>;
    type Error = Status;
    type Future = Call;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        // Waiting for an endpoint or a route table happens per call, bounded by timeouts.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Call {
        match self {
            Inner::Balancer(b) => Call::Direct(tower::Service::call(b, request)),
            Inner::Xds(router) => Call::Routed(Box::pin(router.clone().call(request))),
        }
    }
}

/// Builds a [`Channel`] from a target and settings.
#[derive(Clone, Debug)]
pub struct ChannelBuilder {
    target: String,
    config: BalancerConfig,
    timeout: Option<Duration>,
    dns: DnsConfig,
}

impl Channel {
    /// Starts building a channel for `target` (see the crate docs for the forms).
    pub fn builder(target: impl Into<String>) -> ChannelBuilder {
        ChannelBuilder { target: target.into(), config: BalancerConfig::default(), timeout: None, dns: DnsConfig::default() }
    }

    fn new(inner: Inner, authority: Authority, timeout: Option<Duration>) -> Self {
        let queue = Buffer::new(inner.clone(), QUEUE);
        Channel { inner, queue, reserved: false, authority, timeout }
    }

    /// A channel with default settings (round robin, 10 s wait for endpoints).
    pub fn from_target(target: impl Into<String>) -> Result<Self> {
        Self::builder(target).build()
    }

    /// The endpoints the channel knows and their state (empty for `xds:///`
    /// targets, whose endpoints belong to per-cluster balancers).
    pub fn endpoints(&self) -> Vec<EndpointStatus> {
        match &self.inner {
            Inner::Balancer(b) => b.endpoints(),
            Inner::Xds(_) => Vec::new(),
        }
    }

    /// The underlying balancer, for single-cluster targets.
    pub fn get_ref(&self) -> Option<&Balancer<Body>> {
        match &self.inner {
            Inner::Balancer(b) => Some(b),
            Inner::Xds(_) => None,
        }
    }
}

impl ChannelBuilder {
    /// Load-balancing policy (default round robin).
    pub fn lb(mut self, lb: LbPolicy) -> Self {
        self.config.lb = lb;
        self
    }

    /// Deadline of each call, waiting for an endpoint included; also bounds
    /// the wait for a ready endpoint. Expired calls fail DEADLINE_EXCEEDED.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self.config.ready_timeout = self.config.ready_timeout.min(timeout);
        self
    }

    /// Longest wait for a ready endpoint before a call fails UNAVAILABLE (default 10 s).
    pub fn ready_timeout(mut self, wait: Duration) -> Self {
        self.config.ready_timeout = wait;
        self
    }

    /// TCP connect timeout per endpoint (default 1 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connection.connect_timeout = timeout;
        self
    }

    /// HTTP/2 PING keepalive interval (default off; TCP keepalive is on).
    pub fn http2_keepalive(mut self, interval: Option<Duration>) -> Self {
        self.config.connection.keepalive_interval = interval;
        self
    }

    /// DNS re-resolution timing, for `dns://` targets.
    pub fn dns_config(mut self, dns: DnsConfig) -> Self {
        self.dns = dns;
        self
    }

    /// Builds the channel; starts discovery and connections. Needs a tokio runtime.
    pub fn build(self) -> Result<Channel> {
        let target = Target::parse(&self.target)?;
        if let Target::Xds { name } = &target {
            return self.build_xds(crate::xds::shared_client()?, name);
        }
        let source: discover::BoxDiscover = match &target {
            Target::Static(addrs) => discover::fixed(addrs.iter().map(|a| Endpoint::new(*a)).collect()),
            Target::Xds { .. } => unreachable!("handled above"),
            Target::Dns { server, query } => {
                let resolver = match server {
                    Some(server) => HickoryResolver::with_name_servers(&[*server])?,
                    None => HickoryResolver::system()?,
                };
                dns(Arc::new(resolver), query.clone(), self.dns.clone())
            }
        };
        let authority = target.authority();
        self.build_with(&authority, source)
    }

    /// Builds a channel over a custom discovery source; `authority` is the
    /// `:authority` requests carry and names the channel in errors.
    pub fn build_with(self, authority: &str, source: impl Discover) -> Result<Channel> {
        self.config.lb.validate()?;
        let authority = authority
            .parse::<Authority>()
            .map_err(|e| Error::InvalidTarget { target: self.target.clone(), reason: format!("authority {authority:?}: {e}") })?;
        let balancer = Balancer::new(self.target, source, self.config);
        Ok(Channel::new(Inner::Balancer(balancer), authority, self.timeout))
    }

    /// Builds an `xds:///name` channel on a given xDS client.
    pub fn build_xds(self, client: xds_client::XdsClient, name: &str) -> Result<Channel> {
        let authority = name
            .parse::<Authority>()
            .map_err(|e| Error::InvalidTarget { target: self.target.clone(), reason: format!("name {name:?}: {e}") })?;
        let router = XdsRouter::new(client, name, self.config);
        Ok(Channel::new(Inner::Xds(router), authority, self.timeout))
    }
}

impl tower::Service<http::Request<Body>> for Channel {
    type Response = http::Response<ResponseBody>;
    type Error = Status;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        if self.reserved {
            return Poll::Ready(Ok(()));
        }
        let polled = self.queue.poll_ready(cx).map_err(status_from_queue);
        self.reserved = matches!(polled, Poll::Ready(Ok(())));
        polled
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        // Generated clients send path-only URIs; HTTP/2 needs scheme and authority.
        if request.uri().scheme().is_none() {
            let mut parts = request.uri().clone().into_parts();
            parts.scheme = Some(Scheme::HTTP);
            parts.authority = Some(self.authority.clone());
            if let Ok(uri) = http::Uri::from_parts(parts) {
                *request.uri_mut() = uri;
            }
        }
        let inner = if std::mem::take(&mut self.reserved) {
            Dispatch::Queued(self.queue.call(request))
        } else {
            Dispatch::Direct(self.inner.call(request))
        };
        ResponseFuture { inner, deadline: self.timeout.map(|limit| (limit, Box::pin(tokio::time::sleep(limit)))) }
    }
}

/// Future of a [`Channel`] call.
pub struct ResponseFuture {
    inner: Dispatch,
    deadline: Option<(Duration, Pin<Box<tokio::time::Sleep>>)>,
}

/// How a call reached the service: through the queue, or directly.
enum Dispatch {
    Queued(tower::buffer::future::ResponseFuture<Call>),
    Direct(Call),
}

/// Future of the service behind the queue.
enum Call {
    Direct(mesh_tower::balance::ResponseFuture),
    Routed(Pin<Box<dyn Future<Output = Result<http::Response<ResponseBody>, Status>> + Send>>),
}

impl std::fmt::Debug for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Call::Direct(_) => "Call::Direct",
            Call::Routed(_) => "Call::Routed",
        })
    }
}

impl Future for Call {
    type Output = Result<http::Response<ResponseBody>, Status>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Call::Direct(f) => Pin::new(f).poll(cx).map(|r| r.map_err(status_from)),
            Call::Routed(f) => f.as_mut().poll(cx),
        }
    }
}

impl std::fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").field("timeout", &self.deadline.as_ref().map(|d| d.0)).finish()
    }
}

impl Future for ResponseFuture {
    type Output = Result<http::Response<ResponseBody>, Status>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let polled = match &mut self.inner {
            Dispatch::Queued(f) => Pin::new(f).poll(cx).map(|r| r.map_err(status_from_queue)),
            Dispatch::Direct(f) => Pin::new(f).poll(cx),
        };
        if polled.is_ready() {
            return polled;
        }
        if let Some((limit, sleep)) = &mut self.deadline
            && sleep.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(Status::deadline_exceeded(format!("call exceeded the channel timeout of {limit:?}"))));
        }
        Poll::Pending
    }
}

/// The status a call's error carries through the queue: the service's own, or
/// UNAVAILABLE if the queue's task is gone (the runtime shutting down).
fn status_from_queue(error: tower::BoxError) -> Status {
    match error.downcast::<Status>() {
        Ok(status) => *status,
        Err(other) => Status::unavailable(format!("channel closed: {other}")),
    }
}

/// Maps a client-stack error to the gRPC status a caller sees.
pub fn status_from(error: mesh_tower::Error) -> Status {
    match error {
        mesh_tower::Error::Upstream { source, addr } => {
            let status = Status::from_error(Box::new(source));
            // A lost connection is UNAVAILABLE in gRPC's status mapping.
            let code = if status.code() == tonic::Code::Unknown { tonic::Code::Unavailable } else { status.code() };
            Status::new(code, format!("{addr}: {}", status.message()))
        }
        mesh_tower::Error::InvalidTarget { .. } => Status::invalid_argument(error.to_string()),
        other => Status::unavailable(other.to_string()),
    }
}
