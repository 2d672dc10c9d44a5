use std::collections::BTreeSet;
use std::net::SocketAddr;

use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use mesh_core::model::{Endpoint, RouteAction};
use prost::Message;
use xds_client::resource::{Resource as Decoded, ResourceType, decode};

use super::*;
use crate::mesh::{KubePort, parse};

fn no_kube(_: &KubeRef) -> Vec<Endpoint> {
    Vec::new()
}

fn names(resources: &[Resource], type_url: &str) -> BTreeSet<String> {
    resources.iter().filter(|r| r.type_url == type_url).map(|r| r.name.clone()).collect()
}

fn decoded(resources: &[Resource], type_url: &str, name: &str) -> Decoded {
    let r = resources.iter().find(|r| r.type_url == type_url && r.name == name).unwrap_or_else(|| panic!("no {type_url} {name}"));
    let ty = ResourceType::from_type_url(type_url).unwrap();
    decode(ty, &r.resource).unwrap_or_else(|e| panic!("{name} does not decode: {e:?}"))
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn proxyless_resources_decode_in_our_client() {
    let mesh = parse("example", crate::mesh::EXAMPLE).unwrap();
    let out = resources(&mesh, Shape::Proxyless, None, &no_kube);
    let server = |port: u16| format!("grpc/server?xds.resource.listening_address=127.0.0.1:{port}");
    let listeners = [server(50051), server(50052), server(50053), "greeter".to_owned()];
    assert_eq!(names(&out, LISTENER), listeners.into_iter().collect());
    assert_eq!(names(&out, ROUTE), set(&["greeter"]));
    assert_eq!(names(&out, CLUSTER), set(&["greeter", "greeter|v1", "greeter|v2"]));
    assert_eq!(names(&out, ENDPOINT), set(&["greeter", "greeter|v1", "greeter|v2"]));
    for r in &out {
        decode(ResourceType::from_type_url(r.type_url).unwrap(), &r.resource).unwrap_or_else(|e| panic!("{}: {e:?}", r.name));
    }
    let Decoded::RouteConfiguration(rc) = decoded(&out, ROUTE, "greeter") else { unreachable!() };
    let routes = &rc.virtual_hosts[0].routes;
    assert_eq!(routes.len(), 2);
    let RouteAction::Clusters(split) = &routes[1].action else { panic!("not forwarding") };
    let split: Vec<(&str, u32)> = split.iter().map(|w| (w.cluster.as_str(), w.weight)).collect();
    assert_eq!(split, [("greeter|v1", 90), ("greeter|v2", 10)]);
    assert_eq!(routes[1].policies.timeout, Some(std::time::Duration::from_secs(5)));
    assert_eq!(routes[1].policies.retry.as_ref().unwrap().max_attempts, 3);
    let Decoded::ClusterLoadAssignment(v1) = decoded(&out, ENDPOINT, "greeter|v1") else { unreachable!() };
    let addrs: Vec<SocketAddr> = v1.endpoints.endpoints.iter().map(|e| e.addr).collect();
    assert_eq!(addrs, ["127.0.0.1:50051".parse::<SocketAddr>().unwrap(), "127.0.0.1:50052".parse().unwrap()]);
    let Decoded::ClusterLoadAssignment(all) = decoded(&out, ENDPOINT, "greeter") else { unreachable!() };
    assert_eq!(all.endpoints.endpoints.len(), 3);
}

/// A server's inbound listener (A36) for each endpoint address, in the service's mTLS mode: permissive takes
/// TLS connections on an mTLS chain and plaintext on the default chain; strict has only the mTLS chain.
/// Authorization rules become RBAC filters and the server rate limit the (optional) local rate limit filter.
#[test]
fn servers_get_inbound_listeners_in_their_services_mtls_mode() {
    let text = "services:\n  greeter:\n    endpoints: [127.0.0.1:50051]\n    mtls: MODE\n    authorization:\n      - { action: deny, paths: [\"/admin/*\"] }\n    server_rate_limit: { requests_per_second: 5 }\n";
    let name = "grpc/server?xds.resource.listening_address=127.0.0.1:50051";
    let (dst, src) = ("127.0.0.1:50051".parse().unwrap(), "127.0.0.1:40000".parse().unwrap());
    for (mode, tls_chain, plaintext_chain) in [("permissive", true, true), ("strict", true, false), ("disable", false, true)] {
        let mesh = parse("m", &text.replace("MODE", mode)).unwrap();
        let out = resources(&mesh, Shape::Proxyless, None, &no_kube);
        let Decoded::ServerListener(l) = decoded(&out, LISTENER, name) else { panic!("{mode}: not a server listener") };
        assert_eq!(l.address, dst);
        let tls = l.select(dst, src, true).map(|c| c.tls.is_some());
        let plain = l.select(dst, src, false).map(|c| c.tls.is_some());
        assert_eq!(tls, Some(tls_chain), "{mode}: a TLS connection");
        match (mode, plain) {
            ("strict", Some(true)) | ("permissive" | "disable", Some(false)) => {}
            other => panic!("{mode}: a plaintext connection gets {other:?} (plaintext chain expected: {plaintext_chain})"),
        }
        let chain = l.select(dst, src, tls_chain).unwrap();
        assert_eq!(chain.http.rbac.len(), 1, "{mode}: the deny rule");
        assert_eq!(chain.http.rate_limit.as_ref().map(|r| r.tokens_per_fill), Some(5), "{mode}");
        assert!(chain.tls.as_ref().is_none_or(|t| t.require_client_certificate && t.certificate_provider == "default"));
    }
}

#[test]
fn sidecar_listener_has_an_address_and_the_filters() {
    let mesh = parse("example", crate::mesh::EXAMPLE).unwrap();
    let out = resources(&mesh, Shape::Sidecar, None, &no_kube);
    assert_eq!(names(&out, LISTENER), set(&["greeter:sidecar"]));
    let r = out.iter().find(|r| r.type_url == LISTENER).unwrap();
    let listener = Listener::decode(r.resource.value.as_slice()).unwrap();
    assert!(listener.api_listener.is_none());
    let addr = format!("{:?}", listener.address);
    assert!(addr.contains("127.0.0.1") && addr.contains("15001"), "{addr}");
    let Some(envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(any)) =
        &listener.filter_chains[0].filters[0].config_type
    else {
        panic!("no HCM")
    };
    let hcm = HttpConnectionManager::decode(any.value.as_slice()).unwrap();
    let filters: Vec<&str> = hcm.http_filters.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(filters, ["envoy.filters.http.rbac", "envoy.filters.http.router"]);
    // Envoy normalizes paths as the engine does, so path rules cannot be stepped around with `//admin`.
    assert_eq!((hcm.normalize_path.map(|b| b.value), hcm.merge_slashes, hcm.path_with_escaped_slashes_action), (Some(true), true, 4));
    // Clusters and routes are the same as the proxyless ones.
    assert_eq!(names(&out, CLUSTER), set(&["greeter", "greeter|v1", "greeter|v2"]));
}

/// The RBAC filters of `service`'s sidecar listener, decoded by our xDS client.
fn sidecar_rbac_filters(out: &[Resource], service: &str) -> Vec<mesh_core::authz::Rbac> {
    use envoy_types::pb::envoy::config::listener::v3::filter::ConfigType;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter;
    let name = listener::sidecar_listener_name(service);
    let r = out.iter().find(|r| r.type_url == LISTENER && r.name == name).unwrap_or_else(|| panic!("no listener {name}"));
    let listener = Listener::decode(r.resource.value.as_slice()).unwrap();
    let Some(ConfigType::TypedConfig(any)) = &listener.filter_chains[0].filters[0].config_type else { panic!("no HCM") };
    let hcm = HttpConnectionManager::decode(any.value.as_slice()).unwrap();
    hcm.http_filters
        .iter()
        .filter(|f| f.name == "envoy.filters.http.rbac")
        .map(|f| match &f.config_type {
            Some(http_filter::ConfigType::TypedConfig(any)) => xds_client::resource::rbac::decode(any).unwrap(),
            other => panic!("{other:?}"),
        })
        .collect()
}

/// The sidecar's RBAC filters decode in our xDS client into the engine the mesh file's rules make, for every
/// key a rule may have, and for a service whose default is deny.
#[test]
fn sidecar_rbac_filters_decode_into_the_rules_engine() {
    use mesh_core::authz::{Action, Decision, Engine, RequestView};
    let text = r#"services:
  greeter:
    endpoints: [127.0.0.1:1]
    sidecar: { port: 15001 }
    authorization:
      - { action: deny, from: ["*"], methods: [/helloworld.Greeter/Admin] }
      - action: deny
        paths: ["/admin/*", "*.secret"]
        not_from: ["spiffe://td/ns/ops/*", "*/sa/root"]
      - action: allow
        from: ["spiffe://td/ns/prod/*", "spiffe://td/ns/ops/sa/admin", "*/sa/batch"]
      - action: allow
        namespaces: [staging, "team-*", "*-dev", "a.b"]
        not_paths: ["/internal/*"]
        headers: { x-env: "prod-*", x-user: "*@corp", x-trace: "*", Host: api.example.com }
      - { action: allow, namespaces: ["*"], paths: [/public, "*"], methods: ["/helloworld.Greeter/*", /helloworld.Greeter/SayHello] }
      - { action: allow }
  locked:
    endpoints: [127.0.0.1:2]
    sidecar: { port: 15002 }
    authorization_default: deny
"#;
    let mesh = parse("m", text).unwrap_or_else(|e| panic!("{e}"));
    let out = resources(&mesh, Shape::Sidecar, None, &no_kube);
    let greeter = &mesh.services["greeter"];
    let engine = Engine::new(sidecar_rbac_filters(&out, "greeter")).unwrap();
    assert_eq!(engine, Engine::from_rules(&greeter.authorization, greeter.authorization_default));
    assert_eq!(engine.filters().iter().map(|f| f.policies.len()).collect::<Vec<_>>(), [2, 4]);
    let headers: &[(&str, &str)] = &[];
    let call =
        |path: &str, peer: &'static str| engine.evaluate(&RequestView::new(path, "POST", &headers).unwrap().with_peer_identity(Some(peer)));
    assert_eq!(call("//admin/x", "spiffe://td/ns/prod/sa/web"), Decision::Deny { policy: Some("rule-1".into()) });
    assert!(call("/admin/x", "spiffe://td/ns/ops/sa/web").is_allowed());

    let locked = &mesh.services["locked"];
    let filters = sidecar_rbac_filters(&out, "locked");
    assert_eq!(filters, [mesh_core::authz::Rbac { action: Action::Allow, policies: vec![] }], "allow-nothing");
    assert_eq!(Engine::new(filters).unwrap(), Engine::from_rules(&locked.authorization, locked.authorization_default));
}

#[test]
fn proxyless_policies_and_optional_filters() {
    let text = "services:
  a:
    lb: ring_hash
    endpoints: [127.0.0.1:1]
    fault: { abort: { percent: 5, grpc_status: unavailable } }
    rate_limit: { requests_per_second: 10 }
    adaptive_concurrency: { min_rtt: 20ms, max_limit: 64 }
    outlier_detection: { consecutive_errors: 3, failure_percentage: { threshold: 60 }, max_ejection_time: 90s }
    mtls: strict
";
    let mesh = parse("m", text).unwrap();
    let out = resources(&mesh, Shape::Proxyless, None, &no_kube);
    let Decoded::Listener(l) = decoded(&out, LISTENER, "a") else { unreachable!() };
    assert!(l.http_filters.iter().any(|f| f.contains("fault")), "{:?}", l.http_filters);
    // Our client reads the adaptive concurrency filter back as the file wrote it.
    assert_eq!(l.adaptive_concurrency, mesh.services["a"].adaptive_concurrency);
    let adaptive = l.adaptive_concurrency.expect("the filter");
    assert_eq!((adaptive.min_rtt, adaptive.max_limit), (mesh_core::policy::MinRtt::Fixed(std::time::Duration::from_millis(20)), 64));
    let Decoded::Cluster(c) = decoded(&out, CLUSTER, "a") else { unreachable!() };
    assert_eq!(c.cluster.lb.name(), "ring_hash");
    // Our client reads back what the file said: every algorithm explicit, so Envoy's defaults (success rate on)
    // never differ from the file's.
    let sent = mesh.services["a"].outlier_detection.clone().unwrap();
    assert_eq!(sent.consecutive_5xx, Some(mesh_core::policy::Consecutive { threshold: 3, enforcing: 100 }));
    assert_eq!((sent.success_rate, sent.failure_percentage.map(|f| f.threshold)), (None, Some(60)));
    assert_eq!(c.cluster.policies.outlier_detection, Some(sent));
    assert!(c.cluster.policies.tls.is_some(), "strict mTLS sets upstream TLS");
}

#[test]
fn views_limit_services_but_keep_split_targets() {
    let text = "services:
  a:
    endpoints: [127.0.0.1:1]
    routes: [{ split: { a: 50, b: 50 } }]
  b:
    endpoints: [127.0.0.1:2]
  c:
    endpoints: [127.0.0.1:3]
views:
  web: { services: [a] }
";
    let mesh = parse("m", text).unwrap();
    let view = mesh.views.get("web");
    let out = resources(&mesh, Shape::Proxyless, view, &no_kube);
    // Every server keeps its own listener whatever the view; clients see only their services'.
    let servers = [
        "grpc/server?xds.resource.listening_address=127.0.0.1:1",
        "grpc/server?xds.resource.listening_address=127.0.0.1:2",
        "grpc/server?xds.resource.listening_address=127.0.0.1:3",
    ];
    let with_servers = |clients: &[&str]| set(&[clients, &servers[..]].concat());
    assert_eq!(names(&out, LISTENER), with_servers(&["a"]));
    assert_eq!(names(&out, CLUSTER), set(&["a", "b"]));
    let all = resources(&mesh, Shape::Proxyless, None, &no_kube);
    assert_eq!(names(&all, LISTENER), with_servers(&["a", "b", "c"]));
}

#[test]
fn kubernetes_endpoints_come_from_the_resolver() {
    let text = "services:\n  g:\n    kubernetes: { service: greeter, port: grpc }\n";
    let mesh = parse("m", text).unwrap();
    let kube = |k: &KubeRef| {
        assert_eq!((k.service.as_str(), &k.port), ("greeter", &KubePort::Name("grpc".into())));
        vec![Endpoint::new("10.0.0.1:8080".parse().unwrap())]
    };
    let out = resources(&mesh, Shape::Proxyless, None, &kube);
    let Decoded::ClusterLoadAssignment(e) = decoded(&out, ENDPOINT, "g") else { unreachable!() };
    assert_eq!(e.endpoints.endpoints[0].addr, "10.0.0.1:8080".parse::<SocketAddr>().unwrap());
}

#[test]
fn one_attempt_sends_no_retry_policy_and_shared_subset_endpoints_appear_once() {
    let text = "services:
  a:
    subsets:
      x: { endpoints: [127.0.0.1:1, 127.0.0.1:2] }
      y: { endpoints: [127.0.0.1:2, 127.0.0.1:3] }
    routes: [{ split: { x: 50, y: 50 } }]
    retries: { attempts: 1 }
";
    let mesh = parse("m", text).unwrap();
    let out = resources(&mesh, Shape::Proxyless, None, &no_kube);
    let Decoded::RouteConfiguration(rc) = decoded(&out, ROUTE, "a") else { unreachable!() };
    assert!(rc.virtual_hosts[0].routes.iter().all(|r| r.policies.retry.is_none()), "one attempt means no retry policy");
    let Decoded::ClusterLoadAssignment(all) = decoded(&out, ENDPOINT, "a") else { unreachable!() };
    let mut addrs: Vec<SocketAddr> = all.endpoints.endpoints.iter().map(|e| e.addr).collect();
    addrs.sort();
    let want: Vec<SocketAddr> = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"].iter().map(|a| a.parse().unwrap()).collect();
    assert_eq!(addrs, want);
}

#[test]
fn retry_conditions_and_hedging_reach_clients_as_the_file_says() {
    let text = "services:
  a:
    endpoints: [127.0.0.1:1]
    retries: { attempts: 3, on: [unavailable, 5xx, reset] }
  b:
    endpoints: [127.0.0.1:2]
    hedge: { attempts: 3, delay: 40ms }
";
    let mesh = parse("m", text).unwrap();
    let out = resources(&mesh, Shape::Proxyless, None, &no_kube);
    let Decoded::RouteConfiguration(rc) = decoded(&out, ROUTE, "a") else { unreachable!() };
    let retry = rc.virtual_hosts[0].routes[0].policies.retry.clone().expect("a retry policy");
    assert_eq!((retry.retry_on, retry.http_retry_on.names()), (vec![mesh_core::GrpcCode::Unavailable], vec!["5xx", "reset"]));
    let Decoded::RouteConfiguration(rc) = decoded(&out, ROUTE, "b") else { unreachable!() };
    let policies = &rc.virtual_hosts[0].routes[0].policies;
    assert!(policies.retry.is_none(), "a hedging route does not also retry");
    let hedge = policies.hedge.clone().expect("hedging");
    assert_eq!((hedge.max_attempts, hedge.delay), (3, std::time::Duration::from_millis(40)));
    // Carried both ways: Envoy's hedge on per-try timeout, and the mesh's typed extension (which our client reads).
    let raw = out.iter().find(|r| r.type_url == ROUTE && r.name == "b").unwrap();
    let rc =
        <envoy_types::pb::envoy::config::route::v3::RouteConfiguration as prost::Message>::decode(raw.resource.value.as_slice()).unwrap();
    let route = &rc.virtual_hosts[0].routes[0];
    let typed = xds_client::resource::hedging::decode(&route.typed_per_filter_config).unwrap();
    assert_eq!(typed.as_ref(), Some(&hedge), "{:?}", route.typed_per_filter_config.keys());
    let Some(envoy_types::pb::envoy::config::route::v3::route::Action::Route(action)) = &route.action else { panic!("{route:?}") };
    assert!(action.hedge_policy.as_ref().is_some_and(|h| h.hedge_on_per_try_timeout));
    assert!(parse("m", &text.replace("    hedge:", "    retries: { attempts: 2 }\n    hedge:")).is_err(), "hedge or retries, not both");
}
