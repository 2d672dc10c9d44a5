//! `meshctl call` against servers in another language (Python grpcio) and in Rust.

use mesh_tests::peers::{meshctl, python_grpc_server};
use serde_json::Value;

#[test]
fn meshctl_call_reports_json_against_python_grpc_servers() {
    let a = python_grpc_server().unwrap();
    let b = python_grpc_server().unwrap();
    let target = format!("static:///{},{}", a.addr, b.addr);
    let (code, stdout, stderr) = meshctl(&[
        "call",
        "--target",
        &target,
        "--method",
        "/any.Service/Anything",
        "--data-hex",
        "0a03616263",
        "--n",
        "200",
        "--concurrency",
        "4",
        "--json",
    ])
    .unwrap();
    assert_eq!(code, 0, "stderr: {stderr}");
    let summary: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not one JSON object ({e}): {stdout}"));
    assert_eq!(summary["sent"], 200);
    assert_eq!(summary["ok"], 200);
    assert_eq!(summary["by_code"]["OK"], 200);
    for peer in [&a, &b] {
        let n = summary["by_endpoint"][peer.addr.to_string()].as_u64().unwrap_or(0);
        assert!((90..=110).contains(&n), "{} served {n}: {summary}", peer.addr);
        let replies = summary["by_response"][format!("py:{}", peer.addr.port())].as_u64().unwrap_or(0);
        assert_eq!(replies, n, "{summary}");
    }
    for key in ["p50", "p90", "p99", "max"] {
        assert!(summary["latency_us"][key].as_u64().is_some_and(|v| v > 0), "{key}: {summary}");
    }
}

#[test]
fn meshctl_call_ring_hash_keeps_a_key_on_one_endpoint() {
    let a = python_grpc_server().unwrap();
    let b = python_grpc_server().unwrap();
    let c = python_grpc_server().unwrap();
    let target = format!("static:///{},{},{}", a.addr, b.addr, c.addr);
    let (code, stdout, stderr) = meshctl(&[
        "call",
        "--target",
        &target,
        "--method",
        "/any.Service/Anything",
        "--n",
        "1000",
        "--concurrency",
        "8",
        "--lb",
        "ring_hash",
        "--header",
        "x-mesh-hash-key=user-7",
        "--json",
    ])
    .unwrap();
    assert_eq!(code, 0, "stderr: {stderr}");
    let summary: Value = serde_json::from_str(stdout.trim()).unwrap();
    let by_endpoint = summary["by_endpoint"].as_object().unwrap();
    assert_eq!(by_endpoint.len(), 1, "one key, one endpoint: {summary}");
    assert_eq!(by_endpoint.values().next().unwrap(), 1000);
}

#[test]
fn meshctl_bad_target_or_method_prints_one_error_line_and_exits_2() {
    for (args, needle) in [
        (vec!["call", "--target", "nonsense", "--method", "/a.B/C"], "nonsense"),
        (vec!["call", "--target", "static:///127.0.0.1:1", "--method", "no-slash"], "no-slash"),
        (vec!["call", "--target", "static:///127.0.0.1:1", "--method", "/a.B/C", "--data-hex", "xyz"], "--data-hex"),
    ] {
        let (code, stdout, stderr) = meshctl(&args).unwrap();
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stdout.is_empty(), "{stdout}");
        let lines: Vec<_> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: {stderr}");
        assert!(lines[0].starts_with("error: ") && lines[0].contains(needle), "{args:?}: {stderr}");
    }
}

#[test]
fn meshctl_reports_unavailable_when_nothing_listens() {
    let port = mesh_tests::peers::free_port().unwrap();
    let target = format!("static:///127.0.0.1:{port}");
    let (code, stdout, _) = meshctl(&["call", "--target", &target, "--method", "/a.B/C", "--n", "3", "--json"]).unwrap();
    assert_eq!(code, 1);
    let summary: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(summary["sent"], 3);
    assert_eq!(summary["ok"], 0);
    assert_eq!(summary["by_code"]["UNAVAILABLE"], 3, "{summary}");
}

/// Logs redirected to a file or pipe are plain text (no ANSI colour codes); `--log-format json` writes one JSON
/// object per line, as log collectors read them.
#[test]
fn meshctl_logs_are_plain_text_when_redirected_and_json_when_asked() {
    // A refused connection makes the balancer log a warning.
    let port = mesh_tests::peers::free_port().unwrap();
    let target = format!("static:///127.0.0.1:{port}");
    let args = ["call", "--target", &target, "--method", "/a.B/C", "--timeout-ms", "300"];
    let (_, _, stderr) = meshctl(&args).unwrap();
    assert!(stderr.contains("WARN"), "a warning was logged: {stderr}");
    assert!(!stderr.contains('\u{1b}'), "no escape codes in redirected logs: {stderr:?}");

    let mut json = args.to_vec();
    json.extend(["--log-format", "json"]);
    let (_, _, stderr) = meshctl(&json).unwrap();
    let logged: Vec<serde_json::Value> =
        stderr.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    assert!(logged.iter().any(|l| l["level"] == "WARN" && l["fields"]["message"].is_string()), "{stderr}");
}
