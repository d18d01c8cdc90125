//! Property tests: random request streams drive every policy through matches, allocations,
//! inserts, releases, transfers and promotion ticks, and after every call the cache must keep its
//! structural invariants, its slot accounting and its locks, and agree with reference models of
//! what a match finds.
//!
//! The streams draw prompts from a small universe (four roots, then alphabets of one, two and
//! three tokens per block as the prompt gets deeper), so prompts share prefixes, split edges and
//! diverge all the time, and the tiers are tiny (4 to 32 device blocks, 0 to 48 host blocks), so
//! eviction, admission, rejection and promotion happen on almost every step.

use std::collections::{HashMap, HashSet};

use hotprefix_cache::{
    CacheConfig, CacheError, Lease, LeaseState, PolicyKind, PrefixCache, ResidentBlock, SlotId,
    Transfer, TransferCause, TransferId, TransferKind,
};
use hotprefix_protocol::{BlockHash, Salt};
use proptest::prelude::*;

/// Tokens per block. The streams work on block hashes; this only scales token counters.
const BT: usize = 16;
/// Requests running at once; starting another ends the oldest.
const MAX_LIVE: usize = 4;
/// Bytes per block; promotion budgets are given in blocks and scaled by it.
const BLOCK_BYTES: u64 = 1024;

// ----- generated input ---------------------------------------------------------------------------

/// How a cache under test is sized and tuned.
#[derive(Clone, Debug)]
struct Setup {
    device: u32,
    host: u32,
    /// Hotness at which `hotprefix` writes a node through to the host (`None`: never).
    write_through: Option<f64>,
    /// Blocks one promotion round may load (0: promotion off).
    promotion_blocks: u64,
    /// Whether promotion may displace colder device leaves, and by what margin.
    promotion_margin: Option<f64>,
    /// Hotness half-life in cache turnovers (the churn clock), or `None` for 20 s of wall time.
    half_life_turnovers: Option<f64>,
}

/// One step of a stream. Request and transfer indices are taken modulo the number of live
/// requests or pending transfers, so every generated step means something whatever came before.
#[derive(Clone, Debug)]
enum Op {
    /// A new request: `match_hashes` on the prompt named by `root` and `picks`, with `partial`
    /// tokens of a trailing partial block.
    Start {
        root: u8,
        picks: Vec<u8>,
        partial: u8,
    },
    /// Allocates slots for part of the uncached remainder of a request. On `OutOfBlocks` the
    /// request keeps what it has, or gives up if `give_up`.
    Allocate { req: u8, want: u8, give_up: bool },
    /// Inserts the next computed blocks of a request (those it holds slots for).
    Insert { req: u8, count: u8 },
    /// One scheduler step of a request: allocate for its next blocks, then insert all it holds.
    Compute { req: u8, want: u8 },
    /// Frees some of the slots a request holds but has not inserted.
    Free { req: u8, count: u8 },
    /// Ends a request: frees its un-inserted slots and releases its lease.
    Release { req: u8 },
    /// Completes (or fails) one pending transfer, in any order.
    Finish { transfer: u8, fail: bool },
    /// Advances the clock and runs periodic promotion.
    Tick { step: u8 },
    /// A request for this prompt is queued: `hint_queued` (touches hotness, moves nothing).
    Hint { root: u8, picks: Vec<u8> },
    /// A whole request at once: start, wait for its hit load, compute the rest, release (each
    /// call checked as a step of its own). These keep the tiers churning between the
    /// interleaved steps above.
    Run { root: u8, picks: Vec<u8> },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..4, prop::collection::vec(any::<u8>(), 0..12), 0u8..BT as u8)
            .prop_map(|(root, picks, partial)| Op::Start { root, picks, partial }),
        2 => (any::<u8>(), any::<u8>(), any::<bool>())
            .prop_map(|(req, want, give_up)| Op::Allocate { req, want, give_up }),
        2 => (any::<u8>(), any::<u8>()).prop_map(|(req, count)| Op::Insert { req, count }),
        4 => (any::<u8>(), any::<u8>()).prop_map(|(req, want)| Op::Compute { req, want }),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(req, count)| Op::Free { req, count }),
        2 => any::<u8>().prop_map(|req| Op::Release { req }),
        4 => (any::<u8>(), prop::bool::weighted(0.2))
            .prop_map(|(transfer, fail)| Op::Finish { transfer, fail }),
        1 => (0u8..5).prop_map(|step| Op::Tick { step }),
        1 => (0u8..4, prop::collection::vec(any::<u8>(), 0..12))
            .prop_map(|(root, picks)| Op::Hint { root, picks }),
        4 => (0u8..4, prop::collection::vec(any::<u8>(), 0..12))
            .prop_map(|(root, picks)| Op::Run { root, picks }),
    ]
}

fn small_setup() -> impl Strategy<Value = Setup> {
    (
        4u32..=32,
        0u32..=48,
        prop::option::of(prop::sample::select(vec![1.5, 2.5, 4.0])),
        0u64..=8,
        prop::option::of(prop::sample::select(vec![0.0, 1.0])),
        prop::option::of(prop::sample::select(vec![0.5, 2.0])),
    )
        .prop_map(
            |(device, host, write_through, promotion_blocks, promotion_margin, turnovers)| Setup {
                device,
                host,
                write_through,
                promotion_blocks,
                promotion_margin,
                half_life_turnovers: turnovers,
            },
        )
}

/// Alphabet of the token of block `depth` (0-based). The first blocks after the root are shared
/// by every prompt of that root (a system prompt), the next ones branch in two, deeper ones in
/// three, so short prompts collide and long ones mostly diverge.
fn alphabet(depth: usize) -> u8 {
    match depth {
        0..3 => 1,
        3..8 => 2,
        _ => 3,
    }
}

fn config(policy: PolicyKind, s: &Setup) -> CacheConfig {
    let mut cfg = CacheConfig::new(policy, BT, BLOCK_BYTES, s.device, s.host);
    // On wall time, a short half-life so that hotness decays noticeably within a stream's
    // simulated minutes; on the churn clock the tiny tiers turn over every few requests.
    cfg.hotness.half_life_s = 20.0;
    cfg.hotness.half_life_turnovers = s.half_life_turnovers;
    cfg.hotness.promotion_interval_s = 1.0;
    cfg.hotness.promotion_budget_bytes = s.promotion_blocks * BLOCK_BYTES;
    cfg.hotness.write_through_hotness = s.write_through;
    cfg.hotness.promotion_margin = s.promotion_margin;
    cfg
}

// ----- the harness -------------------------------------------------------------------------------

/// A live request: its prompt, its lease, the device slots of the leased blocks (as the cache
/// reported them in `Match::slots` and `Inserted::slots`), and the slots it was allocated but has
/// not inserted yet (they stand for `hashes[lease.blocks()..]`, in order).
#[derive(Debug)]
struct Req {
    hashes: Vec<BlockHash>,
    lease: Lease,
    slots: Vec<SlotId>,
    pending: Vec<SlotId>,
    /// The hit load its match started.
    load: Option<TransferId>,
}

/// What the caller holds just before a step: used to prove that the cache never hands out, loads
/// into or evicts a slot that a live lease or an outstanding allocation owns.
#[derive(Debug, Default)]
struct Held {
    /// Device slots of every block of every live lease.
    leased: HashSet<SlotId>,
    /// Slots allocated and not yet inserted or freed.
    outstanding: HashSet<SlotId>,
}

/// The expected outcome of one `match_hashes`, from the reference model.
#[derive(Debug)]
struct ExpectedHit {
    id: TransferId,
    dest: Vec<SlotId>,
}

#[derive(Debug)]
struct Harness {
    cache: PrefixCache,
    policy: PolicyKind,
    now: f64,
    live: Vec<Req>,
    /// Transfers taken from the cache and not yet completed or failed.
    transfers: Vec<Transfer>,
    /// Highest transfer id seen, to check ids are fresh.
    last_transfer: u64,
    /// Parent of every hash the stream ever generated (`BlockHash::ROOT` for first blocks), to
    /// rebuild the tree shape from `resident_blocks()`.
    parents: HashMap<BlockHash, BlockHash>,
    /// Every hash ever merged into the tree (model of a cache that never evicts).
    inserted: HashSet<BlockHash>,
    /// Capacities are large enough that nothing is ever evicted: check the exact model.
    never_evicts: bool,
}

type Check = Result<(), TestCaseError>;

fn resident_map(blocks: &[ResidentBlock]) -> HashMap<BlockHash, ResidentBlock> {
    blocks.iter().map(|b| (b.hash, b.clone())).collect()
}

fn device_present(b: &ResidentBlock) -> bool {
    b.device_ready || b.device_loading
}

impl Harness {
    fn new(policy: PolicyKind, cfg: CacheConfig, never_evicts: bool) -> Self {
        Harness {
            cache: PrefixCache::new(cfg).expect("generated configurations are valid"),
            policy,
            now: 0.0,
            live: Vec::new(),
            transfers: Vec::new(),
            last_transfer: 0,
            parents: HashMap::new(),
            inserted: HashSet::new(),
            never_evicts,
        }
    }

    /// Chained hashes of a prompt, registering every block's parent.
    fn prompt(&mut self, root: u8, picks: &[u8]) -> Vec<BlockHash> {
        let tokens = std::iter::once(1000 + u32::from(root)).chain(
            picks
                .iter()
                .enumerate()
                .map(|(i, p)| u32::from(p % alphabet(i + 1))),
        );
        let mut prev = BlockHash::ROOT;
        let mut out = Vec::new();
        for t in tokens {
            let h = BlockHash::chain(prev, Salt::NONE, &[t]);
            self.parents.insert(h, prev);
            out.push(h);
            prev = h;
        }
        out
    }

    fn held(&self) -> Held {
        let mut h = Held::default();
        for r in &self.live {
            h.leased.extend(r.slots.iter().copied());
            h.outstanding.extend(r.pending.iter().copied());
        }
        h
    }

    /// Hash -> device slot over every live lease (equal hashes must have equal slots).
    fn lease_slots(&self) -> HashMap<BlockHash, SlotId> {
        let mut m = HashMap::new();
        for r in &self.live {
            for (h, s) in r.hashes.iter().zip(&r.slots) {
                m.insert(*h, *s);
            }
        }
        m
    }

    /// Device blocks the cache could free right now by evicting, with `also_locked` treated as
    /// locked: every device-ready block that is unlocked and has no locked or loading block
    /// below it (such a block blocks its ancestors from ever becoming a device leaf).
    fn evictable(&self, blocks: &[ResidentBlock], also_locked: &[BlockHash]) -> usize {
        let also: HashSet<BlockHash> = also_locked.iter().copied().collect();
        let mut blocked: HashSet<BlockHash> = HashSet::new();
        for b in blocks {
            // Loading, locked, or the source of a write-through store: not evictable, and
            // neither is anything above it.
            if b.device_loading || b.store_source || b.locked || also.contains(&b.hash) {
                let mut cur = b.hash;
                while cur != BlockHash::ROOT && blocked.insert(cur) {
                    cur = self.parents[&cur];
                }
            }
        }
        blocks
            .iter()
            .filter(|b| b.device_ready && !blocked.contains(&b.hash))
            .count()
    }

    /// Runs one step and checks everything that must hold after it.
    fn step(&mut self, op: &Op) -> Check {
        // Like a scheduler's batch limit, this bounds how much of the device leases can pin.
        if matches!(op, Op::Start { .. }) && self.live.len() >= MAX_LIVE {
            self.end(0);
        }
        let held = self.held();
        let mut hit = None;
        let mut retry = None;
        match op {
            Op::Start {
                root,
                picks,
                partial,
            } => hit = self.start(*root, picks, *partial, &held)?,
            Op::Allocate { req, want, give_up } => {
                self.allocate(*req, Some(*want), *give_up, &held)?;
            }
            Op::Insert { req, count } => self.insert(*req, Some(*count))?,
            Op::Compute { req, want } => {
                self.allocate(*req, Some(*want), false, &held)?;
                self.insert(*req, None)?;
            }
            Op::Free { req, count } => {
                if !self.live.is_empty() {
                    let i = *req as usize % self.live.len();
                    let r = &mut self.live[i];
                    let n = (*count as usize % 4).min(r.pending.len());
                    let freed = r.pending.split_off(r.pending.len() - n);
                    self.cache
                        .free(freed)
                        .expect("the test frees only slots it holds");
                }
            }
            Op::Release { req } => {
                if !self.live.is_empty() {
                    let i = *req as usize % self.live.len();
                    self.end(i);
                }
            }
            Op::Finish { transfer, fail } => retry = self.finish(*transfer, *fail),
            Op::Tick { step } => {
                self.now += [0.0, 0.25, 1.0, 3.0, 30.0][*step as usize % 5];
                self.cache.tick(self.now);
            }
            Op::Run { root, picks } => return self.run(*root, picks),
            Op::Hint { root, picks } => {
                let hashes = self.prompt(*root, picks);
                let before = self.cache.resident_blocks();
                self.cache.hint_queued(&hashes, self.now);
                prop_assert_eq!(
                    before,
                    self.cache.resident_blocks(),
                    "a hint moved something"
                );
            }
        }
        self.take_transfers(&held, hit, retry)?;
        self.check_state()
    }

    /// A whole request, as `tests/policies.rs` drives one.
    fn run(&mut self, root: u8, picks: &[u8]) -> Check {
        let start = Op::Start {
            root,
            picks: picks.to_vec(),
            partial: 0,
        };
        self.step(&start)?;
        let req = self.live.len() - 1;
        let load = self.live[req].load;
        if let Some(pos) = load.and_then(|id| self.transfers.iter().position(|t| t.id == id)) {
            let held = self.held();
            let t = self.transfers.remove(pos);
            self.cache.complete_transfer(t.id);
            self.take_transfers(&held, None, None)?;
            self.check_state()?;
        }
        let held = self.held();
        self.allocate(req as u8, None, false, &held)?;
        self.insert(req as u8, None)?;
        self.take_transfers(&held, None, None)?;
        self.check_state()?;
        self.step(&Op::Release { req: req as u8 })
    }

    fn end(&mut self, i: usize) {
        let r = self.live.swap_remove(i);
        self.cache
            .free(r.pending)
            .expect("the test frees only slots it holds");
        self.cache.release(r.lease);
    }

    /// Starts a request and checks the match against the reference models. Returns the hit load
    /// the match must have planned, if any.
    fn start(
        &mut self,
        root: u8,
        picks: &[u8],
        partial: u8,
        held: &Held,
    ) -> Result<Option<ExpectedHit>, TestCaseError> {
        self.now += 0.125;
        let hashes = self.prompt(root, picks);
        let query_tokens = hashes.len() * BT + usize::from(partial);
        let before = self.cache.resident_blocks();
        let map = resident_map(&before);
        let free = self.cache.usage().device_free;

        // Model (a): the usable prefix of the query in the cache's own state just before. Device
        // presence is prefix-closed, so the usable prefix is a device part (ready or loading)
        // followed by a host part (host copy ready, device absent); a block being written to the
        // host but gone from the device is not usable, and ends the match.
        let mut dev = 0;
        let mut host = 0;
        for h in &hashes {
            match map.get(h) {
                Some(b) if device_present(b) && host == 0 => dev += 1,
                Some(b) if !device_present(b) && b.host_ready => host += 1,
                _ => break,
            }
        }
        // The match locks its whole path before it makes device room for the host part, so the
        // room it can find is what is free plus what is evictable once the device part of the
        // query is locked. Loading stops exactly there (the last node loads partially).
        let room = free + self.evictable(&before, &hashes[..dev]);
        let loaded = host.min(room);
        let leased = self.lease_slots();
        // `fits` answers the same question without side effects, for any extra allocation.
        for extra in [0, 1, 3] {
            prop_assert_eq!(
                self.cache.fits(&hashes, extra),
                host + extra <= room,
                "fits({} extra) with {} host blocks to load and {} room",
                extra,
                host,
                room
            );
        }

        let m = self.cache.match_hashes(&hashes, query_tokens, self.now);
        prop_assert_eq!(
            m.device_blocks,
            dev,
            "device part of the match, query {:?}",
            hashes
        );
        prop_assert_eq!(
            m.host_blocks,
            loaded,
            "host part of the match: {} usable on host, {} device room",
            host,
            room
        );
        prop_assert_eq!(m.slots.len(), m.blocks());
        prop_assert_eq!(m.lease.blocks(), m.blocks());
        prop_assert_eq!(m.cached_tokens, (m.blocks() * BT).min(query_tokens));
        prop_assert_eq!(m.load.is_some(), m.host_blocks > 0);
        if self.never_evicts {
            // Model (b): nothing was ever evicted, so the match is the longest prefix of the
            // query that was ever inserted, all of it on the device.
            let expect = hashes
                .iter()
                .take_while(|h| self.inserted.contains(h))
                .count();
            prop_assert_eq!(m.blocks(), expect, "exact model");
            prop_assert_eq!(m.host_blocks, 0);
        }
        // A block another live lease holds is locked: it must still be in the same slot.
        for (h, s) in hashes.iter().zip(&m.slots) {
            if let Some(prev) = leased.get(h) {
                prop_assert_eq!(prev, s, "a locked block moved");
            }
        }
        // The host part is loaded into slots nobody else holds.
        for s in &m.slots[m.device_blocks..] {
            prop_assert!(!held.leased.contains(s) && !held.outstanding.contains(s));
        }
        let hit = m.load.map(|id| ExpectedHit {
            id,
            dest: m.slots[m.device_blocks..].to_vec(),
        });
        self.live.push(Req {
            hashes,
            lease: m.lease,
            slots: m.slots,
            pending: Vec::new(),
            load: m.load,
        });
        Ok(hit)
    }

    /// Allocates `1 + want % remaining` slots (`None`: all remaining) for a request.
    fn allocate(&mut self, req: u8, want: Option<u8>, give_up: bool, held: &Held) -> Check {
        if self.live.is_empty() {
            return Ok(());
        }
        let i = req as usize % self.live.len();
        let r = &self.live[i];
        let need = r.hashes.len() - r.lease.blocks() - r.pending.len();
        if need == 0 {
            return Ok(());
        }
        let n = want.map_or(need, |w| 1 + w as usize % need);
        let before = self.cache.resident_blocks();
        // Allocation evicts every evictable block before it gives up, so it succeeds exactly
        // when the free slots plus the evictable blocks cover the request.
        let room = self.cache.usage().device_free + self.evictable(&before, &[]);
        match self.cache.allocate(n, self.now) {
            Ok(slots) => {
                prop_assert!(
                    n <= room,
                    "allocated {} with only {} free or evictable",
                    n,
                    room
                );
                prop_assert_eq!(slots.len(), n);
                let distinct: HashSet<SlotId> = slots.iter().copied().collect();
                prop_assert_eq!(distinct.len(), n, "duplicate slots handed out");
                for s in &slots {
                    prop_assert!(
                        !held.leased.contains(s),
                        "allocate handed out slot {:?} of a live lease",
                        s
                    );
                    prop_assert!(
                        !held.outstanding.contains(s),
                        "slot {:?} handed out twice",
                        s
                    );
                    prop_assert!(s.0 < self.cache.usage().device_capacity);
                }
                self.live[i].pending.extend(slots);
            }
            Err(CacheError::OutOfBlocks {
                requested,
                available,
            }) => {
                prop_assert!(!self.never_evicts, "a roomy cache ran out of blocks");
                prop_assert_eq!(requested, n);
                prop_assert!(n > room, "refused {} with {} free or evictable", n, room);
                prop_assert_eq!(available, room, "the error reports the room it found");
                if give_up {
                    self.end(i);
                }
            }
            Err(e) => prop_assert!(false, "unexpected error {}", e),
        }
        Ok(())
    }

    /// Inserts the next `count` (modulo what it holds, `None`: all) blocks the request holds
    /// slots for.
    fn insert(&mut self, req: u8, count: Option<u8>) -> Check {
        if self.live.is_empty() {
            return Ok(());
        }
        let i = req as usize % self.live.len();
        // The request computes its blocks only once its prefix is readable (the contract of
        // `Match::load`); until then it waits.
        if self.live[i].pending.is_empty()
            || self.cache.lease_state(&self.live[i].lease) != LeaseState::Ready
        {
            return Ok(());
        }
        let leased = self.lease_slots();
        let map = resident_map(&self.cache.resident_blocks());
        let r = &mut self.live[i];
        let k = count.map_or(r.pending.len(), |c| 1 + c as usize % r.pending.len());
        let start = r.lease.blocks();
        let hashes = r.hashes[start..start + k].to_vec();
        let slots = r.pending[..k].to_vec();
        // Insert merges up to the first block that is being loaded by someone else.
        let expect = hashes
            .iter()
            .take_while(|h| !map.get(h).is_some_and(|b| b.device_loading))
            .count();
        let ins = self
            .cache
            .insert(&mut r.lease, &hashes, &slots, self.now)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(ins.merged, expect, "blocks merged by insert");
        prop_assert_eq!(ins.slots.len(), ins.merged);
        for j in 0..ins.merged {
            let h = hashes[j];
            match map.get(&h) {
                // Already on the device: the tree's slot wins (and must not have moved if a lease
                // holds it); ours went back to the free list.
                Some(b) if b.device_ready => {
                    if let Some(s) = leased.get(&h) {
                        prop_assert_eq!(ins.slots[j], *s, "a locked block moved");
                    }
                    prop_assert_ne!(ins.slots[j], slots[j]);
                }
                _ => prop_assert_eq!(ins.slots[j], slots[j], "a new block keeps our slot"),
            }
        }
        if self.never_evicts {
            prop_assert_eq!(ins.merged, k, "nothing loads, so everything merges");
        }
        self.inserted.extend(&hashes[..ins.merged]);
        r.slots.extend(ins.slots);
        r.pending.drain(..ins.merged);
        Ok(())
    }

    /// Completes or fails one pending transfer. Returns the failed transfer if it was a load:
    /// the cache plans it again, and the step must find the retry.
    fn finish(&mut self, transfer: u8, fail: bool) -> Option<Transfer> {
        if self.transfers.is_empty() {
            return None;
        }
        let t = self
            .transfers
            .remove(transfer as usize % self.transfers.len());
        if fail {
            self.cache.fail_transfer(t.id);
        } else {
            self.cache.complete_transfer(t.id);
        }
        // Finishing one transfer twice is ignored.
        self.cache.complete_transfer(t.id);
        self.cache.fail_transfer(t.id);
        (fail && t.kind == TransferKind::Load).then_some(t)
    }

    /// Takes the transfers planned by the last step and checks each one: `hit` is the load the
    /// step's match must have planned, `retry` the failed load the step must have planned again.
    fn take_transfers(
        &mut self,
        held: &Held,
        hit: Option<ExpectedHit>,
        retry: Option<Transfer>,
    ) -> Check {
        let usage = self.cache.usage();
        let mut saw_hit = false;
        let mut saw_retry = false;
        let sorted = |t: &Transfer| {
            let mut c = t.copies.clone();
            c.sort();
            c
        };
        for t in self.cache.take_transfers() {
            prop_assert!(t.id.0 > self.last_transfer, "transfer id {:?} reused", t.id);
            self.last_transfer = t.id.0;
            prop_assert!(!t.copies.is_empty(), "empty transfer {:?}", t);
            prop_assert!(
                self.policy != PolicyKind::Lru,
                "lru has no host tier but planned {:?}",
                t
            );
            let (dev, host): (Vec<SlotId>, Vec<SlotId>) = match t.kind {
                TransferKind::Load => t.copies.iter().map(|&(h, d)| (d, h)).unzip(),
                TransferKind::Store => t.copies.iter().copied().unzip(),
            };
            prop_assert!(dev.iter().all(|s| s.0 < usage.device_capacity));
            prop_assert!(host.iter().all(|s| s.0 < usage.host_capacity));
            prop_assert_eq!(dev.iter().collect::<HashSet<_>>().len(), dev.len());
            prop_assert_eq!(host.iter().collect::<HashSet<_>>().len(), host.len());
            // A failed load is planned again with the same copies (its nodes may have been split
            // since, which reorders them), and its device slots may be leased by now.
            if let Some(r) = retry.as_ref().filter(|r| !saw_retry && r.cause == t.cause)
                && t.kind == TransferKind::Load
                && sorted(r) == sorted(&t)
            {
                saw_retry = true;
                self.transfers.push(t);
                continue;
            }
            match (t.kind, t.cause) {
                (TransferKind::Load, TransferCause::Hit) => {
                    match hit.as_ref().filter(|h| h.id == t.id) {
                        Some(want) => {
                            prop_assert_eq!(&dev, &want.dest, "hit load lands in the match's slots")
                        }
                        None => prop_assert!(false, "hit load {:?} nobody matched", t),
                    }
                    saw_hit = true;
                }
                (TransferKind::Load, TransferCause::Promotion) => {
                    prop_assert!(self.policy == PolicyKind::HotPrefix);
                    for s in &dev {
                        prop_assert!(
                            !held.leased.contains(s) && !held.outstanding.contains(s),
                            "promotion loads into held slot {:?}",
                            s
                        );
                    }
                }
                (TransferKind::Store, TransferCause::Eviction) => {
                    for s in &dev {
                        prop_assert!(!held.leased.contains(s), "evicted locked slot {:?}", s);
                    }
                }
                (TransferKind::Store, TransferCause::WriteThrough) => {
                    prop_assert!(self.policy == PolicyKind::HotPrefix);
                }
                _ => prop_assert!(false, "cause and direction disagree: {:?}", t),
            }
            self.transfers.push(t);
        }
        prop_assert_eq!(saw_hit, hit.is_some(), "the match's hit load was planned");
        prop_assert_eq!(
            saw_retry,
            retry.is_some(),
            "the failed load {:?} was retried",
            retry
        );
        Ok(())
    }

    /// Everything that must hold between any two calls.
    fn check_state(&self) -> Check {
        if let Err(e) = self.cache.check_invariants() {
            prop_assert!(false, "invariant broken: {}", e);
        }
        let u = self.cache.usage();
        let cap = u.device_capacity as usize;
        prop_assert_eq!(u.device_free + u.device_cached + u.device_outstanding, cap);
        prop_assert!(u.host_free <= u.host_capacity as usize);
        if self.policy == PolicyKind::Lru {
            prop_assert_eq!(u.host_capacity, 0);
        }
        let outstanding: usize = self.live.iter().map(|r| r.pending.len()).sum();
        prop_assert_eq!(
            u.device_outstanding,
            outstanding,
            "outstanding slots we hold"
        );

        let blocks = self.cache.resident_blocks();
        let map = resident_map(&blocks);
        prop_assert_eq!(map.len(), blocks.len(), "a hash is in the tree twice");
        let on_device = blocks.iter().filter(|b| device_present(b)).count();
        prop_assert_eq!(
            on_device,
            u.device_cached,
            "device blocks reachable from the tree"
        );
        let on_host = blocks
            .iter()
            .filter(|b| b.host_ready || b.host_writing)
            .count();
        prop_assert_eq!(
            on_host,
            u.host_capacity as usize - u.host_free - u.host_held
        );
        for b in &blocks {
            prop_assert!(!(b.device_ready && b.device_loading), "{:?}", b);
            prop_assert!(!(b.host_ready && b.host_writing), "{:?}", b);
        }

        // Locks: a block is locked exactly when a live lease covers it, and then it is on the
        // device (no lease here has failed: those were released at once) in the slot the cache
        // gave the request.
        let mut leased: HashMap<BlockHash, SlotId> = HashMap::new();
        let mut slot_owner: HashMap<SlotId, BlockHash> = HashMap::new();
        for r in &self.live {
            prop_assert_eq!(r.lease.blocks(), r.slots.len());
            let mut loading = false;
            for (h, s) in r.hashes.iter().zip(&r.slots) {
                let b = map.get(h);
                prop_assert!(
                    b.is_some_and(|b| b.locked && device_present(b)),
                    "leased block {:?} is {:?}",
                    h,
                    b
                );
                loading |= b.is_some_and(|b| b.device_loading);
                prop_assert!(s.0 < u.device_capacity);
                if let Some(prev) = leased.insert(*h, *s) {
                    prop_assert_eq!(prev, *s, "two leases see one block in two slots");
                }
                if let Some(prev) = slot_owner.insert(*s, *h) {
                    prop_assert_eq!(prev, *h, "one slot holds two leased blocks");
                }
            }
            let want = if loading {
                LeaseState::Loading
            } else {
                LeaseState::Ready
            };
            prop_assert_eq!(self.cache.lease_state(&r.lease), want);
        }
        let locked: HashSet<BlockHash> =
            blocks.iter().filter(|b| b.locked).map(|b| b.hash).collect();
        let covered: HashSet<BlockHash> = leased.keys().copied().collect();
        prop_assert_eq!(locked, covered, "locked blocks are exactly the leased ones");
        let mut pending = HashSet::new();
        for r in &self.live {
            for s in &r.pending {
                prop_assert!(pending.insert(*s), "outstanding slot {:?} held twice", s);
                prop_assert!(
                    !slot_owner.contains_key(s),
                    "outstanding slot {:?} is leased",
                    s
                );
            }
        }
        Ok(())
    }

    /// Ends every request and finishes every transfer, then checks that nothing stays locked or
    /// outstanding and that the whole device can be reclaimed.
    fn drain(&mut self) -> Check {
        while !self.live.is_empty() {
            self.end(self.live.len() - 1);
        }
        let held = Held::default();
        self.take_transfers(&held, None, None)?;
        while let Some(t) = self.transfers.pop() {
            self.cache.complete_transfer(t.id);
            self.take_transfers(&held, None, None)?;
        }
        self.check_state()?;
        let u = self.cache.usage();
        prop_assert_eq!(u.device_outstanding, 0);
        prop_assert_eq!(u.device_free + u.device_cached, u.device_capacity as usize);
        let blocks = self.cache.resident_blocks();
        prop_assert!(
            blocks.iter().all(|b| !b.locked),
            "a lock survived its lease"
        );
        prop_assert!(
            blocks.iter().all(|b| !b.device_loading && !b.host_writing),
            "a transfer stayed in flight after completion"
        );
        // With no lock and nothing in flight, every device block is evictable.
        let all = self
            .cache
            .allocate(u.device_capacity as usize, self.now)
            .map_err(|e| TestCaseError::fail(format!("drained cache cannot allocate: {e}")))?;
        self.cache
            .free(all)
            .expect("the test frees only slots it holds");
        self.take_transfers(&held, None, None)?;
        self.check_state()
    }
}

fn run_stream(policy: PolicyKind, setup: &Setup, ops: &[Op], never_evicts: bool) -> Check {
    let mut h = Harness::new(policy, config(policy, setup), never_evicts);
    for (i, op) in ops.iter().enumerate() {
        h.step(op)
            .map_err(|e| TestCaseError::fail(format!("{policy}, step {i} {op:?}: {e}")))?;
    }
    if never_evicts {
        prop_assert_eq!(
            h.cache.stats().device_evicted_blocks,
            0,
            "{} evicted",
            policy
        );
    }
    h.drain()
        .map_err(|e| TestCaseError::fail(format!("{policy}, drain: {e}")))
}

/// Proptest settings: `cases` by default, or `PROPTEST_CASES` for a soak run. Failing cases are
/// written up as named regression tests below rather than into a seed file.
fn proptest_config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(cases),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(proptest_config(128))]

    /// Small tiers, every policy: all per-step checks, model (a) on every match, then a drain.
    #[test]
    fn small_caches_keep_invariants_locks_and_accounting(
        setup in small_setup(),
        ops in prop::collection::vec(op_strategy(), 1..160),
    ) {
        for policy in PolicyKind::ALL {
            run_stream(policy, &setup, &ops, false)?;
        }
    }
}

proptest! {
    #![proptest_config(proptest_config(64))]

    /// Tiers too large to ever evict: every match equals the longest prefix ever inserted.
    #[test]
    fn without_eviction_matches_equal_the_longest_inserted_prefix(
        host in 0u32..=48,
        write_through in prop::option::of(prop::sample::select(vec![1.5, 2.5, 4.0])),
        ops in prop::collection::vec(op_strategy(), 1..160),
    ) {
        // Requests never hold more slots (inserted or outstanding) than their prompts have
        // blocks, so this many device slots never run out. The device is sized to the stream
        // because invariant checks cost O(slots).
        let blocks: usize = ops
            .iter()
            .map(|op| match op {
                Op::Start { picks, .. } | Op::Run { picks, .. } => 1 + picks.len(),
                _ => 0,
            })
            .sum();
        let setup = Setup {
            device: (blocks as u32).max(4),
            host,
            write_through,
            promotion_blocks: 4,
            promotion_margin: None,
            half_life_turnovers: None,
        };
        for policy in PolicyKind::ALL {
            run_stream(policy, &setup, &ops, true)?;
        }
    }
}

// ----- regression cases -------------------------------------------------------------------------

/// Runs one request to completion with every transfer completed (as in `tests/policies.rs`).
fn request(c: &mut PrefixCache, hashes: &[BlockHash], now: f64) {
    let m = c.match_hashes(hashes, hashes.len() * BT, now);
    let mut lease = m.lease;
    for t in c.take_transfers() {
        c.complete_transfer(t.id);
    }
    let rest = &hashes[lease.blocks()..];
    let slots = c
        .allocate(rest.len(), now)
        .expect("regression caches have room for one request");
    c.insert(&mut lease, rest, &slots, now)
        .expect("hashes and slots have equal lengths");
    c.release(lease);
    for t in c.take_transfers() {
        c.complete_transfer(t.id);
    }
}

fn ids(base: u64, n: u64) -> Vec<BlockHash> {
    (1..=n).map(|i| BlockHash(base * 1000 + i)).collect()
}

fn finish_all(c: &mut PrefixCache, transfers: Vec<Transfer>) {
    for t in transfers {
        c.complete_transfer(t.id);
    }
}

/// Found by the streams (when a failed load gave its blocks up): a request loads the first half
/// of a host-only prefix, a second request loads the second half below it, and the first load
/// fails. Dropping the failed half from the device orphaned the second half ("node 1 is on the
/// device but its parent 3 is not"); the load must be planned again instead.
#[test]
fn a_failed_hit_load_is_retried_and_does_not_orphan_a_child_loaded_after_it() {
    let mut c =
        PrefixCache::new(CacheConfig::new(PolicyKind::LruOffload, BT, 1024, 4, 16)).unwrap();
    let a = ids(1, 4);
    request(&mut c, &a, 0.0);
    request(&mut c, &ids(2, 4), 1.0); // evicts `a` to the host
    let m1 = c.match_hashes(&a[..2], 2 * BT, 2.0); // loads a[0..2]
    let m2 = c.match_hashes(&a, 4 * BT, 3.0); // a[0..2] loading, loads a[2..4]
    assert_eq!((m2.device_blocks, m2.host_blocks), (2, 2));
    let first = c.take_transfers();
    c.fail_transfer(m1.load.unwrap());
    c.check_invariants().unwrap();
    let retry = c.take_transfers();
    let failed = first.iter().find(|t| Some(t.id) == m1.load).unwrap();
    assert_eq!(retry.len(), 1);
    assert_eq!(
        (retry[0].kind, retry[0].cause, &retry[0].copies),
        (TransferKind::Load, TransferCause::Hit, &failed.copies)
    );
    assert_eq!(c.lease_state(&m2.lease), LeaseState::Loading);
    finish_all(&mut c, first);
    assert_eq!(
        c.lease_state(&m2.lease),
        LeaseState::Loading,
        "the retry is still in flight"
    );
    finish_all(&mut c, retry);
    assert_eq!(c.lease_state(&m1.lease), LeaseState::Ready);
    assert_eq!(c.lease_state(&m2.lease), LeaseState::Ready);
    c.release(m1.lease);
    c.release(m2.lease);
    c.check_invariants().unwrap();
    assert_eq!(c.peek(&a).device_blocks, 4);
}

/// The same through promotion alone: two rounds promote a hot host-only prefix top-down in two
/// transfers (a loading parent counts as on the device), and the first one fails.
#[test]
fn a_failed_promotion_is_retried_and_does_not_orphan_a_child_promoted_after_it() {
    let mut cfg = CacheConfig::new(PolicyKind::HotPrefix, BT, 1024, 4, 16);
    cfg.hotness.write_through_hotness = None;
    cfg.hotness.promotion_budget_bytes = 2 * 1024;
    cfg.hotness.promotion_margin = Some(1.0);
    let mut c = PrefixCache::new(cfg).unwrap();
    let hot = ids(1, 4);
    for t in 0..4 {
        request(&mut c, &hot, f64::from(t));
    }
    request(&mut c, &ids(2, 4), 10.0); // evicts `hot` to the host
    c.tick(12.0); // promotes hot[0..2]
    let first = c.take_transfers();
    c.tick(13.0); // promotes hot[2..4]: its parent is "on the device" (loading)
    let second = c.take_transfers();
    assert!(second.iter().any(|t| t.cause == TransferCause::Promotion));
    let load = first
        .iter()
        .find(|t| t.cause == TransferCause::Promotion)
        .unwrap();
    c.fail_transfer(load.id);
    c.check_invariants().unwrap();
    let retry = c.take_transfers();
    assert_eq!(retry.len(), 1);
    assert_eq!(retry[0].cause, TransferCause::Promotion);
    finish_all(&mut c, first);
    finish_all(&mut c, second);
    finish_all(&mut c, retry);
    c.check_invariants().unwrap();
    assert_eq!(c.peek(&hot).device_blocks, 4);
}
