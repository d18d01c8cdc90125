//! HotPrefix's router: sends each OpenAI-style request to the engine replica that already holds
//! its prefix, from the hotness summaries the engines publish through Redis.
//!
//! The routing core ([`cluster`], [`policy`]) does no I/O, so the simulator runs the same
//! policies on simulated engines.

pub mod cluster;
pub mod policy;
