//! Replica discovery from Kubernetes: watches the `discovery.k8s.io/v1` EndpointSlices of the
//! engines' Service and keeps the registry's [`Source::Kubernetes`] replicas equal to the ready
//! endpoints they list.
//!
//! The translation from slices to replicas is the pure function [`members`]; [`run`] only
//! feeds it from kube's watcher and hands the result to [`Registry::set_members`]. A replica's
//! id is the pod name of its endpoint (the StatefulSet pod name, which the engine also uses as
//! its `--replica-id`), so a replica found here and the same replica's Redis registration are
//! one registry entry.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::Ipv6Addr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use hotprefix_protocol::ReplicaId;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, DefaultBackoff, Event};
use kube::{Api, Client, ResourceExt};

use crate::registry::{Registry, Source};

/// The label Kubernetes puts on every EndpointSlice it derives from a Service, naming it.
pub const SERVICE_LABEL: &str = "kubernetes.io/service-name";
/// Where a pod finds its own namespace (mounted with its service account token).
pub const NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";
/// The longest wait between failed watch attempts (the cap of kube's default backoff).
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often the last membership is given to the registry again although the slices did not
/// change. A replica listed here that also registered in Redis becomes a Redis replica in the
/// registry, and leaves it when its registration expires, even while its endpoint stays ready;
/// this brings it back as a Kubernetes replica.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(5);
/// The port name looked up in the slices when none is configured.
pub const DEFAULT_PORT_NAME: &str = "http";

/// Which port of an endpoint the engines serve on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortSpec {
    /// The slice's port of this name (the Service's port name).
    Named(String),
    /// This port number on every endpoint, whatever the slices say.
    Number(u16),
}

impl Default for PortSpec {
    fn default() -> Self {
        PortSpec::Named(DEFAULT_PORT_NAME.to_string())
    }
}

impl FromStr for PortSpec {
    type Err = String;

    /// A number (1 to 65535) or a port name; a name must be a DNS label, as Kubernetes requires
    /// of Service port names, so a typo is caught at start-up rather than matching nothing.
    fn from_str(s: &str) -> Result<PortSpec, String> {
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return match s.parse::<u16>() {
                Ok(n) if n > 0 => Ok(PortSpec::Number(n)),
                _ => Err(format!("port number {s} is not in 1..=65535")),
            };
        }
        if is_dns_label(s) {
            Ok(PortSpec::Named(s.to_string()))
        } else {
            Err(format!(
                "{s:?} is neither a port number nor a port name (lowercase letters, digits and \
                 '-', at most 63)"
            ))
        }
    }
}

/// Where to discover replicas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubernetesOptions {
    /// The engines' Service.
    pub service: String,
    /// Its namespace.
    pub namespace: String,
    /// The engines' port.
    pub port: PortSpec,
}

impl KubernetesOptions {
    /// The label selector of the Service's EndpointSlices.
    pub fn label_selector(&self) -> String {
        format!("{SERVICE_LABEL}={}", self.service)
    }
}

/// Whether `s` is an RFC 1123 label (at most 63 lowercase letters, digits and '-', starting and
/// ending with a letter or digit): the form of namespace names, Service names and port names.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.first() != Some(&b'-')
        && b.last() != Some(&b'-')
}

/// The namespace this pod runs in, from its service account mount; `default` outside a cluster
/// (or where the mount is disabled), as `kubectl` would assume.
pub fn pod_namespace() -> String {
    std::fs::read_to_string(NAMESPACE_FILE)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_string())
}

/// The port of `slice` the engines serve on: `spec`'s number, or the number of the slice's TCP
/// port named `spec`. `None` when the slice has no such port (a misconfigured `--k8s-port`).
pub fn slice_port(slice: &EndpointSlice, spec: &PortSpec) -> Option<u16> {
    match spec {
        PortSpec::Number(n) => Some(*n),
        PortSpec::Named(name) => slice
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().is_none_or(|proto| proto == "TCP"))
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| p.port)
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| *n > 0),
    }
}

/// Whether an endpoint should get traffic. An absent `ready` means ready (the API's rule). A
/// terminating endpoint is left out even when it reports ready, which it does for a Service
/// that publishes not-ready addresses: a pod that is shutting down should get no new requests.
fn serves(e: &Endpoint) -> bool {
    let c = e.conditions.as_ref();
    c.and_then(|c| c.ready) != Some(false) && c.and_then(|c| c.terminating) != Some(true)
}

/// The replica id of an endpoint: its pod's name, else its hostname, else `address`.
fn endpoint_id(e: &Endpoint, address: &str) -> ReplicaId {
    let pod = e.target_ref.as_ref().and_then(|r| r.name.as_deref());
    let name = [pod, e.hostname.as_deref()]
        .into_iter()
        .flatten()
        .find(|n| !n.is_empty())
        .unwrap_or(address);
    ReplicaId(name.to_string())
}

/// The base URL of an endpoint; IPv6 addresses are bracketed, as URLs require.
fn endpoint_url(address: &str, port: u16) -> String {
    if address.parse::<Ipv6Addr>().is_ok() {
        format!("http://[{address}]:{port}")
    } else {
        format!("http://{address}:{port}")
    }
}

/// The whole membership the slices of one Service describe: (replica id, base URL) of every
/// endpoint that is ready and not terminating, sorted by id.
///
/// An endpoint's first address is used (the API declares an endpoint's addresses fungible). A
/// slice without the configured port contributes nothing. An id listed twice (an endpoint
/// briefly in two slices while the control plane moves it) keeps its first URL in the order of
/// `slices`.
pub fn members<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    port: &PortSpec,
) -> Vec<(ReplicaId, String)> {
    let mut out = BTreeMap::new();
    for slice in slices {
        let Some(port) = slice_port(slice, port) else {
            continue;
        };
        for e in slice.endpoints.iter().filter(|e| serves(e)) {
            let Some(address) = e.addresses.first().filter(|a| !a.is_empty()) else {
                continue;
            };
            out.entry(endpoint_id(e, address))
                .or_insert_with(|| endpoint_url(address, port));
        }
    }
    out.into_iter().collect()
}

/// The Service's slices as last seen, and what was last given to the registry.
#[derive(Debug, Default)]
struct View {
    /// Current slices by name (they all live in the one namespace).
    slices: BTreeMap<String, EndpointSlice>,
    /// Slices collected since the watcher (re)started its list, swapped in when it completes.
    listing: BTreeMap<String, EndpointSlice>,
    /// Whether a complete list has been seen: until then nothing is published, so a partial
    /// list never removes replicas.
    listed: bool,
    /// The membership last published.
    published: Option<Vec<(ReplicaId, String)>>,
    /// Slices already warned about for lacking the port, so a warning is not repeated on
    /// every event.
    warned: BTreeSet<String>,
}

impl View {
    /// Applies one watcher event; returns whether the slices changed.
    fn apply(&mut self, event: Event<EndpointSlice>) -> bool {
        match event {
            Event::Init => {
                self.listing.clear();
                false
            }
            Event::InitApply(s) => {
                self.listing.insert(s.name_any(), s);
                false
            }
            Event::InitDone => {
                self.slices = std::mem::take(&mut self.listing);
                self.listed = true;
                true
            }
            Event::Apply(s) => {
                self.slices.insert(s.name_any(), s);
                self.listed
            }
            Event::Delete(s) => {
                self.slices.remove(&s.name_any());
                self.listed
            }
        }
    }

    /// Recomputes the membership and gives it to the registry when it changed.
    fn publish(&mut self, opts: &KubernetesOptions, registry: &Registry) {
        for slice in self.slices.values() {
            let name = slice.name_any();
            if slice_port(slice, &opts.port).is_none() && !self.warned.contains(&name) {
                tracing::warn!(
                    slice = %name,
                    port = ?opts.port,
                    "EndpointSlice has no such TCP port; its endpoints are ignored (check --k8s-port)"
                );
                self.warned.insert(name);
            }
        }
        self.warned.retain(|n| self.slices.contains_key(n));
        let now = members(self.slices.values(), &opts.port);
        if self.published.as_ref() == Some(&now) {
            return;
        }
        tracing::info!(
            service = %opts.service,
            namespace = %opts.namespace,
            replicas = ?now.iter().map(|(id, url)| format!("{id}={url}")).collect::<Vec<_>>(),
            "Kubernetes membership changed"
        );
        registry.set_members(Source::Kubernetes, &now);
        self.published = Some(now);
    }

    /// Gives the last membership to the registry again (see [`RESYNC_INTERVAL`]).
    fn resync(&self, registry: &Registry) {
        if let Some(members) = &self.published {
            registry.set_members(Source::Kubernetes, members);
        }
    }
}

/// Watches the Service's EndpointSlices through `client` and keeps the registry's Kubernetes
/// replicas equal to their ready endpoints, until `shutdown` resolves.
///
/// Watch errors (API server unreachable, RBAC denying the list) are logged and retried after
/// kube's [`DefaultBackoff`] (0.8 s doubling to 30 s, jittered); the last known membership stays
/// in the registry meanwhile, since stale replicas (ejected by health probes if really gone)
/// route better than none.
///
/// The backoff is applied here rather than with `WatchStreamExt::default_backoff`: that one
/// resets on every `Ok` item, and the watcher yields `Ok(Event::Init)` before each list
/// attempt, so against a failing API server it would retry about once a second forever. Here
/// only an event carrying data from the API server resets it.
pub async fn run(
    client: Client,
    opts: KubernetesOptions,
    registry: Arc<Registry>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let api: Api<EndpointSlice> = Api::namespaced(client, &opts.namespace);
    let cfg = watcher::Config::default().labels(&opts.label_selector());
    let events = watcher::watcher(api, cfg);
    tokio::pin!(events);
    tracing::info!(
        service = %opts.service,
        namespace = %opts.namespace,
        "watching the engines' EndpointSlices"
    );
    let mut view = View::default();
    let mut backoff = DefaultBackoff::default();
    let mut resync = tokio::time::interval(RESYNC_INTERVAL);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // `next` is cancel-safe: the watcher keeps its state in the stream, not in the future.
        let next = tokio::select! {
            () = &mut shutdown => return,
            _ = resync.tick() => {
                view.resync(&registry);
                continue;
            }
            next = events.next() => next,
        };
        match next {
            Some(Ok(event)) => {
                if !matches!(event, Event::Init) {
                    backoff.reset();
                }
                if view.apply(event) {
                    view.publish(&opts, &registry);
                }
            }
            Some(Err(e)) => {
                // The default backoff never runs out; the fallback only keeps this total.
                let wait = backoff.next().unwrap_or(MAX_BACKOFF);
                tracing::warn!(
                    error = %e,
                    service = %opts.service,
                    namespace = %opts.namespace,
                    retry_in = ?wait,
                    "watching EndpointSlices failed; keeping the last membership"
                );
                tokio::select! {
                    () = &mut shutdown => return,
                    () = tokio::time::sleep(wait) => {}
                }
            }
            None => {
                // kube's watcher restarts itself and never ends; were it to, discovery would
                // silently freeze, so say so.
                tracing::error!("the EndpointSlice watch ended; Kubernetes discovery stopped");
                return;
            }
        }
    }
}

/// [`run`] with the client of the environment (in-cluster service account, else kubeconfig).
/// A client that cannot be built is logged and discovery is skipped: the router keeps routing
/// to its other replicas rather than failing to start.
pub async fn run_default(
    opts: KubernetesOptions,
    registry: Arc<Registry>,
    shutdown: impl Future<Output = ()>,
) {
    // kube's TLS is rustls, which needs a process-wide crypto provider; a second install is
    // harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    tokio::pin!(shutdown);
    let client = tokio::select! {
        () = &mut shutdown => return,
        client = Client::try_default() => client,
    };
    match client {
        Ok(client) => run(client, opts, registry, shutdown).await,
        Err(e) => tracing::error!(
            error = %e,
            service = %opts.service,
            "no Kubernetes client (neither in-cluster nor kubeconfig); discovery from \
             EndpointSlices is off"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hotprefix_protocol::Salt;
    use hotprefix_protocol::cluster::{Registration, SCHEMA_VERSION};
    use k8s_openapi::api::core::v1::ObjectReference;
    use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointPort};
    use kube::api::ObjectMeta;

    fn ep(
        pod: Option<&str>,
        address: &str,
        ready: Option<bool>,
        terminating: Option<bool>,
    ) -> Endpoint {
        Endpoint {
            addresses: vec![address.to_string()],
            conditions: Some(EndpointConditions {
                ready,
                serving: ready,
                terminating,
            }),
            target_ref: pod.map(|p| ObjectReference {
                kind: Some("Pod".into()),
                name: Some(p.into()),
                ..ObjectReference::default()
            }),
            ..Endpoint::default()
        }
    }

    fn slice(name: &str, ports: &[(&str, i32)], endpoints: Vec<Endpoint>) -> EndpointSlice {
        EndpointSlice {
            address_type: "IPv4".into(),
            endpoints,
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p)| EndpointPort {
                        name: Some((*n).into()),
                        port: Some(*p),
                        protocol: Some("TCP".into()),
                        ..EndpointPort::default()
                    })
                    .collect(),
            ),
        }
    }

    fn m(pairs: &[(&str, &str)]) -> Vec<(ReplicaId, String)> {
        pairs
            .iter()
            .map(|(id, url)| (ReplicaId((*id).into()), (*url).into()))
            .collect()
    }

    #[test]
    fn ready_endpoints_only() {
        let s = slice(
            "engine-abc",
            &[("metrics", 9090), ("http", 8000)],
            vec![
                ep(Some("engine-0"), "10.0.0.1", Some(true), Some(false)),
                // Absent conditions mean ready, per the API.
                ep(Some("engine-1"), "10.0.0.2", None, None),
                ep(Some("engine-2"), "10.0.0.3", Some(false), None),
                // Ready but terminating (a Service publishing not-ready addresses).
                ep(Some("engine-3"), "10.0.0.4", Some(true), Some(true)),
                Endpoint {
                    conditions: None,
                    ..ep(Some("engine-4"), "10.0.0.5", None, None)
                },
            ],
        );
        assert_eq!(
            members([&s], &PortSpec::default()),
            m(&[
                ("engine-0", "http://10.0.0.1:8000"),
                ("engine-1", "http://10.0.0.2:8000"),
                ("engine-4", "http://10.0.0.5:8000"),
            ])
        );
    }

    #[test]
    fn several_slices_of_one_service() {
        let a = slice(
            "engine-a",
            &[("http", 8000)],
            vec![ep(Some("engine-0"), "10.0.0.1", Some(true), None)],
        );
        let b = slice(
            "engine-b",
            &[("http", 8000)],
            vec![
                ep(Some("engine-1"), "10.0.0.2", Some(true), None),
                // The same pod briefly in two slices: counted once, first slice wins.
                ep(Some("engine-0"), "10.0.0.9", Some(true), None),
            ],
        );
        let empty = slice("engine-c", &[("http", 8000)], vec![]);
        assert_eq!(
            members([&a, &b, &empty], &PortSpec::default()),
            m(&[
                ("engine-0", "http://10.0.0.1:8000"),
                ("engine-1", "http://10.0.0.2:8000"),
            ])
        );
        assert!(members([], &PortSpec::default()).is_empty());
    }

    #[test]
    fn ids_without_a_target_ref() {
        let s = slice(
            "engine-a",
            &[("http", 8000)],
            vec![
                Endpoint {
                    hostname: Some("engine-7".into()),
                    ..ep(None, "10.0.0.7", Some(true), None)
                },
                ep(None, "10.0.0.8", Some(true), None),
                // A target reference without a name falls back like a missing one.
                Endpoint {
                    target_ref: Some(ObjectReference::default()),
                    ..ep(None, "10.0.0.9", Some(true), None)
                },
                // No address at all: nothing to route to.
                Endpoint {
                    addresses: vec![],
                    ..ep(Some("engine-x"), "", Some(true), None)
                },
            ],
        );
        assert_eq!(
            members([&s], &PortSpec::default()),
            m(&[
                ("10.0.0.8", "http://10.0.0.8:8000"),
                ("10.0.0.9", "http://10.0.0.9:8000"),
                ("engine-7", "http://10.0.0.7:8000"),
            ])
        );
    }

    #[test]
    fn named_and_numeric_ports() {
        let s = slice(
            "engine-a",
            &[("grpc", 9000), ("http", 8000)],
            vec![ep(Some("engine-0"), "10.0.0.1", Some(true), None)],
        );
        let with = |port: &str| members([&s], &port.parse().unwrap());
        assert_eq!(with("grpc"), m(&[("engine-0", "http://10.0.0.1:9000")]));
        assert_eq!(with("8080"), m(&[("engine-0", "http://10.0.0.1:8080")]));
        // A name the slice lacks: its endpoints are not guessed at some other port.
        assert!(with("web").is_empty());
        // A UDP port of the right name is not the engines' HTTP port.
        let mut udp = s.clone();
        for p in udp.ports.iter_mut().flatten() {
            p.protocol = Some("UDP".into());
        }
        assert!(members([&udp], &PortSpec::default()).is_empty());
        // Without any ports only a number works.
        let bare = EndpointSlice { ports: None, ..s };
        assert!(members([&bare], &PortSpec::default()).is_empty());
        assert_eq!(
            members([&bare], &PortSpec::Number(8000)),
            m(&[("engine-0", "http://10.0.0.1:8000")])
        );
    }

    #[test]
    fn ipv6_addresses_are_bracketed() {
        let s = EndpointSlice {
            address_type: "IPv6".into(),
            ..slice(
                "engine-a",
                &[("http", 8000)],
                vec![ep(Some("engine-0"), "fd00::1", Some(true), None)],
            )
        };
        assert_eq!(
            members([&s], &PortSpec::default()),
            m(&[("engine-0", "http://[fd00::1]:8000")])
        );
    }

    #[test]
    fn port_specs_parse() {
        assert_eq!("http".parse(), Ok(PortSpec::Named("http".into())));
        assert_eq!("8000".parse(), Ok(PortSpec::Number(8000)));
        assert_eq!("h2c-web".parse(), Ok(PortSpec::Named("h2c-web".into())));
        for bad in [
            "",
            "0",
            "65536",
            "HTTP",
            "-http",
            "http-",
            "a b",
            &"a".repeat(64),
        ] {
            assert!(bad.parse::<PortSpec>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn complete_lists_are_published_and_resynced() {
        let registry = Registry::new(2);
        registry.add_static("http://static:8000");
        let opts = KubernetesOptions {
            service: "engine".into(),
            namespace: "default".into(),
            port: PortSpec::default(),
        };
        let s = |name: &str, pod: &str| {
            slice(
                name,
                &[("http", 8000)],
                vec![ep(Some(pod), "10.0.0.1", Some(true), None)],
            )
        };
        let ids = |r: &Registry| {
            r.targets()
                .into_iter()
                .map(|(id, _)| id.0)
                .collect::<Vec<_>>()
        };
        let mut view = View::default();
        for event in [Event::Init, Event::InitApply(s("a", "engine-0"))] {
            assert!(!view.apply(event));
        }
        assert!(view.apply(Event::InitDone));
        view.publish(&opts, &registry);
        assert_eq!(ids(&registry), ["engine-0", "static:8000"]);
        // A relist keeps the old membership until it completes, then replaces it whole.
        view.apply(Event::Init);
        view.apply(Event::InitApply(s("b", "engine-1")));
        assert_eq!(ids(&registry), ["engine-0", "static:8000"]);
        assert!(view.apply(Event::InitDone));
        view.publish(&opts, &registry);
        assert_eq!(ids(&registry), ["engine-1", "static:8000"]);
        // engine-1 registers in Redis (the entry becomes a Redis replica), then its registration
        // expires while its endpoint stays ready: a resync brings it back.
        registry.register(&Registration {
            schema: SCHEMA_VERSION,
            replica: ReplicaId("engine-1".into()),
            url: "http://10.0.0.1:8000".into(),
            model: "m".into(),
            block_size: 16,
            salt: Salt(1),
            block_hash_scheme: 1,
            started_at_ms: 1,
            version: "0".into(),
        });
        assert!(registry.remove_dynamic(&ReplicaId("engine-1".into())));
        assert_eq!(ids(&registry), ["static:8000"]);
        view.resync(&registry);
        assert_eq!(ids(&registry), ["engine-1", "static:8000"]);
        assert!(view.apply(Event::Delete(s("b", "engine-1"))));
        view.publish(&opts, &registry);
        assert_eq!(ids(&registry), ["static:8000"]);
    }
}
