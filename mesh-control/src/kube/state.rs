//! [`KubeState`]: the Services and EndpointSlices seen so far, and how they resolve to endpoints. Pure data.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// The label that ties an EndpointSlice to its Service (set by the EndpointSlice controller, and by hand for
/// Services without a selector).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Identifies a Service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub name: String,
}

impl ServiceKey {
    /// The key of Service `name` in `namespace`.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for ServiceKey {
    /// `namespace/name`, as kubectl writes it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A service port reference: by name or number (the Service's `port`, not its `targetPort`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortRef {
    /// The Service port's `name`.
    Name(String),
    /// The Service port's `port`.
    Number(u16),
}

impl fmt::Display for PortRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortRef::Name(name) => f.write_str(name),
            PortRef::Number(number) => write!(f, "{number}"),
        }
    }
}

/// One endpoint address as the mesh sees it.
///
/// The conditions are the EndpointSlice's, with Kubernetes' defaults for absent ones: `ready` absent means ready,
/// `serving` absent means the same as `ready`, `terminating` absent means not terminating.
#[derive(Clone, Debug, PartialEq)]
pub struct KubeEndpoint {
    /// The endpoint's address (the slice's first address for the endpoint) and the slice's port number for the
    /// Service port (its target port).
    pub addr: SocketAddr,
    /// The endpoint is ready to receive traffic.
    pub ready: bool,
    /// The endpoint is serving: as `ready`, but also set while the endpoint is terminating.
    pub serving: bool,
    /// The endpoint is terminating (its pod is shutting down).
    pub terminating: bool,
    /// The endpoint's zone (`topology.kubernetes.io/zone` of its node).
    pub zone: Option<String>,
    /// The node the endpoint runs on.
    pub node_name: Option<String>,
    /// The name of the Pod behind the endpoint, when its `targetRef` is a Pod.
    pub pod: Option<String>,
}

/// Everything the watch has seen: Services and their EndpointSlices. Pure data (no I/O).
///
/// [`KubeSource`](super::KubeSource) keeps one up to date from the API server; tests and tools can build one by
/// hand with [`apply_service`](Self::apply_service) and [`apply_slice`](Self::apply_slice). Objects that cannot be
/// used (no name or namespace, a slice without the [`SERVICE_NAME_LABEL`], an FQDN slice, addresses that do not
/// parse) are left out, never an error.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KubeState {
    services: BTreeMap<ServiceKey, Arc<ServiceData>>,
    /// Slices by owning Service, then by slice name.
    slices: BTreeMap<ServiceKey, BTreeMap<String, Arc<SliceData>>>,
    /// Which Service each stored slice belongs to, to find it again when its label changes or it is deleted.
    slice_owner: BTreeMap<ObjectKey, ServiceKey>,
    services_listed: bool,
    slices_listed: bool,
}

/// Namespace and name of a slice.
type ObjectKey = (String, String);

/// What we keep of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ServiceData {
    ports: Vec<ServicePortData>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct ServicePortData {
    /// The port's name; `""` for the unnamed port of a single-port Service, as slices name it.
    name: String,
    port: u16,
    protocol: String,
}

/// What we keep of an EndpointSlice.
#[derive(Clone, Debug, PartialEq)]
struct SliceData {
    ports: Vec<SlicePortData>,
    endpoints: Vec<KubeEndpointData>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct SlicePortData {
    name: String,
    /// `None`: the slice lists the port without a number ("all ports"); it cannot be used.
    port: Option<u16>,
    protocol: String,
}

/// An endpoint of a slice, without its port.
#[derive(Clone, Debug, PartialEq)]
struct KubeEndpointData {
    ip: IpAddr,
    ready: bool,
    serving: bool,
    terminating: bool,
    zone: Option<String>,
    node_name: Option<String>,
    pod: Option<String>,
}

const TCP: &str = "TCP";

impl KubeState {
    /// Adds or replaces a Service. Returns whether the state changed (only the Service's ports matter).
    pub fn apply_service(&mut self, service: &Service) -> bool {
        let Some(key) = object_key(&service.metadata) else {
            tracing::debug!("ignoring a Service without name or namespace");
            return false;
        };
        let key = ServiceKey::new(key.0, key.1);
        let data = ServiceData::from_service(service);
        match self.services.entry(key) {
            Entry::Occupied(mut entry) => {
                if **entry.get() == data {
                    return false;
                }
                entry.insert(Arc::new(data));
            }
            Entry::Vacant(entry) => {
                entry.insert(Arc::new(data));
            }
        }
        true
    }

    /// Removes a Service (its slices stay, and are used again if the Service comes back). Returns whether the state
    /// changed.
    pub fn delete_service(&mut self, service: &Service) -> bool {
        let Some((namespace, name)) = object_key(&service.metadata) else {
            return false;
        };
        self.services.remove(&ServiceKey::new(namespace, name)).is_some()
    }

    /// Adds or replaces an EndpointSlice, filed under the Service its [`SERVICE_NAME_LABEL`] names. A slice without
    /// that label, or of address type FQDN, is dropped (as if deleted). Returns whether the state changed.
    pub fn apply_slice(&mut self, slice: &EndpointSlice) -> bool {
        let Some(key) = object_key(&slice.metadata) else {
            tracing::debug!("ignoring an EndpointSlice without name or namespace");
            return false;
        };
        let owner = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
            .filter(|name| !name.is_empty())
            .map(|name| ServiceKey::new(key.0.clone(), name.clone()));
        let (Some(owner), Some(data)) = (owner, SliceData::from_slice(slice)) else {
            return self.remove_slice(&key);
        };
        let mut changed = false;
        if self.slice_owner.get(&key) != Some(&owner) {
            changed |= self.remove_slice(&key);
            self.slice_owner.insert(key.clone(), owner.clone());
        }
        let slices = self.slices.entry(owner).or_default();
        match slices.entry(key.1) {
            Entry::Occupied(mut entry) => {
                if **entry.get() != data {
                    entry.insert(Arc::new(data));
                    changed = true;
                }
            }
            Entry::Vacant(entry) => {
                entry.insert(Arc::new(data));
                changed = true;
            }
        }
        changed
    }

    /// Removes an EndpointSlice. Returns whether the state changed.
    pub fn delete_slice(&mut self, slice: &EndpointSlice) -> bool {
        match object_key(&slice.metadata) {
            Some(key) => self.remove_slice(&key),
            None => false,
        }
    }

    /// Replaces every Service with `services`, as after a full (re)list: Services not among them are gone. Marks the
    /// Services as listed (see [`is_synced`](Self::is_synced)). Returns whether the state changed.
    pub fn replace_services<'a>(&mut self, services: impl IntoIterator<Item = &'a Service>) -> bool {
        let mut fresh = KubeState::default();
        for service in services {
            fresh.apply_service(service);
        }
        let changed = fresh.services != self.services || !self.services_listed;
        self.services = fresh.services;
        self.services_listed = true;
        changed
    }

    /// Replaces every EndpointSlice with `slices`, as after a full (re)list: slices not among them are gone. Marks
    /// the slices as listed (see [`is_synced`](Self::is_synced)). Returns whether the state changed.
    pub fn replace_slices<'a>(&mut self, slices: impl IntoIterator<Item = &'a EndpointSlice>) -> bool {
        let mut fresh = KubeState::default();
        for slice in slices {
            fresh.apply_slice(slice);
        }
        let changed = fresh.slices != self.slices || !self.slices_listed;
        self.slices = fresh.slices;
        self.slice_owner = fresh.slice_owner;
        self.slices_listed = true;
        changed
    }

    /// Whether both Services and EndpointSlices have been fully listed at least once
    /// ([`replace_services`](Self::replace_services) and [`replace_slices`](Self::replace_slices)). Before that an
    /// absent Service or endpoint may just not have been seen yet; [`KubeSource`](super::KubeSource) publishes no
    /// state before it is synced.
    pub fn is_synced(&self) -> bool {
        self.services_listed && self.slices_listed
    }

    /// Whether the Service exists.
    pub fn contains_service(&self, key: &ServiceKey) -> bool {
        self.services.contains_key(key)
    }

    /// Every Service, in key order.
    pub fn services(&self) -> impl Iterator<Item = &ServiceKey> {
        self.services.keys()
    }

    /// The TCP port numbers of a Service (empty when it does not exist).
    pub fn service_ports(&self, key: &ServiceKey) -> Vec<u16> {
        self.services.get(key).map_or_else(Vec::new, |s| s.ports.iter().filter(|p| p.protocol == TCP).map(|p| p.port).collect())
    }

    /// Endpoints of a service port, in address order.
    ///
    /// Resolves `port` among the Service's TCP ports (by its `name`, or by its `port` number), then takes from every
    /// EndpointSlice of the Service the port of the same name (slices carry target ports, matched by the Service
    /// port's name as Kubernetes does; an unnamed Service port matches the slice's unnamed port). Addresses are
    /// de-duplicated across slices, keeping the most available conditions (ready, then serving, then not
    /// terminating). Not-ready and terminating endpoints are included with their conditions: the mesh decides what
    /// to do with them. IPv4 and IPv6 slices are used; FQDN slices are ignored.
    ///
    /// Empty when the Service or its port does not exist or has no endpoints.
    pub fn endpoints(&self, key: &ServiceKey, port: &PortRef) -> Vec<KubeEndpoint> {
        let Some(service) = self.services.get(key) else {
            return Vec::new();
        };
        let Some(service_port) = service.resolve(port) else {
            return Vec::new();
        };
        let mut merged: BTreeMap<SocketAddr, KubeEndpoint> = BTreeMap::new();
        for slice in self.slices.get(key).into_iter().flat_map(BTreeMap::values) {
            let Some(port) =
                slice.ports.iter().find(|p| p.name == service_port.name && p.protocol == service_port.protocol).and_then(|p| p.port)
            else {
                continue;
            };
            for endpoint in &slice.endpoints {
                let endpoint = endpoint.with_port(port);
                match merged.entry(endpoint.addr) {
                    Entry::Vacant(entry) => {
                        entry.insert(endpoint);
                    }
                    Entry::Occupied(mut entry) => {
                        if availability(&endpoint) > availability(entry.get()) {
                            entry.insert(endpoint);
                        }
                    }
                }
            }
        }
        merged.into_values().collect()
    }

    fn remove_slice(&mut self, key: &ObjectKey) -> bool {
        let Some(owner) = self.slice_owner.remove(key) else {
            return false;
        };
        let Some(slices) = self.slices.get_mut(&owner) else {
            return false;
        };
        let removed = slices.remove(&key.1).is_some();
        if slices.is_empty() {
            self.slices.remove(&owner);
        }
        removed
    }
}

/// Orders duplicates of one address: the most available one wins.
fn availability(endpoint: &KubeEndpoint) -> (bool, bool, bool) {
    (endpoint.ready, endpoint.serving, !endpoint.terminating)
}

/// Namespace and name, both present and non-empty.
fn object_key(metadata: &ObjectMeta) -> Option<ObjectKey> {
    let namespace = metadata.namespace.as_deref().filter(|s| !s.is_empty())?;
    let name = metadata.name.as_deref().filter(|s| !s.is_empty())?;
    Some((namespace.to_owned(), name.to_owned()))
}

fn protocol(protocol: Option<&String>) -> String {
    protocol.map_or_else(|| TCP.to_owned(), Clone::clone)
}

fn port_number(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|&p| p != 0)
}

impl ServiceData {
    fn from_service(service: &Service) -> Self {
        let ports = service
            .spec
            .as_ref()
            .and_then(|spec| spec.ports.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|port| {
                Some(ServicePortData {
                    name: port.name.clone().unwrap_or_default(),
                    port: port_number(port.port)?,
                    protocol: protocol(port.protocol.as_ref()),
                })
            })
            .collect();
        Self { ports }
    }

    /// The Service's TCP port `port` refers to.
    fn resolve(&self, port: &PortRef) -> Option<&ServicePortData> {
        self.ports.iter().filter(|p| p.protocol == TCP).find(|p| match port {
            PortRef::Name(name) => p.name == *name,
            PortRef::Number(number) => p.port == *number,
        })
    }
}

#[derive(Clone, Copy)]
enum AddressType {
    V4,
    V6,
}

impl SliceData {
    /// `None` for a slice whose addresses are not IPs (FQDN, or an unknown type).
    fn from_slice(slice: &EndpointSlice) -> Option<Self> {
        let address_type = match slice.address_type.as_str() {
            "IPv4" => AddressType::V4,
            "IPv6" => AddressType::V6,
            _ => return None,
        };
        let ports = slice
            .ports
            .iter()
            .flatten()
            .map(|port| SlicePortData {
                name: port.name.clone().unwrap_or_default(),
                port: port.port.and_then(port_number),
                protocol: protocol(port.protocol.as_ref()),
            })
            .collect();
        let endpoints = slice
            .endpoints
            .iter()
            .filter_map(|endpoint| {
                // Consumers may use only the first address: the others are fungible (kubernetes#106267).
                let ip = parse_ip(endpoint.addresses.first()?, address_type)?;
                let conditions = endpoint.conditions.as_ref();
                let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
                let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
                let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
                let pod = endpoint.target_ref.as_ref().filter(|r| r.kind.as_deref() == Some("Pod")).and_then(|r| r.name.clone());
                Some(KubeEndpointData {
                    ip,
                    ready,
                    serving,
                    terminating,
                    zone: endpoint.zone.clone(),
                    node_name: endpoint.node_name.clone(),
                    pod,
                })
            })
            .collect();
        Some(Self { ports, endpoints })
    }
}

fn parse_ip(address: &str, address_type: AddressType) -> Option<IpAddr> {
    let ip: IpAddr = address.parse().ok()?;
    match (address_type, ip) {
        (AddressType::V4, IpAddr::V4(_)) | (AddressType::V6, IpAddr::V6(_)) => Some(ip),
        _ => None,
    }
}

impl KubeEndpointData {
    fn with_port(&self, port: u16) -> KubeEndpoint {
        KubeEndpoint {
            addr: SocketAddr::new(self.ip, port),
            ready: self.ready,
            serving: self.serving,
            terminating: self.terminating,
            zone: self.zone.clone(),
            node_name: self.node_name.clone(),
            pod: self.pod.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn service(namespace: &str, name: &str, ports: Value) -> Service {
        serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": { "name": name, "namespace": namespace, "resourceVersion": "100" },
            "spec": { "ports": ports, "selector": { "app": name } },
        }))
        .expect("a Service")
    }

    fn grpc_service(name: &str) -> Service {
        service("default", name, json!([{ "name": "grpc", "protocol": "TCP", "port": 50051, "targetPort": 50051 }]))
    }

    fn slice(name: &str, service: &str, address_type: &str, endpoints: Value, ports: Value) -> EndpointSlice {
        serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": name,
                "namespace": "default",
                "resourceVersion": "200",
                "labels": { SERVICE_NAME_LABEL: service },
            },
            "addressType": address_type,
            "endpoints": endpoints,
            "ports": ports,
        }))
        .expect("an EndpointSlice")
    }

    fn grpc_port() -> Value {
        json!([{ "name": "grpc", "protocol": "TCP", "port": 50051 }])
    }

    fn ready(address: &str) -> Value {
        json!({ "addresses": [address], "conditions": { "ready": true, "serving": true, "terminating": false } })
    }

    fn key(name: &str) -> ServiceKey {
        ServiceKey::new("default", name)
    }

    fn grpc() -> PortRef {
        PortRef::Name("grpc".into())
    }

    fn plain(addr: &str, ready: bool, serving: bool, terminating: bool) -> KubeEndpoint {
        KubeEndpoint { addr: addr.parse().expect("socket address"), ready, serving, terminating, zone: None, node_name: None, pod: None }
    }

    fn addrs(endpoints: &[KubeEndpoint]) -> Vec<String> {
        endpoints.iter().map(|e| e.addr.to_string()).collect()
    }

    #[test]
    fn slices_of_a_service_are_merged_and_others_are_not() {
        let mut state = KubeState::default();
        state.apply_service(&grpc_service("greeter"));
        state.apply_service(&grpc_service("other"));
        state.apply_slice(&slice("greeter-abc12", "greeter", "IPv4", json!([ready("10.0.0.2")]), grpc_port()));
        state.apply_slice(&slice("greeter-def34", "greeter", "IPv4", json!([ready("10.0.0.1")]), grpc_port()));
        state.apply_slice(&slice("other-xyz", "other", "IPv4", json!([ready("10.0.9.9")]), grpc_port()));
        assert_eq!(
            state.endpoints(&key("greeter"), &grpc()),
            vec![plain("10.0.0.1:50051", true, true, false), plain("10.0.0.2:50051", true, true, false)]
        );
        assert_eq!(addrs(&state.endpoints(&key("other"), &grpc())), ["10.0.9.9:50051"]);
        // Same name, other namespace: nothing.
        assert_eq!(state.endpoints(&ServiceKey::new("prod", "greeter"), &grpc()), vec![]);
        assert_eq!(state.services().cloned().collect::<Vec<_>>(), vec![key("greeter"), key("other")]);
    }

    #[test]
    fn service_port_resolves_to_the_slice_target_port_by_name() {
        let mut state = KubeState::default();
        state.apply_service(&service(
            "default",
            "web",
            json!([
                { "name": "http", "protocol": "TCP", "port": 80, "targetPort": "http-server" },
                { "name": "metrics", "protocol": "TCP", "port": 9090, "targetPort": 9091 },
            ]),
        ));
        state.apply_slice(&slice(
            "web-1",
            "web",
            "IPv4",
            json!([ready("10.1.0.5")]),
            json!([
                { "name": "metrics", "protocol": "TCP", "port": 9091 },
                { "name": "http", "protocol": "TCP", "port": 8080 },
            ]),
        ));
        let web = key("web");
        let http = vec![plain("10.1.0.5:8080", true, true, false)];
        assert_eq!(state.endpoints(&web, &PortRef::Name("http".into())), http);
        // By number: the Service's port, not the target port.
        assert_eq!(state.endpoints(&web, &PortRef::Number(80)), http);
        assert_eq!(state.endpoints(&web, &PortRef::Number(8080)), vec![]);
        assert_eq!(addrs(&state.endpoints(&web, &PortRef::Number(9090))), ["10.1.0.5:9091"]);
        assert_eq!(state.endpoints(&web, &PortRef::Name("admin".into())), vec![]);
    }

    #[test]
    fn unnamed_port_of_a_single_port_service() {
        let mut state = KubeState::default();
        state.apply_service(&service("default", "single", json!([{ "port": 80, "targetPort": 8080 }])));
        state.apply_slice(&slice(
            "single-1",
            "single",
            "IPv4",
            json!([ready("10.2.0.1")]),
            json!([{ "name": "", "protocol": "TCP", "port": 8080 }]),
        ));
        assert_eq!(addrs(&state.endpoints(&key("single"), &PortRef::Number(80))), ["10.2.0.1:8080"]);
    }

    #[test]
    fn only_tcp_ports_resolve() {
        let mut state = KubeState::default();
        state.apply_service(&service(
            "default",
            "dns",
            json!([
                { "name": "dns", "protocol": "UDP", "port": 53, "targetPort": 5353 },
                { "name": "dns-tcp", "protocol": "TCP", "port": 53, "targetPort": 5354 },
            ]),
        ));
        state.apply_slice(&slice(
            "dns-1",
            "dns",
            "IPv4",
            json!([ready("10.3.0.1")]),
            json!([
                { "name": "dns", "protocol": "UDP", "port": 5353 },
                { "name": "dns-tcp", "protocol": "TCP", "port": 5354 },
            ]),
        ));
        assert_eq!(addrs(&state.endpoints(&key("dns"), &PortRef::Number(53))), ["10.3.0.1:5354"]);
        assert_eq!(state.endpoints(&key("dns"), &PortRef::Name("dns".into())), vec![]);
    }

    #[test]
    fn ipv6_and_dual_stack() {
        let mut state = KubeState::default();
        state.apply_service(&grpc_service("greeter"));
        state.apply_slice(&slice("greeter-v4", "greeter", "IPv4", json!([ready("10.0.0.1")]), grpc_port()));
        state.apply_slice(&slice("greeter-v6", "greeter", "IPv6", json!([ready("fd00:10:244::7")]), grpc_port()));
        assert_eq!(
            state.endpoints(&key("greeter"), &grpc()),
            vec![plain("10.0.0.1:50051", true, true, false), plain("[fd00:10:244::7]:50051", true, true, false)]
        );
    }

    #[test]
    fn fqdn_slices_and_unusable_addresses_are_ignored() {
        let mut state = KubeState::default();
        state.apply_service(&grpc_service("greeter"));
        state.apply_slice(&slice("greeter-fqdn", "greeter", "FQDN", json!([ready("greeter.example.com")]), grpc_port()));
        assert_eq!(state.endpoints(&key("greeter"), &grpc()), vec![]);
        // An address of the other family, one that does not parse, an endpoint without address: all skipped.
        state.apply_slice(&slice(
            "greeter-v4",
            "greeter",
            "IPv4",
            json!([ready("fd00::1"), ready("10.0.0.300"), { "addresses": [] }, ready("10.0.0.1")]),
            grpc_port(),
        ));
        assert_eq!(addrs(&state.endpoints(&key("greeter"), &grpc())), ["10.0.0.1:50051"]);
        // Only the first address of an endpoint counts (the others are fungible).
        state.apply_slice(&slice("greeter-v4", "greeter", "IPv4", json!([{ "addresses": ["10.0.0.2", "10.0.0.3"] }]), grpc_port()));
        assert_eq!(addrs(&state.endpoints(&key("greeter"), &grpc())), ["10.0.0.2:50051"]);
    }

    #[test]
    fn conditions_and_their_defaults() {
        let mut state = KubeState::default();
        state.apply_service(&grpc_service("greeter"));
        state.apply_slice(&slice(
            "greeter-1",
            "greeter",
            "IPv4",
            json!([
                // Terminating, still serving: the mesh drains it.
                { "addresses": ["10.0.0.1"], "conditions": { "ready": false, "serving": true, "terminating": true } },
                // Terminating and no longer serving.
                { "addresses": ["10.0.0.2"], "conditions": { "ready": false, "serving": false, "terminating": true } },
                // No conditions at all: ready.
                { "addresses": ["10.0.0.3"] },
                // Not ready, serving unset: not serving either.
                { "addresses": ["10.0.0.4"], "conditions": { "ready": false } },
                {
                    "addresses": ["10.0.0.5"],
                    "conditions": { "ready": true },
                    "zone": "us-east-1c",
                    "nodeName": "worker-c",
                    "targetRef": { "kind": "Pod", "namespace": "default", "name": "greeter-abc" },
                },
                // A target that is not a Pod names no pod.
                { "addresses": ["10.0.0.6"], "targetRef": { "kind": "Node", "name": "worker-d" } },
            ]),
            grpc_port(),
        ));
        assert_eq!(
            state.endpoints(&key("greeter"), &grpc()),
            vec![
                plain("10.0.0.1:50051", false, true, true),
                plain("10.0.0.2:50051", false, false, true),
                plain("10.0.0.3:50051", true, true, false),
                plain("10.0.0.4:50051", false, false, false),
                KubeEndpoint {
                    zone: Some("us-east-1c".into()),
                    node_name: Some("worker-c".into()),
                    pod: Some("greeter-abc".into()),
                    ..plain("10.0.0.5:50051", true, true, false)
                },
                plain("10.0.0.6:50051", true, true, false),
            ]
        );
    }

    #[test]
    fn duplicate_addresses_keep_the_most_available() {
        let not_ready = json!([{ "addresses": ["10.0.0.1"], "conditions": { "ready": false, "serving": false } }]);
        let terminating = json!([{ "addresses": ["10.0.0.1"], "conditions": { "ready": false, "serving": true, "terminating": true } }]);
        let readies = json!([ready("10.0.0.1")]);
        // Whatever slice comes first by name.
        for (first, second) in [(&not_ready, &readies), (&readies, &not_ready), (&terminating, &readies)] {
            let mut state = KubeState::default();
            state.apply_service(&grpc_service("greeter"));
            state.apply_slice(&slice("greeter-a", "greeter", "IPv4", first.clone(), grpc_port()));
            state.apply_slice(&slice("greeter-b", "greeter", "IPv4", second.clone(), grpc_port()));
            assert_eq!(state.endpoints(&key("greeter"), &grpc()), vec![plain("10.0.0.1:50051", true, true, false)]);
        }
        let mut state = KubeState::default();
        state.apply_service(&grpc_service("greeter"));
        state.apply_slice(&slice("greeter-a", "greeter", "IPv4", not_ready, grpc_port()));
        state.apply_slice(&slice("greeter-b", "greeter", "IPv4", terminating, grpc_port()));
        assert_eq!(state.endpoints(&key("greeter"), &grpc()), vec![plain("10.0.0.1:50051", false, true, true)]);
    }

    #[test]
    fn slice_ports_without_a_number_or_the_service_port_are_skipped() {
        let mut state = KubeState::default();
        state.apply_service(&grpc_service("greeter"));
        state.apply_slice(&slice("greeter-a", "greeter", "IPv4", json!([ready("10.0.0.1")]), json!([{ "name": "grpc" }])));
        state.apply_slice(&slice("greeter-b", "greeter", "IPv4", json!([ready("10.0.0.2")]), json!([])));
        state.apply_slice(&slice("greeter-c", "greeter", "IPv4", json!([ready("10.0.0.3")]), json!([{ "name": "grpc", "port": 70000 }])));
        state.apply_slice(&slice("greeter-d", "greeter", "IPv4", json!([ready("10.0.0.4")]), grpc_port()));
        assert_eq!(addrs(&state.endpoints(&key("greeter"), &grpc())), ["10.0.0.4:50051"]);
    }

    #[test]
    fn apply_and_delete_report_changes() {
        let mut state = KubeState::default();
        assert!(state.apply_service(&grpc_service("greeter")));
        // A new resourceVersion with the same ports changes nothing.
        let mut again = grpc_service("greeter");
        again.metadata.resource_version = Some("101".into());
        assert!(!state.apply_service(&again));
        let greeter_slice = slice("greeter-a", "greeter", "IPv4", json!([ready("10.0.0.1")]), grpc_port());
        assert!(state.apply_slice(&greeter_slice));
        assert!(!state.apply_slice(&greeter_slice));
        assert!(state.delete_slice(&greeter_slice));
        assert!(!state.delete_slice(&greeter_slice));
        assert_eq!(state.endpoints(&key("greeter"), &grpc()), vec![]);

        // Deleting the Service hides its slices; they are used again when it comes back.
        assert!(state.apply_slice(&greeter_slice));
        assert!(state.delete_service(&again));
        assert!(!state.delete_service(&again));
        assert_eq!(state.endpoints(&key("greeter"), &grpc()), vec![]);
        assert!(!state.contains_service(&key("greeter")));
        assert!(state.apply_service(&again));
        assert_eq!(addrs(&state.endpoints(&key("greeter"), &grpc())), ["10.0.0.1:50051"]);
    }

    #[test]
    fn a_relabelled_slice_moves_and_an_unlabelled_one_goes() {
        let mut state = KubeState::default();
        state.apply_service(&grpc_service("greeter"));
        state.apply_service(&grpc_service("other"));
        state.apply_slice(&slice("shared", "greeter", "IPv4", json!([ready("10.0.0.1")]), grpc_port()));
        assert!(state.apply_slice(&slice("shared", "other", "IPv4", json!([ready("10.0.0.1")]), grpc_port())));
        assert_eq!(state.endpoints(&key("greeter"), &grpc()), vec![]);
        assert_eq!(addrs(&state.endpoints(&key("other"), &grpc())), ["10.0.0.1:50051"]);

        let mut unlabelled = slice("shared", "other", "IPv4", json!([ready("10.0.0.1")]), grpc_port());
        unlabelled.metadata.labels = None;
        assert!(state.apply_slice(&unlabelled));
        assert_eq!(state.endpoints(&key("other"), &grpc()), vec![]);
        assert!(!state.apply_slice(&unlabelled));
    }

    #[test]
    fn objects_without_name_or_namespace_are_ignored() {
        let mut state = KubeState::default();
        let mut nameless = grpc_service("greeter");
        nameless.metadata.name = None;
        assert!(!state.apply_service(&nameless));
        let mut no_namespace = grpc_service("greeter");
        no_namespace.metadata.namespace = None;
        assert!(!state.apply_service(&no_namespace));
        assert!(!state.delete_service(&no_namespace));
        let mut slice_no_namespace = slice("greeter-a", "greeter", "IPv4", json!([ready("10.0.0.1")]), grpc_port());
        slice_no_namespace.metadata.namespace = None;
        assert!(!state.apply_slice(&slice_no_namespace));
        // A Service without spec or ports has no endpoints.
        let bare: Service = serde_json::from_value(json!({ "metadata": { "name": "bare", "namespace": "default" } })).expect("a Service");
        assert!(state.apply_service(&bare));
        assert_eq!(state.endpoints(&key("bare"), &PortRef::Number(80)), vec![]);
        assert_eq!(state.services().cloned().collect::<Vec<_>>(), vec![key("bare")]);
    }

    #[test]
    fn replace_drops_what_the_list_lacks_and_marks_synced() {
        let mut state = KubeState::default();
        assert!(!state.is_synced());
        let a = slice("greeter-a", "greeter", "IPv4", json!([ready("10.0.0.1")]), grpc_port());
        let b = slice("greeter-b", "greeter", "IPv4", json!([ready("10.0.0.2")]), grpc_port());
        assert!(state.replace_services([&grpc_service("greeter"), &grpc_service("gone")]));
        assert!(!state.is_synced());
        assert!(state.replace_slices([&a, &b]));
        assert!(state.is_synced());
        assert_eq!(addrs(&state.endpoints(&key("greeter"), &grpc())), ["10.0.0.1:50051", "10.0.0.2:50051"]);

        // A relist without b and without Service "gone".
        assert!(state.replace_slices([&a]));
        assert!(!state.replace_slices([&a]));
        assert!(state.replace_services([&grpc_service("greeter")]));
        assert_eq!(state.services().cloned().collect::<Vec<_>>(), vec![key("greeter")]);
        assert_eq!(addrs(&state.endpoints(&key("greeter"), &grpc())), ["10.0.0.1:50051"]);
        // b's slice is forgotten entirely: deleting it changes nothing.
        assert!(!state.delete_slice(&b));
        assert!(state.is_synced());
    }

    #[test]
    fn display() {
        assert_eq!(key("greeter").to_string(), "default/greeter");
        assert_eq!(PortRef::Name("grpc".into()).to_string(), "grpc");
        assert_eq!(PortRef::Number(50051).to_string(), "50051");
    }
}
