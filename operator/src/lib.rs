//! The HotPrefix operator: the `HotPrefixService` custom resource and the controller that turns
//! one into running engines, a router and Redis.
//!
//! `crd` defines the resource, `validate` checks what its schema cannot, `resources` builds the
//! children (pure functions), `status` computes the status from what the API server returned,
//! `controller` reconciles, `leader` elects one active replica over a Lease, and `server` and
//! `metrics` are the binary's HTTP surface and metrics (its logs and traces are
//! `hotprefix-telemetry`'s, shared with the engine and the router).

pub mod controller;
pub mod crd;
pub mod leader;
pub mod metrics;
pub mod quantity;
pub mod render;
pub mod resources;
pub mod server;
pub mod status;
pub mod validate;
