//! Config dump: every subscribed resource with version, status, error and
//! last update, and its CSDS form (`envoy.service.status.v3.ClientConfig`).

use std::time::SystemTime;

use envoy_types::pb::envoy::admin::v3::{ClientResourceStatus, UpdateFailureState};
use envoy_types::pb::envoy::service::status::v3::ClientConfig;
use envoy_types::pb::envoy::service::status::v3::client_config::GenericXdsConfig;
use envoy_types::pb::google::protobuf::{Any, ListValue, Struct, Timestamp, Value as PbValue, value::Kind};
use serde_json::{Map, Value};

use crate::cache::Cache;
use crate::resource::ResourceType;
use crate::watch::ResourceStatus;

/// One resource in a config dump.
#[derive(Clone, Debug)]
pub struct ResourceDump {
    /// Its type.
    pub resource_type: ResourceType,
    /// Its name.
    pub name: String,
    /// Version of the value held.
    pub version: String,
    /// Status.
    pub status: ResourceStatus,
    /// Last NACK reason.
    pub error: Option<String>,
    /// Last change.
    pub last_updated: Option<SystemTime>,
    /// The raw resource as last accepted.
    pub raw: Option<Any>,
}

pub(crate) fn dump(cache: &Cache) -> Vec<ResourceDump> {
    let mut out = Vec::new();
    for ty in ResourceType::ALL {
        let Some(state) = cache.types.get(&ty) else { continue };
        for (name, entry) in &state.entries {
            let s = entry.tx.borrow();
            out.push(ResourceDump {
                resource_type: ty,
                name: name.clone(),
                version: s.version.clone(),
                status: s.status.clone(),
                error: s.error.clone(),
                last_updated: s.updated,
                raw: entry.raw.as_ref().map(crate::wire::RawAny::to_any),
            });
        }
    }
    out
}

/// The dump as JSON, one object per resource: `type` (`LDS`, `RDS`, `CDS`, `EDS`), `name`, `version`, `status`
/// (CSDS's name: `REQUESTED`, `ACKED`, `NACKED`, `DOES_NOT_EXIST`), `error` (the NACK reason), and
/// `last_updated_unix_ms`. `meshctl xds-dump` and the admin endpoint's `/config_dump` print it.
pub fn to_json(dump: &[ResourceDump]) -> Vec<Value> {
    dump.iter()
        .map(|r| {
            serde_json::json!({
                "type": r.resource_type.short_name(),
                "name": r.name,
                "version": r.version,
                "status": r.status.csds_name(),
                "error": r.error,
                "last_updated_unix_ms": r.last_updated.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok()).map(|d| d.as_millis() as u64),
            })
        })
        .collect()
}

/// The dump as a CSDS `ClientConfig` (generic xDS configs).
pub fn to_client_config(node_id: &str, dump: &[ResourceDump]) -> ClientConfig {
    let timestamp = |t: SystemTime| {
        let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
    };
    let generic_xds_configs = dump
        .iter()
        .map(|r| GenericXdsConfig {
            type_url: r.resource_type.type_url().to_owned(),
            name: r.name.clone(),
            version_info: r.version.clone(),
            xds_config: r.raw.clone(),
            last_updated: r.last_updated.map(timestamp),
            client_status: match r.status {
                ResourceStatus::Requested => ClientResourceStatus::Requested,
                ResourceStatus::Acked => ClientResourceStatus::Acked,
                ResourceStatus::Nacked => ClientResourceStatus::Nacked,
                ResourceStatus::DoesNotExist | ResourceStatus::Deleted => ClientResourceStatus::DoesNotExist,
            } as i32,
            error_state: r.error.as_ref().map(|e| UpdateFailureState { details: e.clone(), ..Default::default() }),
            ..Default::default()
        })
        .collect();
    ClientConfig {
        node: Some(envoy_types::pb::envoy::config::core::v3::Node { id: node_id.to_owned(), ..Default::default() }),
        generic_xds_configs,
        ..Default::default()
    }
}

/// JSON object → protobuf `Struct` (node metadata).
pub(crate) fn json_to_struct(map: &Map<String, Value>) -> Option<Struct> {
    fn value(v: &Value) -> PbValue {
        let kind = match v {
            Value::Null => Kind::NullValue(0),
            Value::Bool(b) => Kind::BoolValue(*b),
            Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
            Value::String(s) => Kind::StringValue(s.clone()),
            Value::Array(a) => Kind::ListValue(ListValue { values: a.iter().map(value).collect() }),
            Value::Object(o) => Kind::StructValue(Struct { fields: o.iter().map(|(k, v)| (k.clone(), value(v))).collect() }),
        };
        PbValue { kind: Some(kind) }
    }
    (!map.is_empty()).then(|| Struct { fields: map.iter().map(|(k, v)| (k.clone(), value(v))).collect() })
}
