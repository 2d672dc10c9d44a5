//! The Client Status Discovery Service (`envoy.service.status.v3.ClientStatusDiscoveryService`): what this
//! client holds, in the form standard xDS debugging tools read. Serve [`service`] on a gRPC server (mesh-tonic's
//! admin endpoint does, on its own port).

use std::pin::Pin;

use envoy_types::pb::envoy::service::status::v3::client_status_discovery_service_server::{
    ClientStatusDiscoveryService, ClientStatusDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::status::v3::{ClientStatusRequest, ClientStatusResponse};
use futures_util::StreamExt as _;
use tonic::{Request, Response, Status, Streaming};

use crate::XdsClient;

/// CSDS over one xDS client: every request gets the client's whole dump as one `ClientConfig` (node matchers
/// are not applied: the process has one node).
#[derive(Clone, Debug)]
pub struct Csds(XdsClient);

/// The CSDS gRPC service of `client`.
pub fn service(client: XdsClient) -> ClientStatusDiscoveryServiceServer<Csds> {
    ClientStatusDiscoveryServiceServer::new(Csds(client))
}

impl Csds {
    fn response(&self) -> ClientStatusResponse {
        let node = &self.0.bootstrap().node.id;
        ClientStatusResponse { config: vec![crate::to_client_config(node, &self.0.dump())] }
    }
}

type Responses = Pin<Box<dyn futures_util::Stream<Item = Result<ClientStatusResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ClientStatusDiscoveryService for Csds {
    type StreamClientStatusStream = Responses;

    async fn stream_client_status(&self, request: Request<Streaming<ClientStatusRequest>>) -> Result<Response<Responses>, Status> {
        let this = self.clone();
        let responses = request.into_inner().map(move |request| request.map(|_| this.response()));
        Ok(Response::new(Box::pin(responses)))
    }

    async fn fetch_client_status(&self, _: Request<ClientStatusRequest>) -> Result<Response<ClientStatusResponse>, Status> {
        Ok(Response::new(self.response()))
    }
}
