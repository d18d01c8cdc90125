//! HotPrefix's router: sends each OpenAI-style request to the engine replica that already holds
//! its prefix, from the hotness summaries the engines publish through Redis.
//!
//! The routing core ([`cluster`], [`policy`]) does no I/O, so the simulator runs the same
//! policies on simulated engines. [`registry`] is the live view of the replicas, fed by
//! [`redis_feed`] and [`health`]; [`server`] is the HTTP proxy; [`launch`] wires them from a
//! [`config::RouterConfig`].

pub mod cluster;
pub mod config;
pub mod health;
pub mod kubernetes;
pub mod launch;
pub mod metrics;
pub mod policy;
pub mod redis_feed;
pub mod registry;
pub mod server;
