use std::net::SocketAddr;

use mesh_tower::discover::dns::DnsQuery;

use crate::{Error, Result};

/// A parsed target URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `static:///ip:port,ip:port`.
    Static(Vec<SocketAddr>),
    /// `xds:///name`: routing and endpoints from the xDS control plane named
    /// by the bootstrap (`GRPC_XDS_BOOTSTRAP`).
    Xds {
        /// Target name (the listener resource name by default).
        name: String,
    },
    /// `dns://[server]/name[:port]`.
    Dns {
        /// DNS server to ask; `None` uses the system's.
        server: Option<SocketAddr>,
        /// What to look up.
        query: DnsQuery,
    },
}

impl Target {
    /// Parses a target URI; the error names the target and what is wrong.
    pub fn parse(target: &str) -> Result<Self> {
        let invalid = |reason: &str| Error::InvalidTarget { target: target.to_owned(), reason: reason.to_owned() };
        let (scheme, rest) =
            target.split_once("://").ok_or_else(|| invalid("expected scheme://[authority]/name, e.g. dns:///greeter:50051"))?;
        let (authority, path) = rest.split_once('/').ok_or_else(|| invalid("missing '/' after the authority"))?;
        if path.is_empty() {
            return Err(invalid("empty name"));
        }
        match scheme {
            "static" => {
                let addrs = path
                    .split(',')
                    .map(|a| a.trim().parse::<SocketAddr>().map_err(|_| invalid(&format!("{a:?} is not an ip:port address"))))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Self::Static(addrs))
            }
            "dns" => {
                let server = match authority {
                    "" => None,
                    a => Some(
                        a.parse::<SocketAddr>()
                            .or_else(|_| a.parse::<std::net::IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                            .map_err(|_| invalid(&format!("DNS server {a:?} is not an ip[:port]")))?,
                    ),
                };
                let query = if path.starts_with('_') {
                    DnsQuery::Srv { name: path.to_owned() }
                } else {
                    let (name, port) = path
                        .rsplit_once(':')
                        .ok_or_else(|| invalid("DNS name needs a port (host:port), or an SRV name starting with '_'"))?;
                    let port = port
                        .parse::<u16>()
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or_else(|| invalid(&format!("port {port:?} is not a number in 1..=65535")))?;
                    if name.is_empty() {
                        return Err(invalid("empty host name"));
                    }
                    DnsQuery::Host { name: name.to_owned(), port }
                };
                Ok(Self::Dns { server, query })
            }
            "xds" => Ok(Self::Xds { name: path.to_owned() }),
            other => Err(invalid(&format!("unknown scheme {other:?} (expected static, dns or xds)"))),
        }
    }

    /// The `:authority` requests carry.
    pub(crate) fn authority(&self) -> String {
        match self {
            Self::Xds { name } => name.clone(),
            Self::Static(addrs) => addrs.first().map_or_else(|| "localhost".to_owned(), ToString::to_string),
            Self::Dns { query: DnsQuery::Host { name, port }, .. } => format!("{name}:{port}"),
            Self::Dns { query: DnsQuery::Srv { name }, .. } => {
                name.split('.').skip_while(|label| label.starts_with('_')).collect::<Vec<_>>().join(".")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        assert_eq!(
            Target::parse("static:///127.0.0.1:1,127.0.0.1:2").unwrap(),
            Target::Static(vec!["127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap()])
        );
        assert_eq!(
            Target::parse("dns:///greeter.internal:50051").unwrap(),
            Target::Dns { server: None, query: DnsQuery::Host { name: "greeter.internal".into(), port: 50051 } }
        );
        assert_eq!(
            Target::parse("dns://127.0.0.1:5353/_grpc._tcp.greeter").unwrap(),
            Target::Dns { server: Some("127.0.0.1:5353".parse().unwrap()), query: DnsQuery::Srv { name: "_grpc._tcp.greeter".into() } }
        );
    }

    #[test]
    fn bad_targets_name_target_and_reason() {
        for (bad, why) in [
            ("greeter:50051", "scheme"),
            ("static:///nope", "not an ip:port"),
            ("dns:///greeter", "needs a port"),
            ("dns:///greeter:0", "1..=65535"),
            ("ftp:///x", "unknown scheme"),
            ("static:///", "empty name"),
        ] {
            let err = Target::parse(bad).unwrap_err().to_string();
            assert!(err.contains(bad) && err.contains(why), "{bad}: {err}");
        }
    }
}
