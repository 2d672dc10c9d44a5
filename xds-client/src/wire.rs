//! The client's own decoding of ADS responses: the fields it reads, with each resource's bytes kept as a slice
//! of the received message's buffer instead of a copy.
//!
//! envoy-types' `DiscoveryResponse` copies every resource into a `Vec<u8>` of its own. A large resource (a
//! 10,000-endpoint ClusterLoadAssignment is about 300 KB) would then exist twice: in tonic's receive buffer,
//! which keeps its capacity for the stream's life, and in the copy the cache keeps for the config dump. Here a
//! resource that is large and at least half of its response keeps the buffer itself as its bytes (tonic starts
//! a new one for the next message); others are copied, so no resource pins a buffer much larger than itself.

use bytes::Bytes;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;

/// A resource as received: its type URL and encoded bytes.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct RawAny {
    #[prost(string, tag = "1")]
    pub(crate) type_url: String,
    #[prost(bytes = "bytes", tag = "2")]
    pub(crate) value: Bytes,
}

/// Resources at least this large may keep sharing the received buffer; smaller ones are copied out of it.
const SHARE_AT: usize = 64 * 1024;

impl RawAny {
    /// The resource with bytes of its own, unless it is large and at least half of the response that carried it
    /// (`response_bytes`: its resources' total size): then the received buffer, which holds the whole
    /// response, is kept instead of a copy, and at most doubles what the resource costs.
    pub(crate) fn detached(mut self, response_bytes: usize) -> Self {
        if self.value.len() < SHARE_AT || self.value.len() * 2 < response_bytes {
            self.value = Bytes::copy_from_slice(&self.value);
        }
        self
    }

    /// As a protobuf `Any` (a copy), for the config dump.
    pub(crate) fn to_any(&self) -> Any {
        Any { type_url: self.type_url.clone(), value: self.value.to_vec() }
    }
}

impl From<&Any> for RawAny {
    fn from(any: &Any) -> Self {
        Self { type_url: any.type_url.clone(), value: Bytes::copy_from_slice(&any.value) }
    }
}

/// The fields of `envoy.service.discovery.v3.DiscoveryResponse` the client reads.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct SotwResponse {
    #[prost(string, tag = "1")]
    pub(crate) version_info: String,
    #[prost(message, repeated, tag = "2")]
    pub(crate) resources: Vec<RawAny>,
    #[prost(string, tag = "4")]
    pub(crate) type_url: String,
    #[prost(string, tag = "5")]
    pub(crate) nonce: String,
}

/// The fields of `envoy.service.discovery.v3.DeltaDiscoveryResponse` the client reads.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct DeltaResponse {
    #[prost(string, tag = "1")]
    pub(crate) system_version_info: String,
    #[prost(message, repeated, tag = "2")]
    pub(crate) resources: Vec<DeltaResource>,
    #[prost(string, tag = "4")]
    pub(crate) type_url: String,
    #[prost(string, tag = "5")]
    pub(crate) nonce: String,
    #[prost(string, repeated, tag = "6")]
    pub(crate) removed_resources: Vec<String>,
}

/// The fields of `envoy.service.discovery.v3.Resource` the client reads.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct DeltaResource {
    #[prost(string, tag = "1")]
    pub(crate) version: String,
    #[prost(message, optional, tag = "2")]
    pub(crate) resource: Option<RawAny>,
    #[prost(string, tag = "3")]
    pub(crate) name: String,
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, DiscoveryResponse, Resource};

    use super::*;

    #[test]
    fn reads_the_fields_of_envoys_messages() {
        let any = Any { type_url: "t".into(), value: vec![1, 2, 3] };
        let sotw = DiscoveryResponse {
            version_info: "v1".into(),
            resources: vec![any.clone()],
            type_url: "t".into(),
            nonce: "n1".into(),
            canary: true,
            ..Default::default()
        };
        let read = SotwResponse::decode(sotw.encode_to_vec().as_slice()).unwrap();
        assert_eq!((read.version_info.as_str(), read.type_url.as_str(), read.nonce.as_str()), ("v1", "t", "n1"));
        assert_eq!(read.resources, [RawAny::from(&any)]);
        let delta = DeltaDiscoveryResponse {
            system_version_info: "s".into(),
            resources: vec![Resource { name: "r".into(), version: "7".into(), resource: Some(any.clone()), ..Default::default() }],
            type_url: "t".into(),
            removed_resources: vec!["gone".into()],
            nonce: "n2".into(),
            ..Default::default()
        };
        let read = DeltaResponse::decode(delta.encode_to_vec().as_slice()).unwrap();
        assert_eq!((read.system_version_info.as_str(), read.nonce.as_str()), ("s", "n2"));
        assert_eq!(read.removed_resources, ["gone"]);
        let r = &read.resources[0];
        assert_eq!((r.name.as_str(), r.version.as_str(), r.resource.as_ref().map(RawAny::to_any)), ("r", "7", Some(any)));
    }

    #[test]
    fn large_resources_that_are_most_of_their_response_share_the_buffer_and_others_are_copied() {
        let buffer = Bytes::from(vec![7u8; 2 * SHARE_AT]);
        let large = RawAny { type_url: "t".into(), value: buffer.slice(..SHARE_AT) }.detached(SHARE_AT + 100);
        assert_eq!(large.value.as_ptr(), buffer.as_ptr());
        // As large, but a minor part of its response: copied, so it does not keep the rest alive.
        let minor = RawAny { type_url: "t".into(), value: buffer.slice(..SHARE_AT) }.detached(3 * SHARE_AT);
        assert_ne!(minor.value.as_ptr(), buffer.as_ptr());
        let small = RawAny { type_url: "t".into(), value: buffer.slice(..100) }.detached(100);
        assert_ne!(small.value.as_ptr(), buffer.as_ptr());
        assert_eq!(small.value, buffer.slice(..100));
    }
}
