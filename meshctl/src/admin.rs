//! `meshctl status` and `meshctl config-dump`: read a running process's admin endpoint (`/clusters`,
//! `/config_dump`) and print them as tables, or as the endpoint's JSON with `--json`.

use std::net::SocketAddr;
use std::process::ExitCode;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Where the admin endpoint is.
#[derive(Debug, clap::Args)]
pub(crate) struct AdminArgs {
    /// The process's admin address (`meshctl call --admin`, `meshctl demo --admin`, a library's admin endpoint).
    #[arg(long, value_name = "ADDR")]
    admin: SocketAddr,
    /// Print the endpoint's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// GETs `path` from the admin endpoint: its JSON body.
async fn get(admin: SocketAddr, path: &str) -> Result<Value, String> {
    let fail = |e: &dyn std::fmt::Display| format!("GET http://{admin}{path}: {e}");
    let mut stream = tokio::net::TcpStream::connect(admin).await.map_err(|e| fail(&e))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(|e| fail(&e))?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.map_err(|e| fail(&e))?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| fail(&"no HTTP response"))?;
    let status = head.split_whitespace().nth(1).unwrap_or_default();
    if status != "200" {
        return Err(fail(&format!("HTTP {status}: {}", body.trim())));
    }
    serde_json::from_str(body).map_err(|e| fail(&e))
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

/// Prints rows under `header`, each column as wide as its widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        line(row.clone());
    }
}

/// `meshctl status`: the clusters and endpoints of every channel of the process.
pub(crate) async fn status(args: AdminArgs) -> ExitCode {
    let clusters = match get(args.admin, "/clusters").await {
        Ok(v) => v,
        Err(e) => return fail(e),
    };
    if args.json {
        println!("{clusters}");
        return ExitCode::SUCCESS;
    }
    let mut rows = Vec::new();
    for channel in clusters["channels"].as_array().into_iter().flatten() {
        for cluster in channel["clusters"].as_array().into_iter().flatten() {
            for e in cluster["endpoints"].as_array().into_iter().flatten() {
                let zone = &e["locality"]["zone"];
                rows.push(vec![
                    text(&channel["target"]),
                    text(&cluster["name"]),
                    text(&e["address"]),
                    text(&e["state"]),
                    if e["ejected"] == true { "yes".to_owned() } else { "no".to_owned() },
                    text(&e["in_flight"]),
                    text(&e["successes"]),
                    text(&e["failures"]),
                    text(&e["weight"]),
                    if zone.as_str().is_some_and(|z| !z.is_empty()) { text(zone) } else { "-".to_owned() },
                ]);
            }
        }
    }
    table(&["TARGET", "CLUSTER", "ENDPOINT", "STATE", "EJECTED", "IN_FLIGHT", "OK", "FAILED", "WEIGHT", "ZONE"], &rows);
    ExitCode::SUCCESS
}

/// `meshctl config-dump`: every xDS resource the process holds, with its status and NACK reason.
pub(crate) async fn config_dump(args: AdminArgs) -> ExitCode {
    let dump = match get(args.admin, "/config_dump").await {
        Ok(v) => v,
        Err(e) => return fail(e),
    };
    if args.json {
        println!("{dump}");
        return ExitCode::SUCCESS;
    }
    let rows: Vec<Vec<String>> = dump["resources"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| vec![text(&r["type"]), text(&r["name"]), text(&r["version"]), text(&r["status"]), text(&r["error"])])
        .collect();
    table(&["TYPE", "NAME", "VERSION", "STATUS", "ERROR"], &rows);
    ExitCode::SUCCESS
}

fn fail(message: String) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(1)
}
