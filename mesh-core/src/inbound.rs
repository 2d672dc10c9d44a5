//! Server-side (inbound) listeners, as xDS-enabled gRPC servers read them (gRFC A36, A29, A39, A41).
//!
//! A server that joins the mesh fetches one Listener for its listening address. The listener holds filter
//! chains; each accepted connection is given the chain whose [`FilterChainMatch`] fits it most specifically
//! ([`InboundListener::select`]), or the default chain, or none (the connection is closed). A chain says how the
//! connection is secured ([`InboundTls`]) and what its HTTP connection manager does with the calls on it
//! ([`InboundHttp`]: routes, HTTP filters, and the RBAC chain the server enforces).
//!
//! Only what can match is kept here. Envoy's `destination_port`, `server_names` and `application_protocols`
//! never match on a gRPC server (A36: they need original destination or listener filters, which gRPC does not
//! run), so the decoder drops such chains after checking that no two chains share matching rules.
//!
//! `transport_protocol` goes one step past A36, as Envoy's TLS inspector does: our server tells a TLS
//! connection from a plaintext one by its first byte, so a `tls` chain takes TLS connections and a `raw_buffer`
//! chain plaintext ones ([`TransportProtocol`]). That is what puts a permissive port (mTLS and plaintext) in
//! one listener. A listener without `tls` chains selects exactly as A36 does, and a gRPC server, which drops
//! `tls` chains, serves such a listener's plaintext chains.
//!
//! ```
//! use mesh_core::inbound::{FilterChain, FilterChainMatch, InboundHttp, InboundListener, SourceType};
//! use mesh_core::RouteSource;
//!
//! let chain = |name: &str, matcher| FilterChain { name: name.into(), matcher, tls: None, http: InboundHttp::new(RouteSource::Rds("routes".into())) };
//! let listener = InboundListener {
//!     name: "grpc/server?xds.resource.listening_address=0.0.0.0:50051".into(),
//!     address: "0.0.0.0:50051".parse()?,
//!     filter_chains: vec![
//!         chain("pods", FilterChainMatch { source_prefixes: vec!["10.0.0.0/8".parse()?], ..Default::default() }),
//!         chain("local", FilterChainMatch { source_type: SourceType::SameIpOrLoopback, ..Default::default() }),
//!     ],
//!     default_filter_chain: None,
//! };
//! let pick = |src: &str| listener.select("10.1.0.5:50051".parse().unwrap(), src.parse().unwrap(), false).map(|c| c.name.as_str());
//! assert_eq!(pick("127.0.0.1:40000"), Some("local"));
//! assert_eq!(pick("10.7.0.9:40000"), Some("pods"));
//! assert_eq!(pick("192.168.0.1:40000"), None);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::net::{IpAddr, SocketAddr};

use crate::RouteSource;
use crate::authz::{Cidr, Rbac};
use crate::policy::{AdaptiveConcurrency, FaultInjection, RateLimit};

/// A server-side Listener: the address it is for, its filter chains and the chain for connections none fits.
#[derive(Clone, Debug)]
pub struct InboundListener {
    /// The resource name (from the bootstrap's `server_listener_resource_name_template`).
    pub name: String,
    /// The address the listener is for; a server serves it only when this is the address it listens on (A36).
    pub address: SocketAddr,
    /// The chains that can match a connection, in the listener's order.
    pub filter_chains: Vec<FilterChain>,
    /// The chain for connections no chain in `filter_chains` fits; without one such connections are closed.
    pub default_filter_chain: Option<FilterChain>,
}

/// One filter chain: which connections it takes, how they are secured and how their calls are handled.
#[derive(Clone, Debug)]
pub struct FilterChain {
    /// The chain's name (may be empty).
    pub name: String,
    /// Which connections the chain takes (ignored for the default chain).
    pub matcher: FilterChainMatch,
    /// TLS for the connection; `None` is plaintext.
    pub tls: Option<InboundTls>,
    /// What the chain's HTTP connection manager does with calls.
    pub http: InboundHttp,
}

/// The connection properties a chain requires, each field already normalized. An empty list requires nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FilterChainMatch {
    /// The connection's local address is in one of these blocks (Envoy's `prefix_ranges`).
    pub destination_prefixes: Vec<Cidr>,
    /// Envoy's `transport_protocol`.
    pub transport_protocol: TransportProtocol,
    /// Where the connection comes from relative to the server.
    pub source_type: SourceType,
    /// The peer's address is in one of these blocks.
    pub source_prefixes: Vec<Cidr>,
    /// The peer's port is one of these.
    pub source_ports: Vec<u16>,
}

/// Envoy's `transport_protocol` of a chain, as our server reads it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TransportProtocol {
    /// Not set: any connection.
    #[default]
    Any,
    /// `raw_buffer`. A gRPC server runs no listener filter, so to it every connection is `raw_buffer` (A36):
    /// it matches plaintext connections and, unless a `tls` chain fits, TLS ones, and is more specific than
    /// [`Any`](Self::Any).
    RawBuffer,
    /// `tls`: TLS connections only (told apart by their first byte), more specific than `raw_buffer`.
    Tls,
}

impl TransportProtocol {
    /// How specifically the protocol fits a connection (`None`: not at all).
    fn rank(self, tls: bool) -> Option<i16> {
        match (self, tls) {
            (Self::Any, _) => Some(0),
            (Self::RawBuffer, _) => Some(1),
            (Self::Tls, true) => Some(2),
            (Self::Tls, false) => None,
        }
    }
}

/// Envoy's `ConnectionSourceType`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SourceType {
    /// Any peer.
    #[default]
    Any,
    /// A peer on a loopback address, or on the server's own address for the connection.
    SameIpOrLoopback,
    /// Any other peer.
    External,
}

impl SourceType {
    /// Whether a connection from `source` to `destination` is of this type.
    pub fn matches(self, destination: IpAddr, source: IpAddr) -> bool {
        let (destination, source) = (destination.to_canonical(), source.to_canonical());
        let local = source.is_loopback() || source == destination;
        match self {
            Self::Any => true,
            Self::SameIpOrLoopback => local,
            Self::External => !local,
        }
    }
}

/// A chain's TLS (a `DownstreamTlsContext` under A29): certificates come from the bootstrap's certificate
/// provider instances, named here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboundTls {
    /// The provider instance holding the server's certificate and key.
    pub certificate_provider: String,
    /// The provider instance holding the roots client certificates are checked against; `None` asks for no
    /// client certificate.
    pub ca_certificate_provider: Option<String>,
    /// Whether a connection without a valid client certificate is refused (mTLS). Only set with a
    /// `ca_certificate_provider`.
    pub require_client_certificate: bool,
}

/// What a chain's HTTP connection manager says.
#[derive(Clone, Debug)]
pub struct InboundHttp {
    /// The route table, by RDS name or inline. On a server a route that matches must be non-forwarding (A36).
    pub route: RouteSource,
    /// HTTP filter names in order, the router last; optional filters of unknown types are left out.
    pub http_filters: Vec<String>,
    /// The fault filter's configuration, for routes without an override of their own.
    pub fault: Option<FaultInjection>,
    /// The local rate limit filter's bucket, shared by the chain's calls.
    pub rate_limit: Option<RateLimit>,
    /// The adaptive concurrency filter's controller settings.
    pub adaptive_concurrency: Option<AdaptiveConcurrency>,
    /// The RBAC filters, in order: the chain the server checks every call against before serving it
    /// ([`crate::authz::Engine`], A41).
    pub rbac: Vec<Rbac>,
}

impl InboundHttp {
    /// Routes from `route`, only the router filter, no policies.
    pub fn new(route: RouteSource) -> Self {
        Self { route, http_filters: Vec::new(), fault: None, rate_limit: None, adaptive_concurrency: None, rbac: Vec::new() }
    }
}

impl InboundListener {
    /// The chain for a connection from `source` to `destination` (the connection's local address), TLS when
    /// `tls` (its first byte opens a TLS record), as Envoy
    /// selects it: stage by stage, keep the chains whose criterion matches most specifically, and go on with
    /// those only. The stages: the destination address (longest matching prefix; a chain with no prefixes is
    /// the least specific), the transport protocol (`tls` before `raw_buffer` before none; [`TransportProtocol`]), the source type
    /// (`SameIpOrLoopback` or `External` before `Any`), the source address (longest prefix), the source port (a
    /// listed port before none). A stage that leaves no chain ends the search: there is no going back to a
    /// less specific chain an earlier stage dropped. With no chain left, the default chain, if any.
    ///
    /// IPv4 addresses seen as IPv6 (`::ffff:10.1.2.3`, from a dual-stack socket) are matched as IPv4. The
    /// destination port plays no part (chains that name one never match, A36).
    pub fn select(&self, destination: SocketAddr, source: SocketAddr, tls: bool) -> Option<&FilterChain> {
        let (dst, src) = (destination.ip().to_canonical(), source.ip().to_canonical());
        let chains = self.filter_chains.iter().collect();
        let chains = most_specific(chains, |m| prefix_rank(&m.destination_prefixes, dst));
        let chains = most_specific(chains, |m| m.transport_protocol.rank(tls));
        let chains = most_specific(chains, |m| match m.source_type {
            SourceType::Any => Some(0),
            specific => specific.matches(dst, src).then_some(1),
        });
        let chains = most_specific(chains, |m| prefix_rank(&m.source_prefixes, src));
        let chains =
            most_specific(
                chains,
                |m| {
                    if m.source_ports.is_empty() { Some(0) } else { m.source_ports.contains(&source.port()).then_some(1) }
                },
            );
        // The decoder refuses listeners where two chains could tie, so at most one is left (in a listener built
        // by hand, the first of the tied chains).
        chains.first().copied().or(self.default_filter_chain.as_ref())
    }
}

/// The chains whose `rank` is highest; `None` is no match.
fn most_specific(chains: Vec<&FilterChain>, rank: impl Fn(&FilterChainMatch) -> Option<i16>) -> Vec<&FilterChain> {
    let ranked: Vec<_> = chains.into_iter().filter_map(|c| rank(&c.matcher).map(|r| (r, c))).collect();
    let Some(best) = ranked.iter().map(|(r, _)| *r).max() else { return Vec::new() };
    ranked.into_iter().filter(|(r, _)| *r == best).map(|(_, c)| c).collect()
}

/// The longest of `prefixes` holding `ip`; -1 for no prefixes (matches all, least specifically).
fn prefix_rank(prefixes: &[Cidr], ip: IpAddr) -> Option<i16> {
    if prefixes.is_empty() {
        return Some(-1);
    }
    prefixes.iter().filter(|c| c.contains(ip)).map(|c| i16::from(c.normalized().prefix_len)).max()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(name: &str, matcher: FilterChainMatch) -> FilterChain {
        FilterChain { name: name.into(), matcher, tls: None, http: InboundHttp::new(RouteSource::Rds("r".into())) }
    }

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|c| c.parse().unwrap()).collect()
    }

    fn listener(chains: Vec<FilterChain>, default: bool) -> InboundListener {
        InboundListener {
            name: "l".into(),
            address: "0.0.0.0:8080".parse().unwrap(),
            filter_chains: chains,
            default_filter_chain: default.then(|| chain("default", FilterChainMatch::default())),
        }
    }

    fn pick<'a>(l: &'a InboundListener, dst: &str, src: &str) -> Option<&'a str> {
        l.select(dst.parse().unwrap(), src.parse().unwrap(), false).map(|c| c.name.as_str())
    }

    #[test]
    fn the_longest_destination_prefix_wins_and_no_prefix_matches_all() {
        let l = listener(
            vec![
                chain("any", FilterChainMatch::default()),
                chain("ten", FilterChainMatch { destination_prefixes: cidrs(&["10.0.0.0/8"]), ..Default::default() }),
                chain(
                    "ten-one",
                    FilterChainMatch { destination_prefixes: cidrs(&["192.168.0.0/16", "10.1.0.0/16"]), ..Default::default() },
                ),
                chain("v4", FilterChainMatch { destination_prefixes: cidrs(&["0.0.0.0/0"]), ..Default::default() }),
            ],
            false,
        );
        assert_eq!(pick(&l, "10.1.2.3:8080", "1.1.1.1:1"), Some("ten-one"));
        assert_eq!(pick(&l, "10.2.2.3:8080", "1.1.1.1:1"), Some("ten"));
        assert_eq!(pick(&l, "172.16.0.1:8080", "1.1.1.1:1"), Some("v4"), "a /0 block beats no prefix");
        assert_eq!(pick(&l, "[2001:db8::1]:8080", "[2001:db8::2]:1"), Some("any"), "an IPv4 /0 holds no IPv6 address");
        assert_eq!(pick(&l, "[::ffff:10.1.0.1]:8080", "1.1.1.1:1"), Some("ten-one"), "a mapped address is IPv4");
    }

    #[test]
    fn raw_buffer_beats_no_transport_protocol_after_the_destination() {
        let raw = FilterChainMatch { transport_protocol: TransportProtocol::RawBuffer, ..Default::default() };
        let l = listener(vec![chain("any", FilterChainMatch::default()), chain("raw", raw.clone())], false);
        assert_eq!(pick(&l, "10.0.0.1:8080", "10.0.0.2:5000"), Some("raw"));
        // The destination prefix is decided first.
        let ten = FilterChainMatch { destination_prefixes: cidrs(&["10.0.0.0/8"]), ..Default::default() };
        let l = listener(vec![chain("ten", ten), chain("raw", raw)], false);
        assert_eq!(pick(&l, "10.0.0.1:8080", "10.0.0.2:5000"), Some("ten"));
        assert_eq!(pick(&l, "11.0.0.1:8080", "10.0.0.2:5000"), Some("raw"));
    }

    #[test]
    fn a_tls_chain_takes_tls_connections_and_plaintext_goes_elsewhere() {
        let tls = chain("mtls", FilterChainMatch { transport_protocol: TransportProtocol::Tls, ..Default::default() });
        let raw = chain("raw", FilterChainMatch { transport_protocol: TransportProtocol::RawBuffer, ..Default::default() });
        let (dst, src) = ("10.0.0.1:8080".parse().unwrap(), "10.0.0.2:5000".parse().unwrap());
        let permissive = listener(vec![tls.clone()], true);
        let name = |c: Option<&FilterChain>| c.map(|c| c.name.clone());
        assert_eq!(name(permissive.select(dst, src, true)).as_deref(), Some("mtls"));
        assert_eq!(name(permissive.select(dst, src, false)).as_deref(), Some("default"), "plaintext falls to the default chain");
        let both = listener(vec![tls, raw.clone()], false);
        assert_eq!(name(both.select(dst, src, true)).as_deref(), Some("mtls"), "tls is more specific than raw_buffer");
        assert_eq!(name(both.select(dst, src, false)).as_deref(), Some("raw"));
        let a36 = listener(vec![raw], false);
        assert_eq!(name(a36.select(dst, src, true)).as_deref(), Some("raw"), "without a tls chain, A36: every connection is raw_buffer");
    }

    #[test]
    fn a_specific_source_type_beats_any() {
        let l = listener(
            vec![
                chain("any", FilterChainMatch::default()),
                chain("local", FilterChainMatch { source_type: SourceType::SameIpOrLoopback, ..Default::default() }),
                chain("external", FilterChainMatch { source_type: SourceType::External, ..Default::default() }),
            ],
            false,
        );
        assert_eq!(pick(&l, "10.0.0.1:8080", "127.0.0.1:5000"), Some("local"));
        assert_eq!(pick(&l, "10.0.0.1:8080", "10.0.0.1:5000"), Some("local"), "the server's own address");
        assert_eq!(pick(&l, "[::1]:8080", "[::1]:5000"), Some("local"));
        assert_eq!(pick(&l, "10.0.0.1:8080", "10.0.0.2:5000"), Some("external"));
        let only_any = listener(vec![chain("any", FilterChainMatch::default())], false);
        assert_eq!(pick(&only_any, "10.0.0.1:8080", "127.0.0.1:5000"), Some("any"));
    }

    #[test]
    fn the_longest_source_prefix_wins() {
        let l = listener(
            vec![
                chain("any", FilterChainMatch::default()),
                chain("pods", FilterChainMatch { source_prefixes: cidrs(&["10.0.0.0/8"]), ..Default::default() }),
                chain("ns", FilterChainMatch { source_prefixes: cidrs(&["10.4.0.0/16"]), ..Default::default() }),
            ],
            false,
        );
        assert_eq!(pick(&l, "10.0.0.1:8080", "10.4.1.1:5000"), Some("ns"));
        assert_eq!(pick(&l, "10.0.0.1:8080", "10.5.1.1:5000"), Some("pods"));
        assert_eq!(pick(&l, "10.0.0.1:8080", "192.168.1.1:5000"), Some("any"));
    }

    #[test]
    fn a_listed_source_port_beats_no_ports() {
        let l = listener(
            vec![
                chain("any", FilterChainMatch::default()),
                chain("probe", FilterChainMatch { source_ports: vec![9000, 9001], ..Default::default() }),
            ],
            true,
        );
        assert_eq!(pick(&l, "10.0.0.1:8080", "10.0.0.2:9001"), Some("probe"));
        assert_eq!(pick(&l, "10.0.0.1:8080", "10.0.0.2:9002"), Some("any"));
        let ports_only = listener(vec![chain("probe", FilterChainMatch { source_ports: vec![9000], ..Default::default() })], true);
        assert_eq!(pick(&ports_only, "10.0.0.1:8080", "10.0.0.2:9002"), Some("default"));
    }

    #[test]
    fn stages_go_in_order_and_never_back() {
        // The destination stage comes first: the /16 chain wins on destination even though the other chain's
        // source criteria are more specific.
        let l = listener(
            vec![
                chain(
                    "dst",
                    FilterChainMatch {
                        destination_prefixes: cidrs(&["10.1.0.0/16"]),
                        source_type: SourceType::External,
                        ..Default::default()
                    },
                ),
                chain(
                    "src",
                    FilterChainMatch {
                        destination_prefixes: cidrs(&["10.0.0.0/8"]),
                        source_prefixes: cidrs(&["127.0.0.1/32"]),
                        source_ports: vec![5000],
                        ..Default::default()
                    },
                ),
            ],
            true,
        );
        assert_eq!(pick(&l, "10.1.0.1:8080", "192.168.0.9:5000"), Some("dst"));
        // The destination stage kept only "dst", whose source type fails: no return to "src", the default.
        assert_eq!(pick(&l, "10.1.0.1:8080", "127.0.0.1:5000"), Some("default"));
        assert_eq!(pick(&l, "10.2.0.1:8080", "127.0.0.1:5000"), Some("src"));
        // Source type before source prefix: the loopback chain wins over a longer source prefix with ANY.
        let l = listener(
            vec![
                chain("local", FilterChainMatch { source_type: SourceType::SameIpOrLoopback, ..Default::default() }),
                chain("exact", FilterChainMatch { source_prefixes: cidrs(&["127.0.0.1/32"]), ..Default::default() }),
            ],
            false,
        );
        assert_eq!(pick(&l, "10.0.0.1:8080", "127.0.0.1:5000"), Some("local"));
        // Source prefix before source port.
        let l = listener(
            vec![
                chain("prefix", FilterChainMatch { source_prefixes: cidrs(&["10.0.0.0/8"]), ..Default::default() }),
                chain("port", FilterChainMatch { source_ports: vec![5000], ..Default::default() }),
            ],
            false,
        );
        assert_eq!(pick(&l, "10.0.0.1:8080", "10.9.9.9:5000"), Some("prefix"));
        assert_eq!(pick(&l, "10.0.0.1:8080", "11.9.9.9:5000"), Some("port"));
    }

    #[test]
    fn no_match_takes_the_default_chain_or_none() {
        let only = |default| {
            listener(vec![chain("ten", FilterChainMatch { destination_prefixes: cidrs(&["10.0.0.0/8"]), ..Default::default() })], default)
        };
        assert_eq!(pick(&only(true), "192.168.0.1:8080", "1.1.1.1:1"), Some("default"));
        assert_eq!(pick(&only(false), "192.168.0.1:8080", "1.1.1.1:1"), None);
        assert_eq!(pick(&listener(vec![], true), "192.168.0.1:8080", "1.1.1.1:1"), Some("default"));
    }
}
