//! The RBAC filter's configuration (`envoy.extensions.filters.http.rbac.v3.RBAC`) and its per-route override
//! (`RBACPerRoute`), read as gRPC reads them (gRFC A41) into [`mesh_core::authz`].
//!
//! - Permissions: `and_rules`, `or_rules`, `not_rule`, `any`, `header`, `url_path`, `destination_ip`,
//!   `destination_port`; and `requested_server_name` when its matcher is an empty literal (A41: the server name is
//!   the empty string, which such a matcher always matches).
//! - Principals: `and_ids`, `or_ids`, `not_id`, `any`, `authenticated` (its `principal_name` against the peer's
//!   SPIFFE ID; unset: any authenticated peer), `header`, `url_path`, and `source_ip`, `direct_remote_ip` and
//!   `remote_ip`, which are one address here (the peer's: no PROXY protocol, no `x-forwarded-for`; the listener
//!   checks `xff_num_trusted_hops` for it).
//! - Header rules are route header matchers (the decoding RDS uses); A41 forbids rules on `grpc-` headers and
//!   `:scheme`, and `host` is `:authority`.
//! - A filter without `rules` enforces nothing (Envoy); nor does one whose action is LOG (A41: as if no RBAC
//!   filter were configured, which is Envoy's behaviour too: LOG allows every request).
//!
//! Anything else that could change a decision is refused with a reason naming the field, so the listener is
//! NACKed: the new matcher API (`matcher`, `shadow_matcher`), `shadow_rules`, audit logging, CEL conditions,
//! `metadata`, `filter_state`, `sourced_metadata`, custom matchers and principals, `uri_template`,
//! `destination_port_range`, `treat_missing_header_as_empty`. A policy is never half-read.

use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::rbac::v3::permission::Rule;
use envoy_types::pb::envoy::config::rbac::v3::principal::Identifier;
use envoy_types::pb::envoy::config::rbac::v3::{Permission, Policy, Principal, Rbac as ProtoRules, rbac};
use envoy_types::pb::envoy::config::route::v3::HeaderMatcher;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::{Rbac as ProtoRbac, RbacPerRoute};
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
use envoy_types::pb::envoy::r#type::matcher::v3::{PathMatcher, StringMatcher, path_matcher};
use envoy_types::pb::google::protobuf::Any;
use mesh_core::authz::{self, Action, Cidr, Rbac};
use mesh_core::{HeaderMatch, StringMatch};
use prost::Message;

use super::route;

/// Message name of the RBAC filter's configuration.
pub const RBAC: &str = "envoy.extensions.filters.http.rbac.v3.RBAC";
/// Message name of its per-route override.
pub const RBAC_PER_ROUTE: &str = "envoy.extensions.filters.http.rbac.v3.RBACPerRoute";

/// Decodes and validates an `RBAC` filter configuration carried in `any`. A filter that enforces nothing (no
/// `rules`, or the LOG action) is [`Rbac::permissive`]. The error is the NACK reason, naming the field.
pub fn decode(any: &Any) -> Result<Rbac, String> {
    plain(any, RBAC)?;
    let f = ProtoRbac::decode(any.value.as_slice()).map_err(|e| format!("malformed RBAC: {e}"))?;
    filter(&f)
}

/// Decodes an `RBACPerRoute` carried in `any`: the route's own filter configuration, or `None` when it turns the
/// filter off for the route (its `rbac` is unset, Envoy's meaning). For a route's `typed_per_filter_config`.
pub fn decode_per_route(any: &Any) -> Result<Option<Rbac>, String> {
    plain(any, RBAC_PER_ROUTE)?;
    let per_route = RbacPerRoute::decode(any.value.as_slice()).map_err(|e| format!("malformed RBACPerRoute: {e}"))?;
    per_route.rbac.as_ref().map(|f| filter(f).map_err(|e| format!("rbac.{e}"))).transpose()
}

/// Checks `any` holds the message `name` itself: a policy given as a `TypedStruct` (JSON) is refused rather than
/// read as something it is not.
fn plain(any: &Any, name: &str) -> Result<(), String> {
    match super::type_name(&any.type_url) {
        ty if ty == name => Ok(()),
        ty => Err(format!("typed_config: {ty:?} is not {name} (a TypedStruct configuration is not supported)")),
    }
}

fn filter(f: &ProtoRbac) -> Result<Rbac, String> {
    match (&f.rules, &f.matcher) {
        (Some(_), Some(_)) => return Err("rules and matcher: both are set (they are alternatives)".into()),
        (None, Some(_)) => return Err("matcher: the matcher API is not supported (use rules)".into()),
        _ => {}
    }
    if f.shadow_rules.is_some() {
        return Err("shadow_rules: not supported".into());
    }
    if f.shadow_matcher.is_some() {
        return Err("shadow_matcher: not supported".into());
    }
    // The stat prefixes and track_per_rule_stats name counters only; they change no decision.
    let Some(rules) = &f.rules else { return Ok(Rbac::permissive()) };
    self::rules(rules).map_err(|e| format!("rules.{e}"))
}

fn rules(r: &ProtoRules) -> Result<Rbac, String> {
    let action = match rbac::Action::try_from(r.action) {
        Ok(rbac::Action::Allow) => Action::Allow,
        Ok(rbac::Action::Deny) => Action::Deny,
        Ok(rbac::Action::Log) => {
            // A41: a LOG filter is ignored, as if there were none; Envoy's LOG allows every request too.
            tracing::info!("RBAC filter with action LOG: it logs nothing here and allows every request (A41)");
            return Ok(Rbac::permissive());
        }
        Err(_) => return Err(format!("action: unknown action {}", r.action)),
    };
    if r.audit_logging_options.is_some() {
        return Err("audit_logging_options: audit logging is not supported".into());
    }
    // Envoy evaluates policies in the lexicographic order of their names (the map has none).
    let mut named: Vec<_> = r.policies.iter().collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    let policies = named
        .into_iter()
        .map(|(name, p)| policy(p).map(|p| (name.clone(), p)).map_err(|e| format!("policies[{name:?}].{e}")))
        .collect::<Result<_, _>>()?;
    let rbac = Rbac { action, policies };
    rbac.validate().map_err(|e| format!("policies: {e}"))?;
    Ok(rbac)
}

fn policy(p: &Policy) -> Result<authz::Policy, String> {
    if p.condition.is_some() || p.checked_condition.is_some() {
        return Err("condition: CEL conditions are not supported".into());
    }
    if p.cel_config.is_some() {
        return Err("cel_config: CEL is not supported".into());
    }
    if p.permissions.is_empty() {
        return Err("permissions: empty (a policy needs at least one; `any: true` matches every request)".into());
    }
    if p.principals.is_empty() {
        return Err("principals: empty (a policy needs at least one; `any: true` matches every caller)".into());
    }
    let permissions = list("permissions", &p.permissions, permission)?;
    let principals = list("principals", &p.principals, principal)?;
    Ok(authz::Policy { permissions, principals })
}

/// Decodes each of `items`, naming the failing one: `field[i].reason`.
fn list<P, T>(field: &str, items: &[P], decode: impl Fn(&P) -> Result<T, String>) -> Result<Vec<T>, String> {
    items.iter().enumerate().map(|(i, item)| decode(item).map_err(|e| format!("{field}[{i}].{e}"))).collect()
}

/// The rules of an `and_rules`/`or_rules` (`and_ids`/`or_ids`) set: at least one (Envoy).
fn set<P, T>(field: &str, inner: &str, items: &[P], decode: impl Fn(&P) -> Result<T, String>) -> Result<Vec<T>, String> {
    if items.is_empty() {
        return Err(format!("{field}.{inner}: empty (a set needs at least one)"));
    }
    list(&format!("{field}.{inner}"), items, decode)
}

#[allow(deprecated)] // metadata is deprecated but still sent.
fn permission(p: &Permission) -> Result<authz::Permission, String> {
    use authz::Permission as P;
    Ok(match p.rule.as_ref().ok_or("rule: none set")? {
        Rule::AndRules(s) => P::And(set("and_rules", "rules", &s.rules, permission)?),
        Rule::OrRules(s) => P::Or(set("or_rules", "rules", &s.rules, permission)?),
        Rule::NotRule(inner) => P::Not(Box::new(permission(inner).map_err(|e| format!("not_rule.{e}"))?)),
        Rule::Any(true) => P::Any,
        Rule::Any(false) => return Err("any: must be true".into()),
        Rule::Header(h) => P::Header(header(h)?),
        Rule::UrlPath(m) => P::UrlPath(path(m).map_err(|e| format!("url_path.{e}"))?),
        Rule::DestinationIp(c) => P::DestinationIp(cidr(c).map_err(|e| format!("destination_ip: {e}"))?),
        Rule::DestinationPort(port) => {
            P::DestinationPort(u16::try_from(*port).map_err(|_| format!("destination_port: {port} is not a port (at most 65535)"))?)
        }
        Rule::RequestedServerName(m) if empty_literal(m) => P::Any,
        Rule::RequestedServerName(_) => {
            return Err("requested_server_name: the server name is not known here (A41: it is the empty string); only an empty literal matcher is accepted".into());
        }
        Rule::DestinationPortRange(_) => return Err("destination_port_range: not supported".into()),
        Rule::Metadata(_) => return Err("metadata: Envoy metadata matchers are not supported".into()),
        Rule::Matcher(m) => return Err(format!("matcher: custom RBAC matchers are not supported ({:?})", m.name)),
        Rule::UriTemplate(_) => return Err("uri_template: not supported".into()),
        Rule::SourcedMetadata(_) => return Err("sourced_metadata: not supported".into()),
    })
}

#[allow(deprecated)] // source_ip and metadata are deprecated but still sent.
fn principal(p: &Principal) -> Result<authz::Principal, String> {
    use authz::Principal as P;
    Ok(match p.identifier.as_ref().ok_or("identifier: none set")? {
        Identifier::AndIds(s) => P::And(set("and_ids", "ids", &s.ids, principal)?),
        Identifier::OrIds(s) => P::Or(set("or_ids", "ids", &s.ids, principal)?),
        Identifier::NotId(inner) => P::Not(Box::new(principal(inner).map_err(|e| format!("not_id.{e}"))?)),
        Identifier::Any(true) => P::Any,
        Identifier::Any(false) => return Err("any: must be true".into()),
        Identifier::Authenticated(a) => P::Authenticated(
            a.principal_name
                .as_ref()
                .map(|m| route::string_match(m).map_err(|e| format!("authenticated.principal_name: {e}")))
                .transpose()?,
        ),
        Identifier::Header(h) => P::Header(header(h)?),
        Identifier::UrlPath(m) => P::UrlPath(path(m).map_err(|e| format!("url_path.{e}"))?),
        Identifier::SourceIp(c) => P::SourceIp(cidr(c).map_err(|e| format!("source_ip: {e}"))?),
        Identifier::DirectRemoteIp(c) => P::SourceIp(cidr(c).map_err(|e| format!("direct_remote_ip: {e}"))?),
        Identifier::RemoteIp(c) => P::SourceIp(cidr(c).map_err(|e| format!("remote_ip: {e}"))?),
        Identifier::Metadata(_) => return Err("metadata: Envoy metadata matchers are not supported".into()),
        Identifier::FilterState(_) => return Err("filter_state: not supported".into()),
        Identifier::SourcedMetadata(_) => return Err("sourced_metadata: not supported".into()),
        Identifier::Custom(c) => return Err(format!("custom: custom principals are not supported ({:?})", c.name)),
    })
}

/// A header rule: a route header matcher, then A41's limits.
fn header(h: &HeaderMatcher) -> Result<HeaderMatch, String> {
    let field = format!("header ({:?})", h.name);
    if h.treat_missing_header_as_empty {
        return Err(format!("{field}: treat_missing_header_as_empty is not supported"));
    }
    let mut m = route::header(h).map_err(|e| format!("{field}: {e}"))?;
    if m.name.starts_with("grpc-") {
        return Err(format!("{field}: a rule on a grpc- header is not allowed (A41)"));
    }
    if m.name == ":scheme" {
        return Err(format!("{field}: a rule on :scheme is not allowed (A41)"));
    }
    // Envoy aliases the two (A41): one name for both.
    if m.name == "host" {
        m.name = ":authority".into();
    }
    Ok(m)
}

fn path(m: &PathMatcher) -> Result<StringMatch, String> {
    match &m.rule {
        Some(path_matcher::Rule::Path(sm)) => route::string_match(sm).map_err(|e| format!("path: {e}")),
        None => Err("path: missing".into()),
    }
}

/// Whether a string matcher is an exact, prefix, suffix or contains match of the empty string.
fn empty_literal(m: &StringMatcher) -> bool {
    matches!(&m.match_pattern, Some(MatchPattern::Exact(s) | MatchPattern::Prefix(s) | MatchPattern::Suffix(s) | MatchPattern::Contains(s)) if s.is_empty())
}

/// A CIDR range; an unset prefix length is 0 (Envoy's default).
fn cidr(c: &CidrRange) -> Result<Cidr, String> {
    let addr = c.address_prefix.parse().map_err(|_| format!("address_prefix {:?} is not an IP address", c.address_prefix))?;
    let len = c.prefix_len.map_or(0, |l| l.value);
    let prefix_len = u8::try_from(len).map_err(|_| format!("prefix_len {len} is too long for {addr}"))?;
    let cidr = Cidr { addr, prefix_len };
    cidr.validate().map_err(|_| format!("prefix_len {len} is too long for {addr}"))?;
    Ok(cidr)
}

#[cfg(test)]
#[allow(deprecated)] // The direct header matchers, source_ip and metadata are deprecated but still sent.
mod tests {
    use envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig;
    use envoy_types::pb::envoy::config::rbac::v3::principal::Authenticated;
    use envoy_types::pb::envoy::config::rbac::v3::{permission, principal};
    use envoy_types::pb::envoy::config::route::v3::header_matcher::HeaderMatchSpecifier;
    use envoy_types::pb::envoy::r#type::matcher::v3::MetadataMatcher;
    use envoy_types::pb::google::protobuf::UInt32Value;
    use mesh_core::authz::{Decision, Engine, RequestView};

    use super::super::to_any;
    use super::*;

    fn literal(pattern: MatchPattern) -> StringMatcher {
        StringMatcher { match_pattern: Some(pattern), ignore_case: false }
    }

    /// `x*` by prefix, else exact: mesh-control's `string_match`.
    fn mesh_pattern(s: &str) -> StringMatcher {
        match s.strip_suffix('*') {
            Some(prefix) => literal(MatchPattern::Prefix(prefix.into())),
            None => literal(MatchPattern::Exact(s.into())),
        }
    }

    fn any_permission() -> Permission {
        Permission { rule: Some(Rule::Any(true)) }
    }

    fn any_principal() -> Principal {
        Principal { identifier: Some(Identifier::Any(true)) }
    }

    fn url_path(s: &str) -> Permission {
        Permission { rule: Some(Rule::UrlPath(PathMatcher { rule: Some(path_matcher::Rule::Path(mesh_pattern(s))) })) }
    }

    fn authenticated(s: &str) -> Principal {
        Principal { identifier: Some(Identifier::Authenticated(Authenticated { principal_name: Some(mesh_pattern(s)) })) }
    }

    fn filter_of(action: rbac::Action, policies: Vec<(&str, Policy)>) -> ProtoRbac {
        let policies = policies.into_iter().map(|(name, p)| (name.to_owned(), p)).collect();
        ProtoRbac { rules: Some(ProtoRules { action: action as i32, policies, ..Default::default() }), ..Default::default() }
    }

    fn policy_of(permissions: Vec<Permission>, principals: Vec<Principal>) -> Policy {
        Policy { permissions, principals, ..Default::default() }
    }

    fn with_permission(rule: Rule) -> ProtoRbac {
        filter_of(rbac::Action::Deny, vec![("p", policy_of(vec![Permission { rule: Some(rule) }], vec![any_principal()]))])
    }

    fn with_principal(identifier: Identifier) -> ProtoRbac {
        filter_of(rbac::Action::Deny, vec![("p", policy_of(vec![any_permission()], vec![Principal { identifier: Some(identifier) }]))])
    }

    fn reason(f: ProtoRbac) -> String {
        decode(&to_any(&f)).unwrap_err()
    }

    fn header_matcher(name: &str, specifier: HeaderMatchSpecifier) -> HeaderMatcher {
        HeaderMatcher { name: name.into(), header_match_specifier: Some(specifier), ..Default::default() }
    }

    /// The filters mesh-control's `rbac_filter` sends to sidecars for a mesh file's rules (a DENY filter, then
    /// an ALLOW one; policies `rule-{i}`; `*` principals as `any`, `x*` as prefixes; methods as `url_path`).
    #[test]
    fn what_mesh_control_sends_decodes_and_decides_as_its_rules_say() {
        let deny = filter_of(rbac::Action::Deny, vec![("rule-0", policy_of(vec![url_path("/svc.Greeter/Admin")], vec![any_principal()]))]);
        let allow = filter_of(
            rbac::Action::Allow,
            vec![
                ("rule-0", policy_of(vec![url_path("/svc.Greeter/*")], vec![authenticated("spiffe://td/ns/prod/*")])),
                ("rule-1", policy_of(vec![any_permission()], vec![authenticated("spiffe://td/ns/ops/sa/admin")])),
            ],
        );
        let engine = Engine::new(vec![decode(&to_any(&deny)).unwrap(), decode(&to_any(&allow)).unwrap()]).unwrap();
        let headers: &[(&str, &str)] = &[];
        let call = |path: &str, peer: &'static str| {
            engine.evaluate(&RequestView::new(path, "POST", &headers).unwrap().with_peer_identity(Some(peer)))
        };
        assert!(call("/svc.Greeter/SayHello", "spiffe://td/ns/prod/sa/web").is_allowed());
        assert!(call("/other.Svc/Anything", "spiffe://td/ns/ops/sa/admin").is_allowed());
        assert_eq!(call("/svc.Greeter/Admin", "spiffe://td/ns/ops/sa/admin"), Decision::Deny { policy: Some("rule-0".into()) });
        assert_eq!(call("/svc.Greeter/SayHello", "spiffe://td/ns/dev/sa/web"), Decision::Deny { policy: None });
        // Policies come in name order, whatever the map's.
        let names: Vec<_> = engine.filters()[1].policies.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["rule-0", "rule-1"]);
    }

    #[test]
    fn every_supported_rule_decodes() {
        let cidr = |prefix: &str, len| CidrRange { address_prefix: prefix.into(), prefix_len: Some(UInt32Value { value: len }) };
        let permissions = vec![
            Permission {
                rule: Some(Rule::AndRules(permission::Set {
                    rules: vec![
                        Permission { rule: Some(Rule::Header(header_matcher(":method", HeaderMatchSpecifier::ExactMatch("POST".into())))) },
                        Permission { rule: Some(Rule::DestinationPort(8443)) },
                        Permission { rule: Some(Rule::DestinationIp(cidr("10.0.0.0", 8))) },
                    ],
                })),
            },
            Permission { rule: Some(Rule::OrRules(permission::Set { rules: vec![url_path("/a"), url_path("/b*")] })) },
            Permission { rule: Some(Rule::NotRule(Box::new(any_permission()))) },
            Permission { rule: Some(Rule::RequestedServerName(literal(MatchPattern::Exact(String::new())))) },
        ];
        let principals = vec![
            Principal {
                identifier: Some(Identifier::AndIds(principal::Set { ids: vec![authenticated("spiffe://td/x"), any_principal()] })),
            },
            Principal {
                identifier: Some(Identifier::OrIds(principal::Set {
                    ids: vec![Principal { identifier: Some(Identifier::DirectRemoteIp(cidr("::1", 128))) }],
                })),
            },
            Principal {
                identifier: Some(Identifier::NotId(Box::new(Principal {
                    identifier: Some(Identifier::RemoteIp(cidr("192.168.0.0", 16))),
                }))),
            },
            Principal { identifier: Some(Identifier::SourceIp(CidrRange { address_prefix: "0.0.0.0".into(), prefix_len: None })) },
            Principal { identifier: Some(Identifier::Authenticated(Authenticated { principal_name: None })) },
            Principal { identifier: Some(Identifier::Header(header_matcher("Host", HeaderMatchSpecifier::PresentMatch(true)))) },
            Principal { identifier: Some(Identifier::UrlPath(PathMatcher { rule: Some(path_matcher::Rule::Path(mesh_pattern("/x"))) })) },
        ];
        let rbac = decode(&to_any(&filter_of(rbac::Action::Allow, vec![("all", policy_of(permissions, principals))]))).unwrap();
        use authz::{Permission as P, Principal as Q};
        let policy = &rbac.policies[0].1;
        assert_eq!(rbac.action, Action::Allow);
        let P::And(and) = &policy.permissions[0] else { panic!("{:?}", policy.permissions[0]) };
        assert_eq!(and[1], P::DestinationPort(8443));
        assert_eq!(and[2], P::DestinationIp("10.0.0.0/8".parse().unwrap()));
        assert_eq!(
            policy.permissions[1],
            P::Or(vec![P::UrlPath(StringMatch::Exact("/a".into())), P::UrlPath(StringMatch::Prefix("/b".into()))])
        );
        assert_eq!(policy.permissions[3], P::Any, "an empty server name matcher always matches the empty server name");
        assert_eq!(policy.principals[1], Q::Or(vec![Q::SourceIp("::1/128".parse().unwrap())]));
        assert_eq!(policy.principals[3], Q::SourceIp("0.0.0.0/0".parse().unwrap()), "an unset prefix length is 0");
        assert_eq!(policy.principals[4], Q::Authenticated(None));
        assert_eq!(
            policy.principals[5],
            Q::Header(HeaderMatch { name: ":authority".into(), matcher: StringMatch::Present(true), invert: false }),
            "host is :authority"
        );
    }

    #[test]
    fn a_filter_that_enforces_nothing_is_permissive() {
        assert_eq!(decode(&to_any(&ProtoRbac::default())).unwrap(), Rbac::permissive(), "no rules: Envoy enforces nothing");
        let log = filter_of(rbac::Action::Log, vec![("p", policy_of(vec![any_permission()], vec![any_principal()]))]);
        assert_eq!(decode(&to_any(&log)).unwrap(), Rbac::permissive(), "LOG: A41 ignores the filter");
        let no_policies = filter_of(rbac::Action::Allow, vec![]);
        assert_eq!(
            decode(&to_any(&no_policies)).unwrap(),
            Rbac { action: Action::Allow, policies: vec![] },
            "an empty ALLOW denies everything"
        );
    }

    #[test]
    fn per_route_overrides_decode_or_turn_the_filter_off() {
        let deny = filter_of(rbac::Action::Deny, vec![("p", policy_of(vec![any_permission()], vec![any_principal()]))]);
        let own = decode_per_route(&to_any(&RbacPerRoute { rbac: Some(deny) })).unwrap().unwrap();
        assert_eq!(own.action, Action::Deny);
        assert_eq!(decode_per_route(&to_any(&RbacPerRoute { rbac: None })).unwrap(), None, "no rbac: the filter is off for the route");
        let bad = RbacPerRoute { rbac: Some(ProtoRbac { matcher: Some(Default::default()), ..Default::default() }) };
        assert!(decode_per_route(&to_any(&bad)).unwrap_err().starts_with("rbac.matcher:"));
    }

    #[test]
    fn unsupported_fields_are_refused_naming_them() {
        let some_rules = || filter_of(rbac::Action::Allow, vec![]).rules;
        let cases: Vec<(ProtoRbac, &str)> = vec![
            (ProtoRbac { matcher: Some(Default::default()), ..Default::default() }, "matcher: the matcher API is not supported"),
            (ProtoRbac { rules: some_rules(), matcher: Some(Default::default()), ..Default::default() }, "rules and matcher: both are set"),
            (ProtoRbac { rules: some_rules(), shadow_rules: some_rules(), ..Default::default() }, "shadow_rules: not supported"),
            (ProtoRbac { shadow_matcher: Some(Default::default()), ..Default::default() }, "shadow_matcher: not supported"),
            (
                ProtoRbac {
                    rules: Some(ProtoRules { audit_logging_options: Some(Default::default()), ..Default::default() }),
                    ..Default::default()
                },
                "rules.audit_logging_options: audit logging is not supported",
            ),
            (
                ProtoRbac { rules: Some(ProtoRules { action: 7, ..Default::default() }), ..Default::default() },
                "rules.action: unknown action 7",
            ),
            (
                filter_of(
                    rbac::Action::Deny,
                    vec![(
                        "cel",
                        Policy { condition: Some(Default::default()), ..policy_of(vec![any_permission()], vec![any_principal()]) },
                    )],
                ),
                "rules.policies[\"cel\"].condition: CEL conditions are not supported",
            ),
            (
                filter_of(
                    rbac::Action::Deny,
                    vec![(
                        "cel",
                        Policy { checked_condition: Some(Default::default()), ..policy_of(vec![any_permission()], vec![any_principal()]) },
                    )],
                ),
                "rules.policies[\"cel\"].condition:",
            ),
            (
                filter_of(rbac::Action::Deny, vec![("empty", policy_of(vec![], vec![any_principal()]))]),
                "rules.policies[\"empty\"].permissions: empty",
            ),
            (
                filter_of(rbac::Action::Deny, vec![("empty", policy_of(vec![any_permission()], vec![]))]),
                "rules.policies[\"empty\"].principals: empty",
            ),
            (
                with_permission(Rule::RequestedServerName(literal(MatchPattern::Exact("api.example".into())))),
                "permissions[0].requested_server_name: the server name is not known",
            ),
            (
                with_permission(Rule::Metadata(MetadataMatcher::default())),
                "permissions[0].metadata: Envoy metadata matchers are not supported",
            ),
            (
                with_permission(Rule::Matcher(TypedExtensionConfig { name: "ip_port".into(), typed_config: None })),
                "permissions[0].matcher: custom RBAC matchers are not supported (\"ip_port\")",
            ),
            (with_permission(Rule::UriTemplate(Default::default())), "permissions[0].uri_template: not supported"),
            (with_permission(Rule::SourcedMetadata(Default::default())), "permissions[0].sourced_metadata: not supported"),
            (with_permission(Rule::DestinationPortRange(Default::default())), "permissions[0].destination_port_range: not supported"),
            (with_permission(Rule::DestinationPort(70_000)), "permissions[0].destination_port: 70000 is not a port"),
            (with_permission(Rule::Any(false)), "permissions[0].any: must be true"),
            (with_permission(Rule::AndRules(permission::Set { rules: vec![] })), "permissions[0].and_rules.rules: empty"),
            (
                with_permission(Rule::NotRule(Box::new(Permission {
                    rule: Some(Rule::OrRules(permission::Set { rules: vec![any_permission(), Permission { rule: None }] })),
                }))),
                "permissions[0].not_rule.or_rules.rules[1].rule: none set",
            ),
            (
                with_permission(Rule::Header(header_matcher("grpc-timeout", HeaderMatchSpecifier::PresentMatch(true)))),
                "permissions[0].header (\"grpc-timeout\"): a rule on a grpc- header is not allowed (A41)",
            ),
            (
                with_permission(Rule::Header(header_matcher("Grpc-Status", HeaderMatchSpecifier::PresentMatch(true)))),
                "a rule on a grpc- header is not allowed",
            ),
            (
                with_permission(Rule::Header(header_matcher(":scheme", HeaderMatchSpecifier::ExactMatch("http".into())))),
                "header (\":scheme\"): a rule on :scheme is not allowed",
            ),
            (
                with_permission(Rule::Header(HeaderMatcher {
                    treat_missing_header_as_empty: true,
                    ..header_matcher("x-role", HeaderMatchSpecifier::ExactMatch(String::new()))
                })),
                "treat_missing_header_as_empty is not supported",
            ),
            (with_permission(Rule::UrlPath(PathMatcher { rule: None })), "permissions[0].url_path.path: missing"),
            (
                with_permission(Rule::DestinationIp(CidrRange {
                    address_prefix: "10.0.0.0".into(),
                    prefix_len: Some(UInt32Value { value: 33 }),
                })),
                "destination_ip: prefix_len 33 is too long for 10.0.0.0",
            ),
            (
                with_permission(Rule::DestinationIp(CidrRange { address_prefix: "ten".into(), prefix_len: None })),
                "destination_ip: address_prefix \"ten\" is not an IP address",
            ),
            (
                with_principal(Identifier::Metadata(MetadataMatcher::default())),
                "principals[0].metadata: Envoy metadata matchers are not supported",
            ),
            (with_principal(Identifier::FilterState(Default::default())), "principals[0].filter_state: not supported"),
            (with_principal(Identifier::SourcedMetadata(Default::default())), "principals[0].sourced_metadata: not supported"),
            (
                with_principal(Identifier::Custom(TypedExtensionConfig { name: "mtls".into(), typed_config: None })),
                "principals[0].custom: custom principals are not supported",
            ),
            (with_principal(Identifier::OrIds(principal::Set { ids: vec![] })), "principals[0].or_ids.ids: empty"),
            (with_principal(Identifier::Any(false)), "principals[0].any: must be true"),
            (
                with_principal(Identifier::Authenticated(Authenticated { principal_name: Some(StringMatcher::default()) })),
                "principals[0].authenticated.principal_name: no match pattern",
            ),
            (
                with_principal(Identifier::RemoteIp(CidrRange {
                    address_prefix: "::".into(),
                    prefix_len: Some(UInt32Value { value: 129 }),
                })),
                "principals[0].remote_ip: prefix_len 129",
            ),
        ];
        for (filter, want) in cases {
            let got = reason(filter);
            assert!(got.contains(want), "{got:?} does not say {want:?}");
        }
        assert!(reason(with_permission(Rule::Any(false))).starts_with("rules.policies[\"p\"].permissions[0].any"));
        let broken = Any { type_url: format!("type.googleapis.com/{RBAC}"), value: vec![0x0a, 0x05] };
        assert!(decode(&broken).unwrap_err().starts_with("malformed RBAC"));
        let typed_struct = Any { type_url: "type.googleapis.com/xds.type.v3.TypedStruct".into(), value: vec![] };
        assert!(decode(&typed_struct).unwrap_err().contains("TypedStruct configuration is not supported"));
    }
}
