//! The tiered radix tree: residency per tier, locks, transfers, eviction and promotion mechanics.
//!
//! Nodes live in an arena and are named by index. Each edge is a run of full blocks named by their
//! chained [`BlockHash`]es; a node's children are keyed by the hash of their first block. Because
//! the hashes are chained, equal hashes mean equal prefixes, so walking the tree compares hashes
//! only (see the collision note in `hotprefix-protocol`).
//!
//! Residency rules, checked by [`PrefixCache::check_invariants`]:
//! - every node but the root is resident (or being written) in at least one tier;
//! - device presence (resident or loading) is prefix-closed: a node on the device has its parent
//!   on the device, so the device part of any match is a prefix followed by the host part;
//! - a node is locked by every lease whose path runs through it, and a locked node is never
//!   evicted from either tier, split apart from its lock, or moved.
//!
//! Candidates for eviction (per tier) and promotion are kept in ordered sets keyed by the
//! policy's time-invariant priority, so every decision is O(log n).

use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

use hotprefix_protocol::{BlockHash, Salt, Tier, hash_blocks};
use serde::Serialize;

use crate::alloc::{SlotId, SlotPool};
use crate::config::CacheConfig;
use crate::error::CacheError;
use crate::hotness::{HotClock, Hotness};
use crate::policy::{self, NodeInfo, Policy};
use crate::stats::CacheStats;

const ROOT: u32 = 0;

/// Placeholder in a loading node's state until its transfer is planned (ids start at 1).
const PENDING_TRANSFER: TransferId = TransferId(0);

static NEXT_CACHE_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Hasher for maps keyed by [`BlockHash`]. Real block hashes are already uniform, but trace ids
/// replayed by the simulator are small consecutive integers, so one multiply-xorshift round
/// spreads them over the high bits that hashbrown's probing uses.
#[derive(Default, Clone, Copy)]
struct BlockHashHasher(u64);

impl Hasher for BlockHashHasher {
    fn finish(&self) -> u64 {
        let x = self.0.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x ^ (x >> 29)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8 | u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type ChildMap = HashMap<BlockHash, u32, BuildHasherDefault<BlockHashHasher>>;

/// Names one transfer between tiers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct TransferId(pub u64);

/// Direction of a transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum TransferKind {
    /// Host to device.
    Load,
    /// Device to host.
    Store,
}

/// Why a transfer was planned; the engine may prioritise `Hit` loads, which a request waits on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum TransferCause {
    /// A request matched host-resident blocks and waits for them.
    Hit,
    /// Periodic promotion of hot host-only prefixes.
    Promotion,
    /// A node evicted from the device was admitted to the host.
    Eviction,
    /// A hot device node is copied to the host ahead of its eviction.
    WriteThrough,
}

/// A copy the engine must perform and then report with [`PrefixCache::complete_transfer`].
///
/// Ordering contract for stores: an `Eviction` store reads device slots that the cache has
/// already handed back to its free list. The engine must issue the copy before anything else
/// writes those slots (on CUDA: enqueue it on the copy stream and make the compute stream wait on
/// its event before the next step; on CPU: copy synchronously). Loads write device slots that no
/// one reads until the transfer completes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transfer {
    /// Identity to report completion with.
    pub id: TransferId,
    /// Direction.
    pub kind: TransferKind,
    /// Why.
    pub cause: TransferCause,
    /// `(source slot, destination slot)` pairs: host to device for loads, device to host for
    /// stores.
    pub copies: Vec<(SlotId, SlotId)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DevState {
    Absent,
    Ready,
    Loading(TransferId),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HostState {
    Absent,
    Ready,
    Writing(TransferId),
}

/// Ordered-set key: priority (total order on f64) then node index.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Key(f64, u32);

impl Eq for Key {}
impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Key {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0).then(self.1.cmp(&other.1))
    }
}

#[derive(Debug)]
struct Node {
    alive: bool,
    parent: u32,
    hashes: Vec<BlockHash>,
    children: ChildMap,
    dev: DevState,
    dev_slots: Vec<SlotId>,
    host: HostState,
    host_slots: Vec<SlotId>,
    /// Leases whose path runs through this node.
    lock: u32,
    /// Children whose device state is not `Absent`.
    dev_children: u32,
    /// Whether this node's device copy cannot be evicted for now regardless of locks: it is
    /// loading, or a write-through store is reading it.
    pinned: bool,
    /// Whether a write-through store reads this node's current device slots.
    store_source: bool,
    /// Children whose subtree holds a pinned node (they keep this one from becoming a device
    /// leaf, so its blocks are not reclaimable).
    pinned_below: u32,
    /// Device blocks of this node counted in `PrefixCache::reclaimable`.
    reclaim: usize,
    hot: Hotness,
    last_access: f64,
    accesses: u32,
    /// Blocks from the root to the end of this node.
    depth_end: u64,
    dev_key: Option<Key>,
    host_key: Option<Key>,
    promo_key: Option<Key>,
}

impl Node {
    fn new(parent: u32, hashes: Vec<BlockHash>, depth_end: u64) -> Node {
        Node {
            alive: true,
            parent,
            hashes,
            children: ChildMap::default(),
            dev: DevState::Absent,
            dev_slots: Vec::new(),
            host: HostState::Absent,
            host_slots: Vec::new(),
            lock: 0,
            dev_children: 0,
            pinned: false,
            store_source: false,
            pinned_below: 0,
            reclaim: 0,
            hot: Hotness::default(),
            last_access: f64::NEG_INFINITY,
            accesses: 0,
            depth_end,
            dev_key: None,
            host_key: None,
            promo_key: None,
        }
    }

    fn len(&self) -> usize {
        self.hashes.len()
    }

    fn dev_present(&self) -> bool {
        self.dev != DevState::Absent
    }
}

/// A request's hold on a matched (and later extended) prefix path. Everything on the path stays
/// resident until the lease is given back with [`PrefixCache::release`]. Not `Clone`, so it
/// cannot be released twice.
#[derive(Debug, PartialEq, Eq)]
pub struct Lease {
    cache: u64,
    node: u32,
    blocks: usize,
}

impl Lease {
    /// Blocks covered by the lease: the matched prefix plus everything inserted through it.
    pub fn blocks(&self) -> usize {
        self.blocks
    }
}

/// Whether a lease's blocks can be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseState {
    /// Every block is on the device.
    Ready,
    /// Some blocks are still being loaded from the host.
    Loading,
}

/// Result of [`PrefixCache::match_hashes`].
#[derive(Debug)]
pub struct Match {
    /// The hold on the matched path; pass it to `insert` and finally to `release`.
    pub lease: Lease,
    /// Matched blocks already on the device, including blocks still being loaded there by an
    /// earlier match or a promotion (see [`PrefixCache::lease_transfers`]).
    pub device_blocks: usize,
    /// Matched blocks found only on the host; this match started their load.
    pub host_blocks: usize,
    /// Device slots of every matched block, in order (loading ones included).
    pub slots: Vec<SlotId>,
    /// The load this match started, if any. The request must wait for it, and also for loads
    /// that others started on its path: [`PrefixCache::lease_state`] says when all are done.
    pub load: Option<TransferId>,
    /// Prompt tokens covered by the match (capped at the query length).
    pub cached_tokens: usize,
}

impl Match {
    /// Total matched blocks.
    pub fn blocks(&self) -> usize {
        self.device_blocks + self.host_blocks
    }
}

/// Result of a read-only [`PrefixCache::peek`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Peek {
    /// Leading blocks present on the device.
    pub device_blocks: usize,
    /// Following blocks present on the host only.
    pub host_blocks: usize,
}

/// Result of [`PrefixCache::insert`].
#[derive(Debug, PartialEq, Eq)]
pub struct Inserted {
    /// Leading blocks of the input now held by the tree (and by the lease). The caller keeps
    /// ownership of the slots of the blocks after them (a concurrent load is in flight on that
    /// part of the tree); it may retry the insert later or `free` them.
    pub merged: usize,
    /// Device slots to use for the merged blocks. Where the tree already held a block, its slot
    /// replaces the caller's (which went back to the free list): the KV is identical.
    pub slots: Vec<SlotId>,
}

/// One entry of a hotness summary.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SummaryEntry {
    /// Chained hash of the block (names the whole prefix up to it).
    pub hash: BlockHash,
    /// Best tier holding it.
    pub tier: Tier,
    /// Decayed access count now.
    pub hotness: f64,
    /// 1-based block index of this block from the root.
    pub depth: u64,
}

/// One resident block, for debugging and tests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ResidentBlock {
    /// The block's chained hash.
    pub hash: BlockHash,
    /// On the device and readable.
    pub device_ready: bool,
    /// Being loaded to the device.
    pub device_loading: bool,
    /// On the host and readable.
    pub host_ready: bool,
    /// Being written to the host.
    pub host_writing: bool,
    /// Its device copy is the source of an in-flight write-through store (so it cannot be
    /// evicted until that finishes).
    pub store_source: bool,
    /// Held by at least one lease.
    pub locked: bool,
}

/// Occupancy of both tiers, in blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Device slots in all.
    pub device_capacity: u32,
    /// Device slots free.
    pub device_free: usize,
    /// Device slots held by the tree.
    pub device_cached: usize,
    /// Device slots handed out by `allocate` and not yet inserted or freed.
    pub device_outstanding: usize,
    /// Host slots in all.
    pub host_capacity: u32,
    /// Host slots free.
    pub host_free: usize,
    /// Host slots of dropped nodes whose store is still in flight; free once it finishes.
    pub host_held: usize,
    /// Tree nodes, root excluded.
    pub nodes: usize,
}

#[derive(Debug)]
struct InFlight {
    kind: TransferKind,
    cause: TransferCause,
    nodes: Vec<u32>,
}

/// The tiered prefix cache. Single-threaded by design: the engine's scheduler owns it and calls
/// it between steps; nothing here blocks or performs I/O.
#[derive(Debug)]
pub struct PrefixCache {
    cfg: CacheConfig,
    policy: Box<dyn Policy>,
    nodes: Vec<Node>,
    free_nodes: Vec<u32>,
    dev_pool: SlotPool,
    host_pool: SlotPool,
    outstanding: usize,
    /// Which device slots `allocate` handed out and were not yet inserted or freed.
    handed_out: Vec<bool>,
    dev_set: BTreeSet<Key>,
    host_set: BTreeSet<Key>,
    promo_set: BTreeSet<Key>,
    inflight: HashMap<TransferId, InFlight>,
    pending: Vec<Transfer>,
    next_transfer: u64,
    next_promotion: f64,
    /// Identity stamped on leases, so a lease given to the wrong cache is caught.
    id: u64,
    /// Device blocks that evictions could free right now (see `reclaimable_device_blocks`).
    reclaimable: usize,
    /// Host slots of nodes dropped while their store was in flight: the copy may still write
    /// them, so they return to the free list only when that transfer completes or fails.
    host_slots_after: HashMap<TransferId, Vec<SlotId>>,
    /// Blocks handed out by `allocate` so far: the churn clock's input.
    allocated_blocks: u64,
    clock: HotClock,
    stats: CacheStats,
}

impl PrefixCache {
    /// Builds an empty cache.
    pub fn new(cfg: CacheConfig) -> Result<Self, CacheError> {
        cfg.validate()?;
        let policy = policy::build(cfg.policy, &cfg.hotness);
        let host_blocks = if policy.uses_host() {
            cfg.host_blocks
        } else {
            0
        };
        let mut root = Node::new(ROOT, Vec::new(), 0);
        root.dev = DevState::Ready;
        let device_blocks = cfg.device_blocks as usize;
        let capacity = u64::from(cfg.device_blocks) + u64::from(host_blocks);
        let h = &cfg.hotness;
        let clock = match h.half_life_turnovers {
            Some(t) => HotClock::new(t, capacity as f64),
            None => HotClock::new(h.half_life_s, 1.0),
        };
        Ok(PrefixCache {
            dev_pool: SlotPool::new(cfg.device_blocks),
            host_pool: SlotPool::new(host_blocks),
            cfg,
            policy,
            nodes: vec![root],
            free_nodes: Vec::new(),
            outstanding: 0,
            handed_out: vec![false; device_blocks],
            dev_set: BTreeSet::new(),
            host_set: BTreeSet::new(),
            promo_set: BTreeSet::new(),
            inflight: HashMap::new(),
            pending: Vec::new(),
            next_transfer: 1,
            next_promotion: f64::NEG_INFINITY,
            id: NEXT_CACHE_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            reclaimable: 0,
            host_slots_after: HashMap::new(),
            allocated_blocks: 0,
            clock,
            stats: CacheStats::default(),
        })
    }

    /// The configuration the cache was built with.
    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }

    /// Counters since creation.
    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    /// Tier occupancy now.
    pub fn usage(&self) -> Usage {
        let device_free = self.dev_pool.free_count();
        Usage {
            device_capacity: self.dev_pool.capacity(),
            device_free,
            device_cached: self.dev_pool.capacity() as usize - device_free - self.outstanding,
            device_outstanding: self.outstanding,
            host_capacity: self.host_pool.capacity(),
            host_free: self.host_pool.free_count(),
            host_held: self.host_slots_after.values().map(Vec::len).sum(),
            nodes: self.nodes.len() - self.free_nodes.len() - 1,
        }
    }

    /// Device blocks that `allocate` could free by evicting right now: ready, unlocked, and with
    /// nothing loading or being written below them.
    pub fn reclaimable_device_blocks(&self) -> usize {
        self.reclaimable
    }

    // ----- node bookkeeping -------------------------------------------------------------------

    fn info(&self, id: u32) -> NodeInfo {
        let n = &self.nodes[id as usize];
        NodeInfo {
            hotness: n.hot,
            last_access: n.last_access,
            accesses: n.accesses,
            depth_tokens: n.depth_end * self.cfg.block_tokens as u64,
        }
    }

    fn alloc_node(&mut self, node: Node) -> u32 {
        if let Some(id) = self.free_nodes.pop() {
            self.nodes[id as usize] = node;
            id
        } else {
            self.nodes.push(node);
            (self.nodes.len() - 1) as u32
        }
    }

    /// Recomputes which candidate sets `id` belongs to, and with which priority.
    fn refresh(&mut self, id: u32) {
        if id == ROOT || !self.nodes[id as usize].alive {
            return;
        }
        let n = &self.nodes[id as usize];
        let pinned = matches!(n.dev, DevState::Loading(_)) || n.store_source;
        if pinned != n.pinned {
            let before = n.pinned || n.pinned_below > 0;
            let after = pinned || n.pinned_below > 0;
            self.nodes[id as usize].pinned = pinned;
            if before != after {
                self.propagate_pinned(id, after);
            }
        }
        let info = self.info(id);
        let n = &self.nodes[id as usize];
        let reclaim = if n.dev == DevState::Ready && n.lock == 0 && !pinned && n.pinned_below == 0 {
            n.len()
        } else {
            0
        };
        self.reclaimable = self.reclaimable + reclaim - n.reclaim;
        let parent_dev = self.nodes[n.parent as usize].dev_present();
        let want_dev = n.dev == DevState::Ready && n.lock == 0 && n.dev_children == 0 && !pinned;
        let want_host = n.host == HostState::Ready
            && n.lock == 0
            && (n.dev == DevState::Ready || (n.dev == DevState::Absent && n.children.is_empty()));
        let promotes = self.policy.promotion().is_some();
        let want_promo =
            promotes && n.host == HostState::Ready && n.dev == DevState::Absent && parent_dev;
        let dev_prio = self.policy.device_priority(&info);
        let dev_key = want_dev.then_some(Key(dev_prio, id));
        let host_key = want_host.then(|| Key(self.policy.host_priority(&info), id));
        let promo_key = want_promo.then_some(Key(dev_prio, id));
        let (old_dev, old_host, old_promo) = (n.dev_key, n.host_key, n.promo_key);
        Self::update_set(&mut self.dev_set, old_dev, dev_key);
        Self::update_set(&mut self.host_set, old_host, host_key);
        Self::update_set(&mut self.promo_set, old_promo, promo_key);
        let n = &mut self.nodes[id as usize];
        n.dev_key = dev_key;
        n.host_key = host_key;
        n.promo_key = promo_key;
        n.reclaim = reclaim;
    }

    /// Whether `id`'s subtree holds a pinned node (`has`) changed: its parent counts it in
    /// `pinned_below`, and so on up while an ancestor's own answer flips. Stopping at the first
    /// ancestor that does not flip keeps a deep chain of loads linear, not quadratic.
    fn propagate_pinned(&mut self, id: u32, has: bool) {
        let mut cur = self.nodes[id as usize].parent;
        while cur != ROOT {
            let n = &mut self.nodes[cur as usize];
            let before = n.pinned || n.pinned_below > 0;
            if has {
                n.pinned_below += 1;
            } else {
                n.pinned_below -= 1;
            }
            let after = n.pinned || n.pinned_below > 0;
            let parent = n.parent;
            // Its own `pinned` is unchanged, so this refresh does not propagate again.
            self.refresh(cur);
            if before == after {
                break;
            }
            cur = parent;
        }
    }

    fn update_set(set: &mut BTreeSet<Key>, old: Option<Key>, new: Option<Key>) {
        if old == new {
            return;
        }
        if let Some(k) = old {
            set.remove(&k);
        }
        if let Some(k) = new {
            set.insert(k);
        }
    }

    fn refresh_children(&mut self, id: u32) {
        if self.policy.promotion().is_none() {
            return;
        }
        let kids: Vec<u32> = self.nodes[id as usize].children.values().copied().collect();
        for c in kids {
            self.refresh(c);
        }
    }

    /// Changes a node's device state, keeping the parent's `dev_children` and the candidate sets
    /// of the node, its parent and its children right.
    fn set_dev(&mut self, id: u32, state: DevState) {
        let n = &mut self.nodes[id as usize];
        let was = n.dev_present();
        n.dev = state;
        let is = n.dev_present();
        let parent = n.parent;
        if was != is {
            let p = &mut self.nodes[parent as usize];
            if is {
                p.dev_children += 1;
            } else {
                p.dev_children -= 1;
            }
            self.refresh(parent);
            self.refresh_children(id);
        }
        self.refresh(id);
    }

    /// What drives the hotness clock at wall time `now`: seconds, or blocks allocated.
    fn clock_input(&self, now: f64) -> f64 {
        if self.cfg.hotness.half_life_turnovers.is_some() {
            self.allocated_blocks as f64
        } else {
            now
        }
    }

    /// The hotness clock at wall time `now`, in half-lives.
    fn hot_now(&self, now: f64) -> f64 {
        self.clock.at(self.clock_input(now))
    }

    fn touch(&mut self, id: u32, now: f64) {
        let clock = self.hot_now(now);
        let n = &mut self.nodes[id as usize];
        n.hot.touch(clock);
        n.last_access = n.last_access.max(now);
        n.accesses = n.accesses.saturating_add(1);
    }

    /// Adds `delta` to the lock count of `from` and its ancestors up to, but excluding, `until`
    /// (the root for a whole path).
    fn add_lock(&mut self, from: u32, until: u32, delta: i32) {
        let mut cur = from;
        while cur != until && cur != ROOT {
            let n = &mut self.nodes[cur as usize];
            n.lock = n.lock.checked_add_signed(delta).unwrap_or_else(|| {
                debug_assert!(false, "lock count of node {cur} out of range");
                0
            });
            let parent = n.parent;
            self.refresh(cur);
            cur = parent;
        }
    }

    /// Splits `id` after its first `k` blocks. The *lower* part keeps the index `id` (so leases
    /// ending at it stay valid); the new upper part is returned. Both keep the lock count,
    /// hotness and in-flight transfer of the original.
    fn split(&mut self, id: u32, k: usize) -> u32 {
        let (parent, upper) = {
            let n = &mut self.nodes[id as usize];
            debug_assert!(k > 0 && k < n.len());
            let hashes: Vec<BlockHash> = n.hashes.drain(..k).collect();
            let mut upper = Node::new(n.parent, hashes, n.depth_end - (n.len() as u64));
            if !n.dev_slots.is_empty() {
                upper.dev_slots = n.dev_slots.drain(..k).collect();
            }
            if !n.host_slots.is_empty() {
                upper.host_slots = n.host_slots.drain(..k).collect();
            }
            upper.dev = n.dev;
            upper.host = n.host;
            upper.lock = n.lock;
            upper.dev_children = u32::from(n.dev_present());
            // The upper part is not counted as pinned yet: `refresh` below counts it (and adds it
            // to its ancestors) if it is.
            upper.pinned_below = u32::from(n.pinned || n.pinned_below > 0);
            upper.store_source = n.store_source;
            upper.hot = n.hot;
            upper.last_access = n.last_access;
            upper.accesses = n.accesses;
            (n.parent, upper)
        };
        let first = upper.hashes[0];
        let lower_first = self.nodes[id as usize].hashes[0];
        let (dev, host) = (upper.dev, upper.host);
        let u = self.alloc_node(upper);
        self.nodes[u as usize].children.insert(lower_first, id);
        self.nodes[id as usize].parent = u;
        self.nodes[parent as usize].children.insert(first, u);
        let transfers = [
            if let DevState::Loading(t) = dev {
                Some(t)
            } else {
                None
            },
            if let HostState::Writing(t) = host {
                Some(t)
            } else {
                None
            },
        ];
        for t in transfers.into_iter().flatten() {
            if let Some(f) = self.inflight.get_mut(&t) {
                f.nodes.push(u);
            }
        }
        self.refresh(u);
        self.refresh(id);
        u
    }

    /// Removes a childless node, freeing whatever slots it still holds.
    fn remove_node(&mut self, id: u32) {
        debug_assert!(id != ROOT && self.nodes[id as usize].children.is_empty());
        let n = &mut self.nodes[id as usize];
        let parent = n.parent;
        let first = n.hashes[0];
        let dev_present = n.dev_present();
        let dev_slots = std::mem::take(&mut n.dev_slots);
        let host_slots = std::mem::take(&mut n.host_slots);
        let keys = (n.dev_key.take(), n.host_key.take(), n.promo_key.take());
        let (pinned, reclaim, host) = (n.pinned || n.pinned_below > 0, n.reclaim, n.host);
        n.alive = false;
        n.hashes = Vec::new();
        n.pinned = false;
        n.store_source = false;
        n.reclaim = 0;
        self.reclaimable -= reclaim;
        if pinned {
            self.propagate_pinned(id, false);
        }
        self.dev_pool.give_back(dev_slots);
        match host {
            HostState::Writing(t) if self.inflight.contains_key(&t) => {
                self.host_slots_after
                    .entry(t)
                    .or_default()
                    .extend(host_slots);
            }
            _ => self.host_pool.give_back(host_slots),
        }
        Self::update_set(&mut self.dev_set, keys.0, None);
        Self::update_set(&mut self.host_set, keys.1, None);
        Self::update_set(&mut self.promo_set, keys.2, None);
        let p = &mut self.nodes[parent as usize];
        p.children.remove(&first);
        if dev_present {
            p.dev_children -= 1;
        }
        self.free_nodes.push(id);
        self.refresh(parent);
    }

    /// Removes `id` and everything below it. Host blocks dropped this way count as host
    /// evictions.
    fn remove_subtree(&mut self, id: u32) {
        let mut stack = vec![id];
        let mut order = Vec::new();
        while let Some(x) = stack.pop() {
            order.push(x);
            stack.extend(self.nodes[x as usize].children.values().copied());
        }
        for &x in order.iter().rev() {
            let n = &self.nodes[x as usize];
            self.stats.host_evicted_blocks += n.host_slots.len() as u64;
            self.stats.device_evicted_blocks += n.dev_slots.len() as u64;
            self.remove_node(x);
        }
    }

    fn new_transfer(
        &mut self,
        kind: TransferKind,
        cause: TransferCause,
        nodes: Vec<u32>,
        copies: Vec<(SlotId, SlotId)>,
    ) -> TransferId {
        let id = TransferId(self.next_transfer);
        self.next_transfer += 1;
        let bytes = copies.len() as u64 * self.cfg.block_bytes;
        match kind {
            TransferKind::Load => self.stats.h2d_bytes += bytes,
            TransferKind::Store => self.stats.d2h_bytes += bytes,
        }
        self.inflight.insert(id, InFlight { kind, cause, nodes });
        self.pending.push(Transfer {
            id,
            kind,
            cause,
            copies,
        });
        id
    }

    // ----- eviction and admission -------------------------------------------------------------

    /// Finds host slots for `id` under the policy's admission rule, evicting colder host nodes.
    fn admit_to_host(&mut self, id: u32, now: f64) -> Option<Vec<SlotId>> {
        let need = self.nodes[id as usize].len();
        if need > self.host_pool.capacity() as usize {
            return None;
        }
        let info = self.info(id);
        let now = self.hot_now(now);
        let free = self.host_pool.free_count();
        if free >= need {
            return if self.policy.admit(&info, now, None) {
                self.host_pool.take(need)
            } else {
                None
            };
        }
        // Decide before dropping anything: every victim needed must lose to the newcomer.
        let mut victims = Vec::new();
        let mut room = free;
        for v in &self.host_set {
            if room >= need {
                break;
            }
            if !self.policy.admit(&info, now, Some(v.0)) {
                return None;
            }
            victims.push(v.1);
            room += self.nodes[v.1 as usize].len();
        }
        if room < need {
            return None;
        }
        for v in victims {
            self.evict_host(v);
        }
        self.host_pool.take(need)
    }

    fn evict_host(&mut self, id: u32) {
        let n = &mut self.nodes[id as usize];
        debug_assert_eq!(n.host, HostState::Ready);
        let slots = std::mem::take(&mut n.host_slots);
        n.host = HostState::Absent;
        self.stats.host_evicted_blocks += slots.len() as u64;
        self.host_pool.give_back(slots);
        if self.nodes[id as usize].dev == DevState::Absent {
            self.remove_node(id);
        } else {
            self.refresh(id);
        }
    }

    fn evict_device(&mut self, id: u32, now: f64) {
        let len = self.nodes[id as usize].len() as u64;
        self.stats.device_evicted_blocks += len;
        let has_host_copy = self.nodes[id as usize].host != HostState::Absent;
        let admitted = if has_host_copy || !self.policy.uses_host() {
            None
        } else {
            let got = self.admit_to_host(id, now);
            if got.is_none() {
                self.stats.rejected_blocks += len;
            }
            got
        };
        if let Some(host_slots) = admitted {
            self.plan_store(id, host_slots, TransferCause::Eviction);
            self.stats.admitted_blocks += len;
        }
        let dev_slots = std::mem::take(&mut self.nodes[id as usize].dev_slots);
        self.dev_pool.give_back(dev_slots);
        self.set_dev(id, DevState::Absent);
        if self.nodes[id as usize].host == HostState::Absent {
            // Neither tier keeps it; whatever hangs below it (host-only) is unreachable now.
            self.remove_subtree(id);
        }
    }

    /// Plans the copy of `id`'s device blocks into `host_slots` and marks its host copy as being
    /// written.
    fn plan_store(&mut self, id: u32, host_slots: Vec<SlotId>, cause: TransferCause) {
        let n = &mut self.nodes[id as usize];
        let copies = n
            .dev_slots
            .iter()
            .copied()
            .zip(host_slots.iter().copied())
            .collect();
        n.host_slots = host_slots;
        let t = self.new_transfer(TransferKind::Store, cause, vec![id], copies);
        let n = &mut self.nodes[id as usize];
        n.host = HostState::Writing(t);
        // An eviction store reads slots that are already free again; a write-through store
        // reads the slots the node keeps, which must not be evicted and reused until it is done.
        n.store_source = cause == TransferCause::WriteThrough;
    }

    /// Gives a host-only node the device `slots` it will be loaded into and marks it loading
    /// (present on the device) until `plan_load` names the transfer.
    fn start_load(&mut self, id: u32, slots: Vec<SlotId>) {
        self.nodes[id as usize].dev_slots = slots;
        self.set_dev(id, DevState::Loading(PENDING_TRANSFER));
    }

    /// Plans one host-to-device transfer for `nodes` (each loading into the device slots it was
    /// given) and names it in their state. `None` for no nodes.
    fn plan_load(&mut self, nodes: Vec<u32>, cause: TransferCause) -> Option<TransferId> {
        if nodes.is_empty() {
            return None;
        }
        let copies = nodes
            .iter()
            .flat_map(|&n| {
                let n = &self.nodes[n as usize];
                n.host_slots
                    .iter()
                    .copied()
                    .zip(n.dev_slots.iter().copied())
            })
            .collect();
        let t = self.new_transfer(TransferKind::Load, cause, nodes.clone(), copies);
        for node in nodes {
            self.nodes[node as usize].dev = DevState::Loading(t);
        }
        Some(t)
    }

    /// Takes `n` device slots, evicting device leaves in policy order. With `limit`, only nodes
    /// whose priority is below it may be evicted (promotion must not displace hotter nodes).
    fn take_device(&mut self, n: usize, now: f64, limit: Option<f64>) -> Option<Vec<SlotId>> {
        while self.dev_pool.free_count() < n {
            let victim = *self.dev_set.first()?;
            if limit.is_some_and(|l| victim.0 >= l) {
                return None;
            }
            self.evict_device(victim.1, now);
        }
        self.dev_pool.take(n)
    }

    /// Hands out `n` device slots for newly computed KV, evicting by policy when needed. The
    /// caller owns them until it `insert`s or `free`s them.
    pub fn allocate(&mut self, n: usize, now: f64) -> Result<Vec<SlotId>, CacheError> {
        let available = self.dev_pool.free_count() + self.reclaimable;
        if available < n {
            // Fail without evicting anything: a failed allocation must not flush the cache.
            return Err(CacheError::OutOfBlocks {
                requested: n,
                available,
            });
        }
        match self.take_device(n, now, None) {
            Some(slots) => {
                self.outstanding += n;
                for s in &slots {
                    self.handed_out[s.0 as usize] = true;
                }
                self.allocated_blocks += n as u64;
                Ok(slots)
            }
            None => Err(CacheError::OutOfBlocks {
                requested: n,
                available: self.dev_pool.free_count(),
            }),
        }
    }

    /// Returns slots from `allocate` that were never inserted.
    ///
    /// Fails, changing nothing, if a slot was not handed out by `allocate` or is listed twice:
    /// giving it back would put a slot in use on the free list.
    pub fn free(&mut self, slots: Vec<SlotId>) -> Result<(), CacheError> {
        self.claim(&slots)?;
        self.outstanding -= slots.len();
        self.dev_pool.give_back(slots);
        Ok(())
    }

    /// Takes back the caller's ownership of `slots`, all or nothing: each must be one that
    /// `allocate` handed out and that was not returned since, listed once.
    fn claim(&mut self, slots: &[SlotId]) -> Result<(), CacheError> {
        for (k, s) in slots.iter().enumerate() {
            match self.handed_out.get_mut(s.0 as usize) {
                Some(owned @ true) => *owned = false,
                _ => {
                    for taken in &slots[..k] {
                        self.handed_out[taken.0 as usize] = true;
                    }
                    return Err(CacheError::NotHandedOut(*s));
                }
            }
        }
        Ok(())
    }

    // ----- matching ---------------------------------------------------------------------------

    /// Hashes `tokens` under `salt` and matches them; returns the match and the hashes of all
    /// full blocks of `tokens` (to pass to `insert` later).
    pub fn match_prefix(
        &mut self,
        tokens: &[u32],
        salt: Salt,
        now: f64,
    ) -> (Match, Vec<BlockHash>) {
        let hashes = hash_blocks(tokens, self.cfg.block_tokens, salt, BlockHash::ROOT);
        let m = self.match_hashes(&hashes, tokens.len(), now);
        (m, hashes)
    }

    /// Matches the longest cached prefix of `hashes`, locks it, counts the access on every node
    /// of the path, and starts loading its host-only part to the device (as far as device room
    /// allows). `query_tokens` is the prompt length, for hit/miss token counters.
    pub fn match_hashes(&mut self, hashes: &[BlockHash], query_tokens: usize, now: f64) -> Match {
        let walked = self.walk(hashes);
        let mut path: Vec<u32> = walked.iter().map(|&(c, _)| c).collect();
        if let (Some(last), Some(&(c, m))) = (path.last_mut(), walked.last())
            && m < self.nodes[c as usize].len()
        {
            // The match ends inside this node: split it so the lease covers exactly the match.
            *last = self.split(c, m);
        }
        if let Some(&last) = path.last() {
            self.add_lock(last, ROOT, 1);
        }
        for &p in &path {
            self.touch(p, now);
            self.refresh(p);
        }

        // Start loading the host-only tail, node by node, as far as device room allows. The
        // nodes are marked present at once (so the next one's parent is present); the transfer
        // id is patched in once every node of this match is known.
        let mut device_blocks = 0;
        let mut host_blocks = 0;
        let mut loads = Vec::new();
        let deepest = path.last().copied();
        let mut cut = None;
        let mut k = 0;
        while k < path.len() {
            let p = path[k];
            let len = self.nodes[p as usize].len();
            k += 1;
            if self.nodes[p as usize].dev_present() {
                device_blocks += len;
                continue;
            }
            let (node, slots) = match self.take_device(len, now, None) {
                Some(s) => (p, s),
                None => {
                    let room = self.dev_pool.free_count();
                    let taken = if room > 0 {
                        let upper = self.split(p, room);
                        self.dev_pool.take(room).map(|s| (upper, s))
                    } else {
                        None
                    };
                    match taken {
                        Some((upper, s)) => {
                            path[k - 1] = upper;
                            cut = Some(k);
                            (upper, s)
                        }
                        None => {
                            cut = Some(k - 1);
                            break;
                        }
                    }
                }
            };
            host_blocks += slots.len();
            self.start_load(node, slots);
            loads.push(node);
            if cut.is_some() {
                break;
            }
        }
        if let (Some(c), Some(d)) = (cut, deepest) {
            // Drop this lease's lock below the last node kept (for a partial load, the lower part
            // of the split node hangs below the kept upper part).
            let keep = c.checked_sub(1).map(|k| path[k]);
            self.add_lock(d, keep.unwrap_or(ROOT), -1);
            path.truncate(c);
        }
        let load = self.plan_load(loads, TransferCause::Hit);

        let mut slots = Vec::with_capacity(device_blocks + host_blocks);
        for &p in &path {
            slots.extend_from_slice(&self.nodes[p as usize].dev_slots);
        }
        self.maybe_write_through(&path, now);

        let bt = self.cfg.block_tokens;
        let dev_tokens = (device_blocks * bt).min(query_tokens);
        let cached_tokens = ((device_blocks + host_blocks) * bt).min(query_tokens);
        self.stats.lookups += 1;
        self.stats.query_tokens += query_tokens as u64;
        self.stats.device_hit_tokens += dev_tokens as u64;
        self.stats.host_hit_tokens += (cached_tokens - dev_tokens) as u64;
        self.stats.miss_tokens += (query_tokens - cached_tokens) as u64;
        Match {
            lease: Lease {
                cache: self.id,
                node: path.last().copied().unwrap_or(ROOT),
                blocks: device_blocks + host_blocks,
            },
            device_blocks,
            host_blocks,
            slots,
            load,
            cached_tokens,
        }
    }

    /// Copies hot device-only nodes of `path` to the host ahead of their eviction.
    /// Only while the device is nearly full (less than a tenth free): until then no eviction is
    /// coming and the copy would be wasted bandwidth.
    fn maybe_write_through(&mut self, path: &[u32], now: f64) {
        if !self.policy.uses_host()
            || self.dev_pool.free_count() * 10 >= self.dev_pool.capacity() as usize
        {
            return;
        }
        for &p in path {
            let n = &self.nodes[p as usize];
            if n.dev != DevState::Ready || n.host != HostState::Absent {
                continue;
            }
            if !self.policy.write_through(&self.info(p), self.hot_now(now)) {
                continue;
            }
            let Some(host_slots) = self.admit_to_host(p, now) else {
                continue;
            };
            let len = host_slots.len() as u64;
            self.plan_store(p, host_slots, TransferCause::WriteThrough);
            self.stats.write_through_blocks += len;
            self.refresh(p);
        }
    }

    /// Read-only lookup: how many leading blocks of `hashes` are on the device, and how many
    /// more on the host. Changes no hotness and takes no lock (for ordering and routing).
    pub fn peek(&self, hashes: &[BlockHash]) -> Peek {
        let mut out = Peek::default();
        for (c, m) in self.walk(hashes) {
            if self.nodes[c as usize].dev_present() {
                out.device_blocks += m;
            } else {
                out.host_blocks += m;
            }
        }
        out
    }

    /// The usable path a match of `hashes` would take, without splitting: each node on the
    /// device or readable on the host, with how many of its blocks match (all but maybe the
    /// last's). Device presence is prefix-closed, so device nodes come first.
    fn walk(&self, hashes: &[BlockHash]) -> Vec<(u32, usize)> {
        let mut path = Vec::new();
        let mut cur = ROOT;
        let mut i = 0;
        while i < hashes.len() {
            let Some(&c) = self.nodes[cur as usize].children.get(&hashes[i]) else {
                break;
            };
            let n = &self.nodes[c as usize];
            if !(n.dev_present() || n.host == HostState::Ready) {
                break;
            }
            let m = common_prefix(&n.hashes, &hashes[i..]);
            path.push((c, m));
            if m < n.len() {
                break;
            }
            i += m;
            cur = c;
        }
        path
    }

    /// Whether matching `hashes` now (loading its host part in full) and then allocating
    /// `new_blocks` more device blocks would succeed, without changing anything. A scheduler asks
    /// this before admitting a request, so that a request it cannot admit yet leaves no trace:
    /// no hotness counted, no load started, no eviction made.
    pub fn fits(&self, hashes: &[BlockHash], new_blocks: usize) -> bool {
        let mut host_blocks = 0;
        // Device blocks of the path that are reclaimable now but would be locked by the match.
        let mut path_reclaim = 0;
        for (c, m) in self.walk(hashes) {
            let n = &self.nodes[c as usize];
            if n.dev_present() {
                path_reclaim += n.reclaim.min(m);
            } else {
                host_blocks += m;
            }
        }
        let available = self.dev_pool.free_count() + self.reclaimable - path_reclaim;
        host_blocks <= available && new_blocks <= available - host_blocks
    }

    /// The loads the blocks of `lease` still wait for (empty when it is ready), including loads
    /// other requests or promotion started.
    ///
    /// # Panics
    /// If `lease` comes from another cache.
    pub fn lease_transfers(&self, lease: &Lease) -> Vec<TransferId> {
        self.check_lease(lease);
        let mut out = Vec::new();
        let mut cur = lease.node;
        while cur != ROOT {
            let n = &self.nodes[cur as usize];
            if let DevState::Loading(t) = n.dev
                && !out.contains(&t)
            {
                out.push(t);
            }
            cur = n.parent;
        }
        out
    }

    /// Tells the cache that a request for `hashes` has been queued and will be matched later.
    /// Policies that look ahead (`hotprefix`) count it as an access of the cached part of its
    /// prefix now, so the prefix is less likely to be evicted while the request waits; for the
    /// others this does nothing. Takes no lock and moves nothing.
    pub fn hint_queued(&mut self, hashes: &[BlockHash], now: f64) {
        if !self.policy.uses_queue_hints() {
            return;
        }
        for (c, _) in self.walk(hashes) {
            self.touch(c, now);
            self.refresh(c);
        }
    }

    /// Whether the blocks of `lease` can be read now.
    ///
    /// # Panics
    /// If `lease` comes from another cache.
    pub fn lease_state(&self, lease: &Lease) -> LeaseState {
        self.check_lease(lease);
        let mut state = LeaseState::Ready;
        let mut cur = lease.node;
        while cur != ROOT {
            let n = &self.nodes[cur as usize];
            // A leased node is never absent from the device: locks forbid eviction and failed
            // loads are retried.
            if n.dev != DevState::Ready {
                state = LeaseState::Loading;
            }
            cur = n.parent;
        }
        state
    }

    // ----- insertion and release --------------------------------------------------------------

    /// Adds newly computed full blocks after the end of `lease`: `hashes[i]` lives in device slot
    /// `slots[i]` (from `allocate`). The lease grows over what is merged. See [`Inserted`].
    pub fn insert(
        &mut self,
        lease: &mut Lease,
        hashes: &[BlockHash],
        slots: &[SlotId],
        now: f64,
    ) -> Result<Inserted, CacheError> {
        if lease.cache != self.id {
            return Err(CacheError::ForeignLease);
        }
        if hashes.len() != slots.len() {
            return Err(CacheError::LengthMismatch {
                hashes: hashes.len(),
                slots: slots.len(),
            });
        }
        self.claim(slots)?;
        let mut cur = lease.node;
        let mut i = 0;
        let mut canonical = Vec::with_capacity(slots.len());
        let mut extended = Vec::new();
        while i < hashes.len() && self.nodes[cur as usize].dev_present() {
            let child = self.nodes[cur as usize].children.get(&hashes[i]).copied();
            let Some(c) = child else {
                let depth = self.nodes[cur as usize].depth_end + (hashes.len() - i) as u64;
                let mut node = Node::new(cur, hashes[i..].to_vec(), depth);
                node.dev_slots = slots[i..].to_vec();
                let id = self.alloc_node(node);
                self.nodes[cur as usize].children.insert(hashes[i], id);
                self.touch(id, now);
                self.set_dev(id, DevState::Ready);
                canonical.extend_from_slice(&slots[i..]);
                extended.push(id);
                i = hashes.len();
                cur = id;
                break;
            };
            let n = &self.nodes[c as usize];
            if matches!(n.dev, DevState::Loading(_)) {
                break;
            }
            let m = common_prefix(&n.hashes, &hashes[i..]);
            let c = if m < n.len() { self.split(c, m) } else { c };
            match self.nodes[c as usize].dev {
                DevState::Ready => {
                    canonical.extend_from_slice(&self.nodes[c as usize].dev_slots);
                    self.dev_pool.give_back(slots[i..i + m].iter().copied());
                }
                DevState::Absent => {
                    self.nodes[c as usize].dev_slots = slots[i..i + m].to_vec();
                    canonical.extend_from_slice(&slots[i..i + m]);
                    self.set_dev(c, DevState::Ready);
                }
                // A split keeps the state, and loading nodes were skipped above.
                DevState::Loading(_) => break,
            }
            self.touch(c, now);
            extended.push(c);
            i += m;
            cur = c;
        }
        for &e in &extended {
            self.nodes[e as usize].lock += 1;
            self.refresh(e);
        }
        // The blocks after a stop stay the caller's.
        for s in &slots[i..] {
            self.handed_out[s.0 as usize] = true;
        }
        self.outstanding -= i;
        lease.node = cur;
        lease.blocks += i;
        Ok(Inserted {
            merged: i,
            slots: canonical,
        })
    }

    /// Gives back a lease: its path becomes evictable again (as far as other leases allow).
    ///
    /// # Panics
    /// If `lease` comes from another cache: that is a bug in the caller, and going on would
    /// corrupt both caches' lock counts.
    pub fn release(&mut self, lease: Lease) {
        self.check_lease(&lease);
        self.add_lock(lease.node, ROOT, -1);
    }

    fn check_lease(&self, lease: &Lease) {
        assert_eq!(
            lease.cache, self.id,
            "a lease was given to a cache that did not issue it"
        );
    }

    // ----- transfers and promotion ------------------------------------------------------------

    /// Transfers planned since the last call, in the order they must be issued.
    pub fn take_transfers(&mut self) -> Vec<Transfer> {
        std::mem::take(&mut self.pending)
    }

    /// Reports that a transfer finished; its blocks become readable in the destination tier.
    /// Every transfer taken from [`PrefixCache::take_transfers`] must be reported, by this or by
    /// [`PrefixCache::fail_transfer`], even when its nodes were dropped meanwhile (then the call
    /// only releases the host slots the copy was writing, see [`Usage::host_held`]). Unknown ids
    /// are ignored.
    pub fn complete_transfer(&mut self, id: TransferId) {
        let Some(f) = self.inflight.remove(&id) else {
            return;
        };
        if let Some(slots) = self.host_slots_after.remove(&id) {
            self.host_pool.give_back(slots);
        }
        for node in f.nodes {
            let n = &mut self.nodes[node as usize];
            if !n.alive {
                continue;
            }
            match f.kind {
                TransferKind::Load if n.dev == DevState::Loading(id) => {
                    self.set_dev(node, DevState::Ready);
                }
                TransferKind::Store if n.host == HostState::Writing(id) => {
                    n.host = HostState::Ready;
                    n.store_source = false;
                    self.refresh(node);
                }
                _ => {}
            }
        }
    }

    /// Reports that a transfer failed. A failed load is planned again (a new transfer with the
    /// same copies, from [`PrefixCache::take_transfers`]): its blocks stay on the host, the
    /// device slots stay reserved, and leases waiting on it keep waiting. Giving up instead would
    /// have to drop device copies below the node that later loads or inserts put there, some of
    /// them locked. An engine whose copies keep failing has a broken device and must restart.
    /// A failed store drops the host copy.
    pub fn fail_transfer(&mut self, id: TransferId) {
        let Some(f) = self.inflight.remove(&id) else {
            return;
        };
        if let Some(slots) = self.host_slots_after.remove(&id) {
            self.host_pool.give_back(slots);
        }
        self.stats.failed_transfers += 1;
        let mut retry_nodes = Vec::new();
        for node in f.nodes {
            let n = &mut self.nodes[node as usize];
            if !n.alive {
                continue;
            }
            match f.kind {
                TransferKind::Load if n.dev == DevState::Loading(id) => retry_nodes.push(node),
                TransferKind::Store if n.host == HostState::Writing(id) => {
                    let slots = std::mem::take(&mut n.host_slots);
                    n.host = HostState::Absent;
                    n.store_source = false;
                    self.host_pool.give_back(slots);
                    if n.dev == DevState::Absent {
                        // Not matchable while its store was in flight, so no lease holds it.
                        self.remove_subtree(node);
                    } else {
                        self.refresh(node);
                    }
                }
                _ => {}
            }
        }
        self.plan_load(retry_nodes, f.cause);
    }

    /// Periodic work at time `now`: promotion of hot host-only prefixes back to the device (for
    /// policies that promote), at most once per promotion interval.
    pub fn tick(&mut self, now: f64) {
        let Some(promo) = self.policy.promotion() else {
            return;
        };
        if now < self.next_promotion {
            return;
        }
        self.next_promotion = now + promo.interval_s;
        let mut budget = (promo.budget_bytes / self.cfg.block_bytes) as usize;
        let mut loads = Vec::new();
        while budget > 0 {
            let Some(&Key(prio, mut cand)) = self.promo_set.last() else {
                break;
            };
            if self.nodes[cand as usize].len() > budget {
                cand = self.split(cand, budget);
            }
            let len = self.nodes[cand as usize].len();
            // Lock the path so making room cannot evict the parent the candidate hangs from.
            self.add_lock(cand, ROOT, 1);
            let limit = promo.margin.map_or(f64::NEG_INFINITY, |m| prio - m);
            // Evict only if the leaves colder than the limit make enough room: a promotion that
            // gives up halfway must not have evicted anything for nothing. (Leaves that would
            // become evictable once their children go are not counted, so this may promote less
            // than it could.)
            let mut room = self.dev_pool.free_count();
            for k in self.dev_set.iter().take_while(|k| k.0 < limit) {
                if room >= len {
                    break;
                }
                room += self.nodes[k.1 as usize].len();
            }
            let slots = if room >= len {
                self.take_device(len, now, Some(limit))
            } else {
                None
            };
            self.add_lock(cand, ROOT, -1);
            let Some(slots) = slots else { break };
            // Present from now on, so its children become candidates top-down.
            self.start_load(cand, slots);
            loads.push(cand);
            budget -= len;
            self.stats.promoted_blocks += len as u64;
        }
        self.plan_load(loads, TransferCause::Promotion);
    }

    // ----- export -----------------------------------------------------------------------------

    /// The hottest `top_k` blocks, hottest first, for publishing. A block's hotness is capped by
    /// its ancestors', so the result is prefix-closed: every listed block's parent is listed
    /// before it.
    pub fn summary(&self, top_k: usize, now: f64) -> Vec<SummaryEntry> {
        let now = self.hot_now(now);
        // Effective key: min over the path, computed top-down.
        let mut eff: Vec<(f64, u64, u32)> = Vec::new();
        let mut stack: Vec<(u32, f64)> = vec![(ROOT, f64::INFINITY)];
        while let Some((id, cap)) = stack.pop() {
            for &c in self.nodes[id as usize].children.values() {
                let n = &self.nodes[c as usize];
                if !(n.dev_present() || n.host != HostState::Absent) {
                    continue;
                }
                let k = n.hot.key().min(cap);
                eff.push((k, n.depth_end, c));
                stack.push((c, k));
            }
        }
        eff.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut out = Vec::new();
        'outer: for (key, _, id) in eff {
            let n = &self.nodes[id as usize];
            let tier = if n.dev_present() {
                Tier::Device
            } else {
                Tier::Host
            };
            let start = n.depth_end - n.len() as u64;
            let hotness = (key - now).exp2();
            for (j, h) in n.hashes.iter().enumerate() {
                if out.len() >= top_k {
                    break 'outer;
                }
                out.push(SummaryEntry {
                    hash: *h,
                    tier,
                    hotness,
                    depth: start + j as u64 + 1,
                });
            }
        }
        out
    }

    /// Every block in the tree with its state, in depth-first order.
    pub fn resident_blocks(&self) -> Vec<ResidentBlock> {
        let mut out = Vec::new();
        let mut stack = vec![ROOT];
        while let Some(id) = stack.pop() {
            let n = &self.nodes[id as usize];
            for h in &n.hashes {
                out.push(ResidentBlock {
                    hash: *h,
                    device_ready: n.dev == DevState::Ready,
                    device_loading: matches!(n.dev, DevState::Loading(_)),
                    host_ready: n.host == HostState::Ready,
                    host_writing: matches!(n.host, HostState::Writing(_)),
                    store_source: n.store_source,
                    locked: n.lock > 0,
                });
            }
            stack.extend(n.children.values().copied());
        }
        out
    }

    /// Checks every structural invariant; returns the first violation found. Meant for tests
    /// and debug builds: it walks the whole tree.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut dev_seen = vec![false; self.dev_pool.capacity() as usize];
        let mut host_seen = vec![false; self.host_pool.capacity() as usize];
        let mark = |seen: &mut Vec<bool>, s: SlotId, what: &str| -> Result<(), String> {
            let slot = seen
                .get_mut(s.0 as usize)
                .ok_or_else(|| format!("{what} slot {} out of range", s.0))?;
            if *slot {
                return Err(format!("{what} slot {} used twice", s.0));
            }
            *slot = true;
            Ok(())
        };
        let mut dev_in_tree = 0;
        let mut reclaimable = 0;
        let mut host_in_tree = 0;
        let mut candidates = (0, 0, 0);
        for (id, n) in self.nodes.iter().enumerate().skip(1) {
            if !n.alive {
                continue;
            }
            let id = id as u32;
            let p = &self.nodes[n.parent as usize];
            if !p.alive || p.children.get(&n.hashes[0]) != Some(&id) {
                return Err(format!("node {id} not linked from its parent {}", n.parent));
            }
            if n.depth_end != p.depth_end + n.len() as u64 {
                return Err(format!(
                    "node {id} has depth {} under parent depth {}",
                    n.depth_end, p.depth_end
                ));
            }
            if n.dev_present() != (n.dev_slots.len() == n.len())
                || (!n.dev_present() && !n.dev_slots.is_empty())
            {
                return Err(format!(
                    "node {id} device slots disagree with its state {:?}",
                    n.dev
                ));
            }
            if (n.host != HostState::Absent) != (n.host_slots.len() == n.len())
                || (n.host == HostState::Absent && !n.host_slots.is_empty())
            {
                return Err(format!(
                    "node {id} host slots disagree with its state {:?}",
                    n.host
                ));
            }
            if !n.dev_present() && n.host == HostState::Absent {
                return Err(format!("node {id} is resident nowhere"));
            }
            if n.dev_present() && !p.dev_present() {
                return Err(format!(
                    "node {id} is on the device but its parent {} is not",
                    n.parent
                ));
            }
            let dev_children = n
                .children
                .values()
                .filter(|&&c| self.nodes[c as usize].dev_present())
                .count();
            if dev_children != n.dev_children as usize {
                return Err(format!(
                    "node {id} counts {} device children, has {dev_children}",
                    n.dev_children
                ));
            }
            if n.store_source
                && !(n.dev == DevState::Ready && matches!(n.host, HostState::Writing(_)))
            {
                return Err(format!(
                    "node {id} is a store source without a store reading it"
                ));
            }
            let pinned = matches!(n.dev, DevState::Loading(_)) || n.store_source;
            if pinned != n.pinned {
                return Err(format!(
                    "node {id} pinned flag {} but state says {pinned}",
                    n.pinned
                ));
            }
            let pinned_below: u32 = n
                .children
                .values()
                .filter(|&&c| {
                    let c = &self.nodes[c as usize];
                    c.pinned || c.pinned_below > 0
                })
                .count() as u32;
            if pinned_below != n.pinned_below {
                return Err(format!(
                    "node {id} counts {} pinned below, has {pinned_below}",
                    n.pinned_below
                ));
            }
            let reclaim = n.dev == DevState::Ready && n.lock == 0 && !pinned && pinned_below == 0;
            if n.reclaim != if reclaim { n.len() } else { 0 } {
                return Err(format!("node {id} counts {} reclaimable blocks", n.reclaim));
            }
            reclaimable += n.reclaim;
            let child_locks: u32 = n
                .children
                .values()
                .map(|&c| self.nodes[c as usize].lock)
                .sum();
            if n.lock < child_locks {
                return Err(format!(
                    "node {id} lock {} below its children's {child_locks}",
                    n.lock
                ));
            }
            for &s in &n.dev_slots {
                mark(&mut dev_seen, s, "device")?;
            }
            for &s in &n.host_slots {
                mark(&mut host_seen, s, "host")?;
            }
            dev_in_tree += n.dev_slots.len();
            host_in_tree += n.host_slots.len();
            for (key, set, what) in [
                (n.dev_key, &self.dev_set, "device"),
                (n.host_key, &self.host_set, "host"),
                (n.promo_key, &self.promo_set, "promotion"),
            ] {
                if let Some(k) = key
                    && !set.contains(&k)
                {
                    return Err(format!("node {id} missing from the {what} set"));
                }
            }
            candidates.0 += usize::from(n.dev_key.is_some());
            candidates.1 += usize::from(n.host_key.is_some());
            candidates.2 += usize::from(n.promo_key.is_some());
            if n.lock > 0 && (n.dev_key.is_some() || n.host_key.is_some()) {
                return Err(format!("locked node {id} is an eviction candidate"));
            }
            if n.dev_key.is_some() && (n.dev != DevState::Ready || n.dev_children > 0) {
                return Err(format!(
                    "node {id} is a device candidate but not a ready device leaf"
                ));
            }
        }
        if candidates
            != (
                self.dev_set.len(),
                self.host_set.len(),
                self.promo_set.len(),
            )
        {
            return Err(format!(
                "candidate sets hold stale entries: nodes say {candidates:?}, sets hold {:?}",
                (
                    self.dev_set.len(),
                    self.host_set.len(),
                    self.promo_set.len()
                )
            ));
        }
        for &s in self.dev_pool.free_slots() {
            mark(&mut dev_seen, s, "free device")?;
        }
        let handed_out = self.handed_out.iter().filter(|&&h| h).count();
        if handed_out != self.outstanding {
            return Err(format!(
                "{handed_out} slots marked handed out, {} counted",
                self.outstanding
            ));
        }
        if dev_in_tree + self.dev_pool.free_count() + self.outstanding
            != self.dev_pool.capacity() as usize
        {
            return Err(format!(
                "device slots leak: {dev_in_tree} in tree + {} free + {} outstanding != {}",
                self.dev_pool.free_count(),
                self.outstanding,
                self.dev_pool.capacity()
            ));
        }
        if reclaimable != self.reclaimable {
            return Err(format!(
                "reclaimable blocks: nodes say {reclaimable}, the total says {}",
                self.reclaimable
            ));
        }
        let host_after: usize = self.host_slots_after.values().map(Vec::len).sum();
        for (t, slots) in &self.host_slots_after {
            if !self.inflight.contains_key(t) {
                return Err(format!("host slots held for finished transfer {t:?}"));
            }
            for &s in slots {
                mark(&mut host_seen, s, "held host")?;
            }
        }
        if host_in_tree + host_after + self.host_pool.free_count()
            != self.host_pool.capacity() as usize
        {
            return Err(format!(
                "host slots leak: {host_in_tree} in tree + {host_after} held + {} free != {}",
                self.host_pool.free_count(),
                self.host_pool.capacity()
            ));
        }
        Ok(())
    }
}

fn common_prefix(a: &[BlockHash], b: &[BlockHash]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
