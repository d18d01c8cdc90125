//! HotPrefix's trace-driven cluster simulator: replays request traces through N engine replicas,
//! each driving the real `hotprefix-cache` crate, behind the router's own routing policies
//! (`hotprefix-router`), on a stated cost model, and reports hit ratios, TTFT, throughput and
//! bytes moved per policy.
//!
//! Entry points: [`cluster::simulate`] runs one policy on one trace; [`optimal::belady`] computes
//! the offline hit-ratio bound; the `hotprefix-bench` binary (`src/main.rs`) wires them to the
//! command line, and [`report`] writes tables, CSV and plots. [`load`] replays a workload
//! against a running engine over HTTP (`hotprefix-bench load`).

pub mod cluster;
pub mod cost;
pub mod load;
pub mod optimal;
pub mod report;
pub mod trace;
pub mod workload;
