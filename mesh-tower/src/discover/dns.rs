//! DNS discovery: A/AAAA for `host:port`, SRV for `_service._proto.name`.
//!
//! The answer is re-resolved when its TTL runs out (bounded by
//! [`DnsConfig::min_refresh`] and [`DnsConfig::max_refresh`]). When a lookup
//! fails the last good answer stays in use, the failure is logged, and the
//! lookup is retried with exponential backoff. An empty answer is a valid
//! answer (the set becomes empty), as in gRPC's DNS resolver.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{Name, RData};
use mesh_core::Endpoint;

use super::{BoxDiscover, Change};
use crate::{Error, Result};

/// What to look up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DnsQuery {
    /// A and AAAA records of `name`, each paired with `port`.
    Host {
        /// Host name.
        name: String,
        /// Port of every endpoint.
        port: u16,
    },
    /// SRV records of `name` (`_grpc._tcp.greeter.internal`); each target's
    /// addresses with the record's port and weight.
    Srv {
        /// SRV owner name.
        name: String,
    },
}

impl DnsQuery {
    /// The name being looked up.
    pub fn name(&self) -> &str {
        match self {
            Self::Host { name, .. } | Self::Srv { name } => name,
        }
    }
}

/// One answer: the endpoints and how long they may be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// Endpoints, sorted by address.
    pub endpoints: Vec<Endpoint>,
    /// Time until the answer expires (the smallest TTL involved).
    pub ttl: Duration,
}

/// Boxed future returned by [`Resolve::lookup`].
pub type LookupFuture<'a> = Pin<Box<dyn Future<Output = Result<Answer>> + Send + 'a>>;

/// The DNS seen by the mesh: a small trait so tests can use a fake.
pub trait Resolve: Send + Sync + 'static {
    /// Resolves a query.
    fn lookup<'a>(&'a self, query: &'a DnsQuery) -> LookupFuture<'a>;
}

/// Timing of DNS re-resolution.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsConfig {
    /// Shortest interval between lookups, whatever the TTL says.
    pub min_refresh: Duration,
    /// Longest interval between lookups.
    pub max_refresh: Duration,
    /// First retry delay after a failed lookup; doubles up to `max_refresh`.
    pub retry_backoff: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self { min_refresh: Duration::from_secs(1), max_refresh: Duration::from_secs(300), retry_backoff: Duration::from_secs(1) }
    }
}

/// A discovery source backed by DNS.
pub fn dns<R: Resolve>(resolver: Arc<R>, query: DnsQuery, config: DnsConfig) -> BoxDiscover {
    struct State<R> {
        resolver: Arc<R>,
        query: DnsQuery,
        config: DnsConfig,
        last: Option<Vec<Endpoint>>,
        wait: Duration,
        failures: u32,
    }
    let state = State { resolver, query, config, last: None, wait: Duration::ZERO, failures: 0 };
    Box::pin(futures_util::stream::unfold(state, |mut st| async move {
        loop {
            tokio::time::sleep(st.wait).await;
            match st.resolver.lookup(&st.query).await {
                Ok(answer) => {
                    st.failures = 0;
                    st.wait = answer.ttl.clamp(st.config.min_refresh, st.config.max_refresh);
                    tracing::debug!(name = st.query.name(), endpoints = answer.endpoints.len(), ttl = ?answer.ttl, "dns answer");
                    if st.last.as_ref() != Some(&answer.endpoints) {
                        st.last = Some(answer.endpoints.clone());
                        return Some((Change::reset(answer.endpoints), st));
                    }
                }
                Err(error) => {
                    let backoff = st.config.retry_backoff.saturating_mul(1 << st.failures.min(16));
                    st.wait = backoff.min(st.config.max_refresh);
                    st.failures += 1;
                    tracing::warn!(name = st.query.name(), %error, retry_in = ?st.wait, kept = st.last.as_ref().map_or(0, Vec::len), "dns lookup failed; keeping last good answer");
                }
            }
        }
    }))
}

/// [`Resolve`] backed by hickory-resolver.
#[derive(Clone, Debug)]
pub struct HickoryResolver {
    inner: TokioResolver,
}

impl HickoryResolver {
    /// Uses the given name servers (UDP and TCP), no search domains.
    pub fn with_name_servers(servers: &[SocketAddr]) -> Result<Self> {
        Self::build(ResolverConfig::from_name_servers(name_server_configs(servers)), None)
    }

    /// Uses the system configuration (`/etc/resolv.conf`).
    pub fn system() -> Result<Self> {
        let text =
            std::fs::read_to_string("/etc/resolv.conf").map_err(|e| Error::Dns { name: "/etc/resolv.conf".into(), source: e.into() })?;
        let conf = ResolvConf::parse(&text);
        let mut config = ResolverConfig::from_name_servers(name_server_configs(&conf.servers));
        for domain in &conf.search {
            match Name::from_ascii(domain) {
                Ok(name) => config.add_search(name),
                Err(error) => tracing::warn!(%domain, %error, "ignoring search domain in /etc/resolv.conf"),
            }
        }
        Self::build(config, conf.ndots)
    }

    fn build(config: ResolverConfig, ndots: Option<usize>) -> Result<Self> {
        let mut builder = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
        if let Some(ndots) = ndots {
            builder.options_mut().ndots = ndots;
        }
        // The balancer re-resolves at TTL itself; a cache would only hide changes.
        builder.options_mut().cache_size = 0;
        builder.options_mut().timeout = Duration::from_secs(2);
        builder.options_mut().attempts = 2;
        let inner = builder.build().map_err(|e| Error::Dns { name: "<resolver>".into(), source: e.into() })?;
        Ok(Self { inner })
    }

    async fn hosts(&self, name: &str, port: u16, weight: u32) -> Result<(Vec<Endpoint>, Instant)> {
        let lookup = self.inner.lookup_ip(name).await.map_err(|e| Error::Dns { name: name.to_owned(), source: e.into() })?;
        let endpoints = lookup.iter().map(|ip| Endpoint::new(SocketAddr::new(ip, port)).with_weight(weight)).collect();
        Ok((endpoints, lookup.valid_until()))
    }

    async fn resolve(&self, query: &DnsQuery) -> Result<Answer> {
        let now = Instant::now();
        let (mut endpoints, valid_until) = match query {
            DnsQuery::Host { name, port } => self.hosts(name, *port, 1).await?,
            DnsQuery::Srv { name } => {
                let lookup = self.inner.srv_lookup(name.as_str()).await.map_err(|e| Error::Dns { name: name.clone(), source: e.into() })?;
                let mut valid_until = lookup.valid_until();
                let mut endpoints = Vec::new();
                for record in lookup.answers() {
                    if let RData::SRV(srv) = &record.data {
                        let target = srv.target.to_string();
                        let (found, until) = self.hosts(&target, srv.port, u32::from(srv.weight)).await?;
                        valid_until = valid_until.min(until);
                        endpoints.extend(found);
                    }
                }
                (endpoints, valid_until)
            }
        };
        endpoints.sort_by_key(|e| e.addr);
        endpoints.dedup_by_key(|e| e.addr);
        Ok(Answer { endpoints, ttl: valid_until.saturating_duration_since(now) })
    }
}

impl Resolve for HickoryResolver {
    fn lookup<'a>(&'a self, query: &'a DnsQuery) -> LookupFuture<'a> {
        Box::pin(self.resolve(query))
    }
}

fn name_server_configs(servers: &[SocketAddr]) -> Vec<NameServerConfig> {
    servers
        .iter()
        .map(|addr| {
            let mut config = NameServerConfig::udp_and_tcp(addr.ip());
            for connection in &mut config.connections {
                connection.port = addr.port();
            }
            config
        })
        .collect()
}

/// What the mesh reads from `/etc/resolv.conf`: name servers, the search list (Kubernetes pods get
/// `<ns>.svc.cluster.local svc.cluster.local cluster.local`, so `greeter:50051` resolves) and `ndots`.
#[derive(Debug, Default, PartialEq, Eq)]
struct ResolvConf {
    servers: Vec<SocketAddr>,
    search: Vec<String>,
    ndots: Option<usize>,
}

impl ResolvConf {
    /// Parses the file as glibc does for these keys: the last `search` or `domain` line wins; unknown lines
    /// and options are ignored.
    fn parse(text: &str) -> Self {
        let mut conf = Self::default();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => {
                    conf.servers.extend(words.next().and_then(|ip| ip.parse::<IpAddr>().ok()).map(|ip| SocketAddr::new(ip, 53)));
                }
                Some("search" | "domain") => conf.search = words.map(str::to_owned).collect(),
                Some("options") => {
                    for option in words {
                        if let Some(n) = option.strip_prefix("ndots:").and_then(|n| n.parse::<usize>().ok()) {
                            conf.ndots = Some(n.min(15));
                        }
                    }
                }
                _ => {}
            }
        }
        conf
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use futures_util::StreamExt;

    use super::*;

    #[test]
    fn resolv_conf_gives_servers_search_list_and_ndots() {
        let conf = ResolvConf::parse(
            "# kubelet\nnameserver 10.96.0.10\nsearch default.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5 timeout:1\nnameserver bogus\n",
        );
        assert_eq!(conf.servers, ["10.96.0.10:53".parse::<SocketAddr>().unwrap()]);
        assert_eq!(conf.search, ["default.svc.cluster.local", "svc.cluster.local", "cluster.local"]);
        assert_eq!(conf.ndots, Some(5));
        assert_eq!(ResolvConf::parse("domain corp.example\nsearch a.example\n").search, ["a.example"], "the last one wins");
        assert_eq!(ResolvConf::parse("options ndots:99").ndots, Some(15), "glibc's cap");
    }

    /// A scripted resolver: answers are popped in order; the last one repeats.
    struct Script(Mutex<Vec<Result<Answer>>>);

    impl Resolve for Script {
        fn lookup<'a>(&'a self, _: &'a DnsQuery) -> LookupFuture<'a> {
            let mut answers = self.0.lock().unwrap();
            let next = if answers.len() > 1 {
                answers.remove(0)
            } else {
                answers[0].as_ref().map(Clone::clone).map_err(|_| Error::Dns { name: "x".into(), source: "down".into() })
            };
            Box::pin(async move { next })
        }
    }

    fn answer(ports: &[u16], ttl: u64) -> Result<Answer> {
        let endpoints = ports.iter().map(|p| Endpoint::new(SocketAddr::from(([127, 0, 0, 1], *p)))).collect();
        Ok(Answer { endpoints, ttl: Duration::from_secs(ttl) })
    }

    #[tokio::test(start_paused = true)]
    async fn reresolves_at_ttl_and_keeps_last_good_on_failure() {
        let failure = Err(Error::Dns { name: "x".into(), source: "SERVFAIL".into() });
        let script = Script(Mutex::new(vec![answer(&[1], 5), failure, answer(&[1], 5), answer(&[2], 5)]));
        let query = DnsQuery::Host { name: "x".into(), port: 1 };
        let mut stream = dns(Arc::new(script), query, DnsConfig::default());
        let start = tokio::time::Instant::now();
        let Some(Change::Reset(first)) = stream.next().await else { panic!("no first answer") };
        assert_eq!(first.endpoints[0].addr.port(), 1);
        // The failure and the unchanged answer yield nothing; the change does.
        let Some(Change::Reset(second)) = stream.next().await else { panic!("no second answer") };
        assert_eq!(second.endpoints[0].addr.port(), 2);
        // ttl 5 s, then failure backoff 1 s, then ttl 5 s.
        assert_eq!(start.elapsed(), Duration::from_secs(11));
    }
}
