//! Discovery sources: where a balancer learns its endpoints.
//!
//! A source is any [`Stream`] of [`Change`]s ([`Discover`] is implemented for
//! all of them), so xDS, Kubernetes or a test can feed a balancer the same way.
//! Built-in sources:
//!
//! - [`fixed`]: a static list, sent once.
//! - [`channel`]: a handle the caller pushes changes through.
//! - [`dns`]: A/AAAA or SRV records, re-resolved at their TTL.
//!
//! A source never reports errors to the balancer: a failing source logs and
//! keeps the last good set, which is what a mesh client should keep serving.

pub mod dns;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::Stream;
use mesh_core::{Endpoint, EndpointSet};
use tokio::sync::mpsc;

/// One change to an endpoint set.
///
/// Endpoints travel as `Arc<Endpoint>`: the balancer keeps the source's copy instead of making its own, so an
/// xDS cache and the balancer fed from it hold each endpoint once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Add an endpoint, or update it (weight, locality, metadata) if its
    /// address is known.
    Insert(Arc<Endpoint>),
    /// Remove the endpoint with this address; in-flight requests finish.
    Remove(SocketAddr),
    /// Replace the whole set, with its locality weights and drop overloads (what DNS and xDS EDS updates are).
    Reset(EndpointSet),
}

impl Change {
    /// Adds or updates one endpoint.
    pub fn insert(endpoint: Endpoint) -> Self {
        Self::Insert(Arc::new(endpoint))
    }

    /// Replaces the whole set with these endpoints (no locality weights, no drops).
    pub fn reset(endpoints: impl IntoIterator<Item = Endpoint>) -> Self {
        Self::Reset(EndpointSet { endpoints: endpoints.into_iter().map(Arc::new).collect(), ..EndpointSet::default() })
    }
}

/// A discovery source: a stream of endpoint changes.
///
/// The stream ending means "no more changes": the last set stays in use.
pub trait Discover: Stream<Item = Change> + Send + 'static {}

impl<S: Stream<Item = Change> + Send + 'static> Discover for S {}

/// A boxed discovery source.
pub type BoxDiscover = Pin<Box<dyn Stream<Item = Change> + Send + 'static>>;

/// A fixed endpoint list, reported once.
pub fn fixed(endpoints: Vec<Endpoint>) -> BoxDiscover {
    Box::pin(futures_util::stream::iter([Change::reset(endpoints)]))
}

/// A source driven by hand: changes sent on the [`ChangeSender`] reach the
/// balancer in order.
pub fn channel() -> (ChangeSender, BoxDiscover) {
    let (tx, rx) = mpsc::unbounded_channel();
    (ChangeSender { tx }, Box::pin(Receiver { rx }))
}

/// Sending half of [`channel`].
#[derive(Clone, Debug)]
pub struct ChangeSender {
    tx: mpsc::UnboundedSender<Change>,
}

impl ChangeSender {
    /// Sends a change; returns `false` once the balancer is gone.
    pub fn send(&self, change: Change) -> bool {
        self.tx.send(change).is_ok()
    }
}

struct Receiver {
    rx: mpsc::UnboundedReceiver<Change>,
}

impl Stream for Receiver {
    type Item = Change;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Change>> {
        self.rx.poll_recv(cx)
    }
}
