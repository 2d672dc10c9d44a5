//! EDS: cluster load assignments (gRPC A27, A81 rules).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use envoy_types::pb::envoy::config::core::v3::{HealthStatus as ProtoHealth, Locality as ProtoLocality, Metadata};
use envoy_types::pb::envoy::config::endpoint::v3::cluster_load_assignment::Policy;
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, LbEndpoint};
use envoy_types::pb::envoy::r#type::v3::FractionalPercent;
use envoy_types::pb::envoy::r#type::v3::fractional_percent::DenominatorType;
use envoy_types::pb::google::protobuf::UInt32Value;
use envoy_types::pb::google::protobuf::value::Kind;
use mesh_core::{DropOverload, Endpoint, EndpointSet, HealthStatus, Labels, Locality};
use prost::Message;
use prost::encoding::WireType;

/// The endpoints of one cluster.
#[derive(Clone, Debug)]
pub struct EndpointsResource {
    /// The EDS resource name (the cluster's EDS service name).
    pub cluster_name: String,
    /// Endpoints, locality weights and drop overloads.
    pub endpoints: EndpointSet,
}

/// Decodes and validates a `ClusterLoadAssignment`.
///
/// The assignment is read field by field rather than decoded whole: each `LbEndpoint` is decoded, validated
/// and dropped before the next, so a 10,000-endpoint assignment never exists as 10,000 protobuf structs at once
/// (their memory would outlive the update as allocator fragmentation). Endpoints of one locality share one
/// `Locality`, and equal label sets share one copy.
pub(crate) fn decode(bytes: &[u8]) -> Result<EndpointsResource, String> {
    let header = ClaHeader::decode(bytes).map_err(|e| format!("malformed ClusterLoadAssignment: {e}"))?;
    if header.cluster_name.is_empty() {
        return Err("cluster_name: empty".into());
    }
    let endpoints = assemble(bytes, header.policy.as_ref())?;
    Ok(EndpointsResource { cluster_name: header.cluster_name, endpoints })
}

/// Validates the endpoints of a decoded assignment (a static cluster's `load_assignment`), by the same path.
pub(crate) fn convert(cla: &ClusterLoadAssignment) -> Result<EndpointSet, String> {
    assemble(&cla.encode_to_vec(), cla.policy.as_ref())
}

/// The fields of a `ClusterLoadAssignment` besides its endpoints (field 2, skipped by this decode).
#[derive(Clone, PartialEq, Message)]
struct ClaHeader {
    #[prost(string, tag = "1")]
    cluster_name: String,
    #[prost(message, optional, tag = "4")]
    policy: Option<Policy>,
}

/// The fields of a `LocalityLbEndpoints` besides its endpoints (field 2, skipped by this decode).
#[derive(Clone, PartialEq, Message)]
struct LocalityHeader {
    #[prost(message, optional, tag = "1")]
    locality: Option<ProtoLocality>,
    #[prost(message, optional, tag = "3")]
    load_balancing_weight: Option<UInt32Value>,
    #[prost(uint32, tag = "5")]
    priority: u32,
}

/// The length-delimited occurrences of field `tag` in a protobuf message, in order, without decoding them.
/// Stops after the first error.
fn fields(mut buf: &[u8], tag: u32) -> impl Iterator<Item = Result<&[u8], String>> {
    let mut failed = false;
    std::iter::from_fn(move || {
        while !buf.is_empty() && !failed {
            match next_field(&mut buf, tag) {
                Ok(Some((field, value))) if field == tag => return Some(Ok(value)),
                Ok(_) => {}
                Err(e) => {
                    failed = true;
                    return Some(Err(e));
                }
            }
        }
        None
    })
}

/// Reads one field off `buf`: its number and, when length-delimited, its bytes. Other fields (groups
/// included) are skipped as prost skips unknown fields; field `tag` must be length-delimited (a message), as
/// a whole-message decode would also insist.
fn next_field<'a>(buf: &mut &'a [u8], tag: u32) -> Result<Option<(u32, &'a [u8])>, String> {
    let (field, wire) = prost::encoding::decode_key(buf).map_err(|e| e.to_string())?;
    if wire != WireType::LengthDelimited {
        if field == tag {
            return Err(format!("field {field}: wire type {wire:?} where a message belongs"));
        }
        prost::encoding::skip_field(wire, field, buf, prost::encoding::DecodeContext::default()).map_err(|e| e.to_string())?;
        return Ok(None);
    }
    let len = prost::encoding::decode_varint(buf).map_err(|e| e.to_string())?;
    let len = usize::try_from(len).ok().filter(|&len| len <= buf.len()).ok_or_else(|| format!("field {field}: truncated"))?;
    let (value, rest) = buf.split_at(len);
    *buf = rest;
    Ok(Some((field, value)))
}

/// Builds and validates the endpoint set of an encoded assignment.
///
/// When any locality has a weight, localities without one or with weight 0
/// are ignored (A27) and the weights fill `locality_weights`. Priorities must
/// be contiguous from 0, a locality may appear once per priority, addresses
/// only once (A81), and weights may not sum past `u32::MAX` within a priority
/// (localities) or a locality (endpoints).
fn assemble(bytes: &[u8], policy: Option<&Policy>) -> Result<EndpointSet, String> {
    let malformed = |e: String| format!("malformed ClusterLoadAssignment: {e}");
    let localities_raw = fields(bytes, 2).collect::<Result<Vec<_>, _>>().map_err(malformed)?;
    let mut headers = Vec::with_capacity(localities_raw.len());
    for (i, raw) in localities_raw.iter().enumerate() {
        headers.push(LocalityHeader::decode(*raw).map_err(|e| format!("endpoints[{i}]: malformed LocalityLbEndpoints: {e}"))?);
    }
    let weighted = headers.iter().any(|l| l.load_balancing_weight.is_some());
    // Sized exactly up front (a cheap pass over the bytes): growing by doubling would leave freed buffers behind.
    let kept = |l: &LocalityHeader| !weighted || l.load_balancing_weight.is_some_and(|w| w.value > 0);
    let total = headers.iter().zip(&localities_raw).filter(|(l, _)| kept(l)).map(|(_, raw)| fields(raw, 2).count()).sum();
    let mut set = EndpointSet { endpoints: Vec::with_capacity(total), ..EndpointSet::default() };
    // Where each kept locality's endpoints start in the list (locality index, first endpoint), for naming a
    // duplicate address.
    let mut starts: Vec<(usize, usize)> = Vec::new();
    let mut localities = HashSet::new();
    let mut labels: HashMap<Labels, Arc<Labels>> = HashMap::new();
    let mut priority_weights: HashMap<u32, u64> = HashMap::new();
    for (i, (l, raw)) in headers.iter().zip(&localities_raw).enumerate() {
        if !kept(l) {
            continue;
        }
        let weight = l.load_balancing_weight.map(|w| w.value);
        // Contiguous from 0 (checked below), so a priority past 16 bits cannot be valid.
        let priority = u16::try_from(l.priority)
            .map_err(|_| format!("endpoints[{i}].priority: {} is not below 65536 (priorities are contiguous from 0)", l.priority))?;
        let locality = match &l.locality {
            Some(l) if !(l.region.is_empty() && l.zone.is_empty() && l.sub_zone.is_empty()) => {
                Arc::new(Locality { region: l.region.clone(), zone: l.zone.clone(), sub_zone: l.sub_zone.clone() })
            }
            _ => Locality::shared_default(),
        };
        if !localities.insert((l.priority, Arc::clone(&locality))) {
            return Err(format!("endpoints[{i}]: duplicate locality {locality:?} in priority {}", l.priority));
        }
        if let Some(w) = weight {
            let sum = priority_weights.entry(l.priority).or_default();
            *sum += u64::from(w);
            if *sum > u64::from(u32::MAX) {
                return Err(format!(
                    "endpoints[{i}].load_balancing_weight: locality weights of priority {} sum past {}",
                    l.priority,
                    u32::MAX
                ));
            }
            let first = *set.locality_weights.entry((*locality).clone()).or_insert(w);
            if first != w {
                tracing::warn!(?locality, first, ignored = w, "locality has different weights in different priorities; keeping the first");
            }
        } else {
            priority_weights.entry(l.priority).or_default();
        }
        let mut endpoint_weights = 0u64;
        starts.push((i, set.endpoints.len()));
        for (j, raw) in fields(raw, 2).enumerate() {
            let raw = raw.map_err(|e| format!("endpoints[{i}]: malformed LocalityLbEndpoints: {e}"))?;
            let at = |e: String| format!("endpoints[{i}].lb_endpoints[{j}]: {e}");
            let e = LbEndpoint::decode(raw).map_err(|e| at(format!("malformed LbEndpoint: {e}")))?;
            let ep = endpoint(&e, &locality, priority, &mut labels).map_err(at)?;
            endpoint_weights += u64::from(ep.weight);
            set.endpoints.push(Arc::new(ep));
        }
        if endpoint_weights > u64::from(u32::MAX) {
            return Err(format!("endpoints[{i}].lb_endpoints: endpoint weights sum past {}", u32::MAX));
        }
    }
    // Duplicate addresses: sort positions by address (then by order of appearance) and compare neighbours; the
    // later of two is named.
    let mut order: Vec<u32> = (0..set.endpoints.len() as u32).collect();
    order.sort_unstable_by_key(|&k| (set.endpoints[k as usize].addr, k));
    if let Some(pair) = order.windows(2).find(|w| set.endpoints[w[0] as usize].addr == set.endpoints[w[1] as usize].addr) {
        let later = pair[1] as usize;
        let (i, start) = starts[starts.partition_point(|&(_, start)| start <= later) - 1];
        return Err(format!("endpoints[{i}].lb_endpoints[{}]: duplicate address {}", later - start, set.endpoints[later].addr));
    }
    let priorities: BTreeSet<u32> = priority_weights.into_keys().collect();
    if priorities.last().is_some_and(|&max| u64::from(max) + 1 != priorities.len() as u64) {
        return Err(format!("endpoints: priorities must be contiguous from 0, got {priorities:?}"));
    }
    for (i, d) in policy.iter().flat_map(|p| &p.drop_overloads).enumerate() {
        let parts_per_million =
            d.drop_percentage.as_ref().map_or(Ok(0), ppm).map_err(|e| format!("policy.drop_overloads[{i}].drop_percentage: {e}"))?;
        set.drop_overloads.push(DropOverload { category: d.category.clone(), parts_per_million });
    }
    Ok(set)
}

/// A fractional percent as parts per million, capped at one million.
fn ppm(p: &FractionalPercent) -> Result<u32, String> {
    let scale = match DenominatorType::try_from(p.denominator) {
        Ok(DenominatorType::Hundred) => 10_000,
        Ok(DenominatorType::TenThousand) => 100,
        Ok(DenominatorType::Million) => 1,
        Err(_) => return Err(format!("unknown denominator {}", p.denominator)),
    };
    Ok(p.numerator.saturating_mul(scale).min(1_000_000))
}

fn endpoint(
    e: &LbEndpoint,
    locality: &Arc<Locality>,
    priority: u16,
    labels: &mut HashMap<Labels, Arc<Labels>>,
) -> Result<Endpoint, String> {
    let (host, port) = host_port(e)?;
    let ip: IpAddr = host.parse().map_err(|_| format!("endpoint.address.socket_address.address: {host:?} is not an IP address"))?;
    let metadata = match e.metadata.as_ref().map(flatten) {
        Some(m) if !m.is_empty() => Arc::clone(labels.entry(m).or_insert_with_key(|m| Arc::new(m.clone()))),
        _ => mesh_core::model::no_labels(),
    };
    let ep = Endpoint {
        addr: SocketAddr::new(ip, port),
        weight: e.load_balancing_weight.map_or(1, |w| w.value).max(1),
        locality: Arc::clone(locality),
        priority,
        health: health(e.health_status),
        metadata,
    };
    ep.validate().map_err(|e| format!("endpoint.address: {e}"))?;
    Ok(ep)
}

/// Host and port of an endpoint's socket address (the host may be a name).
pub(crate) fn host_port(e: &LbEndpoint) -> Result<(&str, u16), String> {
    let ep = match &e.host_identifier {
        Some(HostIdentifier::Endpoint(ep)) => ep,
        Some(HostIdentifier::EndpointName(_)) => return Err("endpoint_name: named endpoints are not supported".into()),
        None => return Err("endpoint: missing".into()),
    };
    let sa = match ep.address.as_ref().and_then(|a| a.address.as_ref()) {
        Some(AddressKind::SocketAddress(sa)) => sa,
        Some(_) => return Err("endpoint.address: only socket addresses are supported".into()),
        None => return Err("endpoint.address: missing".into()),
    };
    let port = match sa.port_specifier {
        Some(PortSpecifier::PortValue(p)) => u16::try_from(p)
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("endpoint.address.socket_address.port_value: {p} is not in 1..=65535"))?,
        Some(PortSpecifier::NamedPort(_)) => return Err("endpoint.address.socket_address.named_port: not supported".into()),
        None => return Err("endpoint.address.socket_address.port_value: missing".into()),
    };
    if sa.address.is_empty() {
        return Err("endpoint.address.socket_address.address: empty".into());
    }
    Ok((&sa.address, port))
}

fn health(status: i32) -> HealthStatus {
    match ProtoHealth::try_from(status) {
        Ok(ProtoHealth::Healthy) => HealthStatus::Healthy,
        Ok(ProtoHealth::Unhealthy | ProtoHealth::Timeout) => HealthStatus::Unhealthy,
        Ok(ProtoHealth::Draining) => HealthStatus::Draining,
        Ok(ProtoHealth::Degraded) => HealthStatus::Degraded,
        Ok(ProtoHealth::Unknown) | Err(_) => HealthStatus::Unknown,
    }
}

/// String values of `filter_metadata` as `namespace.key` labels.
fn flatten(m: &Metadata) -> Labels {
    let mut out = Labels::new();
    for (ns, fields) in &m.filter_metadata {
        for (key, value) in &fields.fields {
            if let Some(Kind::StringValue(s)) = &value.kind {
                out.insert(format!("{ns}.{key}"), s.clone());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::core::v3::{Address, Locality as ProtoLocality, Pipe, SocketAddress};
    use envoy_types::pb::envoy::config::endpoint::v3::cluster_load_assignment::{Policy, policy::DropOverload as ProtoDrop};
    use envoy_types::pb::envoy::config::endpoint::v3::{Endpoint as ProtoEndpoint, LocalityLbEndpoints};
    use envoy_types::pb::google::protobuf::{Struct, UInt32Value, Value};

    use super::super::{DecodeError, Resource, ResourceType, to_any};
    use super::*;

    fn lb(host: &str, port: u32) -> LbEndpoint {
        let sa = SocketAddress { address: host.into(), port_specifier: Some(PortSpecifier::PortValue(port)), ..Default::default() };
        let ep = ProtoEndpoint { address: Some(Address { address: Some(AddressKind::SocketAddress(sa)) }), ..Default::default() };
        LbEndpoint { host_identifier: Some(HostIdentifier::Endpoint(ep)), ..Default::default() }
    }

    fn locality(zone: &str, weight: Option<u32>, priority: u32, eps: Vec<LbEndpoint>) -> LocalityLbEndpoints {
        LocalityLbEndpoints {
            locality: Some(ProtoLocality { region: "r".into(), zone: zone.into(), sub_zone: String::new() }),
            load_balancing_weight: weight.map(|value| UInt32Value { value }),
            priority,
            lb_endpoints: eps,
            ..Default::default()
        }
    }

    fn cla(endpoints: Vec<LocalityLbEndpoints>) -> ClusterLoadAssignment {
        ClusterLoadAssignment { cluster_name: "greeter".into(), endpoints, ..Default::default() }
    }

    fn decode_cla(c: &ClusterLoadAssignment) -> Result<EndpointsResource, DecodeError> {
        match super::super::decode(ResourceType::ClusterLoadAssignment, &to_any(c))? {
            Resource::ClusterLoadAssignment(e) => Ok(e),
            other => panic!("unexpected {other:?}"),
        }
    }

    fn reason(c: &ClusterLoadAssignment) -> String {
        let err = decode_cla(c).unwrap_err();
        assert_eq!(err.name.as_deref(), Some("greeter"), "{err}");
        err.reason
    }

    #[test]
    fn good_assignment() {
        let mut a = lb("10.0.0.1", 8080);
        a.health_status = ProtoHealth::Timeout as i32;
        a.load_balancing_weight = Some(UInt32Value { value: 5 });
        let label = Value { kind: Some(Kind::StringValue("v2".into())) };
        let number = Value { kind: Some(Kind::NumberValue(1.0)) };
        let fields = [("version".to_owned(), label), ("n".to_owned(), number)].into_iter().collect();
        a.metadata =
            Some(Metadata { filter_metadata: [("mesh".to_owned(), Struct { fields })].into_iter().collect(), ..Default::default() });
        let mut b = lb("::1", 8081);
        b.health_status = ProtoHealth::Degraded as i32;
        let mut c = cla(vec![
            locality("a", Some(3), 0, vec![a]),
            locality("b", Some(0), 0, vec![lb("10.0.0.9", 1)]),
            locality("c", None, 0, vec![lb("10.0.0.8", 1)]),
            locality("d", Some(1), 1, vec![b]),
        ]);
        let drop = |numerator, denominator: DenominatorType| ProtoDrop {
            category: "lb".into(),
            drop_percentage: Some(FractionalPercent { numerator, denominator: denominator as i32 }),
        };
        c.policy = Some(Policy {
            drop_overloads: vec![
                drop(5, DenominatorType::Hundred),
                drop(7, DenominatorType::TenThousand),
                drop(u32::MAX, DenominatorType::Hundred),
            ],
            ..Default::default()
        });
        let r = decode_cla(&c).unwrap();
        assert_eq!(r.cluster_name, "greeter");
        let set = &r.endpoints;
        assert_eq!(set.endpoints.len(), 2);
        let (a, b) = (&set.endpoints[0], &set.endpoints[1]);
        assert_eq!((a.addr.to_string(), a.weight, a.priority, a.health), ("10.0.0.1:8080".into(), 5, 0, HealthStatus::Unhealthy));
        assert_eq!(a.locality.zone, "a");
        assert_eq!(a.metadata.get("mesh.version").map(String::as_str), Some("v2"));
        assert_eq!(a.metadata.len(), 1);
        assert_eq!((b.addr.to_string(), b.weight, b.priority, b.health), ("[::1]:8081".into(), 1, 1, HealthStatus::Degraded));
        let weights: Vec<_> = set.locality_weights.iter().map(|(l, w)| (l.zone.as_str(), *w)).collect();
        assert_eq!(weights, [("a", 3), ("d", 1)]);
        let ppms: Vec<_> = set.drop_overloads.iter().map(|d| d.parts_per_million).collect();
        assert_eq!(ppms, [50_000, 700, 1_000_000]);

        // Without locality weights every locality counts and none is weighted.
        let r = decode_cla(&cla(vec![locality("a", None, 0, vec![lb("10.0.0.1", 1)]), locality("b", None, 0, vec![])])).unwrap();
        assert_eq!((r.endpoints.endpoints.len(), r.endpoints.locality_weights.len()), (1, 0));
        assert!(decode_cla(&cla(vec![])).unwrap().endpoints.endpoints.is_empty());
    }

    #[test]
    fn rejections() {
        let one = |e: LbEndpoint| cla(vec![locality("a", None, 0, vec![e])]);
        assert!(reason(&one(lb("10.0.0.1", 0))).contains("endpoints[0].lb_endpoints[0]: endpoint.address.socket_address.port_value: 0"));
        assert!(reason(&one(lb("10.0.0.1", 65536))).contains("port_value: 65536"));
        assert!(reason(&one(lb("greeter.svc", 80))).contains("\"greeter.svc\" is not an IP address"));
        assert!(reason(&one(lb("0.0.0.0", 80))).contains("unspecified"));
        let mut named = lb("10.0.0.1", 80);
        named.host_identifier = Some(HostIdentifier::EndpointName("n".into()));
        assert!(reason(&one(named)).contains("endpoint_name"));
        let mut pipe = lb("10.0.0.1", 80);
        pipe.host_identifier = Some(HostIdentifier::Endpoint(ProtoEndpoint {
            address: Some(Address { address: Some(AddressKind::Pipe(Pipe::default())) }),
            ..Default::default()
        }));
        assert!(reason(&one(pipe)).contains("only socket addresses"));

        let gap = cla(vec![locality("a", None, 0, vec![]), locality("b", None, 2, vec![])]);
        assert!(reason(&gap).contains("priorities must be contiguous from 0, got {0, 2}"));
        assert!(reason(&cla(vec![locality("a", None, 1, vec![])])).contains("contiguous"));
        assert!(reason(&cla(vec![locality("a", None, 70_000, vec![])])).contains("endpoints[0].priority: 70000 is not below 65536"));
        let dup = cla(vec![locality("a", None, 0, vec![lb("10.0.0.1", 80)]), locality("b", None, 0, vec![lb("10.0.0.1", 80)])]);
        assert!(reason(&dup).contains("endpoints[1].lb_endpoints[0]: duplicate address 10.0.0.1:80"));
        assert!(reason(&cla(vec![locality("a", None, 0, vec![]), locality("a", None, 0, vec![])])).contains("duplicate locality"));
        let heavy = cla(vec![locality("a", Some(u32::MAX), 0, vec![]), locality("b", Some(1), 0, vec![])]);
        assert!(reason(&heavy).contains("endpoints[1].load_balancing_weight"));
        let mut big = lb("10.0.0.1", 80);
        big.load_balancing_weight = Some(UInt32Value { value: u32::MAX });
        assert!(reason(&cla(vec![locality("a", None, 0, vec![big, lb("10.0.0.2", 80)])])).contains("endpoint weights sum past"));
        let mut c = cla(vec![]);
        c.policy = Some(Policy {
            drop_overloads: vec![ProtoDrop {
                category: "x".into(),
                drop_percentage: Some(FractionalPercent { numerator: 1, denominator: 9 }),
            }],
            ..Default::default()
        });
        assert!(reason(&c).contains("policy.drop_overloads[0].drop_percentage: unknown denominator 9"));
        // Field 2 (endpoints) must be a message; unknown fields, groups included, are skipped as prost does.
        let mut bytes = cla(vec![locality("a", None, 0, vec![lb("10.0.0.1", 80)])]).encode_to_vec();
        bytes.extend([0x48, 0x01]); // field 9, varint 1: unknown, skipped
        bytes.extend([0x4b, 0x08, 0x01, 0x4c]); // field 9 as a group holding field 1 = 1: skipped
        assert_eq!(decode(&bytes).unwrap().endpoints.endpoints.len(), 1);
        bytes.extend([0x10, 0x01]); // field 2 as a varint
        assert!(decode(&bytes).unwrap_err().contains("field 2: wire type Varint where a message belongs"), "{:?}", decode(&bytes));
        let nameless = decode_cla(&ClusterLoadAssignment::default()).unwrap_err();
        assert_eq!((nameless.name.as_deref(), nameless.reason.as_str()), (Some(""), "cluster_name: empty"));
    }
}
