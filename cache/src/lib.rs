//! HotPrefix's tiered prefix KV cache: a radix tree of KV blocks over two tiers (device and host
//! memory), scheduled by hotness.
//!
//! The cache *decides* and the caller *executes*: it hands out block slots, plans copies between
//! tiers ([`Transfer`]) and tracks their in-flight state, but performs no I/O, knows nothing of
//! GPUs, HTTP or Redis, and needs no async runtime. The engine drives it between scheduler steps;
//! the simulator drives the very same code against a cost model.
//!
//! # Driving it
//! 1. [`PrefixCache::match_prefix`] (tokens) or [`PrefixCache::match_hashes`] (block hashes, as
//!    the simulator and router use) returns a [`Match`]: device slots of the cached prefix, the
//!    host-only part whose load it started, and a [`Lease`] that locks the path.
//! 2. [`PrefixCache::allocate`] gives slots for the uncached remainder (evicting by policy);
//!    [`PrefixCache::insert`] adds each full block once computed; [`PrefixCache::release`] ends
//!    the request.
//! 3. [`PrefixCache::take_transfers`] lists copies to issue; [`PrefixCache::complete_transfer`]
//!    reports them done. [`PrefixCache::tick`] runs periodic promotion.
//! 4. [`PrefixCache::summary`] exports the hottest prefixes for the router.
//!
//! # Hotness
//! Every node of the tree carries `H(t) = sum over accesses a of 2^(-(t - t_a) / half_life)`:
//! one per request that matched through the node or inserted into it, halving every
//! `half_life_s` seconds (default 600 s). It is stored as the time-invariant key
//! `log2(H) + t / half_life` (see [`hotness`]), so it is decayed lazily in O(1) and the relative
//! order of nodes never changes between accesses. A match counts on every node of its path, so
//! an ancestor is at least as hot as any descendant it was reached through.
//!
//! The `hotprefix` policy ranks nodes by *value* = `H(t) * (1 + d / D)`, where `d` is the token
//! depth of the node's last block and `D = depth_weight_tokens`. The factor is the relative cost
//! of recomputing a token at depth `d`: a transformer spends about `2P` FLOPs per token on
//! weights and `4 L d_model d` on attention over `d` tokens of context, and for Llama-3.1-8B
//! (P = 8e9, L = 32, d_model = 4096) the two are equal at d = 30,500. In the log domain the value
//! is `key + log2(1 + d / D)`, still time-invariant. The weighting is off by default (`D = 0`):
//! measured on the Mooncake conversation trace it lowered the hit ratio, because deep blocks
//! are reused less often than their recompute cost pays back (see [`HotnessConfig`]).
//!
//! # Policies
//! See [`policy`]: `hotprefix`, `lru`, `lru-offload`, `reuse-offload`, chosen by
//! [`PolicyKind`] in [`CacheConfig`].

mod alloc;
pub mod config;
mod error;
pub mod hotness;
pub mod policy;
mod stats;
mod tree;

pub use alloc::SlotId;
pub use config::{CacheConfig, HotnessConfig, PolicyKind};
pub use error::CacheError;
pub use stats::CacheStats;
pub use tree::{
    Inserted, Lease, LeaseState, Match, Peek, PrefixCache, ResidentBlock, SummaryEntry, Transfer,
    TransferCause, TransferId, TransferKind, Usage,
};
