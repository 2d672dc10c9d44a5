//! Fuzz-style properties: the resource decoders never panic and every error
//! has a reason.

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use envoy_types::pb::envoy::config::core::v3::{Address, Locality, SocketAddress};
use envoy_types::pb::envoy::config::endpoint::v3::cluster_load_assignment::{Policy, policy::DropOverload};
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints};
use envoy_types::pb::envoy::config::listener::v3::{ApiListener, Listener};
use envoy_types::pb::envoy::config::route::v3::route_action::ClusterSpecifier;
use envoy_types::pb::envoy::config::route::v3::route_match::PathSpecifier;
use envoy_types::pb::envoy::config::route::v3::{Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{HttpConnectionManager, HttpFilter, http_filter};
use envoy_types::pb::envoy::r#type::v3::FractionalPercent;
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use proptest::prelude::*;
use prost::Message;
use xds_client::resource::{DecodeError, Resource, ResourceType, decode, resource_name};

const WRAPPER: &str = "type.googleapis.com/envoy.service.discovery.v3.Resource";

fn check(result: Result<Resource, DecodeError>, ty: ResourceType) {
    match result {
        Ok(r) => assert_eq!(r.resource_type(), ty),
        Err(e) => assert!(!e.reason.is_empty(), "empty reason: {e:?}"),
    }
}

fn type_url() -> impl Strategy<Value = String> {
    let known: Vec<String> = ResourceType::ALL.iter().map(|t| t.type_url().to_owned()).chain([WRAPPER.to_owned()]).collect();
    prop_oneof![proptest::sample::select(known), ".{0,80}"]
}

fn opt_u32() -> impl Strategy<Value = Option<UInt32Value>> {
    proptest::option::of(prop_oneof![Just(0u32), Just(1u32), Just(u32::MAX), any::<u32>()].prop_map(|value| UInt32Value { value }))
}

fn lb_endpoint() -> impl Strategy<Value = LbEndpoint> {
    let host = prop_oneof![
        Just("10.0.0.1".to_owned()),
        Just("::1".to_owned()),
        Just("0.0.0.0".to_owned()),
        "[0-9a-z.:]{0,12}",
        "10\\.0\\.[0-9]\\.[0-9]"
    ];
    let port = prop_oneof![Just(0u32), Just(65535u32), Just(65536u32), any::<u32>(), 1u32..100];
    (host, port, opt_u32(), -1i32..8).prop_map(|(address, port, load_balancing_weight, health_status)| {
        let sa = SocketAddress { address, port_specifier: Some(PortSpecifier::PortValue(port)), ..Default::default() };
        let ep = Endpoint { address: Some(Address { address: Some(AddressKind::SocketAddress(sa)) }), ..Default::default() };
        LbEndpoint { host_identifier: Some(HostIdentifier::Endpoint(ep)), load_balancing_weight, health_status, ..Default::default() }
    })
}

fn locality() -> impl Strategy<Value = LocalityLbEndpoints> {
    let priority = prop_oneof![0u32..3, Just(u32::MAX), any::<u32>()];
    (proptest::option::of("[ab]"), opt_u32(), priority, proptest::collection::vec(lb_endpoint(), 0..4)).prop_map(
        |(zone, w, priority, eps)| LocalityLbEndpoints {
            locality: zone.map(|zone| Locality { region: "r".into(), zone, sub_zone: String::new() }),
            load_balancing_weight: w,
            priority,
            lb_endpoints: eps,
            ..Default::default()
        },
    )
}

fn assignment() -> impl Strategy<Value = ClusterLoadAssignment> {
    let drop = (any::<u32>(), -1i32..4).prop_map(|(numerator, denominator)| DropOverload {
        category: "c".into(),
        drop_percentage: Some(FractionalPercent { numerator, denominator }),
    });
    (proptest::option::of("[a-z]{0,5}"), proptest::collection::vec(locality(), 0..5), proptest::collection::vec(drop, 0..3)).prop_map(
        |(name, endpoints, drops)| ClusterLoadAssignment {
            cluster_name: name.unwrap_or_default(),
            endpoints,
            policy: Some(Policy { drop_overloads: drops, ..Default::default() }),
            ..Default::default()
        },
    )
}

fn pack<M: prost::Name>(m: &M) -> Any {
    Any { type_url: M::type_url(), value: m.encode_to_vec() }
}

/// A valid resource of each type, encoded.
fn valid(ty: ResourceType) -> Any {
    let route = Route {
        r#match: Some(RouteMatch { path_specifier: Some(PathSpecifier::Prefix("/".into())), ..Default::default() }),
        action: Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(ClusterSpecifier::Cluster("c".into())),
            ..Default::default()
        })),
        ..Default::default()
    };
    let rc = RouteConfiguration {
        name: "r".into(),
        virtual_hosts: vec![VirtualHost { name: "vh".into(), domains: vec!["*".into()], routes: vec![route], ..Default::default() }],
        ..Default::default()
    };
    match ty {
        ResourceType::Listener => {
            let router = HttpFilter {
                name: "router".into(),
                config_type: Some(http_filter::ConfigType::TypedConfig(pack(&Router::default()))),
                ..Default::default()
            };
            let hcm = HttpConnectionManager {
                route_specifier: Some(RouteSpecifier::RouteConfig(rc)),
                http_filters: vec![router],
                ..Default::default()
            };
            pack(&Listener { name: "l".into(), api_listener: Some(ApiListener { api_listener: Some(pack(&hcm)) }), ..Default::default() })
        }
        ResourceType::RouteConfiguration => pack(&rc),
        ResourceType::Cluster => pack(&Cluster {
            name: "c".into(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
            ..Default::default()
        }),
        ResourceType::ClusterLoadAssignment => {
            let sa = SocketAddress { address: "10.0.0.1".into(), port_specifier: Some(PortSpecifier::PortValue(80)), ..Default::default() };
            let ep = Endpoint { address: Some(Address { address: Some(AddressKind::SocketAddress(sa)) }), ..Default::default() };
            let lb = LbEndpoint { host_identifier: Some(HostIdentifier::Endpoint(ep)), ..Default::default() };
            let l = LocalityLbEndpoints { lb_endpoints: vec![lb], ..Default::default() };
            pack(&ClusterLoadAssignment { cluster_name: "e".into(), endpoints: vec![l], ..Default::default() })
        }
    }
}

proptest! {
    #[test]
    fn mutated_valid_resources_never_panic(edits in proptest::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 1..6)) {
        for ty in ResourceType::ALL {
            let mut any = valid(ty);
            prop_assert!(decode(ty, &any).is_ok(), "{:?}", decode(ty, &any));
            for &(at, byte, op) in &edits {
                let len = any.value.len();
                match op {
                    0 if len > 0 => any.value[at % len] = byte,
                    1 => any.value.insert(at % (len + 1), byte),
                    _ => any.value.truncate(at % (len + 1)),
                }
            }
            check(decode(ty, &any), ty);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256), url in type_url()) {
        for ty in ResourceType::ALL {
            let any = Any { type_url: url.clone(), value: bytes.clone() };
            let _ = resource_name(ty, &any).map_err(|e| assert!(!e.reason.is_empty()));
            check(decode(ty, &any), ty);
            let typed = Any { type_url: ty.type_url().to_owned(), value: bytes.clone() };
            check(decode(ty, &typed), ty);
        }
    }

    #[test]
    fn arbitrary_assignments_never_panic(cla in assignment()) {
        let any = Any { type_url: ResourceType::ClusterLoadAssignment.type_url().to_owned(), value: cla.encode_to_vec() };
        match decode(ResourceType::ClusterLoadAssignment, &any) {
            Ok(Resource::ClusterLoadAssignment(r)) => {
                prop_assert!(r.endpoints.endpoints.iter().all(|e| e.weight >= 1 && e.addr.port() != 0));
                prop_assert!(r.endpoints.drop_overloads.iter().all(|d| d.parts_per_million <= 1_000_000));
            }
            Ok(other) => prop_assert!(false, "wrong type {other:?}"),
            Err(e) => prop_assert!(!e.reason.is_empty()),
        }
    }
}
