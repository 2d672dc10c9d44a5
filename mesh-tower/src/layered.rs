//! The boxed boundary of a layered route or cluster: a stack of layers behind one pointer, sent requests by
//! `&self`. Each call clones the concrete stack (reference counts, no allocation) and drives it, readiness
//! included, in one boxed future: one allocation per call, where `BoxCloneSyncService::clone` followed by
//! `oneshot` makes three (the boxed clone, the boxed call, and the future around them).

use std::sync::Arc;

use futures_util::future::BoxFuture;
use tower::{Service, ServiceExt};

use crate::Error;
use crate::balance::ResponseBody;

type Response = Result<http::Response<ResponseBody>, Error>;

/// A layered stack taking `Req`s. Cheap to clone; clones share the stack.
pub(crate) struct Layered<Req>(Arc<dyn Send_<Req>>);

impl<Req> Clone for Layered<Req> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

trait Send_<Req>: Send + Sync {
    fn send(&self, request: Req) -> BoxFuture<'static, Response>;
}

impl<S, Req> Send_<Req> for S
where
    S: Service<Req, Response = http::Response<ResponseBody>, Error = Error> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    Req: Send + 'static,
{
    fn send(&self, request: Req) -> BoxFuture<'static, Response> {
        Box::pin(self.clone().oneshot(request))
    }
}

impl<Req: Send + 'static> Layered<Req> {
    /// `service` behind the boundary.
    pub(crate) fn new<S>(service: S) -> Self
    where
        S: Service<Req, Response = http::Response<ResponseBody>, Error = Error> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
    {
        Self(Arc::new(service))
    }

    /// Sends one request through the stack, waiting for its readiness first.
    pub(crate) fn send(&self, request: Req) -> BoxFuture<'static, Response> {
        self.0.send(request)
    }
}
