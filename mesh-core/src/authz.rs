//! Authorization with the semantics of Envoy's RBAC HTTP filter, as gRPC servers apply it (gRFC A41).
//!
//! An [`Rbac`] is one RBAC filter: an action and named [`Policy`]s. A policy matches a request when at least one
//! of its [`Permission`]s (what is asked: path, headers, destination) and at least one of its [`Principal`]s (who
//! asks: the peer's SPIFFE ID, its address, headers) match. A DENY filter denies a request that any policy
//! matches; an ALLOW filter denies one that no policy matches (so an ALLOW filter without policies denies
//! everything). An [`Engine`] runs a chain of filters in order, as Envoy chains RBAC filters: each decides on
//! its own and the first that denies wins; a request no filter denies is allowed.
//!
//! The engine sees a [`RequestView`]: the path already normalized by [`normalize_path`], the method, the
//! authority (lower-cased by [`normalize_host`]), a header lookup, the peer's identity and the addresses of the
//! connection. Normalizing is what keeps a rule on `/admin` from being stepped around with `//admin`,
//! `/%61dmin` or `/a/../admin`: the decision is taken on the path the server will route. A path that cannot
//! be normalized is an error, and the caller denies it (fail closed).
//!
//! Header matching follows A41: `:path`, `:method` and `:authority` are matched like headers (`host` is the same
//! header as `:authority`), multiple values are joined with `,`, hop-by-hop headers (`te`, `connection`, ...)
//! are never seen, and a rule on a `grpc-` header or on `:scheme` is invalid ([`Rbac::validate`]).
//!
//! ```
//! use mesh_core::StringMatch;
//! use mesh_core::authz::{Action, Decision, Engine, Permission, Policy, Principal, Rbac, RequestView};
//!
//! let deny_admin = Policy {
//!     permissions: vec![Permission::UrlPath(StringMatch::Prefix("/admin".into()))],
//!     principals: vec![Principal::Any],
//! };
//! let engine = Engine::new(vec![Rbac { action: Action::Deny, policies: vec![("no-admin".into(), deny_admin)] }])?;
//! let headers: &[(&str, &str)] = &[];
//! let request = RequestView::new("//%61dmin/users?page=2", "POST", &headers)?;
//! assert_eq!(request.path(), "/admin/users");
//! assert_eq!(engine.evaluate(&request), Decision::Deny { policy: Some("no-admin".into()) });
//! # Ok::<(), mesh_core::Error>(())
//! ```

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use crate::policy::{AuthzAction, AuthzRule};
use crate::{Error, HeaderMatch, Regex, Result, StringMatch};

/// What an [`Rbac`] filter does with the requests its policies match.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Allow-list: a request is allowed only if a policy matches it.
    Allow,
    /// Block-list: a request is denied if a policy matches it.
    Deny,
}

/// One RBAC filter (Envoy's `envoy.config.rbac.v3.RBAC`).
#[derive(Clone, Debug, PartialEq)]
pub struct Rbac {
    /// Allow-list or block-list.
    pub action: Action,
    /// Named policies, evaluated in order (Envoy evaluates them in the lexicographic order of their names, which
    /// is the order the xDS decoder gives them). Only the name of the first match is reported.
    pub policies: Vec<(String, Policy)>,
}

/// A policy: it matches a request when any permission and any principal match.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// What the request asks for; at least one.
    pub permissions: Vec<Permission>,
    /// Who asks; at least one.
    pub principals: Vec<Principal>,
}

/// A condition on what a request asks for (Envoy's `Permission`).
#[derive(Clone, Debug, PartialEq)]
pub enum Permission {
    /// Every request.
    Any,
    /// All of these (at least one).
    And(Vec<Permission>),
    /// Any of these (at least one).
    Or(Vec<Permission>),
    /// Not this one.
    Not(Box<Permission>),
    /// A header, or the pseudo-headers `:path` (the normalized path), `:method` and `:authority` (lower-cased).
    /// A method rule is a header rule on `:method`.
    Header(HeaderMatch),
    /// The normalized path ([`normalize_path`]), its query and fragment left out. One trailing slash is not
    /// significant: the matcher is also tried on the path with it removed, or added (`Exact("/admin")` matches
    /// `/admin/`; `Prefix("/admin/")` matches `/admin`).
    UrlPath(StringMatch),
    /// The local address of the connection is in this block.
    DestinationIp(Cidr),
    /// The local port of the connection.
    DestinationPort(u16),
}

/// A condition on who makes a request (Envoy's `Principal`).
#[derive(Clone, Debug, PartialEq)]
pub enum Principal {
    /// Every caller.
    Any,
    /// All of these (at least one).
    And(Vec<Principal>),
    /// Any of these (at least one).
    Or(Vec<Principal>),
    /// Not this one.
    Not(Box<Principal>),
    /// A peer that proved an identity (mTLS): `None` matches any such peer, `Some` one whose SPIFFE ID matches
    /// (a `spiffe://td/ns/prod/*` rule is `Prefix("spiffe://td/ns/prod/")`). A peer without one never matches.
    Authenticated(Option<StringMatch>),
    /// A header, as in [`Permission::Header`].
    Header(HeaderMatch),
    /// The path, as in [`Permission::UrlPath`].
    UrlPath(StringMatch),
    /// The peer's address is in this block. Envoy's `source_ip`, `direct_remote_ip` and `remote_ip` are all this:
    /// the mesh reads neither PROXY protocol nor `x-forwarded-for`, so the three are the connection's peer (A41).
    SourceIp(Cidr),
}

/// An IP address block (`10.0.0.0/8`, `2001:db8::/32`). An IPv4 address seen as IPv6 (`::ffff:10.1.2.3`, from a
/// dual-stack socket) is matched as the IPv4 address it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    /// The block's address; bits past the prefix are ignored.
    pub addr: IpAddr,
    /// Leading bits that must be equal: up to 32 for IPv4, 128 for IPv6.
    pub prefix_len: u8,
}

impl Cidr {
    /// Checks the prefix length fits the address family.
    pub fn validate(&self) -> Result<()> {
        let max = self.max_len();
        if self.prefix_len > max {
            return Err(invalid(
                "cidr",
                format!("{}/{}: the prefix length of an address of {max} bits is at most {max}", self.addr, self.prefix_len),
            ));
        }
        Ok(())
    }

    fn max_len(&self) -> u8 {
        if self.addr.is_ipv4() { 32 } else { 128 }
    }

    /// The same block in one spelling: an IPv4 block written as IPv6 (`::ffff:10.0.0.0/104`) becomes the IPv4
    /// block it is (`10.0.0.0/8`), the prefix length is capped at the family's bits, and the bits past the
    /// prefix are cleared. Two blocks holding the same addresses normalize to the same value.
    pub fn normalized(self) -> Cidr {
        let (addr, prefix_len) = match self.addr {
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => (self.addr.to_canonical(), self.prefix_len.saturating_sub(96)),
            addr => (addr, self.prefix_len),
        };
        let prefix_len = prefix_len.min(if addr.is_ipv4() { 32 } else { 128 });
        let len = u32::from(prefix_len);
        let addr = match addr {
            IpAddr::V4(a) => IpAddr::V4((u32::from(a) & u32::MAX.checked_shl(32 - len).unwrap_or(0)).into()),
            IpAddr::V6(a) => IpAddr::V6((u128::from(a) & u128::MAX.checked_shl(128 - len).unwrap_or(0)).into()),
        };
        Cidr { addr, prefix_len }
    }

    /// Whether `ip` is in the block (never for an address of the other family).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let block = self.normalized();
        let len = u32::from(block.prefix_len);
        match (block.addr, ip.to_canonical()) {
            (IpAddr::V4(block), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
                u32::from(block) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(block), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
                u128::from(block) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = Error;

    /// Parses `addr/len`, or a bare address (a block of one).
    fn from_str(s: &str) -> Result<Self> {
        let (addr, len) = s.split_once('/').map_or((s, None), |(a, l)| (a, Some(l)));
        let addr: IpAddr = addr.parse().map_err(|_| invalid("cidr", format!("{s:?}: {addr:?} is not an IP address")))?;
        let prefix_len = match len {
            None if addr.is_ipv4() => 32,
            None => 128,
            Some(len) => len.parse().map_err(|_| invalid("cidr", format!("{s:?}: {len:?} is not a prefix length")))?,
        };
        let cidr = Self { addr, prefix_len };
        cidr.validate()?;
        Ok(cidr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

fn invalid(field: &'static str, reason: String) -> Error {
    Error::InvalidPolicy { policy: "rbac", field, reason }
}

/// What the chain decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No filter denied the request.
    Allow,
    /// A filter denied it.
    Deny {
        /// The DENY policy that matched, or `None` when an ALLOW filter had no policy matching.
        policy: Option<String>,
    },
}

impl Decision {
    /// Whether the request may go on.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Self::Allow)
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Allow => f.write_str("allowed"),
            Self::Deny { policy: Some(policy) } => write!(f, "denied by policy {policy:?}"),
            Self::Deny { policy: None } => f.write_str("denied: no allow policy matched"),
        }
    }
}

/// A request's headers as the engine reads them: by lower-case name, the values of a repeated header joined with
/// `,` (no spaces), as A41 asks. The pseudo-headers and `host` are not asked for: [`RequestView`] answers those.
pub trait Headers {
    /// The value of the header `name` (lower case), `None` when absent.
    fn get(&self, name: &str) -> Option<Cow<'_, str>>;
}

/// Name and value pairs, names compared ignoring ASCII case.
impl<'a> Headers for &'a [(&'a str, &'a str)] {
    fn get(&self, name: &str) -> Option<Cow<'_, str>> {
        join(self.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| *v))
    }
}

/// Joins the values of one header with `,`; `None` when there are none.
fn join<'a>(mut values: impl Iterator<Item = &'a str>) -> Option<Cow<'a, str>> {
    let first = values.next()?;
    match values.next() {
        None => Some(Cow::Borrowed(first)),
        Some(second) => {
            let mut joined = format!("{first},{second}");
            for value in values {
                joined.push(',');
                joined.push_str(value);
            }
            Some(Cow::Owned(joined))
        }
    }
}

/// Headers the engine never matches: hop-by-hop headers (A41: `te` may reach the server, and must not match).
const HOP_BY_HOP: [&str; 6] = ["connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade"];

/// The request as the engine sees it. Its path is always normalized: the only way to make one is
/// [`RequestView::new`], which normalizes it or fails.
pub struct RequestView<'a> {
    path: String,
    method: &'a str,
    authority: Option<String>,
    headers: &'a dyn Headers,
    peer_identity: Option<&'a str>,
    source_ip: Option<IpAddr>,
    destination_ip: Option<IpAddr>,
    destination_port: Option<u16>,
}

impl fmt::Debug for RequestView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestView")
            .field("path", &self.path)
            .field("method", &self.method)
            .field("authority", &self.authority)
            .field("peer_identity", &self.peer_identity)
            .field("source_ip", &self.source_ip)
            .field("destination_ip", &self.destination_ip)
            .field("destination_port", &self.destination_port)
            .finish_non_exhaustive()
    }
}

impl<'a> RequestView<'a> {
    /// A request for `raw_path` (the `:path` as received, query included), normalized by [`normalize_path`];
    /// the error is its error, and the caller denies the request. No authority, peer or addresses yet.
    pub fn new(raw_path: &str, method: &'a str, headers: &'a dyn Headers) -> Result<Self> {
        Ok(Self {
            path: normalize_path(raw_path)?,
            method,
            authority: None,
            headers,
            peer_identity: None,
            source_ip: None,
            destination_ip: None,
            destination_port: None,
        })
    }

    /// The authority (`:authority`, or `Host` when it is absent), lower-cased by [`normalize_host`].
    pub fn with_authority(mut self, authority: Option<&str>) -> Self {
        self.authority = authority.map(normalize_host);
        self
    }

    /// The peer's proven identity (its SPIFFE ID); `None` for a peer that proved none.
    pub fn with_peer_identity(mut self, identity: Option<&'a str>) -> Self {
        self.peer_identity = identity;
        self
    }

    /// The peer's address.
    pub fn with_source_ip(mut self, ip: Option<IpAddr>) -> Self {
        self.source_ip = ip;
        self
    }

    /// The local address and port the request came in on.
    pub fn with_destination(mut self, ip: Option<IpAddr>, port: Option<u16>) -> Self {
        self.destination_ip = ip;
        self.destination_port = port;
        self
    }

    /// The normalized path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The method.
    pub fn method(&self) -> &str {
        self.method
    }

    /// The lower-cased authority.
    pub fn authority(&self) -> Option<&str> {
        self.authority.as_deref()
    }

    /// The peer's identity.
    pub fn peer_identity(&self) -> Option<&str> {
        self.peer_identity
    }

    /// The header `name` (lower case) as a rule sees it: the pseudo-headers from the view, `host` as
    /// `:authority`, hop-by-hop headers never.
    pub fn header(&self, name: &str) -> Option<Cow<'_, str>> {
        match name {
            ":path" => Some(Cow::Borrowed(&self.path)),
            ":method" => Some(Cow::Borrowed(self.method)),
            ":authority" | "host" => self.authority.as_deref().map(Cow::Borrowed),
            name if HOP_BY_HOP.contains(&name) => None,
            name => self.headers.get(name),
        }
    }

    /// Whether `matcher` matches the path, with or without one trailing slash ([`Permission::UrlPath`]).
    fn path_matches(&self, matcher: &StringMatch) -> bool {
        if matcher.matches(Some(&self.path)) {
            return true;
        }
        match self.path.strip_suffix('/') {
            Some("") => false,
            Some(without) => matcher.matches(Some(without)),
            None => matcher.matches(Some(&format!("{}/", self.path))),
        }
    }
}

/// Lower-cases a host (`:authority` or `Host`) for matching: host names are case-insensitive (RFC 3986 §3.2.2), so
/// a rule on `example.com` must catch `EXAMPLE.com`. The port, if any, is kept.
pub fn normalize_host(host: &str) -> String {
    host.to_ascii_lowercase()
}

/// Normalizes a request path for authorization, so the decision is taken on the path the server routes.
///
/// 1. The query (`?...`) and fragment (`#...`) are cut off.
/// 2. Percent-encodings are decoded once, left to right: an unreserved character (`%61` is `a`, `%2E` is `.`)
///    becomes itself; `%2F` and `%5C` (either case) become `/`, a separator like any other (Envoy's
///    `UNESCAPE_AND_REDIRECT`); every other one stays encoded, its hex digits upper-cased (`%3f` is `%3F`). A
///    `%` not followed by two hex digits is an error.
/// 3. A backslash is a `/`.
/// 4. The path must then start with `/`, or it is an error.
/// 5. Repeated slashes are merged, and `.` and `..` segments removed (RFC 3986 §5.2.4); `..` never climbs
///    above the root.
///
/// A trailing slash is kept (`/admin/` stays `/admin/`, `/admin/.` becomes `/admin/`), as Envoy keeps it: prefix
/// and regex rules can tell the two apart. Path rules ([`Permission::UrlPath`]) then treat one trailing slash as
/// not significant, so a rule on `/admin` also catches `/admin/` whether it is exact or a prefix. Exact is
/// string equality and prefix a plain string prefix (so `/admin` is a prefix of `/administrator`), as in
/// Envoy's `StringMatcher`.
///
/// ```
/// use mesh_core::authz::normalize_path;
/// assert_eq!(normalize_path("/a//b/./c/../%64?x=1").unwrap(), "/a/b/d");
/// assert_eq!(normalize_path("\\admin%2F").unwrap(), "/admin/");
/// assert!(normalize_path("/a%zz").is_err() && normalize_path("admin").is_err());
/// ```
pub fn normalize_path(raw: &str) -> Result<String> {
    let error = |at: usize, reason: &'static str| Error::InvalidPath { path: raw.to_owned(), at, reason };
    let end = raw.find(['?', '#']).unwrap_or(raw.len());
    let bytes = &raw.as_bytes()[..end];
    // Decoding gives ASCII for every escape, and copies every other byte, so the result stays UTF-8.
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = |at: usize| bytes.get(at).and_then(|b| (*b as char).to_digit(16));
                let (Some(high), Some(low)) = (hex(i + 1), hex(i + 2)) else {
                    return Err(error(i, "a % must be followed by two hex digits"));
                };
                let byte = (high * 16 + low) as u8;
                match byte {
                    b'/' | b'\\' => decoded.push(b'/'),
                    b if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') => decoded.push(b),
                    b => decoded.extend_from_slice(format!("%{b:02X}").as_bytes()),
                }
                i += 3;
            }
            b'\\' => {
                decoded.push(b'/');
                i += 1;
            }
            b => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    let decoded = String::from_utf8(decoded).map_err(|_| error(0, "not UTF-8"))?;
    if !decoded.starts_with('/') {
        return Err(error(0, "a path must start with /"));
    }
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in decoded.split('/').skip(1) {
        // A segment that is empty, `.` or `..` leaves the path ending in a directory: `/a/` `/a/.` `/a/b/..`.
        trailing_slash = matches!(segment, "" | "." | "..");
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            segment => segments.push(segment),
        }
    }
    let mut path = String::with_capacity(decoded.len());
    for segment in &segments {
        path.push('/');
        path.push_str(segment);
    }
    if path.is_empty() || trailing_slash {
        path.push('/');
    }
    Ok(path)
}

impl Rbac {
    /// A filter that denies nothing: a DENY filter without policies (Envoy's RBAC filter without `rules`).
    pub fn permissive() -> Self {
        Self { action: Action::Deny, policies: Vec::new() }
    }

    /// Checks the filter can be evaluated as Envoy would: policy names non-empty and unique, every policy with a
    /// permission and a principal, no empty `And`/`Or`, CIDR prefixes within their address's length, header
    /// names lower case and not `grpc-` headers or `:scheme` (A41).
    pub fn validate(&self) -> Result<()> {
        for (i, (name, policy)) in self.policies.iter().enumerate() {
            if name.is_empty() {
                return Err(invalid("policies", format!("policies[{i}]: empty name")));
            }
            if self.policies[..i].iter().any(|(other, _)| other == name) {
                return Err(invalid("policies", format!("policies[{i}]: a second policy named {name:?}")));
            }
            policy.validate().map_err(|e| match e {
                Error::InvalidPolicy { policy: p, field, reason } => {
                    Error::InvalidPolicy { policy: p, field, reason: format!("policy {name:?}: {reason}") }
                }
                other => other,
            })?;
        }
        Ok(())
    }

    /// The name of the first policy matching `request`.
    pub fn matching_policy(&self, request: &RequestView<'_>) -> Option<&str> {
        self.policies.iter().find(|(_, policy)| policy.matches(request)).map(|(name, _)| name.as_str())
    }

    /// This filter's decision on `request`, on its own.
    pub fn evaluate(&self, request: &RequestView<'_>) -> Decision {
        match (self.action, self.matching_policy(request)) {
            (Action::Deny, Some(name)) => Decision::Deny { policy: Some(name.to_owned()) },
            (Action::Deny, None) | (Action::Allow, Some(_)) => Decision::Allow,
            (Action::Allow, None) => Decision::Deny { policy: None },
        }
    }
}

impl Policy {
    /// Checks the policy (see [`Rbac::validate`]).
    pub fn validate(&self) -> Result<()> {
        if self.permissions.is_empty() {
            return Err(invalid("permissions", "no permissions (use Permission::Any to match every request)".into()));
        }
        if self.principals.is_empty() {
            return Err(invalid("principals", "no principals (use Principal::Any to match every caller)".into()));
        }
        for (i, p) in self.permissions.iter().enumerate() {
            p.validate().map_err(|reason| invalid("permissions", format!("permissions[{i}]{reason}")))?;
        }
        for (i, p) in self.principals.iter().enumerate() {
            p.validate().map_err(|reason| invalid("principals", format!("principals[{i}]{reason}")))?;
        }
        Ok(())
    }

    /// Whether any permission and any principal match `request`.
    pub fn matches(&self, request: &RequestView<'_>) -> bool {
        self.permissions.iter().any(|p| p.matches(request)) && self.principals.iter().any(|p| p.matches(request))
    }
}

/// Checks a header rule's name (A41): lower case, and neither a `grpc-` header nor `:scheme`.
fn validate_header(h: &HeaderMatch) -> Result<(), String> {
    let reason = if h.name.is_empty() {
        "empty header name"
    } else if h.name.bytes().any(|b| b.is_ascii_uppercase()) {
        "header names are matched in lower case"
    } else if h.name.starts_with("grpc-") {
        "grpc- headers cannot be matched (A41)"
    } else if h.name == ":scheme" {
        ":scheme cannot be matched (A41)"
    } else {
        return Ok(());
    };
    Err(format!(".header {:?}: {reason}", h.name))
}

/// Checks each of a list of sub-rules, naming the one that fails: `.and[2].not: ...`.
fn validate_list<T>(kind: &str, rules: &[T], validate: impl Fn(&T) -> Result<(), String>) -> Result<(), String> {
    if rules.is_empty() {
        return Err(format!(".{kind}: empty list (it needs at least one rule)"));
    }
    rules.iter().enumerate().try_for_each(|(i, r)| validate(r).map_err(|e| format!(".{kind}[{i}]{e}")))
}

fn validate_cidr(cidr: &Cidr) -> Result<(), String> {
    cidr.validate().map_err(|e| match e {
        Error::InvalidPolicy { reason, .. } => format!(".cidr {reason}"),
        other => format!(".cidr {other}"),
    })
}

impl Permission {
    /// Checks the rule; the error is where in it (`.and[1].header "grpc-x": ...`) and why.
    fn validate(&self) -> Result<(), String> {
        match self {
            Self::Any | Self::UrlPath(_) | Self::DestinationPort(_) => Ok(()),
            Self::And(rules) => validate_list("and", rules, Self::validate),
            Self::Or(rules) => validate_list("or", rules, Self::validate),
            Self::Not(rule) => rule.validate().map_err(|e| format!(".not{e}")),
            Self::Header(h) => validate_header(h),
            Self::DestinationIp(cidr) => validate_cidr(cidr),
        }
    }

    /// Whether the rule matches `request`.
    pub fn matches(&self, request: &RequestView<'_>) -> bool {
        match self {
            Self::Any => true,
            Self::And(rules) => rules.iter().all(|r| r.matches(request)),
            Self::Or(rules) => rules.iter().any(|r| r.matches(request)),
            Self::Not(rule) => !rule.matches(request),
            Self::Header(h) => h.matches(request.header(&h.name).as_deref()),
            Self::UrlPath(m) => request.path_matches(m),
            Self::DestinationIp(cidr) => request.destination_ip.is_some_and(|ip| cidr.contains(ip)),
            Self::DestinationPort(port) => request.destination_port == Some(*port),
        }
    }
}

impl Principal {
    /// Checks the rule; the error is where in it and why.
    fn validate(&self) -> Result<(), String> {
        match self {
            Self::Any | Self::Authenticated(_) | Self::UrlPath(_) => Ok(()),
            Self::And(rules) => validate_list("and", rules, Self::validate),
            Self::Or(rules) => validate_list("or", rules, Self::validate),
            Self::Not(rule) => rule.validate().map_err(|e| format!(".not{e}")),
            Self::Header(h) => validate_header(h),
            Self::SourceIp(cidr) => validate_cidr(cidr),
        }
    }

    /// Whether the rule matches `request`.
    pub fn matches(&self, request: &RequestView<'_>) -> bool {
        match self {
            Self::Any => true,
            Self::And(rules) => rules.iter().all(|r| r.matches(request)),
            Self::Or(rules) => rules.iter().any(|r| r.matches(request)),
            Self::Not(rule) => !rule.matches(request),
            Self::Authenticated(name) => request.peer_identity.is_some_and(|id| name.as_ref().is_none_or(|m| m.matches(Some(id)))),
            Self::Header(h) => h.matches(request.header(&h.name).as_deref()),
            Self::UrlPath(m) => request.path_matches(m),
            Self::SourceIp(cidr) => request.source_ip.is_some_and(|ip| cidr.contains(ip)),
        }
    }
}

/// A mesh-file value pattern, as Istio's `AuthorizationPolicy` writes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Glob<'a> {
    /// `*`: anything (for a header, that it is present).
    Any,
    /// No `*`: equal to this.
    Exact(&'a str),
    /// `x*`: starts with `x`.
    Prefix(&'a str),
    /// `*x`: ends with `x`.
    Suffix(&'a str),
}

impl<'a> Glob<'a> {
    /// Reads `s`: `*`, `x*`, `*x`, or exact. A `*` anywhere else is part of an exact value
    /// ([`AuthzRule::validate`] refuses those).
    pub fn parse(s: &'a str) -> Self {
        if s == "*" {
            Self::Any
        } else if let Some(prefix) = s.strip_suffix('*') {
            Self::Prefix(prefix)
        } else if let Some(suffix) = s.strip_prefix('*') {
            Self::Suffix(suffix)
        } else {
            Self::Exact(s)
        }
    }

    /// The string matcher; `None` for [`Glob::Any`].
    pub fn string_match(self) -> Option<StringMatch> {
        match self {
            Self::Any => None,
            Self::Exact(s) => Some(StringMatch::Exact(s.to_owned())),
            Self::Prefix(s) => Some(StringMatch::Prefix(s.to_owned())),
            Self::Suffix(s) => Some(StringMatch::Suffix(s.to_owned())),
        }
    }
}

/// The regular expression a caller's SPIFFE ID matches when its namespace (the segment after `/ns/`, right after
/// the trust domain) matches `namespace` (a [`Glob`]); metacharacters in it are escaped.
///
/// ```
/// assert_eq!(mesh_core::authz::namespace_pattern("prod-*"), "spiffe://[^/]+/ns/prod\\-[^/]*/.*");
/// ```
pub fn namespace_pattern(namespace: &str) -> String {
    let segment = match Glob::parse(namespace) {
        Glob::Any => "[^/]+".to_owned(),
        Glob::Exact(ns) => regex::escape(ns),
        Glob::Prefix(ns) => format!("{}[^/]*", regex::escape(ns)),
        Glob::Suffix(ns) => format!("[^/]*{}", regex::escape(ns)),
    };
    format!("spiffe://[^/]+/ns/{segment}/.*")
}

/// The name a rule's header is matched under: lower case, and `host` is `:authority` (A41 aliases the two).
pub fn rule_header_name(name: &str) -> String {
    match name.to_ascii_lowercase() {
        host if host == "host" => ":authority".to_owned(),
        name => name,
    }
}

/// One mesh-file rule as an RBAC policy: one principal and one permission, each the AND (`And`) of the rule's
/// conditions on it, each condition the OR (`Or`) of its values (a lone condition or value stands alone; no
/// condition is `Any`).
///
/// - Principal: `principals` as `Authenticated` names (a `*` among them drops the condition: any caller),
///   `namespaces` as `Authenticated` regexes ([`namespace_pattern`]), `not_principals` as `Not` of theirs.
/// - Permission: `paths` as `UrlPath` (a `*` drops the condition), `not_paths` as `Not` of theirs, `methods` as
///   `UrlPath`, then one `Header` per header (`*`: present).
pub fn rule_policy(rule: &AuthzRule) -> Policy {
    fn one_of<T>(mut items: Vec<T>, or: fn(Vec<T>) -> T) -> T {
        if items.len() == 1 { items.remove(0) } else { or(items) }
    }
    fn all_of<T>(mut items: Vec<T>, and: fn(Vec<T>) -> T, any: T) -> T {
        match items.len() {
            0 => any,
            1 => items.remove(0),
            _ => and(items),
        }
    }
    let name = |p: &String| match Glob::parse(p).string_match() {
        Some(m) => Principal::Authenticated(Some(m)),
        None => Principal::Any,
    };
    let path = |p: &String| match Glob::parse(p).string_match() {
        Some(m) => Permission::UrlPath(m),
        None => Permission::Any,
    };
    let mut principals = Vec::new();
    if !rule.principals.is_empty() && !rule.principals.iter().any(|p| p == "*") {
        principals.push(one_of(rule.principals.iter().map(name).collect(), Principal::Or));
    }
    if !rule.namespaces.is_empty() {
        let namespace = |ns: &String| {
            let regex = Regex::new(&namespace_pattern(ns)).expect("an escaped namespace is a valid regex");
            Principal::Authenticated(Some(StringMatch::Regex(regex)))
        };
        principals.push(one_of(rule.namespaces.iter().map(namespace).collect(), Principal::Or));
    }
    if !rule.not_principals.is_empty() {
        principals.push(Principal::Not(Box::new(one_of(rule.not_principals.iter().map(name).collect(), Principal::Or))));
    }
    let mut permissions = Vec::new();
    if !rule.paths.is_empty() && !rule.paths.iter().any(|p| p == "*") {
        permissions.push(one_of(rule.paths.iter().map(path).collect(), Permission::Or));
    }
    if !rule.not_paths.is_empty() {
        permissions.push(Permission::Not(Box::new(one_of(rule.not_paths.iter().map(path).collect(), Permission::Or))));
    }
    if !rule.methods.is_empty() {
        permissions.push(one_of(rule.methods.iter().map(path).collect(), Permission::Or));
    }
    for (name, value) in &rule.headers {
        let matcher = Glob::parse(value).string_match().unwrap_or(StringMatch::Present(true));
        permissions.push(Permission::Header(HeaderMatch { name: rule_header_name(name), matcher, invert: false }));
    }
    Policy {
        principals: vec![all_of(principals, Principal::And, Principal::Any)],
        permissions: vec![all_of(permissions, Permission::And, Permission::Any)],
    }
}

/// A chain of RBAC filters, run in order as Envoy runs them: each decides on its own, the first to deny wins.
/// The default chain is empty and allows everything.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Engine {
    chain: Vec<Rbac>,
}

impl Engine {
    /// A chain of `filters`, each validated ([`Rbac::validate`]); the error names the filter.
    pub fn new(filters: Vec<Rbac>) -> Result<Self> {
        for (i, rbac) in filters.iter().enumerate() {
            rbac.validate().map_err(|e| match e {
                Error::InvalidPolicy { policy, field, reason } => {
                    Error::InvalidPolicy { policy, field, reason: format!("filter {i}: {reason}") }
                }
                other => other,
            })?;
        }
        Ok(Self { chain: filters })
    }

    /// The mesh file's rules as RBAC filters, as `mesh-control` sends them to sidecars: a DENY filter of the deny
    /// rules, then an ALLOW filter of the allow rules, policies named `rule-{i}` in each, in name order. The DENY
    /// filter is there only if it has rules; the ALLOW filter if it has rules, or, without any, when `default` is
    /// [`AuthzAction::Deny`]: then it has no policies and denies every call (Istio's allow-nothing policy).
    ///
    /// A rule is one policy ([`rule_policy`]). The rules are not validated here ([`AuthzRule::validate`]): any
    /// value gives some matcher.
    pub fn from_rules(rules: &[AuthzRule], default: AuthzAction) -> Self {
        let chain = [(AuthzAction::Deny, Action::Deny), (AuthzAction::Allow, Action::Allow)]
            .into_iter()
            .filter_map(|(rule_action, action)| {
                let mut policies: Vec<_> = rules
                    .iter()
                    .filter(|r| r.action == rule_action)
                    .enumerate()
                    .map(|(i, rule)| (format!("rule-{i}"), rule_policy(rule)))
                    .collect();
                // In name order, as Envoy evaluates them (`rule-10` before `rule-2`).
                policies.sort_by(|a, b| a.0.cmp(&b.0));
                let allow_nothing = action == Action::Allow && default == AuthzAction::Deny;
                (!policies.is_empty() || allow_nothing).then_some(Rbac { action, policies })
            })
            .collect();
        Self { chain }
    }

    /// The filters, in order.
    pub fn filters(&self) -> &[Rbac] {
        &self.chain
    }

    /// The chain's decision on `request`.
    pub fn evaluate(&self, request: &RequestView<'_>) -> Decision {
        self.chain.iter().map(|rbac| rbac.evaluate(request)).find(|d| !d.is_allowed()).unwrap_or(Decision::Allow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Regex;

    const NO_HEADERS: &[(&str, &str)] = &[];

    fn view<'a>(path: &str, headers: &'a &'a [(&'a str, &'a str)]) -> RequestView<'a> {
        RequestView::new(path, "POST", headers).unwrap()
    }

    fn deny(permission: Permission) -> Engine {
        Engine::new(vec![Rbac {
            action: Action::Deny,
            policies: vec![("deny".into(), Policy { permissions: vec![permission], principals: vec![Principal::Any] })],
        }])
        .unwrap()
    }

    fn allow(name: &str, permissions: Vec<Permission>, principals: Vec<Principal>) -> Rbac {
        Rbac { action: Action::Allow, policies: vec![(name.into(), Policy { permissions, principals })] }
    }

    fn header(name: &str, matcher: StringMatch) -> HeaderMatch {
        HeaderMatch { name: name.into(), matcher, invert: false }
    }

    #[test]
    fn paths_are_normalized_as_a_server_routes_them() {
        let cases = [
            ("/", "/"),
            ("/admin", "/admin"),
            ("//admin", "/admin"),
            ("/admin/", "/admin/"),
            ("/admin//", "/admin/"),
            ("/%61dmin", "/admin"),
            ("/a/../admin", "/admin"),
            ("/%2Fadmin", "/admin"),
            ("/%2fadmin", "/admin"),
            ("/admin%2F", "/admin/"),
            ("/admin%5Cx", "/admin/x"),
            ("/admin#frag", "/admin"),
            ("/admin?x=1", "/admin"),
            ("/admin?x=/../y#z", "/admin"),
            ("/./admin", "/admin"),
            ("\\admin", "/admin"),
            ("/../../admin", "/admin"),
            ("/..", "/"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/a/%2e%2E/admin", "/admin"),
            ("/a%3fb", "/a%3Fb"),
            ("/a%25%32%46b", "/a%252Fb"),
            ("/svc.Greeter/SayHello", "/svc.Greeter/SayHello"),
            ("/caf%C3%A9", "/caf%C3%A9"),
            ("/a..b/.c", "/a..b/.c"),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize_path(raw).as_deref(), Ok(want), "{raw:?}");
        }
    }

    #[test]
    fn paths_that_cannot_be_normalized_are_errors_naming_where() {
        for (raw, at) in [("/%zz", 1), ("/a%4", 2), ("/a%", 2), ("admin", 0), ("", 0), ("?/admin", 0), ("*", 0), ("/%g1", 1)] {
            match normalize_path(raw) {
                Err(Error::InvalidPath { path, at: got, .. }) => assert_eq!((path.as_str(), got), (raw, at), "{raw:?}"),
                other => panic!("{raw:?}: {other:?}"),
            }
        }
        let headers = NO_HEADERS;
        assert!(RequestView::new("/%zz", "GET", &headers).is_err(), "no view, so no decision: the caller denies");
        assert!(normalize_path("/%zz").unwrap_err().to_string().contains("two hex digits"));
    }

    /// Every way of spelling `/admin` a server routes to `/admin` gets the decision `/admin` gets, for a prefix
    /// rule and for an exact one, and so does a host in another case.
    #[test]
    fn bypass_attempts_get_the_decision_of_the_normalized_path() {
        let attempts =
            ["//admin", "/admin/", "/%61dmin", "/a/../admin", "/%2Fadmin", "/admin%2F", "/admin#frag", "/admin?x=1", "/./admin", "\\admin"];
        let headers = NO_HEADERS;
        for rule in [StringMatch::Prefix("/admin".into()), StringMatch::Exact("/admin".into())] {
            let engine = deny(Permission::UrlPath(rule.clone()));
            let expected = engine.evaluate(&view("/admin", &headers));
            assert_eq!(expected, Decision::Deny { policy: Some("deny".into()) });
            for attempt in attempts {
                assert_eq!(engine.evaluate(&view(attempt, &headers)), expected, "{attempt:?} against {rule:?}");
            }
            assert!(engine.evaluate(&view("/public", &headers)).is_allowed());
            // An allow-list lets every spelling through alike.
            let allow_only = Engine::new(vec![allow("admin", vec![Permission::UrlPath(rule.clone())], vec![Principal::Any])]).unwrap();
            for attempt in attempts {
                assert!(allow_only.evaluate(&view(attempt, &headers)).is_allowed(), "{attempt:?} against allowed {rule:?}");
            }
        }
        let on_path_header = deny(Permission::Header(header(":path", StringMatch::Prefix("/admin".into()))));
        for attempt in attempts {
            assert!(!on_path_header.evaluate(&view(attempt, &headers)).is_allowed(), "{attempt:?} against :path");
        }
        let host = deny(Permission::Header(header(":authority", StringMatch::Exact("example.com".into()))));
        let host_alias = deny(Permission::Header(header("host", StringMatch::Exact("example.com".into()))));
        for engine in [host, host_alias] {
            for authority in ["EXAMPLE.com", "example.com", "Example.COM"] {
                let request = view("/", &headers).with_authority(Some(authority));
                assert!(!engine.evaluate(&request).is_allowed(), "{authority:?}");
            }
            assert!(engine.evaluate(&view("/", &headers).with_authority(Some("other.com"))).is_allowed());
        }
        assert_eq!(normalize_host("EXAMPLE.com:8443"), "example.com:8443");
    }

    #[test]
    fn one_trailing_slash_is_not_significant_to_path_rules() {
        let headers = NO_HEADERS;
        let matches = |rule: StringMatch, path: &str| deny(Permission::UrlPath(rule)).evaluate(&view(path, &headers)) != Decision::Allow;
        assert!(matches(StringMatch::Exact("/admin/".into()), "/admin"));
        assert!(matches(StringMatch::Prefix("/admin/".into()), "/admin"));
        assert!(matches(StringMatch::Regex(Regex::new("/admin").unwrap()), "/admin/"));
        assert!(matches(StringMatch::Prefix("/admin".into()), "/administrator"), "a prefix is a string prefix, as Envoy's");
        assert!(!matches(StringMatch::Exact("/admin".into()), "/admin/x"));
        assert!(matches(StringMatch::Exact("/admin".into()), "/admin//x/.."), "that is /admin/");
        assert!(!matches(StringMatch::Exact("/".into()), "/a"));
    }

    #[test]
    fn the_first_filter_to_deny_wins() {
        let headers = NO_HEADERS;
        let deny_admin = Rbac {
            action: Action::Deny,
            policies: vec![(
                "no-admin".into(),
                Policy { permissions: vec![Permission::UrlPath(StringMatch::Prefix("/admin".into()))], principals: vec![Principal::Any] },
            )],
        };
        let allow_everything = allow("all", vec![Permission::Any], vec![Principal::Any]);
        let engine = Engine::new(vec![allow_everything.clone(), deny_admin.clone()]).unwrap();
        assert_eq!(
            engine.evaluate(&view("/admin/x", &headers)),
            Decision::Deny { policy: Some("no-admin".into()) },
            "an earlier allow does not stop a later deny"
        );
        assert_eq!(engine.evaluate(&view("/x", &headers)), Decision::Allow);
        let allow_x = allow("x", vec![Permission::UrlPath(StringMatch::Exact("/x".into()))], vec![Principal::Any]);
        let engine = Engine::new(vec![deny_admin, allow_x]).unwrap();
        assert_eq!(engine.evaluate(&view("/y", &headers)), Decision::Deny { policy: None });
        assert_eq!(Decision::Deny { policy: None }.to_string(), "denied: no allow policy matched");
        assert!(Engine::default().evaluate(&view("/anything", &headers)).is_allowed(), "no filters, no denial");
    }

    #[test]
    fn an_allow_filter_without_policies_denies_everything_and_a_permissive_one_nothing() {
        let headers = NO_HEADERS;
        let engine = Engine::new(vec![Rbac { action: Action::Allow, policies: vec![] }]).unwrap();
        assert_eq!(engine.evaluate(&view("/", &headers)), Decision::Deny { policy: None });
        assert!(Engine::new(vec![Rbac::permissive()]).unwrap().evaluate(&view("/", &headers)).is_allowed());
    }

    #[test]
    fn principals_match_the_peer_identity() {
        let headers = NO_HEADERS;
        let prod = Principal::Authenticated(Some(StringMatch::Prefix("spiffe://td/ns/prod/".into())));
        let engine = Engine::new(vec![allow("prod", vec![Permission::Any], vec![prod])]).unwrap();
        let as_peer = |id: Option<&'static str>| engine.evaluate(&view("/", &headers).with_peer_identity(id));
        assert!(as_peer(Some("spiffe://td/ns/prod/sa/web")).is_allowed());
        assert!(!as_peer(Some("spiffe://td/ns/dev/sa/web")).is_allowed());
        assert!(!as_peer(Some("spiffe://td/ns/production/sa/web")).is_allowed(), "the prefix ends at the /");
        assert!(!as_peer(None).is_allowed());

        let any_authenticated = Engine::new(vec![allow("mtls", vec![Permission::Any], vec![Principal::Authenticated(None)])]).unwrap();
        assert!(any_authenticated.evaluate(&view("/", &headers).with_peer_identity(Some("spiffe://td/x"))).is_allowed());
        assert_eq!(
            any_authenticated.evaluate(&view("/", &headers)),
            Decision::Deny { policy: None },
            "plaintext peers are not authenticated"
        );
        let deny_unauthenticated = Engine::new(vec![Rbac {
            action: Action::Deny,
            policies: vec![(
                "plaintext".into(),
                Policy { permissions: vec![Permission::Any], principals: vec![Principal::Not(Box::new(Principal::Authenticated(None)))] },
            )],
        }])
        .unwrap();
        assert!(!deny_unauthenticated.evaluate(&view("/", &headers)).is_allowed());
        assert!(deny_unauthenticated.evaluate(&view("/", &headers).with_peer_identity(Some("spiffe://td/x"))).is_allowed());
    }

    #[test]
    fn not_and_or_combine() {
        let headers: &[(&str, &str)] = &[("x-env", "prod"), ("x-tag", "a"), ("x-tag", "b"), ("te", "trailers")];
        let path = |p: &str| Permission::UrlPath(StringMatch::Prefix(p.into()));
        let method = |m: &str| Permission::Header(header(":method", StringMatch::Exact(m.into())));
        // POST under /api, not under /api/internal.
        let rule = Permission::And(vec![method("POST"), path("/api"), Permission::Not(Box::new(path("/api/internal")))]);
        let engine = Engine::new(vec![allow("api", vec![rule], vec![Principal::Any])]).unwrap();
        assert!(engine.evaluate(&view("/api/users", &headers)).is_allowed());
        assert!(!engine.evaluate(&view("/api/internal/x", &headers)).is_allowed());
        assert!(!engine.evaluate(&RequestView::new("/api/users", "GET", &headers).unwrap()).is_allowed());
        let either = Permission::Or(vec![path("/a"), path("/b")]);
        let engine = Engine::new(vec![allow("ab", vec![either], vec![Principal::Any])]).unwrap();
        assert!(engine.evaluate(&view("/b", &headers)).is_allowed() && !engine.evaluate(&view("/c", &headers)).is_allowed());

        // Repeated headers are joined with a comma; hop-by-hop ones are never seen.
        let tags = Principal::Header(header("x-tag", StringMatch::Exact("a,b".into())));
        let te = Principal::Header(header("te", StringMatch::Present(true)));
        let request = view("/", &headers);
        assert!(tags.matches(&request) && !te.matches(&request));
        let ip = Principal::And(vec![
            Principal::SourceIp("10.0.0.0/8".parse().unwrap()),
            Principal::Not(Box::new(Principal::SourceIp("10.9.0.0/16".parse().unwrap()))),
        ]);
        assert!(ip.matches(&view("/", &headers).with_source_ip(Some("10.1.2.3".parse().unwrap()))));
        assert!(ip.matches(&view("/", &headers).with_source_ip(Some("::ffff:10.1.2.3".parse().unwrap()))), "a mapped IPv4 address is IPv4");
        assert!(!ip.matches(&view("/", &headers).with_source_ip(Some("10.9.2.3".parse().unwrap()))));
        assert!(!ip.matches(&view("/", &headers)), "no address, no match");
        let port = Permission::And(vec![Permission::DestinationPort(8443), Permission::DestinationIp("2001:db8::/32".parse().unwrap())]);
        assert!(port.matches(&view("/", &headers).with_destination(Some("2001:db8::1".parse().unwrap()), Some(8443))));
        assert!(!port.matches(&view("/", &headers).with_destination(Some("2001:db9::1".parse().unwrap()), Some(8443))));
    }

    #[test]
    fn cidrs_parse_and_contain() {
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()) && !all.contains("::1".parse().unwrap()));
        let one: Cidr = "192.168.1.7".parse().unwrap();
        assert_eq!(one.to_string(), "192.168.1.7/32");
        assert!(one.contains("192.168.1.7".parse().unwrap()) && !one.contains("192.168.1.8".parse().unwrap()));
        let sloppy: Cidr = "10.1.2.3/8".parse().unwrap();
        assert!(sloppy.contains("10.200.0.1".parse().unwrap()), "bits past the prefix are ignored");
        assert!("::/0".parse::<Cidr>().unwrap().contains("2001:db8::1".parse().unwrap()));
        // An IPv4 block written as IPv6 is the IPv4 block: its prefix counts the 96 mapping bits.
        let mapped: Cidr = "::ffff:10.0.0.0/104".parse().unwrap();
        assert_eq!(mapped.normalized(), "10.0.0.0/8".parse().unwrap());
        assert!(mapped.contains("10.9.9.9".parse().unwrap()) && !mapped.contains("11.0.0.1".parse().unwrap()));
        assert_eq!(sloppy.normalized().to_string(), "10.0.0.0/8");
        for bad in ["10.0.0.0/33", "::/129", "10.0.0.0/x", "nope/8", "10.0.0.0/-1"] {
            assert!(matches!(bad.parse::<Cidr>(), Err(Error::InvalidPolicy { field: "cidr", .. })), "{bad:?}");
        }
    }

    #[test]
    fn validation_names_the_policy_and_the_rule() {
        let policy =
            |permissions, principals| Rbac { action: Action::Deny, policies: vec![("p".into(), Policy { permissions, principals })] };
        let reason = |rbac: Rbac| match Engine::new(vec![rbac]) {
            Err(Error::InvalidPolicy { reason, .. }) => reason,
            other => panic!("{other:?}"),
        };
        assert!(
            reason(policy(vec![Permission::And(vec![])], vec![Principal::Any])).contains("policy \"p\": permissions[0].and: empty list")
        );
        assert!(
            reason(policy(vec![Permission::Any], vec![Principal::Not(Box::new(Principal::Or(vec![])))]))
                .contains("principals[0].not.or: empty list")
        );
        let bad_cidr = Principal::SourceIp(Cidr { addr: "10.0.0.0".parse().unwrap(), prefix_len: 40 });
        assert!(
            reason(policy(vec![Permission::Any], vec![Principal::Or(vec![Principal::Any, bad_cidr])]))
                .contains("principals[0].or[1].cidr 10.0.0.0/40")
        );
        assert!(reason(policy(vec![], vec![Principal::Any])).contains("no permissions"));
        assert!(reason(policy(vec![Permission::Any], vec![])).contains("no principals"));
        for (name, why) in [("grpc-timeout", "grpc-"), (":scheme", ":scheme"), ("X-Role", "lower case"), ("", "empty")] {
            let rule = Permission::Header(header(name, StringMatch::Present(true)));
            assert!(reason(policy(vec![rule], vec![Principal::Any])).contains(why), "{name:?}");
        }
        let twice = Rbac {
            action: Action::Deny,
            policies: vec![("p".into(), Policy { permissions: vec![Permission::Any], principals: vec![Principal::Any] }); 2],
        };
        assert!(reason(twice).contains("a second policy named \"p\""));
        assert!(reason(policy(vec![], vec![])).starts_with("filter 0: "));
    }

    fn strings(values: &[&str]) -> Vec<String> {
        values.iter().map(|s| s.to_string()).collect()
    }

    fn rule(action: AuthzAction, principals: &[&str], methods: &[&str]) -> AuthzRule {
        AuthzRule { action, principals: strings(principals), methods: strings(methods), ..AuthzRule::default() }
    }

    /// The decision of `rules` (default allow) on a POST to `path` with `headers` by `peer`.
    fn decide(rules: &[AuthzRule], default: AuthzAction, path: &str, peer: Option<&str>, headers: &[(&str, &str)]) -> Decision {
        let engine = Engine::from_rules(rules, default);
        engine.evaluate(&RequestView::new(path, "POST", &headers).unwrap().with_peer_identity(peer))
    }

    #[test]
    fn mesh_file_rules_become_a_deny_then_an_allow_filter() {
        let engine = Engine::from_rules(
            &[
                rule(AuthzAction::Allow, &["spiffe://td/ns/prod/*"], &["/svc.Greeter/*"]),
                rule(AuthzAction::Deny, &["*"], &["/svc.Greeter/Admin"]),
            ],
            AuthzAction::Allow,
        );
        assert_eq!(engine.filters().iter().map(|f| f.action).collect::<Vec<_>>(), [Action::Deny, Action::Allow]);
        let headers = NO_HEADERS;
        let call = |path: &str, peer: &'static str| engine.evaluate(&view(path, &headers).with_peer_identity(Some(peer)));
        assert!(call("/svc.Greeter/SayHello", "spiffe://td/ns/prod/sa/web").is_allowed());
        assert_eq!(call("/svc.Greeter/Admin", "spiffe://td/ns/prod/sa/web"), Decision::Deny { policy: Some("rule-0".into()) });
        assert_eq!(call("/svc.Greeter/SayHello", "spiffe://td/ns/dev/sa/web"), Decision::Deny { policy: None });
        assert_eq!(Engine::from_rules(&[], AuthzAction::Allow), Engine::default());
        // `*` is any caller, with a proven identity or without (the file's meaning before the other keys).
        assert_eq!(
            decide(&[rule(AuthzAction::Deny, &["*"], &[])], AuthzAction::Allow, "/x", None, &[]),
            Decision::Deny { policy: Some("rule-0".into()) }
        );
    }

    #[test]
    fn principal_globs_are_exact_prefix_suffix_or_any() {
        let allow = |from: &[&str]| vec![rule(AuthzAction::Allow, from, &[])];
        let by = |rules: &[AuthzRule], peer: Option<&str>| decide(rules, AuthzAction::Allow, "/x", peer, &[]).is_allowed();
        let admin = allow(&["*/sa/admin"]);
        assert!(by(&admin, Some("spiffe://td/ns/ops/sa/admin")));
        assert!(!by(&admin, Some("spiffe://td/ns/ops/sa/admin2")) && !by(&admin, None));
        let exact = allow(&["spiffe://td/ns/ops/sa/web"]);
        assert!(by(&exact, Some("spiffe://td/ns/ops/sa/web")) && !by(&exact, Some("spiffe://td/ns/ops/sa/web2")));
        let either = allow(&["spiffe://td/ns/prod/*", "*/sa/admin"]);
        assert!(by(&either, Some("spiffe://td/ns/prod/sa/web")) && by(&either, Some("spiffe://x/ns/dev/sa/admin")));
        assert!(!by(&either, Some("spiffe://td/ns/dev/sa/web")));
    }

    #[test]
    fn namespaces_match_the_segment_after_the_trust_domain() {
        let allow = |namespaces: &[&str]| vec![AuthzRule { namespaces: strings(namespaces), ..AuthzRule::new(AuthzAction::Allow) }];
        let by = |rules: &[AuthzRule], peer: Option<&str>| decide(rules, AuthzAction::Allow, "/x", peer, &[]).is_allowed();
        let prod = allow(&["prod"]);
        assert!(by(&prod, Some("spiffe://td/ns/prod/sa/web")) && by(&prod, Some("spiffe://other.td/ns/prod/sa/db")));
        assert!(!by(&prod, Some("spiffe://td/ns/production/sa/web")), "the whole segment");
        assert!(!by(&prod, Some("spiffe://td/ns/dev/sa/ns/prod/x")), "only the segment after the trust domain");
        assert!(!by(&prod, Some("spiffe://td/ns/prod")) && !by(&prod, None));
        let globs = allow(&["prod-*", "*-prod"]);
        for peer in ["spiffe://td/ns/prod-eu/sa/a", "spiffe://td/ns/eu-prod/sa/a"] {
            assert!(by(&globs, Some(peer)), "{peer}");
        }
        for peer in ["spiffe://td/ns/prod/sa/a", "spiffe://td/ns/eu-prod-x/sa/a", "spiffe://td/ns/x/sa/prod-a"] {
            assert!(!by(&globs, Some(peer)), "{peer}");
        }
        let any = allow(&["*"]);
        assert!(by(&any, Some("spiffe://td/ns/a/sa/b")) && !by(&any, Some("spiffe://td/workload")) && !by(&any, None));
        // Metacharacters are literal: `a.b` is not `a-b`.
        let dotted = allow(&["a.b"]);
        assert!(by(&dotted, Some("spiffe://td/ns/a.b/sa/x")) && !by(&dotted, Some("spiffe://td/ns/a-b/sa/x")));
        assert_eq!(namespace_pattern("*"), "spiffe://[^/]+/ns/[^/]+/.*");
    }

    #[test]
    fn paths_match_the_normalized_path_so_spellings_do_not_bypass_a_deny() {
        let deny = |paths: &[&str]| vec![AuthzRule { paths: strings(paths), ..AuthzRule::new(AuthzAction::Deny) }];
        let at = |rules: &[AuthzRule], path: &str| decide(rules, AuthzAction::Allow, path, None, &[]).is_allowed();
        let admin = deny(&["/admin/*"]);
        for attempt in ["/admin/users", "//admin", "/admin", "/%61dmin/x", "/a/../admin/x", "/admin%2Fx", "\\admin\\x", "/./admin?x=1"] {
            assert!(!at(&admin, attempt), "{attempt:?} is /admin/...");
        }
        assert!(at(&admin, "/administrator") && at(&admin, "/public/admin"));
        let json = deny(&["*.json"]);
        assert!(!at(&json, "/a/b.json") && !at(&json, "/a/b.js%6Fn") && at(&json, "/a/b.json5"));
        let exact = deny(&["/healthz"]);
        assert!(!at(&exact, "/healthz") && !at(&exact, "//healthz/") && at(&exact, "/healthz/x"));
        assert!(!at(&deny(&["*"]), "/anything"));
        // An allow-list of paths: others are denied.
        let only = vec![AuthzRule { paths: strings(&["/public/*", "/"]), ..AuthzRule::new(AuthzAction::Allow) }];
        assert!(at(&only, "/public/x") && at(&only, "/") && !at(&only, "/private"));
    }

    #[test]
    fn not_from_and_not_paths_exclude() {
        let rules = [AuthzRule {
            paths: strings(&["/admin/*"]),
            not_principals: strings(&["spiffe://td/ns/ops/*", "*/sa/root"]),
            ..AuthzRule::new(AuthzAction::Deny)
        }];
        let by = |path: &str, peer: Option<&str>| decide(&rules, AuthzAction::Allow, path, peer, &[]).is_allowed();
        assert!(!by("/admin/x", Some("spiffe://td/ns/prod/sa/web")), "not an ops caller: denied");
        assert!(!by("/admin/x", None), "no identity is not an excluded one");
        assert!(by("/admin/x", Some("spiffe://td/ns/ops/sa/web")) && by("/admin/x", Some("spiffe://td/ns/prod/sa/root")));
        assert!(by("/public", Some("spiffe://td/ns/prod/sa/web")));
        let allow = [AuthzRule { not_paths: strings(&["/internal/*", "*.secret"]), ..AuthzRule::new(AuthzAction::Allow) }];
        let at = |path: &str| decide(&allow, AuthzAction::Allow, path, None, &[]).is_allowed();
        assert!(at("/x") && !at("/internal/y") && !at("//internal//y") && !at("/a.secret"));
    }

    #[test]
    fn headers_all_match_exactly_by_glob_or_by_presence() {
        let headers = [("x-env", "prod-eu"), ("x-user", "alice@corp"), ("x-tag", "a"), ("host", "api.example.com")];
        let rule = |pairs: &[(&str, &str)]| AuthzRule {
            headers: pairs.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect(),
            ..AuthzRule::new(AuthzAction::Allow)
        };
        let allowed = |pairs: &[(&str, &str)], sent: &[(&str, &str)]| {
            let engine = Engine::from_rules(&[rule(pairs)], AuthzAction::Allow);
            let authority = sent.iter().find(|(n, _)| *n == "host").map(|(_, v)| *v);
            engine.evaluate(&RequestView::new("/", "POST", &sent).unwrap().with_authority(authority)).is_allowed()
        };
        assert!(allowed(&[("x-env", "prod-*"), ("x-user", "*@corp"), ("x-tag", "*")], &headers));
        assert!(!allowed(&[("x-env", "prod-*"), ("x-user", "*@other")], &headers), "every header must match");
        assert!(!allowed(&[("x-missing", "*")], &headers));
        assert!(allowed(&[("x-tag", "a")], &headers) && !allowed(&[("x-tag", "ab")], &headers));
        assert!(allowed(&[("host", "api.example.com")], &headers), "host is :authority");
        let policy = rule_policy(&rule(&[("host", "*")]));
        assert_eq!(policy.permissions, [Permission::Header(header(":authority", StringMatch::Present(true)))]);
    }

    #[test]
    fn conditions_of_a_rule_are_anded_and_an_empty_rule_matches_everything() {
        let rules = [AuthzRule {
            principals: strings(&["*/sa/web"]),
            namespaces: strings(&["prod"]),
            paths: strings(&["/svc.Greeter/*"]),
            methods: strings(&["/svc.Greeter/SayHello"]),
            headers: [("x-env".to_string(), "prod".to_string())].into(),
            ..AuthzRule::new(AuthzAction::Allow)
        }];
        let env: &[(&str, &str)] = &[("x-env", "prod")];
        let web = Some("spiffe://td/ns/prod/sa/web");
        assert!(decide(&rules, AuthzAction::Allow, "/svc.Greeter/SayHello", web, env).is_allowed());
        assert!(!decide(&rules, AuthzAction::Allow, "/svc.Greeter/SayHello", web, &[]).is_allowed(), "no header");
        assert!(!decide(&rules, AuthzAction::Allow, "/svc.Greeter/Other", web, env).is_allowed(), "another method");
        assert!(!decide(&rules, AuthzAction::Allow, "/svc.Greeter/SayHello", Some("spiffe://td/ns/dev/sa/web"), env).is_allowed());
        assert!(!decide(&rules, AuthzAction::Allow, "/svc.Greeter/SayHello", Some("spiffe://td/ns/prod/sa/db"), env).is_allowed());
        let empty = rule_policy(&AuthzRule::new(AuthzAction::Deny));
        assert_eq!((empty.permissions, empty.principals), (vec![Permission::Any], vec![Principal::Any]));
        assert!(!decide(&[AuthzRule::new(AuthzAction::Deny)], AuthzAction::Allow, "/x", None, &[]).is_allowed());
    }

    #[test]
    fn default_deny_is_an_allow_filter_without_policies() {
        let allow_nothing = Engine::from_rules(&[], AuthzAction::Deny);
        assert_eq!(allow_nothing.filters(), [Rbac { action: Action::Allow, policies: vec![] }]);
        assert_eq!(decide(&[], AuthzAction::Deny, "/x", Some("spiffe://td/ns/a/sa/b"), &[]), Decision::Deny { policy: None });
        assert!(decide(&[], AuthzAction::Allow, "/x", None, &[]).is_allowed());
        // Deny rules still come first; with allow rules the default changes nothing.
        let deny_admin = rule(AuthzAction::Deny, &[], &["/svc.A/Admin"]);
        assert_eq!(Engine::from_rules(std::slice::from_ref(&deny_admin), AuthzAction::Deny).filters().len(), 2);
        assert_eq!(
            decide(std::slice::from_ref(&deny_admin), AuthzAction::Deny, "/svc.A/Admin", None, &[]),
            Decision::Deny { policy: Some("rule-0".into()) }
        );
        let allow_web = rule(AuthzAction::Allow, &["*/sa/web"], &[]);
        assert_eq!(
            Engine::from_rules(&[deny_admin.clone(), allow_web.clone()], AuthzAction::Deny),
            Engine::from_rules(&[deny_admin, allow_web], AuthzAction::Allow)
        );
    }
}
