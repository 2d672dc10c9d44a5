//! Typed watchers.
//!
//! A [`Watch`] follows one resource. Its state carries the last accepted
//! value, its status and the last error, so a consumer can keep serving a
//! cached value while it is reported NACKed or deleted (A88).

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::{mpsc, watch};

use crate::resource::{ClusterResource, EndpointsResource, ListenerResource, Resource, ResourceType};

/// Where a resource stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResourceStatus {
    /// Subscribed; nothing received yet.
    Requested,
    /// Received and accepted.
    Acked,
    /// The latest version was rejected; `error` says why. A cached value, if
    /// any, stays in use.
    Nacked,
    /// The server said it does not exist, or it did not arrive before the
    /// does-not-exist timer fired.
    DoesNotExist,
    /// The server stopped sending it after it had a value; the cached value
    /// stays in use unless the client fails on data errors.
    Deleted,
}

impl ResourceStatus {
    /// CSDS name of the status.
    pub fn csds_name(&self) -> &'static str {
        match self {
            Self::Requested => "REQUESTED",
            Self::Acked => "ACKED",
            Self::Nacked => "NACKED",
            Self::DoesNotExist | Self::Deleted => "DOES_NOT_EXIST",
        }
    }
}

/// Snapshot of one watched resource.
#[derive(Clone, Debug)]
pub struct WatchState {
    /// Last accepted value, if any.
    pub value: Option<Arc<Resource>>,
    /// Status.
    pub status: ResourceStatus,
    /// Last error (NACK reason), if any.
    pub error: Option<String>,
    /// Version of the value.
    pub version: String,
    /// When the state last changed: for a change carried by a response, when that response arrived (before
    /// decoding), so `now - updated` is the time the client took to apply it.
    pub updated: Option<SystemTime>,
}

impl WatchState {
    pub(crate) fn requested() -> Self {
        Self { value: None, status: ResourceStatus::Requested, error: None, version: String::new(), updated: None }
    }
}

/// A resource type with a typed view.
pub trait XdsResource: Send + Sync + 'static {
    /// Its xDS type.
    const TYPE: ResourceType;
    /// The typed view of a decoded resource of this type.
    fn from_resource(resource: &Resource) -> Option<&Self>;
}

impl XdsResource for ListenerResource {
    const TYPE: ResourceType = ResourceType::Listener;
    fn from_resource(resource: &Resource) -> Option<&Self> {
        match resource {
            Resource::Listener(r) => Some(r),
            _ => None,
        }
    }
}

/// A server's listener (A36); a client's API listener under the same name is not one.
impl XdsResource for mesh_core::inbound::InboundListener {
    const TYPE: ResourceType = ResourceType::Listener;
    fn from_resource(resource: &Resource) -> Option<&Self> {
        match resource {
            Resource::ServerListener(r) => Some(r),
            _ => None,
        }
    }
}

impl XdsResource for mesh_core::RouteConfig {
    const TYPE: ResourceType = ResourceType::RouteConfiguration;
    fn from_resource(resource: &Resource) -> Option<&Self> {
        match resource {
            Resource::RouteConfiguration(r) => Some(r),
            _ => None,
        }
    }
}

impl XdsResource for ClusterResource {
    const TYPE: ResourceType = ResourceType::Cluster;
    fn from_resource(resource: &Resource) -> Option<&Self> {
        match resource {
            Resource::Cluster(r) => Some(r),
            _ => None,
        }
    }
}

impl XdsResource for EndpointsResource {
    const TYPE: ResourceType = ResourceType::ClusterLoadAssignment;
    fn from_resource(resource: &Resource) -> Option<&Self> {
        match resource {
            Resource::ClusterLoadAssignment(r) => Some(r),
            _ => None,
        }
    }
}

/// Unsubscribes when the last watch of a resource is dropped.
#[derive(Debug)]
pub(crate) struct Unsubscribe {
    pub(crate) ty: ResourceType,
    pub(crate) name: String,
    pub(crate) commands: mpsc::UnboundedSender<crate::client::Command>,
}

impl Drop for Unsubscribe {
    fn drop(&mut self) {
        let _ = self.commands.send(crate::client::Command::Unsubscribe(self.ty, std::mem::take(&mut self.name)));
    }
}

/// Follows one resource of type `T`.
#[derive(Debug)]
pub struct Watch<T> {
    rx: watch::Receiver<WatchState>,
    _unsubscribe: Arc<Unsubscribe>,
    _type: PhantomData<fn() -> T>,
}

impl<T> Clone for Watch<T> {
    fn clone(&self) -> Self {
        Self { rx: self.rx.clone(), _unsubscribe: self._unsubscribe.clone(), _type: PhantomData }
    }
}

impl<T: XdsResource> Watch<T> {
    pub(crate) fn new(rx: watch::Receiver<WatchState>, unsubscribe: Arc<Unsubscribe>) -> Self {
        Self { rx, _unsubscribe: unsubscribe, _type: PhantomData }
    }

    /// The resource name.
    pub fn name(&self) -> &str {
        &self._unsubscribe.name
    }

    /// The current state (marks it seen).
    pub fn state(&mut self) -> WatchState {
        self.rx.borrow_and_update().clone()
    }

    /// The current status (does not mark the state seen).
    pub fn status(&self) -> ResourceStatus {
        self.rx.borrow().status.clone()
    }

    /// The current value, if any.
    pub fn value(&self) -> Option<Typed<T>> {
        self.rx.borrow().value.clone().and_then(Typed::new)
    }

    /// Waits for the next change; `false` once the client is gone.
    pub async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }
}

/// A decoded resource seen as `T`.
#[derive(Debug)]
pub struct Typed<T> {
    resource: Arc<Resource>,
    _type: PhantomData<fn() -> T>,
}

impl<T> Clone for Typed<T> {
    fn clone(&self) -> Self {
        Self { resource: self.resource.clone(), _type: PhantomData }
    }
}

impl<T: XdsResource> Typed<T> {
    /// Wraps a resource if it is a `T`.
    pub fn new(resource: Arc<Resource>) -> Option<Self> {
        T::from_resource(&resource)?;
        Some(Self { resource, _type: PhantomData })
    }

    /// The underlying resource.
    pub fn resource(&self) -> &Arc<Resource> {
        &self.resource
    }
}

impl<T: XdsResource> std::ops::Deref for Typed<T> {
    type Target = T;

    fn deref(&self) -> &T {
        match T::from_resource(&self.resource) {
            Some(t) => t,
            // `new` checked the variant and the resource is immutable.
            None => unreachable!("Typed holds a resource of its own type"),
        }
    }
}
