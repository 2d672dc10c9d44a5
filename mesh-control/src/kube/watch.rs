//! [`KubeSource`]: the Service and EndpointSlice watches, publishing a [`KubeState`] on every change.

use super::state::{KubeState, SERVICE_NAME_LABEL};
use ::kube::Api;
use ::kube::Client;
use ::kube::runtime::WatchStreamExt;
use ::kube::runtime::watcher::{self, Event};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// How long a burst of changes may go on before it is published, at most, as a multiple of the debounce.
const MAX_DELAY_FACTOR: u32 = 10;

/// The longest debounce [`KubeSource::with_debounce`] takes.
const MAX_DEBOUNCE: Duration = Duration::from_secs(60);

/// Runs the Service and EndpointSlice watches and publishes a fresh [`KubeState`] on every change.
///
/// The watches use `kube`'s watcher: a list, then a watch from the list's resource version, resumed after
/// disconnects and relisted when the version has expired (410 Gone). A relist replaces the whole set at once, so
/// objects deleted while disconnected disappear. Watch errors are logged and retried with `kube`'s default backoff
/// (0.8 s doubling to 30 s, with jitter); the last state stays published meanwhile.
///
/// Changes are debounced (100 ms of quiet by default, and at most ten times that): a burst, such as an initial list
/// of many objects, gives one update. Nothing is published before both Services and EndpointSlices have been listed
/// once, so the first state a receiver sees after the initial (empty) one is complete
/// ([`KubeState::is_synced`]).
///
/// Needs `get`, `list` and `watch` on `services` and `discovery.k8s.io` `endpointslices` (see
/// `deploy/kubernetes/rbac.yaml`).
#[derive(Clone)]
pub struct KubeSource {
    client: Client,
    namespace: Option<String>,
    debounce: Duration,
}

impl fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeSource").field("namespace", &self.namespace).field("debounce", &self.debounce).finish_non_exhaustive()
    }
}

/// One item from either watch (boxed: a Service is about twice the size of a slice).
enum Update {
    Services(Box<Result<Event<Service>, watcher::Error>>),
    Slices(Box<Result<Event<EndpointSlice>, watcher::Error>>),
}

/// Objects of a relist, gathered from `Init` to `InitDone`.
type Relist<K> = Option<Vec<K>>;

impl KubeSource {
    /// A source watching `namespace`, or every namespace when `None`, through `client`.
    pub fn new(client: Client, namespace: Option<String>) -> Self {
        Self { client, namespace, debounce: Duration::from_millis(100) }
    }

    /// Sets how long changes must be quiet before they are published (100 ms by default, at most a minute). A
    /// burst is published after ten times this at most.
    #[must_use]
    pub fn with_debounce(mut self, debounce: Duration) -> Self {
        self.debounce = debounce.min(MAX_DEBOUNCE);
        self
    }

    /// Spawns the watch task; returns the receiver. It holds an empty, not synced state until both Services and
    /// EndpointSlices have been listed. The task ends when every receiver is dropped.
    ///
    /// # Panics
    ///
    /// When called outside a Tokio runtime.
    pub fn start(self) -> watch::Receiver<Arc<KubeState>> {
        let (tx, rx) = watch::channel(Arc::new(KubeState::default()));
        tokio::spawn(self.run(tx));
        rx
    }

    async fn run(self, tx: watch::Sender<Arc<KubeState>>) {
        let (services, slices): (Api<Service>, Api<EndpointSlice>) = match &self.namespace {
            Some(namespace) => (Api::namespaced(self.client.clone(), namespace), Api::namespaced(self.client.clone(), namespace)),
            None => (Api::all(self.client.clone()), Api::all(self.client.clone())),
        };
        let services =
            watcher::watcher(services, watcher::Config::default()).default_backoff().map(|event| Update::Services(Box::new(event)));
        // Only slices that belong to a Service.
        let slices = watcher::watcher(slices, watcher::Config::default().labels(SERVICE_NAME_LABEL))
            .default_backoff()
            .map(|event| Update::Slices(Box::new(event)));
        let mut updates = std::pin::pin!(futures_util::stream::select(services, slices));

        let mut watched = Watched::default();
        // Set while changes wait to be published: when the burst began, and when to publish.
        let mut pending: Option<(Instant, Instant)> = None;
        let scope = self.namespace.as_deref().unwrap_or("all namespaces");
        tracing::info!(namespace = scope, "watching Kubernetes Services and EndpointSlices");

        loop {
            tokio::select! {
                () = tx.closed() => return,
                () = sleep_until(pending.map(|(_, at)| at)) => {
                    pending = None;
                    // Nothing before both lists are in: receivers see complete states only.
                    if watched.state.is_synced() {
                        tracing::debug!(services = watched.state.services().count(), "publishing Kubernetes state");
                        tx.send_replace(Arc::new(watched.state.clone()));
                    }
                }
                update = updates.next() => {
                    let Some(update) = update else {
                        tracing::warn!("Kubernetes watches ended");
                        return;
                    };
                    let was_synced = watched.state.is_synced();
                    if watched.apply(update) {
                        let now = Instant::now();
                        let first = pending.map_or(now, |(first, _)| first);
                        pending = Some((first, (now + self.debounce).min(first + self.debounce * MAX_DELAY_FACTOR)));
                    }
                    if !was_synced && watched.state.is_synced() {
                        let services = watched.state.services().count();
                        tracing::info!(namespace = scope, services, "listed Kubernetes Services and EndpointSlices");
                    }
                }
            }
        }
    }
}

/// The watch task's data: the state, and the objects of relists in progress.
#[derive(Default)]
struct Watched {
    state: KubeState,
    service_relist: Relist<Service>,
    slice_relist: Relist<EndpointSlice>,
}

impl Watched {
    /// Applies one update; returns whether the state changed.
    fn apply(&mut self, update: Update) -> bool {
        match update {
            Update::Services(event) => handle(&mut self.state, &mut self.service_relist, *event, "services"),
            Update::Slices(event) => handle(&mut self.state, &mut self.slice_relist, *event, "endpointslices"),
        }
    }
}

/// Sleeps until `at`, or forever when `None`.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Applies one watcher event to `state`; returns whether it changed.
fn handle<K: Ops>(state: &mut KubeState, relist: &mut Relist<K>, event: Result<Event<K>, watcher::Error>, resource: &'static str) -> bool {
    match event {
        Ok(Event::Apply(object)) => K::apply(state, &object),
        Ok(Event::Delete(object)) => K::delete(state, &object),
        Ok(Event::Init) => {
            *relist = Some(Vec::new());
            false
        }
        Ok(Event::InitApply(object)) => {
            relist.get_or_insert_default().push(object);
            false
        }
        Ok(Event::InitDone) => {
            let objects = relist.take().unwrap_or_default();
            tracing::debug!(resource, count = objects.len(), "Kubernetes list done");
            K::replace(state, &objects)
        }
        Err(error) => {
            tracing::warn!(resource, %error, "Kubernetes watch failed; retrying with backoff");
            false
        }
    }
}

/// The [`KubeState`] operations for one kind of object.
trait Ops: Sized {
    fn apply(state: &mut KubeState, object: &Self) -> bool;
    fn delete(state: &mut KubeState, object: &Self) -> bool;
    fn replace(state: &mut KubeState, objects: &[Self]) -> bool;
}

impl Ops for Service {
    fn apply(state: &mut KubeState, object: &Self) -> bool {
        state.apply_service(object)
    }
    fn delete(state: &mut KubeState, object: &Self) -> bool {
        state.delete_service(object)
    }
    fn replace(state: &mut KubeState, objects: &[Self]) -> bool {
        state.replace_services(objects)
    }
}

impl Ops for EndpointSlice {
    fn apply(state: &mut KubeState, object: &Self) -> bool {
        state.apply_slice(object)
    }
    fn delete(state: &mut KubeState, object: &Self) -> bool {
        state.delete_slice(object)
    }
    fn replace(state: &mut KubeState, objects: &[Self]) -> bool {
        state.replace_slices(objects)
    }
}
