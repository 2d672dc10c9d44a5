use super::*;
use mesh_core::policy::AuthzAction;

fn err(text: &str) -> FileError {
    parse("mesh.yaml", text).expect_err("the file should be rejected")
}

const BASE: &str = "\
services:
  greeter:
    endpoints:
      - { address: 127.0.0.1:1, labels: { version: v1 } }
      - { address: 127.0.0.1:2, labels: { version: v2 } }
    subsets:
      v1: { labels: { version: v1 } }
      v2: { labels: { version: v2 } }
    routes:
      - split:
          v1: 90
          v2: 10
";

#[test]
fn example_is_valid() {
    let mesh = parse("example", EXAMPLE).unwrap();
    let greeter = &mesh.services["greeter"];
    let EndpointSource::Static(endpoints) = &greeter.endpoints else { panic!("static endpoints") };
    assert_eq!(endpoints.len(), 3);
    assert_eq!(greeter.subsets.len(), 2);
    assert_eq!(greeter.routes.len(), 2);
    assert_eq!(greeter.routes[1].split, vec![("greeter|v1".to_owned(), 90), ("greeter|v2".to_owned(), 10)]);
    assert_eq!(greeter.routes[0].matches.headers[0].name, "x-canary");
    assert_eq!(greeter.retry.as_ref().unwrap().retry_on, [mesh_core::GrpcCode::Unavailable, mesh_core::GrpcCode::Cancelled]);
    assert_eq!(greeter.timeout, Some(Duration::from_secs(5)));
    let budget = mesh_core::policy::RetryBudget { ratio: 0.2, ..Default::default() };
    assert_eq!(greeter.circuit_breakers.retry_budget, Some(budget), "the service's retries bring the cluster a budget");
    assert_eq!(greeter.sidecar_port, Some(15001));
    assert_eq!(greeter.mtls, MtlsMode::Permissive);
    assert_eq!(greeter.authorization.len(), 1);
}

#[test]
fn base_is_valid_and_default_route_goes_to_the_service() {
    parse("mesh.yaml", BASE).unwrap();
    let mesh = parse("m", "services:\n  a:\n    endpoints: [127.0.0.1:9]\n").unwrap();
    assert_eq!(mesh.services["a"].routes[0].split, vec![("a".to_owned(), 1)]);
    assert!(matches!(mesh.services["a"].lb, LbPolicy::RoundRobin));
}

#[test]
fn unknown_subset_names_line_and_field() {
    let e = err(&BASE.replace("v2: 10", "v3: 10"));
    assert_eq!((e.file.as_str(), e.line, e.field.as_str()), ("mesh.yaml", 12, "services.greeter.routes[0].split.v3"));
    assert!(e.reason.contains("\"v3\" is neither a subset of greeter (v1, v2) nor a service"), "{e}");
    assert_eq!(e.to_string(), format!("mesh.yaml:12: services.greeter.routes[0].split.v3: {}", e.reason));
}

#[test]
fn typo_in_a_field_names_it() {
    let e = err(&BASE.replace("    subsets:", "    subsetz:"));
    assert_eq!(e.line, 6, "{e}");
    assert_eq!(e.field, "services.greeter.subsetz", "{e}");
    assert!(e.reason.contains("subsetz"), "{e}");
}

#[test]
fn wrong_type_names_line_and_field() {
    let e = err(&BASE.replace("v1: 90", "v1: ninety"));
    assert_eq!((e.line, e.field.as_str()), (11, "services.greeter.routes[0].split.v1"), "{e}");
}

#[test]
fn bad_values_are_rejected_precisely() {
    let cases: &[(&str, &str, usize, &str, &str)] = &[
        ("    routes:", "    lb: fastest\n    routes:", 9, "services.greeter.lb", "\"fastest\" is not one of"),
        ("127.0.0.1:2", "localhost:2", 5, "services.greeter.endpoints[1]", "not an IP:port"),
        ("    routes:", "    timeout: 5 seconds\n    routes:", 9, "services.greeter.timeout", "not a duration"),
        ("v1: 90\n          v2: 10", "v1: 0\n          v2: 0", 10, "services.greeter.routes[0].split", "more than 0"),
        ("    routes:", "    mtls: on\n    routes:", 9, "services.greeter.mtls", "not one of disable, permissive, strict"),
        ("    routes:", "    retries: { attempts: 0 }\n    routes:", 9, "services.greeter.retries.attempts", "at least 1"),
        ("    routes:", "    retries: { attempts: 2, on: [flaky] }\n    routes:", 9, "services.greeter.retries.on", "\"flaky\""),
        (
            "    routes:",
            "    retries: { attempts: 2, budget_percent: 150 }\n    routes:",
            9,
            "services.greeter.retries.budget_percent",
            "0 to 100",
        ),
        (
            "    routes:",
            "    outlier_detection: { interval: 0s }\n    routes:",
            9,
            "services.greeter.outlier_detection.interval",
            "more than 0",
        ),
        (
            "    routes:",
            "    outlier_detection: { consecutive_errors: 0 }\n    routes:",
            9,
            "services.greeter.outlier_detection.consecutive_errors",
            "1 to 255",
        ),
        (
            "    routes:",
            "    outlier_detection: { failure_percentage: { threshold: 101 } }\n    routes:",
            9,
            "services.greeter.outlier_detection.failure_percentage.threshold",
            "0 to 100",
        ),
        (
            "      - split:",
            "      - retries: { attempts: 2, budget_percent: 50 }\n        split:",
            10,
            "services.greeter.routes[0].retries.budget_percent",
            "set it in the service's retries",
        ),
        (
            "    routes:",
            "    fault: { abort: { percent: 200, grpc_status: 14 } }\n    routes:",
            9,
            "services.greeter.fault.abort.percent",
            "0 to 100",
        ),
        (
            "    routes:",
            "    adaptive_concurrency: { min_rtt: 10ms, min_rtt_interval: 30s }\n    routes:",
            9,
            "services.greeter.adaptive_concurrency",
            "not both",
        ),
        (
            "    routes:",
            "    adaptive_concurrency: { min_limit: 10, max_limit: 5 }\n    routes:",
            9,
            "services.greeter.adaptive_concurrency.min_limit",
            "at most max_limit 5",
        ),
        (
            "      - split:",
            "      - mirror: { v2: 0 }\n        split:",
            10,
            "services.greeter.routes[0].mirror.v2",
            "percent from 1 to 100",
        ),
        (
            "      - split:",
            "      - mirror: { v3: 10 }\n        split:",
            10,
            "services.greeter.routes[0].mirror.v3",
            "neither a subset of greeter",
        ),
        (
            "    routes:",
            "    authorization:\n      - { action: allow, from: [frontend] }\n    routes:",
            10,
            "services.greeter.authorization[0].from",
            "not a SPIFFE ID",
        ),
    ];
    for (from, to, line, field, reason) in cases {
        let e = err(&BASE.replace(from, to));
        assert_eq!((e.line, e.field.as_str()), (*line, *field), "{to}: {e}");
        assert!(e.reason.contains(reason), "{to}: {e}");
    }
}

#[test]
fn syntax_errors_name_the_line() {
    let e = err("services:\n  greeter:\n    lb: [round_robin\n");
    assert!(e.line >= 3, "{e}");
    assert!(!e.reason.is_empty());
}

#[test]
fn views_and_sidecar_ports_are_checked() {
    let e = err(&format!("{BASE}views:\n  web: {{ services: [greeter, nope] }}\n"));
    assert_eq!((e.line, e.field.as_str()), (14, "views.web.services[1]"), "{e}");
    let two = "services:\n  a:\n    endpoints: [127.0.0.1:1]\n    sidecar: { port: 15001 }\n  b:\n    endpoints: [127.0.0.1:2]\n    sidecar: { port: 15001 }\n";
    let e = err(two);
    assert_eq!((e.line, e.field.as_str()), (7, "services.b.sidecar.port"), "{e}");
    let ok = parse("m", &format!("{BASE}views:\n  web: {{ services: [greeter] }}\n")).unwrap();
    assert!(ok.views["web"].contains("greeter"));
}

#[test]
fn durations() {
    assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
    assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
    assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
    assert_eq!(parse_duration("100us"), Some(Duration::from_micros(100)));
    assert_eq!(parse_duration("5"), None);
    assert_eq!(parse_duration("s"), None);
    assert_eq!(parse_duration("1e400s"), None);
}

#[test]
fn kubernetes_sources() {
    let text = "services:\n  g:\n    kubernetes: { service: greeter, port: grpc }\n    subsets:\n      v2: { kubernetes: { service: greeter-v2, namespace: apps, port: 8080 } }\n";
    let mesh = parse("m", text).unwrap();
    let g = &mesh.services["g"];
    assert!(matches!(&g.endpoints, EndpointSource::Kubernetes(k) if k.namespace == "default" && k.port == KubePort::Name("grpc".into())));
    assert!(matches!(&g.subsets["v2"], Subset::Endpoints(EndpointSource::Kubernetes(k)) if k.port == KubePort::Number(8080)));
}

#[test]
fn path_at_line_follows_lists() {
    let text = "a:\n  b:\n    - x: 1\n      y: 2\n    - x: 3\nc: 4\n";
    assert_eq!(path_at_line(text, 4), "a.b[0].y");
    assert_eq!(path_at_line(text, 5), "a.b[1].x");
    assert_eq!(path_at_line(text, 6), "c");
}

#[test]
fn the_shipped_kubernetes_configmap_holds_a_valid_mesh() {
    let manifest = include_str!("../../../deploy/kubernetes/configmap.yaml");
    let (_, block) = manifest.split_once("mesh.yaml: |\n").expect("the ConfigMap has a mesh.yaml key");
    let text: String = block.lines().map(|l| l.strip_prefix("    ").unwrap_or(l)).map(|l| format!("{l}\n")).collect();
    let mesh = parse("deploy/kubernetes/configmap.yaml", &text).unwrap_or_else(|e| panic!("{e}"));
    let greeter = &mesh.services["greeter"];
    assert!(matches!(&greeter.subsets["v1"], Subset::Endpoints(EndpointSource::Kubernetes(k)) if k.service == "greeter-v1"));
}

#[test]
fn service_names_may_carry_a_port() {
    let ok = "services:\n  greeter.default.svc.cluster.local:50051:\n    endpoints: [127.0.0.1:1]\n";
    assert!(parse("m", ok).unwrap().services.contains_key("greeter.default.svc.cluster.local:50051"));
    for bad in ["Greeter", "greeter:0", "greeter:x", ":50051", "greeter:70000"] {
        let text = format!("services:\n  \"{bad}\":\n    endpoints: [127.0.0.1:1]\n");
        let e = parse("m", &text).unwrap_err();
        assert!(e.reason.contains("service name"), "{bad}: {e}");
    }
}

/// Values that would panic, or give xDS that Envoy or gRPC reject, or silently give no endpoints.
#[test]
fn unusable_values_are_rejected_without_panicking() {
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "    routes:",
            "    retries: { attempts: 2, backoff: { base: 2000000000000000000s } }\n    routes:",
            "services.greeter.retries.backoff.base",
            "at most a year",
        ),
        ("    routes:", "    timeout: 9000h\n    routes:", "services.greeter.timeout", "at most a year"),
        ("127.0.0.1:2", "127.0.0.1:0", "services.greeter.endpoints[1]", "cannot be dialled"),
        ("127.0.0.1:2", "0.0.0.0:2", "services.greeter.endpoints[1]", "cannot be dialled"),
        ("127.0.0.1:2", "127.0.0.1:1", "services.greeter.endpoints[1]", "listed twice"),
        (
            "labels: { version: v2 } }\n    subsets",
            "weight: 4294967295, labels: { version: v2 } }\n    subsets",
            "services.greeter.endpoints[1].weight",
            "add up to more than",
        ),
        (
            "v2: { labels: { version: v2 } }",
            "v2: { labels: { version: v3 } }",
            "services.greeter.subsets.v2.labels",
            "no endpoint of greeter",
        ),
        ("    routes:", "    sidecar: { port: 0 }\n    routes:", "services.greeter.sidecar.port", "port 0"),
    ];
    for (from, to, field, reason) in cases {
        let text = BASE.replace(from, to);
        assert_ne!(text, BASE, "{from} is in BASE");
        let e = err(&text);
        assert_eq!(e.field, *field, "{to}: {e}");
        assert!(e.reason.contains(reason), "{to}: {e}");
    }
    let kube = |k: &str| format!("services:\n  g:\n    kubernetes: {k}\n");
    let e = err(&kube("{ service: greeter, port: 0 }"));
    assert_eq!(e.field, "services.g.kubernetes.port", "{e}");
    let e = err(&kube("{ service: Greeter_1, port: grpc }"));
    assert_eq!(e.field, "services.g.kubernetes.service", "{e}");
    let e = err(&format!("{}    subsets:\n      v1: {{ labels: {{ version: v1 }} }}\n", kube("{ service: greeter, port: grpc }")));
    assert_eq!(e.field, "services.g.subsets.v1.labels", "{e}");
    assert!(e.reason.contains("Kubernetes endpoints carry no labels"), "{e}");
}

/// Errors about a key name the key's own line, in block and flow style.
#[test]
fn key_errors_name_the_key_line() {
    let e = err("services:\n  Bad_Name:\n    endpoints: [127.0.0.1:1]\n");
    assert_eq!((e.line, e.field.as_str()), (2, "services.Bad_Name"), "{e}");
    let e = err(&BASE.replace("    routes:", "    retries:\n      attempts: 2\n      on: [flaky]\n    routes:"));
    assert_eq!((e.line, e.field.as_str()), (11, "services.greeter.retries.on"), "{e}");
    let e = err(&BASE.replace("    routes:", "    retries: { attempts: 0 }\n    routes:"));
    assert_eq!((e.line, e.field.as_str()), (9, "services.greeter.retries.attempts"), "{e}");
    let e = err(&BASE.replace("      v2: { labels: { version: v2 } }", "      V2:\n        labels: { version: v2 }"));
    assert_eq!((e.line, e.field.as_str()), (8, "services.greeter.subsets.V2"), "{e}");
}

#[test]
fn authorization_rules_take_every_key() {
    let text = BASE.replace(
        "    routes:",
        "    authorization_default: deny
    authorization:
      - action: deny
        paths: [\"/admin/*\", \"*.json\"]
        not_from: [\"*/sa/root\"]
      - action: allow
        from: [\"spiffe://td/ns/prod/*\", \"*/sa/admin\", \"spiffe://td/ns/a/sa/b\"]
        namespaces: [prod, \"prod-*\", \"*-prod\"]
        not_paths: [\"/internal/*\"]
        methods: [\"/pkg.Svc/*\"]
        headers: { X-Env: \"prod-*\", x-trace: \"*\" }
      - { action: allow }
    routes:",
    );
    let mesh = parse("mesh.yaml", &text).unwrap_or_else(|e| panic!("{e}"));
    let greeter = &mesh.services["greeter"];
    assert_eq!(greeter.authorization_default, AuthzAction::Deny);
    let [deny, allow, everything] = greeter.authorization.as_slice() else { panic!("{:?}", greeter.authorization) };
    let v = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!((deny.action, &deny.paths, &deny.not_principals), (AuthzAction::Deny, &v(&["/admin/*", "*.json"]), &v(&["*/sa/root"])));
    assert_eq!(allow.principals, v(&["spiffe://td/ns/prod/*", "*/sa/admin", "spiffe://td/ns/a/sa/b"]));
    assert_eq!((&allow.namespaces, &allow.not_paths), (&v(&["prod", "prod-*", "*-prod"]), &v(&["/internal/*"])));
    assert_eq!(allow.methods, v(&["/pkg.Svc/*"]));
    let headers: Vec<(&str, &str)> = allow.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    assert_eq!(headers, [("x-env", "prod-*"), ("x-trace", "*")], "names lower-cased");
    assert!(everything.matches_everything());
    assert_eq!(parse("m", BASE).unwrap().services["greeter"].authorization_default, AuthzAction::Allow);
}

#[test]
fn bad_authorization_values_name_the_rule_field_and_line() {
    let rules = |rule: &str| BASE.replace("    routes:", &format!("    authorization:\n      - {{ action: allow }}\n{rule}    routes:"));
    // (rule text from line 11, the line of the error, the field, part of the reason)
    let cases: &[(&str, usize, &str, &str)] = &[
        ("      - { action: allow, from: [frontend] }\n", 11, "from", "\"frontend\" is not a SPIFFE ID"),
        ("      - action: deny\n        from: [\"spiffe://td/*/x\"]\n", 12, "from", "not a SPIFFE ID"),
        ("      - action: deny\n        not_from: [\"*\"]\n", 12, "not_from", "exclude every caller"),
        ("      - action: allow\n        namespaces: [\"prod/x\"]\n", 12, "namespaces", "\"prod/x\" is not a namespace"),
        ("      - action: allow\n        paths: [admin]\n", 12, "paths", "must start with /"),
        ("      - action: allow\n        paths: [\"/a//b\"]\n", 12, "paths", "write \"/a/b\""),
        ("      - action: allow\n        not_paths: [\"/a/*/b\"]\n", 12, "not_paths", "at the start or the end"),
        ("      - action: allow\n        methods: [Svc/Method]\n", 12, "methods", "not a gRPC method path"),
        ("      - action: allow\n        headers: { grpc-timeout: 1S }\n", 12, "headers", "grpc-"),
        ("      - action: allow\n        headers:\n          x-a: \"a*b\"\n", 12, "headers", "\"x-a\": \"a*b\""),
        ("      - { action: permit }\n", 11, "action", "\"permit\" is not allow or deny"),
    ];
    for (rule, line, field, reason) in cases {
        let e = err(&rules(rule));
        assert_eq!((e.line, e.field.as_str()), (*line, format!("services.greeter.authorization[1].{field}").as_str()), "{rule}: {e}");
        assert!(e.reason.contains(reason), "{rule}: {e}");
    }
    let e = err(&BASE.replace("    routes:", "    authorization_default: closed\n    routes:"));
    assert_eq!((e.line, e.field.as_str()), (9, "services.greeter.authorization_default"), "{e}");
    assert!(e.reason.contains("\"closed\" is not allow or deny"), "{e}");
    let e = err(&rules("      - { action: allow, paths: [/x], hosts: [a] }\n"));
    assert!(e.reason.contains("hosts"), "unknown keys are refused: {e}");
}
