//! Serving a tonic service in the mesh: an xDS-enabled server (gRFC A36), or one behind a fixed acceptor.
//!
//! [`Server::builder`] takes its inbound policy from the control plane: with [`ServerBuilder::xds`] it
//! subscribes to the server Listener named by the bootstrap's `server_listener_resource_name_template` and the
//! listening address, and serves each connection as the matching filter chain says (mTLS or plaintext; RBAC,
//! local rate limit and faults per call; see [`mesh_tower::inbound`]). Until that listener arrives the server
//! does not serve (connections are closed), unless a local [`fallback`](ServerBuilder::fallback) is given. A
//! rejected (NACKed) or deleted listener leaves the last good one serving. The status is a watch
//! ([`RunningServer::status`]) and each change is logged.
//!
//! [`serve_mtls`] serves behind a fixed [`MtlsAcceptor`] (strict or permissive), without xDS.
//!
//! Either way the caller's proven SPIFFE ID is on every request as a [`PeerIdentity`] extension, which a tonic
//! handler reads with [`caller`].

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::RouteConfig;
use mesh_core::inbound::InboundListener;
use mesh_tower::connect::PeerIdentity;
use mesh_tower::inbound::{InboundPolicy, InboundStats, ServeOptions, Serving};
use mesh_tower::tls::{CredentialsSource, MtlsAcceptor};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use xds_client::{Typed, Watch, XdsClient};

use crate::xds::{AbortOnDrop, forward};
use crate::{Error, Result};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serves `service` on `listener` until the listener fails, each connection through `acceptor`. Each call is
/// recorded in the default server metrics and traced in the default server span ([`crate::telemetry::server_layer`]).
pub async fn serve_mtls<S, B>(listener: TcpListener, acceptor: MtlsAcceptor, service: S, max_connection_age: Option<Duration>)
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<B>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (_keep, policy) = watch::channel(Serving::Serving(Arc::new(InboundPolicy::single("mtls", Some(acceptor)))));
    mesh_tower::inbound::serve(listener, policy, tonic_service(service), ServeOptions { max_connection_age }).await;
}

/// The application's tonic service as the inbound stack serves it: server metrics and spans recorded
/// ([`crate::telemetry::server_layer`]), hyper's body in, tonic's out.
fn tonic_service<S, B>(
    service: S,
) -> impl tower::Service<
    http::Request<hyper::body::Incoming>,
    Response = http::Response<tonic::body::Body>,
    Error = Infallible,
    Future = impl Send + 'static,
> + Clone
+ Send
+ 'static
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<B>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let service = tower::Layer::layer(&crate::telemetry::server_layer(), service);
    tower::ServiceBuilder::new()
        .map_request(|request: http::Request<hyper::body::Incoming>| request.map(tonic::body::Body::new))
        .map_response(|response: http::Response<_>| response.map(tonic::body::Body::new))
        .service(service)
}

/// The caller's identity of a tonic request served in the mesh (`None` for a plaintext caller).
pub fn caller<T>(request: &tonic::Request<T>) -> Option<&PeerIdentity> {
    request.extensions().get::<PeerIdentity>()
}

/// An xDS-enabled server (see the [module docs](self)).
#[derive(Debug)]
pub struct Server;

impl Server {
    /// A builder: set where the inbound policy comes from, then [`serve`](ServerBuilder::serve).
    pub fn builder() -> ServerBuilder {
        ServerBuilder::default()
    }
}

/// Builds a [`Server`].
#[derive(Debug, Default)]
pub struct ServerBuilder {
    xds: Option<XdsClient>,
    fallback: Option<InboundListener>,
    max_connection_age: Option<Duration>,
    providers: BTreeMap<String, CredentialsSource>,
}

impl ServerBuilder {
    /// Takes the inbound policy from the control plane `client` talks to: the Listener its bootstrap's
    /// `server_listener_resource_name_template` names for the listening address, and the RDS tables it uses.
    /// Certificates come from the bootstrap's certificate provider instances.
    pub fn xds(mut self, client: XdsClient) -> Self {
        self.xds = Some(client);
        self
    }

    /// Serves with `listener` (a local default) until the control plane's arrives, instead of not serving;
    /// without xDS, always. Its address is not checked.
    pub fn fallback(mut self, listener: InboundListener) -> Self {
        self.fallback = Some(listener);
        self
    }

    /// Adds (or replaces) a certificate provider instance, which TLS chains name: the bootstrap's instances
    /// come with [`xds`](Self::xds); this gives one without xDS, or overrides one.
    pub fn certificate_provider(mut self, name: impl Into<String>, credentials: impl Into<CredentialsSource>) -> Self {
        self.providers.insert(name.into(), credentials.into());
        self
    }

    /// Closes each connection gracefully once it is this old (gRPC's `MAX_CONNECTION_AGE`).
    pub fn max_connection_age(mut self, age: Duration) -> Self {
        self.max_connection_age = Some(age);
        self
    }

    /// Starts serving `service` on `listener`; it runs until the [`RunningServer`] is dropped.
    pub fn serve<S, B>(self, listener: TcpListener, service: S) -> Result<RunningServer>
    where
        S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<B>, Error = Infallible> + Clone + Send + 'static,
        S::Future: Send + 'static,
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let local = listener.local_addr().map_err(|e| Error::Server(format!("the listener has no local address: {e}")))?;
        let stats = Arc::new(InboundStats::default());
        let mut providers = self.xds.as_ref().map(|c| crate::xds::certificate_providers(c.bootstrap())).unwrap_or_default();
        providers.extend(self.providers);
        let initial = match &self.fallback {
            Some(fallback) => {
                let policy = InboundPolicy::build(fallback, &|_| None, &providers, &stats)
                    .map_err(|e| Error::Server(format!("the fallback listener cannot be served: {e}")))?;
                Serving::Serving(Arc::new(policy))
            }
            None if self.xds.is_some() => Serving::NotServing("waiting for the inbound listener from the control plane".into()),
            None => return Err(Error::Server("a server needs xDS or a fallback listener".into())),
        };
        let (publish, status) = watch::channel(initial);
        let (follower, fixed) = match self.xds {
            Some(client) => {
                let Some(name) = client.bootstrap().listener_name_for_server(local) else {
                    return Err(Error::Server(
                        "the bootstrap has no server_listener_resource_name_template: an xDS server cannot name its listener".into(),
                    ));
                };
                tracing::info!(listener = %name, %local, "xDS server waiting for its inbound listener");
                let task = tokio::spawn(follow(client, name, local, providers, stats.clone(), publish));
                (Some(AbortOnDrop(task.abort_handle())), None)
            }
            // Nothing changes the fallback; the sender is kept so the connections' watches stay open.
            None => (None, Some(publish)),
        };
        let options = ServeOptions { max_connection_age: self.max_connection_age };
        let serving = tokio::spawn(mesh_tower::inbound::serve(listener, status.clone(), tonic_service(service), options));
        Ok(RunningServer { local, status, stats, _serving: AbortOnDrop(serving.abort_handle()), _follower: follower, _fixed: fixed })
    }
}

/// A server started by [`ServerBuilder::serve`]; dropping it stops the server.
#[derive(Debug)]
pub struct RunningServer {
    local: SocketAddr,
    status: watch::Receiver<Serving>,
    stats: Arc<InboundStats>,
    _serving: AbortOnDrop,
    _follower: Option<AbortOnDrop>,
    /// The policy's sender when no xDS follower holds it (a fixed fallback).
    _fixed: Option<watch::Sender<Serving>>,
}

impl RunningServer {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Whether it serves, and with what policy: changes as the inbound config does.
    pub fn status(&self) -> watch::Receiver<Serving> {
        self.status.clone()
    }

    /// Its handshakes, RBAC decisions, rate-limited calls and faults.
    pub fn stats(&self) -> &InboundStats {
        &self.stats
    }
}

/// Follows the server's listener and the route tables it names, publishing each policy that builds.
async fn follow(
    client: XdsClient,
    name: String,
    local: SocketAddr,
    providers: BTreeMap<String, CredentialsSource>,
    stats: Arc<InboundStats>,
    publish: watch::Sender<Serving>,
) {
    let (dirty, mut changes) = mpsc::unbounded_channel();
    let lds: Watch<InboundListener> = client.watch(&name);
    let _lds = forward(&lds, &dirty);
    let mut rds: HashMap<String, (Watch<RouteConfig>, AbortOnDrop)> = HashMap::new();
    // What the published policy was built from, to rebuild only on change (a rebuild starts new rate limit
    // buckets).
    let mut built: Vec<Arc<xds_client::resource::Resource>> = Vec::new();
    let _ = dirty.send(());
    while changes.recv().await.is_some() {
        while changes.try_recv().is_ok() {}
        let serving = matches!(&*publish.borrow(), Serving::Serving(_));
        let Some(listener) = lds.value() else {
            if !serving {
                let reason = format!("inbound listener {name}: {:?}", lds.status());
                publish.send_replace(Serving::NotServing(reason));
            }
            continue;
        };
        if listener.address != local {
            let reason = format!("inbound listener {name} is for {}, not the listening address {local} (A36)", listener.address);
            tracing::warn!("{reason}; {}", if serving { "the last good listener keeps serving" } else { "not serving" });
            if !serving {
                publish.send_replace(Serving::NotServing(reason));
            }
            continue;
        }
        // Subscribe to the route tables the chains name, and only those.
        let wanted: Vec<String> = listener
            .filter_chains
            .iter()
            .chain(&listener.default_filter_chain)
            .filter_map(|c| match &c.http.route {
                mesh_core::RouteSource::Rds(table) => Some(table.clone()),
                mesh_core::RouteSource::Inline(_) => None,
            })
            .collect();
        rds.retain(|table, _| wanted.contains(table));
        for table in wanted {
            rds.entry(table).or_insert_with_key(|table| {
                let watch = client.watch::<RouteConfig>(table);
                let forwarding = forward(&watch, &dirty);
                (watch, forwarding)
            });
        }
        let tables: HashMap<&str, Typed<RouteConfig>> =
            rds.iter().filter_map(|(table, (watch, _))| watch.value().map(|v| (table.as_str(), v))).collect();
        let mut inputs = vec![listener.resource().clone()];
        inputs.extend(tables.values().map(|t| t.resource().clone()));
        if inputs.len() == built.len() && inputs.iter().zip(&built).all(|(a, b)| Arc::ptr_eq(a, b)) {
            continue;
        }
        let routes = |table: &str| tables.get(table).map(|t| RouteConfig::clone(t));
        match InboundPolicy::build(&listener, &routes, &providers, &stats) {
            Ok(policy) => {
                tracing::info!(listener = %name, chains = listener.filter_chains.len(), "serving with the inbound listener");
                publish.send_replace(Serving::Serving(Arc::new(policy)));
                built = inputs;
            }
            Err(error) => {
                tracing::warn!(%error, "{}", if serving { "the last good inbound listener keeps serving" } else { "not serving" });
                if !serving {
                    publish.send_replace(Serving::NotServing(error.to_string()));
                }
            }
        }
    }
}
