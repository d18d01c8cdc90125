//! Leader election over a `coordination.k8s.io/v1` Lease, so that several operator replicas
//! are safe: only the holder reconciles, the others wait to take over.
//!
//! The protocol is client-go's: the holder renews `renewTime` every retry period with an
//! update guarded by the Lease's `resourceVersion` (two candidates racing for it cannot both
//! win: the loser gets 409 Conflict); a candidate takes the Lease over when its record has not
//! changed for `leaseDurationSeconds`, measured on the candidate's own clock from when it first
//! saw that record, so clock skew between machines does not matter. A holder that cannot renew
//! within the renew deadline stops reconciling, since another replica may take over soon after.
//! A holder shutting down releases the Lease (empty holder) so the next one starts at once.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::time::Instant;

/// Timings, with client-go's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTimings {
    /// How long a record must stay unchanged before another candidate may take the Lease.
    pub lease_duration: Duration,
    /// How long the holder keeps leading without a successful renewal.
    pub renew_deadline: Duration,
    /// The pause between attempts to acquire or renew.
    pub retry_period: Duration,
}

impl Default for LeaseTimings {
    fn default() -> Self {
        LeaseTimings {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// The result of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// This candidate holds the Lease (acquired or renewed).
    Leader,
    /// Another candidate holds it (or won a race for it).
    Follower {
        /// The holder, when known.
        holder: Option<String>,
    },
}

/// One candidate's view of one Lease.
#[derive(Debug)]
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    timings: LeaseTimings,
    /// The `resourceVersion` of the record last seen and when it was first seen.
    observed: Option<(String, Instant)>,
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

fn whole_seconds(d: Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

impl LeaseLock {
    /// A candidate `identity` for the Lease `name` of `api`'s namespace.
    pub fn new(api: Api<Lease>, name: &str, identity: &str, timings: LeaseTimings) -> Self {
        LeaseLock {
            api,
            name: name.to_string(),
            identity: identity.to_string(),
            timings,
            observed: None,
        }
    }

    /// This candidate's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The timings.
    pub fn timings(&self) -> LeaseTimings {
        self.timings
    }

    /// Creates the Lease held by this candidate, or takes it over / renews it when allowed.
    pub async fn try_acquire_or_renew(&mut self) -> Result<Attempt, kube::Error> {
        let Some(lease) = self.api.get_opt(&self.name).await? else {
            let t = now();
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(whole_seconds(self.timings.lease_duration)),
                    acquire_time: Some(t.clone()),
                    renew_time: Some(t),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observe(&created);
                    Ok(Attempt::Leader)
                }
                // Another candidate created it first.
                Err(kube::Error::Api(s)) if s.is_already_exists() || s.is_conflict() => {
                    Ok(Attempt::Follower { holder: None })
                }
                Err(e) => Err(e),
            };
        };
        self.observe(&lease);
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let mine = holder.as_deref() == Some(self.identity.as_str());
        if !mine && holder.is_some() && !self.expired(&spec) {
            return Ok(Attempt::Follower { holder });
        }
        let t = now();
        let renewed = LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(whole_seconds(self.timings.lease_duration)),
            acquire_time: if mine {
                spec.acquire_time.clone()
            } else {
                Some(t.clone())
            },
            renew_time: Some(t),
            lease_transitions: Some(spec.lease_transitions.unwrap_or(0) + if mine { 0 } else { 1 }),
            ..spec
        };
        // The update carries the resourceVersion read above: if anyone wrote the Lease since,
        // the API server refuses it and this attempt loses.
        let updated = Lease {
            metadata: lease.metadata.clone(),
            spec: Some(renewed),
        };
        match self
            .api
            .replace(&self.name, &PostParams::default(), &updated)
            .await
        {
            Ok(l) => {
                self.observe(&l);
                Ok(Attempt::Leader)
            }
            Err(kube::Error::Api(s)) if s.is_conflict() => Ok(Attempt::Follower { holder }),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up if this candidate holds it, so another can take it without waiting
    /// for it to expire.
    pub async fn release(&mut self) -> Result<(), kube::Error> {
        let Some(lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        let released = Lease {
            metadata: lease.metadata,
            spec: Some(LeaseSpec {
                holder_identity: None,
                lease_duration_seconds: Some(1),
                renew_time: Some(now()),
                ..spec
            }),
        };
        match self
            .api
            .replace(&self.name, &PostParams::default(), &released)
            .await
        {
            Ok(_) => Ok(()),
            // Someone else wrote it meanwhile: it is not ours to release any more.
            Err(kube::Error::Api(s)) if s.is_conflict() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Remembers when a record was first seen (a new resourceVersion restarts the clock).
    fn observe(&mut self, lease: &Lease) {
        let rv = lease.metadata.resource_version.clone().unwrap_or_default();
        if self.observed.as_ref().is_none_or(|(seen, _)| *seen != rv) {
            self.observed = Some((rv, Instant::now()));
        }
    }

    /// Whether the record seen has stayed unchanged for its lease duration on this clock.
    fn expired(&self, spec: &LeaseSpec) -> bool {
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.timings.lease_duration, Duration::from_secs);
        self.observed
            .as_ref()
            .is_some_and(|(_, at)| at.elapsed() >= duration)
    }
}

/// Tries to acquire the Lease every retry period until this candidate leads. API errors are
/// logged and retried.
pub async fn acquire(lock: &mut LeaseLock) {
    loop {
        match lock.try_acquire_or_renew().await {
            Ok(Attempt::Leader) => {
                tracing::info!(identity = lock.identity(), "acquired the leader lease");
                return;
            }
            Ok(Attempt::Follower { holder }) => {
                tracing::debug!(?holder, "the leader lease is held by another replica");
            }
            Err(e) => tracing::warn!(error = %e, "acquiring the leader lease failed"),
        }
        tokio::time::sleep(lock.timings().retry_period).await;
    }
}

/// Renews the Lease every retry period; returns when leadership is lost: another candidate
/// took the Lease, or no renewal succeeded within the renew deadline.
pub async fn hold(lock: &mut LeaseLock) {
    let mut last_renewal = Instant::now();
    loop {
        tokio::time::sleep(lock.timings().retry_period).await;
        match lock.try_acquire_or_renew().await {
            Ok(Attempt::Leader) => {
                last_renewal = Instant::now();
                continue;
            }
            Ok(Attempt::Follower { holder }) if holder.as_deref() != Some(lock.identity()) => {
                tracing::error!(?holder, "another replica took the leader lease");
                return;
            }
            // A write raced this renewal but the Lease is still ours: try again.
            Ok(Attempt::Follower { .. }) => {
                tracing::warn!("renewing the leader lease raced another write");
            }
            Err(e) => tracing::warn!(error = %e, "renewing the leader lease failed"),
        }
        if last_renewal.elapsed() >= lock.timings().renew_deadline {
            tracing::error!("the leader lease could not be renewed in time");
            return;
        }
    }
}
