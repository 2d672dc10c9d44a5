//! Protocol state per resource type: subscriptions, cached resources,
//! versions and nonces, and what to send back (ACK or NACK). No I/O: the
//! stream task feeds responses in and sends what comes out.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::resource::{self, DecodeError, Resource, ResourceType};
use crate::watch::{ResourceStatus, WatchState};
use crate::wire::{DeltaResponse, RawAny, SotwResponse};

/// gRPC status INVALID_ARGUMENT, used in NACKs.
const INVALID_ARGUMENT: i32 = 3;

/// How the cache treats bad or vanished data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct DataErrorPolicy {
    /// Drop cached values of resources that are NACKed or deleted (A88's
    /// `fail_on_data_errors`); by default they stay in use.
    pub(crate) fail_on_data_errors: bool,
    /// The server's `ignore_resource_deletion` feature.
    pub(crate) ignore_resource_deletion: bool,
}

/// One subscribed resource.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) tx: watch::Sender<WatchState>,
    pub(crate) raw: Option<RawAny>,
    pub(crate) dne_timer: Option<AbortHandle>,
}

impl Entry {
    fn new() -> Self {
        Self { tx: watch::channel(WatchState::requested()).0, raw: None, dne_timer: None }
    }

    pub(crate) fn has_value(&self) -> bool {
        self.tx.borrow().value.is_some()
    }

    fn cancel_timer(&mut self) {
        if let Some(t) = self.dne_timer.take() {
            t.abort();
        }
    }

    fn update(&self, f: impl FnOnce(&mut WatchState)) {
        self.update_at(SystemTime::now(), f);
    }

    /// Changes the state; `at` is when the change arrived.
    fn update_at(&self, at: SystemTime, f: impl FnOnce(&mut WatchState)) {
        self.tx.send_modify(|s| {
            f(s);
            s.updated = Some(at);
        });
    }
}

/// State of one resource type.
#[derive(Debug, Default)]
pub(crate) struct TypeState {
    /// SotW: last accepted version.
    pub(crate) version: String,
    /// Last nonce received.
    pub(crate) nonce: String,
    /// Subscribed resources by name.
    pub(crate) entries: BTreeMap<String, Entry>,
    /// Subscriptions the server has not been told of yet.
    pub(crate) pending_subscribe: BTreeSet<String>,
    /// Unsubscriptions the server has not been told of yet.
    pub(crate) pending_unsubscribe: BTreeSet<String>,
}

/// All protocol state.
#[derive(Debug, Default)]
pub(crate) struct Cache {
    pub(crate) types: HashMap<ResourceType, TypeState>,
    pub(crate) policy: DataErrorPolicy,
}

impl Cache {
    pub(crate) fn state(&mut self, ty: ResourceType) -> &mut TypeState {
        self.types.entry(ty).or_default()
    }

    /// Types with at least one subscription, in a fixed order.
    pub(crate) fn subscribed_types(&self) -> Vec<ResourceType> {
        ResourceType::ALL.into_iter().filter(|ty| self.types.get(ty).is_some_and(|s| !s.entries.is_empty())).collect()
    }

    /// Adds a subscription; returns the receiver and whether it is new.
    pub(crate) fn subscribe(&mut self, ty: ResourceType, name: &str) -> (watch::Receiver<WatchState>, bool) {
        let state = self.state(ty);
        if let Some(entry) = state.entries.get(name) {
            return (entry.tx.subscribe(), false);
        }
        let entry = Entry::new();
        let rx = entry.tx.subscribe();
        state.entries.insert(name.to_owned(), entry);
        state.pending_unsubscribe.remove(name);
        state.pending_subscribe.insert(name.to_owned());
        (rx, true)
    }

    /// Drops a subscription once nobody watches it; returns whether it did.
    pub(crate) fn unsubscribe(&mut self, ty: ResourceType, name: &str) -> bool {
        let state = self.state(ty);
        let unwatched = state.entries.get(name).is_some_and(|e| e.tx.receiver_count() == 0);
        if unwatched && let Some(mut entry) = state.entries.remove(name) {
            entry.cancel_timer();
            state.pending_subscribe.remove(name);
            state.pending_unsubscribe.insert(name.to_owned());
        }
        unwatched
    }

    /// The SotW request that states the current subscription of `ty`.
    pub(crate) fn sotw_request(&mut self, ty: ResourceType, nonce: Option<&str>, error: Option<String>) -> DiscoveryRequest {
        let state = self.state(ty);
        state.pending_subscribe.clear();
        state.pending_unsubscribe.clear();
        DiscoveryRequest {
            version_info: state.version.clone(),
            resource_names: state.entries.keys().cloned().collect(),
            type_url: ty.type_url().to_owned(),
            response_nonce: nonce.unwrap_or_default().to_owned(),
            error_detail: error.map(|message| RpcStatus { code: INVALID_ARGUMENT, message, details: vec![] }),
            ..Default::default()
        }
    }

    /// The delta request for a fresh stream: everything subscribed, with the
    /// versions we hold.
    pub(crate) fn delta_initial_request(&mut self, ty: ResourceType) -> DeltaDiscoveryRequest {
        let state = self.state(ty);
        state.pending_subscribe.clear();
        state.pending_unsubscribe.clear();
        let initial_resource_versions =
            state.entries.iter().filter(|(_, e)| e.has_value()).map(|(name, e)| (name.clone(), e.tx.borrow().version.clone())).collect();
        DeltaDiscoveryRequest {
            type_url: ty.type_url().to_owned(),
            resource_names_subscribe: state.entries.keys().cloned().collect(),
            initial_resource_versions,
            ..Default::default()
        }
    }

    /// The delta request carrying subscription changes since the last one.
    pub(crate) fn delta_change_request(&mut self, ty: ResourceType) -> Option<DeltaDiscoveryRequest> {
        let state = self.state(ty);
        if state.pending_subscribe.is_empty() && state.pending_unsubscribe.is_empty() {
            return None;
        }
        Some(DeltaDiscoveryRequest {
            type_url: ty.type_url().to_owned(),
            resource_names_subscribe: std::mem::take(&mut state.pending_subscribe).into_iter().collect(),
            resource_names_unsubscribe: std::mem::take(&mut state.pending_unsubscribe).into_iter().collect(),
            ..Default::default()
        })
    }

    /// Records a SotW response's nonce (and its version when every resource was accepted) and returns the
    /// ACK, or the NACK carrying `error`. Sent before [`Cache::apply_sotw`] tells the watchers.
    pub(crate) fn sotw_ack(&mut self, ty: ResourceType, response: &SotwResponse, error: Option<String>) -> DiscoveryRequest {
        let state = self.state(ty);
        state.nonce = response.nonce.clone();
        if error.is_none() {
            state.version = response.version_info.clone();
        }
        self.sotw_request(ty, Some(&response.nonce), error)
    }

    /// Applies a decoded SotW response to the cache and its watchers.
    pub(crate) fn apply_sotw(&mut self, ty: ResourceType, version: &str, decoded: Decoded, received: SystemTime) {
        let policy = self.policy;
        let state = self.state(ty);
        let mut seen: BTreeSet<String> = decoded.invalid.keys().cloned().collect();
        for (name, (resource, raw)) in decoded.valid {
            if let Some(entry) = state.entries.get_mut(&name) {
                accept(entry, resource, raw, version, received);
            }
            seen.insert(name);
        }
        for (name, reason) in &decoded.invalid {
            if let Some(entry) = state.entries.get_mut(name) {
                reject(entry, reason, policy, received);
            }
        }
        // LDS and CDS: a resource missing from the response is deleted, if it had a value. One never received
        // is left to its does-not-exist timer: the response may answer a request sent before it was subscribed
        // (gRPC's XdsClient does the same).
        if ty.all_resources_required_in_sotw() {
            for (name, entry) in &state.entries {
                if !seen.contains(name) && entry.has_value() {
                    delete(entry, policy, received);
                }
            }
        }
    }

    /// Applies a decoded delta response (its ACK already sent) to the cache and its watchers; `versions` are
    /// the response's per-resource versions.
    pub(crate) fn apply_delta(
        &mut self,
        ty: ResourceType,
        response: &DeltaResponse,
        versions: &HashMap<String, String>,
        decoded: Decoded,
        received: SystemTime,
    ) {
        let policy = self.policy;
        let state = self.state(ty);
        for (name, (resource, raw)) in decoded.valid {
            if let Some(entry) = state.entries.get_mut(&name) {
                let version = versions.get(&name).map_or("", String::as_str);
                accept(entry, resource, raw, version, received);
            }
        }
        for (name, reason) in &decoded.invalid {
            if let Some(entry) = state.entries.get_mut(name) {
                reject(entry, reason, policy, received);
            }
        }
        for name in &response.removed_resources {
            if let Some(entry) = state.entries.get(name) {
                delete(entry, policy, received);
            }
        }
        state.nonce = response.nonce.clone();
    }

    /// Marks a resource that never arrived as not existing.
    pub(crate) fn does_not_exist(&mut self, ty: ResourceType, name: &str) {
        if let Some(entry) = self.state(ty).entries.get_mut(name) {
            entry.dne_timer = None;
            if !entry.has_value() {
                entry.update(|s| s.status = ResourceStatus::DoesNotExist);
            }
        }
    }
}

/// The resources of one response, decoded in two phases (A46): a resource whose name cannot be read is an
/// error of its own; one that fails validation is rejected by name; the rest are used. Pure: no cache, no
/// lock, so a large response is decoded while watchers keep subscribing.
#[derive(Debug, Default)]
pub(crate) struct Decoded {
    valid: BTreeMap<String, (Resource, RawAny)>,
    invalid: BTreeMap<String, String>,
    unnamed: Vec<String>,
}

impl Decoded {
    /// Decodes `anys`, keeping each accepted one's bytes for the config dump.
    pub(crate) fn decode(ty: ResourceType, anys: impl IntoIterator<Item = RawAny>) -> Self {
        let mut decoded = Self::default();
        let anys: Vec<RawAny> = anys.into_iter().collect();
        let response_bytes = anys.iter().map(|a| a.value.len()).sum();
        for any in anys {
            match resource::resource_name_raw(ty, &any.type_url, &any.value) {
                Err(error) => decoded.unnamed.push(error.to_string()),
                Ok(name) => match resource::decode_raw(ty, &any.type_url, &any.value) {
                    Ok(resource) => {
                        decoded.valid.insert(name, (resource, any.detached(response_bytes)));
                    }
                    Err(DecodeError { reason, .. }) => {
                        decoded.invalid.insert(name, reason);
                    }
                },
            }
        }
        decoded
    }

    /// How many resources were valid, and how many invalid (unnamed ones included).
    pub(crate) fn sizes(&self) -> (usize, usize) {
        (self.valid.len(), self.invalid.len() + self.unnamed.len())
    }

    /// One line per rejected resource; empty means ACK.
    pub(crate) fn errors(&self) -> Vec<String> {
        self.unnamed.iter().cloned().chain(self.invalid.iter().map(|(name, reason)| format!("{name}: {reason}"))).collect()
    }
}

fn accept(entry: &mut Entry, resource: Resource, raw: RawAny, version: &str, received: SystemTime) {
    entry.cancel_timer();
    entry.raw = Some(raw);
    entry.update_at(received, |s| {
        s.value = Some(Arc::new(resource));
        s.status = ResourceStatus::Acked;
        s.error = None;
        s.version = version.to_owned();
    });
}

fn reject(entry: &mut Entry, reason: &str, policy: DataErrorPolicy, received: SystemTime) {
    // The resource exists (it arrived, invalid): its does-not-exist timer is moot, as in gRPC.
    entry.cancel_timer();
    entry.update_at(received, |s| {
        s.status = ResourceStatus::Nacked;
        s.error = Some(reason.to_owned());
        if policy.fail_on_data_errors {
            s.value = None;
        }
    });
}

fn delete(entry: &Entry, policy: DataErrorPolicy, received: SystemTime) {
    entry.update_at(received, |s| {
        if s.value.is_none() {
            s.status = ResourceStatus::DoesNotExist;
        } else if policy.fail_on_data_errors && !policy.ignore_resource_deletion {
            s.value = None;
            s.status = ResourceStatus::DoesNotExist;
        } else {
            s.status = ResourceStatus::Deleted;
        }
    });
}
