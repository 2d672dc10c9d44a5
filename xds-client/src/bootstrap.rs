//! gRPC's xDS bootstrap file (gRFC A27, A47 federation, A71 fallback).
//!
//! Read from the file named by `GRPC_XDS_BOOTSTRAP`, or the JSON in
//! `GRPC_XDS_BOOTSTRAP_CONFIG`, or built in code. A file written for grpc-go,
//! grpc-java or Istio's agent works unchanged: unknown fields are ignored.

use std::collections::BTreeMap;
use std::path::Path;

use mesh_core::Locality;
use serde_json::{Map, Value};

use crate::{Error, Result};

/// Environment variable naming the bootstrap file.
pub const BOOTSTRAP_PATH_ENV: &str = "GRPC_XDS_BOOTSTRAP";
/// Environment variable holding the bootstrap JSON itself.
pub const BOOTSTRAP_CONFIG_ENV: &str = "GRPC_XDS_BOOTSTRAP_CONFIG";
/// Server feature: keep resources the server stops sending (A53).
pub const FEATURE_IGNORE_RESOURCE_DELETION: &str = "ignore_resource_deletion";
/// Server feature (ours): use the incremental (delta) ADS protocol.
pub const FEATURE_DELTA: &str = "delta_ads";

/// The parsed bootstrap.
#[derive(Clone, Debug, PartialEq)]
pub struct Bootstrap {
    /// Control planes, in order: the first is primary, the rest fallbacks (A71).
    pub servers: Vec<XdsServer>,
    /// Identity sent to the control plane.
    pub node: Node,
    /// Certificate provider plugin instances by name (`file_watcher`).
    pub certificate_providers: BTreeMap<String, CertificateProvider>,
    /// Federation authorities by name (`xdstp://` resource names).
    pub authorities: BTreeMap<String, Authority>,
    /// Listener name template for xDS-enabled servers.
    pub server_listener_resource_name_template: Option<String>,
    /// Listener name template for `xds:///name` targets (`%s` by default).
    pub client_default_listener_resource_name_template: String,
}

/// One control plane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdsServer {
    /// `host:port` or a URI as given.
    pub server_uri: String,
    /// Credentials to use (the first supported entry of `channel_creds`).
    pub channel_creds: ChannelCreds,
    /// Server features (`xds_v3`, `ignore_resource_deletion`, `delta_ads`, ...).
    pub server_features: Vec<String>,
}

impl XdsServer {
    /// Whether the server lists `feature`.
    pub fn has_feature(&self, feature: &str) -> bool {
        self.server_features.iter().any(|f| f == feature)
    }

    /// The socket path of a `unix:` server URI (`unix:///etc/istio/proxy/XDS`, `unix:relative/path`), as
    /// Istio's agent writes for proxyless gRPC; `None` for network addresses.
    pub fn unix_path(&self) -> Option<&str> {
        let rest = self.server_uri.strip_prefix("unix:")?;
        Some(rest.strip_prefix("//").unwrap_or(rest)).filter(|path| !path.is_empty())
    }

    /// `http://host:port` (or `https://` for TLS) for the gRPC connection.
    pub fn endpoint_uri(&self) -> String {
        let bare = self.server_uri.trim_start_matches("dns:///").trim_start_matches("dns:").trim_start_matches("//");
        if bare.contains("://") {
            return bare.to_owned();
        }
        let scheme = match self.channel_creds {
            ChannelCreds::Insecure => "http",
            ChannelCreds::Tls { .. } | ChannelCreds::GoogleDefault => "https",
        };
        format!("{scheme}://{bare}")
    }
}

/// Channel credentials for a control plane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChannelCreds {
    /// Plaintext.
    Insecure,
    /// TLS with optional files (A65).
    Tls {
        /// CA bundle path.
        ca_certificate_file: Option<String>,
        /// Client certificate path.
        certificate_file: Option<String>,
        /// Client key path.
        private_key_file: Option<String>,
    },
    /// Google default credentials (accepted, connected as TLS).
    GoogleDefault,
}

/// The node identity (Envoy `Node`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Node {
    /// Node id.
    pub id: String,
    /// Cluster (service) the node belongs to.
    pub cluster: String,
    /// Where it runs.
    pub locality: Locality,
    /// Free-form metadata sent to the control plane.
    pub metadata: Map<String, Value>,
}

/// A certificate provider plugin instance.
#[derive(Clone, Debug, PartialEq)]
pub struct CertificateProvider {
    /// Plugin name, e.g. `file_watcher`.
    pub plugin_name: String,
    /// Plugin configuration as given.
    pub config: Value,
    /// The configuration of a `file_watcher` instance, checked when the bootstrap was read.
    pub file_watcher: Option<FileWatcherConfig>,
}

/// gRPC's `file_watcher` certificate provider: PEM files read again every `refresh_interval`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileWatcherConfig {
    /// The certificate chain (with `private_key_file`), if the instance provides an identity.
    pub certificate_file: Option<String>,
    /// Its private key.
    pub private_key_file: Option<String>,
    /// The trust bundle, if the instance provides roots.
    pub ca_certificate_file: Option<String>,
    /// A SPIFFE trust bundle map (gRPC A87): roots per trust domain, in place of `ca_certificate_file`.
    pub spiffe_trust_bundle_map_file: Option<String>,
    /// How often the files are read again (default 600 s).
    pub refresh_interval: std::time::Duration,
}

/// A federation authority (A47).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authority {
    /// Listener name template for this authority.
    pub client_listener_resource_name_template: Option<String>,
    /// Its own servers; empty means the top-level ones.
    pub servers: Vec<XdsServer>,
}

impl Bootstrap {
    /// Reads `GRPC_XDS_BOOTSTRAP` (a path), else `GRPC_XDS_BOOTSTRAP_CONFIG`.
    pub fn from_env() -> Result<Self> {
        if let Ok(path) = std::env::var(BOOTSTRAP_PATH_ENV) {
            return Self::from_file(Path::new(&path));
        }
        match std::env::var(BOOTSTRAP_CONFIG_ENV) {
            Ok(json) => Self::from_json(&json, BOOTSTRAP_CONFIG_ENV),
            Err(_) => Err(Error::NoBootstrap),
        }
    }

    /// Reads and parses a bootstrap file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Bootstrap {
            source_name: path.display().to_string(),
            line: None,
            field: "<file>".into(),
            reason: e.to_string(),
        })?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Parses bootstrap JSON; `source_name` names it in errors.
    pub fn from_json(json: &str, source_name: &str) -> Result<Self> {
        let fail = |line: Option<usize>, field: &str, reason: String| Error::Bootstrap {
            source_name: source_name.to_owned(),
            line,
            field: field.to_owned(),
            reason,
        };
        let root: Value = serde_json::from_str(json).map_err(|e| fail(Some(e.line()), "<json>", e.to_string()))?;
        let root = root.as_object().ok_or_else(|| fail(None, "<root>", "must be a JSON object".into()))?;
        let p = Parser { fail: &fail };

        let servers = p.servers(root.get("xds_servers"), "xds_servers")?;
        if servers.is_empty() {
            return Err(fail(None, "xds_servers", "at least one server is required".into()));
        }
        let node = match root.get("node") {
            None | Some(Value::Null) => Node::default(),
            Some(v) => p.node(v)?,
        };
        let mut certificate_providers = BTreeMap::new();
        for (name, v) in p.object_opt(root.get("certificate_providers"), "certificate_providers")? {
            let field = format!("certificate_providers.{name}");
            let o = p.object(v, &field)?;
            let plugin_name = p.string(o.get("plugin_name"), &format!("{field}.plugin_name"))?;
            let config = o.get("config").cloned().unwrap_or(Value::Null);
            let file_watcher = (plugin_name == "file_watcher").then(|| p.file_watcher(&config, &format!("{field}.config"))).transpose()?;
            certificate_providers.insert(name.clone(), CertificateProvider { plugin_name, config, file_watcher });
        }
        let mut authorities = BTreeMap::new();
        for (name, v) in p.object_opt(root.get("authorities"), "authorities")? {
            let field = format!("authorities.{name}");
            let o = p.object(v, &field)?;
            let template =
                p.string_opt(o.get("client_listener_resource_name_template"), &format!("{field}.client_listener_resource_name_template"))?;
            if let Some(t) = &template
                && !t.starts_with(&format!("xdstp://{name}/"))
            {
                return Err(fail(
                    None,
                    &format!("{field}.client_listener_resource_name_template"),
                    format!("must start with \"xdstp://{name}/\""),
                ));
            }
            let servers = match o.get("xds_servers") {
                None | Some(Value::Null) => Vec::new(),
                v => p.servers(v, &format!("{field}.xds_servers"))?,
            };
            authorities.insert(name.clone(), Authority { client_listener_resource_name_template: template, servers });
        }
        Ok(Self {
            servers,
            node,
            certificate_providers,
            authorities,
            server_listener_resource_name_template: p
                .string_opt(root.get("server_listener_resource_name_template"), "server_listener_resource_name_template")?,
            client_default_listener_resource_name_template: p
                .string_opt(root.get("client_default_listener_resource_name_template"), "client_default_listener_resource_name_template")?
                .unwrap_or_else(|| "%s".to_owned()),
        })
    }

    /// A minimal bootstrap for one plaintext server, built in code.
    pub fn for_server(server_uri: impl Into<String>, node_id: impl Into<String>) -> Self {
        Self {
            servers: vec![XdsServer {
                server_uri: server_uri.into(),
                channel_creds: ChannelCreds::Insecure,
                server_features: vec!["xds_v3".into()],
            }],
            node: Node { id: node_id.into(), ..Node::default() },
            certificate_providers: BTreeMap::new(),
            authorities: BTreeMap::new(),
            server_listener_resource_name_template: None,
            client_default_listener_resource_name_template: "%s".into(),
        }
    }

    /// The listener resource name for an `xds:///name` target (A47 templates).
    pub fn listener_name_for_target(&self, target_name: &str) -> String {
        self.client_default_listener_resource_name_template.replace("%s", target_name)
    }

    /// The listener resource name for a server listening on `listening` (A36): every `%s` of
    /// `server_listener_resource_name_template` replaced by `IP:port` (`[::]:80` for IPv6); `None` without a
    /// template (such a server cannot serve).
    pub fn listener_name_for_server(&self, listening: std::net::SocketAddr) -> Option<String> {
        self.server_listener_resource_name_template.as_ref().map(|t| t.replace("%s", &listening.to_string()))
    }
}

struct Parser<'a, F: Fn(Option<usize>, &str, String) -> Error> {
    fail: &'a F,
}

impl<F: Fn(Option<usize>, &str, String) -> Error> Parser<'_, F> {
    fn object<'v>(&self, v: &'v Value, field: &str) -> Result<&'v Map<String, Value>> {
        v.as_object().ok_or_else(|| (self.fail)(None, field, "must be an object".into()))
    }

    fn object_opt<'v>(&self, v: Option<&'v Value>, field: &str) -> Result<Vec<(&'v String, &'v Value)>> {
        match v {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(v) => Ok(self.object(v, field)?.iter().collect()),
        }
    }

    fn string(&self, v: Option<&Value>, field: &str) -> Result<String> {
        self.string_opt(v, field)?.ok_or_else(|| (self.fail)(None, field, "is required".into()))
    }

    fn string_opt(&self, v: Option<&Value>, field: &str) -> Result<Option<String>> {
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err((self.fail)(None, field, "must be a string".into())),
        }
    }

    /// A `file_watcher` instance's config: the certificate and key together, or neither; at least one of them or
    /// the CA file; `refresh_interval` a protobuf JSON duration (`"600s"`).
    fn file_watcher(&self, config: &Value, field: &str) -> Result<FileWatcherConfig> {
        let empty = Map::new();
        let o = match config {
            Value::Null => &empty,
            v => self.object(v, field)?,
        };
        let file = |key: &str| self.string_opt(o.get(key), &format!("{field}.{key}"));
        let (certificate_file, private_key_file, ca_certificate_file) =
            (file("certificate_file")?, file("private_key_file")?, file("ca_certificate_file")?);
        let spiffe_trust_bundle_map_file = file("spiffe_trust_bundle_map_file")?;
        if certificate_file.is_some() != private_key_file.is_some() {
            return Err((self.fail)(None, field, "certificate_file and private_key_file go together".into()));
        }
        if certificate_file.is_none() && ca_certificate_file.is_none() && spiffe_trust_bundle_map_file.is_none() {
            let needs = "needs certificate_file and private_key_file, or ca_certificate_file or spiffe_trust_bundle_map_file";
            return Err((self.fail)(None, field, needs.into()));
        }
        let refresh_interval = match self.string_opt(o.get("refresh_interval"), &format!("{field}.refresh_interval"))? {
            None => std::time::Duration::from_secs(600),
            Some(text) => text
                .strip_suffix('s')
                .and_then(|secs| secs.parse::<f64>().ok())
                .filter(|secs| *secs > 0.0)
                .and_then(|secs| std::time::Duration::try_from_secs_f64(secs).ok())
                .ok_or_else(|| {
                    (self.fail)(None, &format!("{field}.refresh_interval"), format!("{text:?} is not a positive duration like \"600s\""))
                })?,
        };
        Ok(FileWatcherConfig { certificate_file, private_key_file, ca_certificate_file, spiffe_trust_bundle_map_file, refresh_interval })
    }

    fn servers(&self, v: Option<&Value>, field: &str) -> Result<Vec<XdsServer>> {
        let list = match v {
            Some(Value::Array(list)) => list,
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(_) => return Err((self.fail)(None, field, "must be an array".into())),
        };
        list.iter()
            .enumerate()
            .map(|(i, s)| {
                let field = format!("{field}[{i}]");
                let o = self.object(s, &field)?;
                let server_uri = self.string(o.get("server_uri"), &format!("{field}.server_uri"))?;
                if server_uri.is_empty() {
                    return Err((self.fail)(None, &format!("{field}.server_uri"), "must not be empty".into()));
                }
                let channel_creds = self.creds(o.get("channel_creds"), &format!("{field}.channel_creds"))?;
                let server_features = match o.get("server_features") {
                    None | Some(Value::Null) => Vec::new(),
                    Some(Value::Array(fs)) => fs.iter().filter_map(|f| f.as_str().map(str::to_owned)).collect(),
                    Some(_) => return Err((self.fail)(None, &format!("{field}.server_features"), "must be an array of strings".into())),
                };
                Ok(XdsServer { server_uri, channel_creds, server_features })
            })
            .collect()
    }

    /// The first supported entry, as gRPC does.
    fn creds(&self, v: Option<&Value>, field: &str) -> Result<ChannelCreds> {
        let Some(Value::Array(list)) = v else {
            return Err((self.fail)(None, field, "is required: a list such as [{\"type\": \"insecure\"}]".into()));
        };
        for (i, c) in list.iter().enumerate() {
            let field = format!("{field}[{i}]");
            let o = self.object(c, &field)?;
            let config = o.get("config").and_then(Value::as_object);
            let file = |key: &str| config.and_then(|c| c.get(key)).and_then(Value::as_str).map(str::to_owned);
            match self.string(o.get("type"), &format!("{field}.type"))?.as_str() {
                "insecure" => return Ok(ChannelCreds::Insecure),
                "tls" => {
                    if file("certificate_file").is_some() != file("private_key_file").is_some() {
                        return Err((self.fail)(
                            None,
                            &format!("{field}.config"),
                            "certificate_file and private_key_file must be given together".into(),
                        ));
                    }
                    return Ok(ChannelCreds::Tls {
                        ca_certificate_file: file("ca_certificate_file"),
                        certificate_file: file("certificate_file"),
                        private_key_file: file("private_key_file"),
                    });
                }
                "google_default" => return Ok(ChannelCreds::GoogleDefault),
                _ => continue,
            }
        }
        Err((self.fail)(None, field, "no supported credential type (insecure, tls, google_default)".into()))
    }

    fn node(&self, v: &Value) -> Result<Node> {
        let o = self.object(v, "node")?;
        let locality = match o.get("locality") {
            None | Some(Value::Null) => Locality::default(),
            Some(l) => {
                let l = self.object(l, "node.locality")?;
                Locality {
                    region: self.string_opt(l.get("region"), "node.locality.region")?.unwrap_or_default(),
                    zone: self.string_opt(l.get("zone"), "node.locality.zone")?.unwrap_or_default(),
                    sub_zone: self.string_opt(l.get("sub_zone"), "node.locality.sub_zone")?.unwrap_or_default(),
                }
            }
        };
        let metadata = match o.get("metadata") {
            None | Some(Value::Null) => Map::new(),
            Some(m) => self.object(m, "node.metadata")?.clone(),
        };
        Ok(Node {
            id: self.string_opt(o.get("id"), "node.id")?.unwrap_or_default(),
            cluster: self.string_opt(o.get("cluster"), "node.cluster")?.unwrap_or_default(),
            locality,
            metadata,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shaped like the file Istio's agent writes for proxyless gRPC.
    const ISTIO_LIKE: &str = r#"{
      "xds_servers": [
        {"server_uri": "unix:///etc/istio/proxy/XDS", "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]},
        {"server_uri": "127.0.0.1:15010", "channel_creds": [{"type": "unknown"}, {"type": "tls", "config": {"ca_certificate_file": "/ca.pem"}}], "server_features": ["xds_v3", "ignore_resource_deletion"]}
      ],
      "node": {"id": "sidecar~10.0.0.1~greeter.default~default.svc.cluster.local", "cluster": "greeter",
               "locality": {"region": "r1", "zone": "z1"}, "metadata": {"GENERATOR": "grpc", "ISTIO_VERSION": "1.24"}},
      "certificate_providers": {"default": {"plugin_name": "file_watcher", "config": {"ca_certificate_file": "/ca.pem", "refresh_interval": "900s"}},
                                "spiffe": {"plugin_name": "file_watcher", "config": {"spiffe_trust_bundle_map_file": "/map.json"}}},
      "authorities": {"xds.example.com": {"client_listener_resource_name_template": "xdstp://xds.example.com/envoy.config.listener.v3.Listener/%s"}},
      "server_listener_resource_name_template": "xds.istio.io/grpc/lds/inbound/%s",
      "some_future_field": 42
    }"#;

    #[test]
    fn parses_an_istio_style_file() {
        let b = Bootstrap::from_json(ISTIO_LIKE, "bootstrap.json").unwrap();
        assert_eq!(b.servers.len(), 2);
        assert_eq!(b.servers[0].channel_creds, ChannelCreds::Insecure);
        assert!(matches!(&b.servers[1].channel_creds, ChannelCreds::Tls { ca_certificate_file: Some(f), .. } if f == "/ca.pem"));
        assert!(b.servers[1].has_feature(FEATURE_IGNORE_RESOURCE_DELETION));
        assert_eq!(b.node.locality.zone, "z1");
        assert_eq!(b.node.metadata["GENERATOR"], "grpc");
        assert_eq!(b.certificate_providers["default"].plugin_name, "file_watcher");
        let watcher = b.certificate_providers["default"].file_watcher.clone().unwrap();
        assert_eq!(watcher.certificate_file, None);
        assert_eq!(watcher.ca_certificate_file.as_deref(), Some("/ca.pem"));
        assert_eq!(watcher.refresh_interval, std::time::Duration::from_secs(900));
        let spiffe = b.certificate_providers["spiffe"].file_watcher.clone().unwrap();
        assert_eq!(
            (spiffe.spiffe_trust_bundle_map_file.as_deref(), spiffe.ca_certificate_file),
            (Some("/map.json"), None),
            "A87's bundle map alone"
        );
        assert!(b.authorities.contains_key("xds.example.com"));
        assert_eq!(b.server_listener_resource_name_template.as_deref(), Some("xds.istio.io/grpc/lds/inbound/%s"));
        assert_eq!(b.listener_name_for_target("greeter"), "greeter");
        let listening = "[::]:50051".parse().unwrap();
        assert_eq!(b.listener_name_for_server(listening).as_deref(), Some("xds.istio.io/grpc/lds/inbound/[::]:50051"));
        assert_eq!(Bootstrap { server_listener_resource_name_template: None, ..b.clone() }.listener_name_for_server(listening), None);
        assert_eq!(b.servers[1].endpoint_uri(), "https://127.0.0.1:15010");
        assert_eq!(b.servers[0].unix_path(), Some("/etc/istio/proxy/XDS"));
        assert_eq!(b.servers[1].unix_path(), None);
    }

    #[test]
    fn errors_name_source_line_and_field() {
        let err = Bootstrap::from_json("{\n  \"xds_servers\": [\n  }", "/etc/b.json").unwrap_err();
        assert!(matches!(&err, Error::Bootstrap { line: Some(3), .. }), "{err}");
        assert!(err.to_string().starts_with("bootstrap /etc/b.json line 3"), "{err}");

        for (json, field) in [
            (r#"{"xds_servers": []}"#, "xds_servers"),
            (r#"{"xds_servers": [{"channel_creds": [{"type": "insecure"}]}]}"#, "xds_servers[0].server_uri"),
            (r#"{"xds_servers": [{"server_uri": "a:1", "channel_creds": [{"type": "magic"}]}]}"#, "xds_servers[0].channel_creds"),
            (r#"{"xds_servers": [{"server_uri": "a:1"}]}"#, "xds_servers[0].channel_creds"),
            (
                r#"{"xds_servers": [{"server_uri": "a:1", "channel_creds": [{"type": "tls", "config": {"certificate_file": "/c.pem"}}]}]}"#,
                "xds_servers[0].channel_creds[0].config",
            ),
            (r#"{"xds_servers": [{"server_uri": "a:1", "channel_creds": [{"type": "insecure"}]}], "node": {"id": 7}}"#, "node.id"),
        ] {
            let err = Bootstrap::from_json(json, "b.json").unwrap_err();
            assert!(matches!(&err, Error::Bootstrap { field: f, .. } if f == field), "{json}: {err}");
        }
        // file_watcher instances are checked when the bootstrap is read.
        let servers = r#""xds_servers": [{"server_uri": "a:1", "channel_creds": [{"type": "insecure"}]}]"#;
        for (config, field) in [
            (r#"{"certificate_file": "/c.pem"}"#, "certificate_providers.default.config"),
            (r#"{}"#, "certificate_providers.default.config"),
            (r#"{"ca_certificate_file": "/ca.pem", "refresh_interval": "10m"}"#, "certificate_providers.default.config.refresh_interval"),
            (r#"{"ca_certificate_file": 3}"#, "certificate_providers.default.config.ca_certificate_file"),
        ] {
            let json =
                format!(r#"{{{servers}, "certificate_providers": {{"default": {{"plugin_name": "file_watcher", "config": {config}}}}}}}"#);
            let err = Bootstrap::from_json(&json, "b.json").unwrap_err();
            assert!(matches!(&err, Error::Bootstrap { field: f, .. } if f == field), "{json}: {err}");
        }
    }
}
