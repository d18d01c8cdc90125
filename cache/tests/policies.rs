//! Behaviour that tells the policies apart, plus the basic match/insert/transfer life cycle.

// Helpers outside `#[test]` functions panic on purpose when the cache misbehaves.
#![allow(clippy::unwrap_used)]

use hotprefix_cache::{
    CacheConfig, LeaseState, PolicyKind, PrefixCache, SlotId, TransferCause, TransferKind,
};
use hotprefix_protocol::BlockHash;

/// A cache with 16-token blocks of 1 KiB.
fn cache(policy: PolicyKind, device: u32, host: u32) -> PrefixCache {
    PrefixCache::new(CacheConfig::new(policy, 16, 1024, device, host)).unwrap()
}

/// Block hashes of a chain `base+1, base+2, ...` (ids stand in for chained hashes).
fn chain(base: u64, n: usize) -> Vec<BlockHash> {
    (1..=n as u64).map(|i| BlockHash(base * 1000 + i)).collect()
}

/// Runs one request to completion: match, allocate the rest, insert, release, finish transfers.
fn request(c: &mut PrefixCache, hashes: &[BlockHash], now: f64) -> (usize, usize) {
    let m = c.match_hashes(hashes, hashes.len() * 16, now);
    let (dev, host) = (m.device_blocks, m.host_blocks);
    let mut lease = m.lease;
    finish_transfers(c);
    assert_eq!(c.lease_state(&lease), LeaseState::Ready);
    let rest = &hashes[lease.blocks()..];
    let slots = c.allocate(rest.len(), now).unwrap();
    let ins = c.insert(&mut lease, rest, &slots, now).unwrap();
    assert_eq!(ins.merged, rest.len());
    c.release(lease);
    finish_transfers(c);
    c.check_invariants().unwrap();
    (dev, host)
}

fn finish_transfers(c: &mut PrefixCache) {
    let pending = c.take_transfers();
    finish_transfers_from(c, pending);
}

/// Reports `t` (transfers taken earlier) complete.
fn finish_transfers_from(c: &mut PrefixCache, t: Vec<hotprefix_cache::Transfer>) {
    for t in t {
        c.complete_transfer(t.id);
    }
}

#[test]
fn a_repeated_prompt_hits_the_device_and_a_diverging_one_splits_the_edge() {
    let mut c = cache(PolicyKind::HotPrefix, 64, 64);
    let a = chain(1, 8);
    assert_eq!(request(&mut c, &a, 0.0), (0, 0));
    assert_eq!(request(&mut c, &a, 1.0), (8, 0));
    let mut b = a[..5].to_vec();
    b.extend(chain(2, 3));
    assert_eq!(request(&mut c, &b, 2.0), (5, 0));
    assert_eq!(
        c.usage().nodes,
        3,
        "one shared edge split into a parent and two children"
    );
    assert_eq!(c.stats().device_hit_tokens, (8 + 5) * 16);
}

#[test]
fn insert_returns_the_tree_slots_for_blocks_computed_twice() {
    let mut c = cache(PolicyKind::Lru, 64, 0);
    let h = chain(1, 4);
    let m1 = c.match_hashes(&h, 64, 0.0);
    let m2 = c.match_hashes(&h, 64, 0.0);
    let (mut l1, mut l2) = (m1.lease, m2.lease);
    let s1 = c.allocate(4, 0.0).unwrap();
    let s2 = c.allocate(4, 0.0).unwrap();
    assert_eq!(c.insert(&mut l1, &h, &s1, 0.0).unwrap().slots, s1);
    let second = c.insert(&mut l2, &h, &s2, 0.0).unwrap();
    assert_eq!(
        second.slots, s1,
        "the duplicate computation maps onto the cached slots"
    );
    assert_eq!(c.usage().device_free, 60);
    c.release(l1);
    c.release(l2);
    c.check_invariants().unwrap();
}

#[test]
fn lru_evicts_the_least_recently_used_leaf_and_has_no_host_tier() {
    let mut c = cache(PolicyKind::Lru, 8, 100);
    let (a, b) = (chain(1, 4), chain(2, 4));
    request(&mut c, &a, 0.0);
    request(&mut c, &b, 1.0);
    request(&mut c, &a, 2.0); // a is now more recent than b
    request(&mut c, &chain(3, 4), 3.0); // needs 4 blocks: evicts b
    assert_eq!(c.peek(&a).device_blocks, 4);
    assert_eq!(c.peek(&b).device_blocks + c.peek(&b).host_blocks, 0);
    assert_eq!(c.usage().host_capacity, 0);
    assert_eq!(c.stats().d2h_bytes, 0);
}

#[test]
fn hotprefix_evicts_the_coldest_leaf_not_the_least_recent() {
    let mut c = cache(PolicyKind::HotPrefix, 8, 0);
    let (a, b) = (chain(1, 4), chain(2, 4));
    for t in 0..5 {
        request(&mut c, &a, t as f64); // a: hot
    }
    request(&mut c, &b, 10.0); // b: once, but most recent
    request(&mut c, &chain(3, 4), 11.0);
    assert_eq!(c.peek(&a).device_blocks, 4, "the hot prefix survives");
    assert_eq!(
        c.peek(&b).device_blocks,
        0,
        "the recent but cold prefix goes"
    );
}

#[test]
fn on_the_churn_clock_idle_time_does_not_cool_a_prefix() {
    // Default: hotness decays per cache turnover. A day without new blocks changes nothing.
    let mut c = cache(PolicyKind::HotPrefix, 8, 0);
    let (hot, b) = (chain(1, 4), chain(2, 4));
    for t in 0..5 {
        request(&mut c, &hot, t as f64);
    }
    request(&mut c, &b, 86_400.0);
    request(&mut c, &chain(3, 4), 86_401.0);
    assert_eq!(c.peek(&hot).device_blocks, 4);
    assert_eq!(c.peek(&b).device_blocks, 0);
    // On the wall clock with a 600 s half-life, a day decays five accesses to nothing.
    let mut cfg = CacheConfig::new(PolicyKind::HotPrefix, 16, 1024, 8, 0);
    cfg.hotness.half_life_turnovers = None;
    let mut c = PrefixCache::new(cfg).unwrap();
    for t in 0..5 {
        request(&mut c, &hot, t as f64);
    }
    request(&mut c, &b, 86_400.0);
    request(&mut c, &chain(3, 4), 86_401.0);
    assert_eq!(c.peek(&hot).device_blocks, 0);
    assert_eq!(c.peek(&b).device_blocks, 4);
}

#[test]
fn lru_offload_writes_every_evicted_node_to_host_and_loads_it_back_on_a_hit() {
    let mut c = cache(PolicyKind::LruOffload, 4, 16);
    let a = chain(1, 4);
    request(&mut c, &a, 0.0);
    request(&mut c, &chain(2, 4), 1.0); // evicts a to host
    assert_eq!(c.stats().admitted_blocks, 4);
    assert_eq!(c.peek(&a).host_blocks, 4);
    let m = c.match_hashes(&a, 64, 2.0);
    assert_eq!((m.device_blocks, m.host_blocks), (0, 4));
    assert_eq!(c.lease_state(&m.lease), LeaseState::Loading);
    let loads = c.take_transfers();
    let load = loads.iter().find(|t| t.kind == TransferKind::Load).unwrap();
    assert_eq!(load.cause, TransferCause::Hit);
    assert_eq!(load.copies.len(), 4);
    assert_eq!(Some(load.id), m.load);
    for t in loads {
        c.complete_transfer(t.id);
    }
    assert_eq!(c.lease_state(&m.lease), LeaseState::Ready);
    c.release(m.lease);
    c.check_invariants().unwrap();
    assert_eq!(c.stats().host_hit_tokens, 64);
}

#[test]
fn hotprefix_does_not_admit_a_cold_prefix_to_a_host_full_of_hotter_ones() {
    let mut cfg = CacheConfig::new(PolicyKind::HotPrefix, 16, 1024, 4, 4);
    cfg.hotness.write_through_hotness = None;
    let mut c = PrefixCache::new(cfg).unwrap();
    let hot = chain(1, 4);
    for t in 0..4 {
        request(&mut c, &hot, t as f64);
    }
    request(&mut c, &chain(2, 4), 5.0); // hot goes to host (room there)
    assert_eq!(c.peek(&hot).host_blocks, 4);
    request(&mut c, &chain(3, 4), 6.0); // chain 2 (cold) evicted: host full of a hotter node
    assert_eq!(c.stats().admitted_blocks, 4);
    assert_eq!(c.stats().rejected_blocks, 4);
    assert_eq!(
        c.peek(&hot).host_blocks,
        4,
        "the hot prefix keeps its host copy"
    );
}

#[test]
fn reuse_offload_admits_only_blocks_seen_twice() {
    let mut c = cache(PolicyKind::ReuseOffload, 4, 16);
    let (once, twice) = (chain(1, 4), chain(2, 4));
    request(&mut c, &once, 0.0);
    request(&mut c, &twice, 1.0); // evicts `once`: seen once, rejected
    assert_eq!(c.stats().rejected_blocks, 4);
    request(&mut c, &twice, 2.0);
    request(&mut c, &chain(3, 4), 3.0); // evicts `twice`: admitted
    assert_eq!(c.stats().admitted_blocks, 4);
    assert_eq!(c.peek(&twice).host_blocks, 4);
    assert_eq!(c.peek(&once).host_blocks, 0);
}

#[test]
fn hotprefix_promotes_a_hot_host_prefix_back_to_the_device() {
    let mut cfg = CacheConfig::new(PolicyKind::HotPrefix, 16, 1024, 4, 16);
    cfg.hotness.write_through_hotness = None;
    cfg.hotness.promotion_budget_bytes = 1 << 30;
    cfg.hotness.promotion_margin = Some(1.0);
    let mut c = PrefixCache::new(cfg).unwrap();
    let hot = chain(1, 4);
    for t in 0..6 {
        request(&mut c, &hot, t as f64);
    }
    // A cold prefix needs the whole device: the hot one is evicted and admitted to host.
    let cold = chain(2, 4);
    request(&mut c, &cold, 10.0);
    assert_eq!(c.peek(&hot).host_blocks, 4, "evicted to host");
    c.tick(12.0);
    let t = c.take_transfers();
    assert!(
        t.iter()
            .any(|t| t.cause == TransferCause::Promotion && t.copies.len() == 4),
        "promotion planned: {t:?}"
    );
    for t in t {
        c.complete_transfer(t.id);
    }
    assert_eq!(c.peek(&hot).device_blocks, 4, "promoted");
    assert_eq!(
        c.peek(&cold).device_blocks,
        0,
        "the colder device leaf made room"
    );
    assert_eq!(c.stats().promoted_blocks, 4);
    c.check_invariants().unwrap();
    // Promotion never displaces hotter nodes: the cold prefix (if kept on host) stays there.
    c.tick(20.0);
    assert!(c.take_transfers().is_empty());
    assert_eq!(c.peek(&hot).device_blocks, 4);
}

#[test]
fn without_a_margin_promotion_only_fills_free_device_slots() {
    let mut cfg = CacheConfig::new(PolicyKind::HotPrefix, 16, 1024, 8, 32);
    cfg.hotness.write_through_hotness = None;
    cfg.hotness.promotion_budget_bytes = 1 << 30;
    let mut c = PrefixCache::new(cfg).unwrap();
    let hot = chain(1, 4);
    for t in 0..6 {
        request(&mut c, &hot, t as f64);
    }
    request(&mut c, &chain(2, 8), 10.0); // fills the device; the hot prefix goes to host
    assert_eq!(c.peek(&hot).host_blocks, 4);
    c.tick(11.0);
    assert!(
        c.take_transfers().is_empty(),
        "nothing is displaced for a promotion"
    );
    // Free the device: allocate everything (evicting the cold prefix) and give it back.
    let all = c.allocate(8, 12.0).unwrap();
    c.free(all).unwrap();
    finish_transfers(&mut c);
    c.tick(13.0);
    let t = c.take_transfers();
    assert!(
        t.iter()
            .any(|t| t.cause == TransferCause::Promotion && t.copies.len() == 4),
        "{t:?}"
    );
    finish_transfers_from(&mut c, t);
    assert_eq!(c.peek(&hot).device_blocks, 4);
    c.check_invariants().unwrap();
}

#[test]
fn locked_blocks_are_never_evicted_and_allocation_fails_cleanly() {
    let mut c = cache(PolicyKind::HotPrefix, 4, 4);
    let a = chain(1, 4);
    let m = c.match_hashes(&a, 64, 0.0);
    let mut lease = m.lease;
    let slots = c.allocate(4, 0.0).unwrap();
    c.insert(&mut lease, &a, &slots, 0.0).unwrap();
    let err = c.allocate(1, 1.0).unwrap_err();
    assert!(err.to_string().contains("out of device blocks"), "{err}");
    assert_eq!(c.peek(&a).device_blocks, 4);
    c.release(lease);
    assert_eq!(c.allocate(1, 2.0).unwrap().len(), 1);
    c.check_invariants().unwrap();
}

#[test]
fn a_failed_load_is_planned_again_and_the_lease_keeps_waiting() {
    let mut c = cache(PolicyKind::LruOffload, 4, 8);
    let a = chain(1, 4);
    request(&mut c, &a, 0.0);
    request(&mut c, &chain(2, 4), 1.0);
    let m = c.match_hashes(&a, 64, 2.0);
    let first = c.take_transfers();
    let load = first.iter().find(|t| Some(t.id) == m.load).unwrap().clone();
    c.fail_transfer(load.id);
    assert_eq!(c.lease_state(&m.lease), LeaseState::Loading);
    assert_eq!(c.stats().failed_transfers, 1);
    let retry = c.take_transfers();
    assert_eq!(retry.len(), 1);
    assert_ne!(retry[0].id, load.id);
    assert_eq!(retry[0].copies, load.copies, "same blocks, same slots");
    c.check_invariants().unwrap();
    c.complete_transfer(load.id); // late completion of the failed one: ignored
    assert_eq!(c.lease_state(&m.lease), LeaseState::Loading);
    for t in first.iter().filter(|t| t.id != load.id).chain(&retry) {
        c.complete_transfer(t.id);
    }
    assert_eq!(c.lease_state(&m.lease), LeaseState::Ready);
    c.release(m.lease);
    c.check_invariants().unwrap();
}

#[test]
fn write_through_copies_a_very_hot_node_so_its_eviction_is_free() {
    let mut cfg = CacheConfig::new(PolicyKind::HotPrefix, 16, 1024, 4, 8);
    // Three accesses one second apart are worth just under 3 after decay.
    cfg.hotness.write_through_hotness = Some(2.9);
    let mut c = PrefixCache::new(cfg).unwrap();
    let a = chain(1, 4);
    for t in 0..3 {
        request(&mut c, &a, t as f64);
    }
    assert_eq!(c.stats().write_through_blocks, 4);
    let d2h = c.stats().d2h_bytes;
    request(&mut c, &chain(2, 4), 4.0);
    assert_eq!(
        c.stats().d2h_bytes,
        d2h,
        "evicting a node with a host copy moves nothing"
    );
    assert_eq!(c.peek(&a).host_blocks, 4);
}

#[test]
fn write_through_waits_until_the_device_is_nearly_full() {
    let mut cfg = CacheConfig::new(PolicyKind::HotPrefix, 16, 1024, 64, 64);
    cfg.hotness.write_through_hotness = Some(2.9);
    let mut c = PrefixCache::new(cfg).unwrap();
    let a = chain(1, 4);
    for t in 0..5 {
        request(&mut c, &a, t as f64);
    }
    assert_eq!(
        c.stats().write_through_blocks,
        0,
        "60 of 64 blocks free: no eviction coming"
    );
    assert_eq!(c.stats().d2h_bytes, 0);
}

#[test]
fn summary_is_hottest_first_and_prefix_closed() {
    let mut c = cache(PolicyKind::HotPrefix, 64, 64);
    let a = chain(1, 6);
    let mut b = a[..2].to_vec();
    b.extend(chain(2, 2));
    request(&mut c, &a, 0.0);
    request(&mut c, &b, 1.0);
    request(&mut c, &b, 2.0);
    let s = c.summary(100, 3.0);
    assert_eq!(s.len(), 8);
    assert_eq!(s[0].hash, a[0]);
    assert_eq!(s[0].depth, 1);
    for w in s.windows(2) {
        assert!(w[0].hotness >= w[1].hotness);
    }
    let top3: Vec<_> = c.summary(3, 3.0).iter().map(|e| e.hash).collect();
    assert_eq!(top3, vec![a[0], a[1], b[2]]);
}

#[test]
fn match_by_tokens_hashes_with_the_protocol_scheme() {
    let mut c = cache(PolicyKind::Lru, 16, 0);
    let tokens: Vec<u32> = (0..40).collect();
    let salt = hotprefix_protocol::Salt::new("m", None, None);
    let (m, hashes) = c.match_prefix(&tokens, salt, 0.0);
    assert_eq!(hashes.len(), 2, "only the two full blocks");
    assert_eq!(
        hashes,
        hotprefix_protocol::hash_blocks(&tokens, 16, salt, BlockHash::ROOT)
    );
    let mut lease = m.lease;
    let slots = c.allocate(2, 0.0).unwrap();
    c.insert(&mut lease, &hashes, &slots, 0.0).unwrap();
    c.release(lease);
    let (m, _) = c.match_prefix(&tokens, salt, 1.0);
    assert_eq!(m.cached_tokens, 32);
    assert_eq!(m.slots, slots);
    let free: Vec<SlotId> = Vec::new();
    c.free(free).unwrap();
    c.release(m.lease);
}

#[test]
fn a_failed_allocation_evicts_nothing() {
    let mut c = cache(PolicyKind::Lru, 8, 0);
    let a = chain(1, 4);
    request(&mut c, &a, 0.0);
    assert_eq!(c.reclaimable_device_blocks(), 4);
    let err = c.allocate(9, 1.0).unwrap_err();
    assert_eq!(
        err,
        hotprefix_cache::CacheError::OutOfBlocks {
            requested: 9,
            available: 8
        }
    );
    assert_eq!(
        c.peek(&a).device_blocks,
        4,
        "the cached prefix survives the failed call"
    );
    assert_eq!(c.stats().device_evicted_blocks, 0);
}

#[test]
fn a_lease_from_another_cache_is_refused() {
    let mut a = cache(PolicyKind::Lru, 8, 0);
    let mut b = cache(PolicyKind::Lru, 8, 0);
    let h = chain(1, 2);
    let m = a.match_hashes(&h, 32, 0.0);
    let mut lease = m.lease;
    let slots = b.allocate(2, 0.0).unwrap();
    let err = b.insert(&mut lease, &h, &slots, 0.0).unwrap_err();
    assert_eq!(err, hotprefix_cache::CacheError::ForeignLease);
    a.release(lease);
    b.free(slots).unwrap();
    a.check_invariants().unwrap();
    b.check_invariants().unwrap();
}

#[test]
#[should_panic(expected = "a lease was given to a cache that did not issue it")]
fn releasing_a_lease_into_another_cache_panics_instead_of_corrupting_it() {
    let mut a = cache(PolicyKind::Lru, 8, 0);
    let mut b = cache(PolicyKind::Lru, 8, 0);
    let m = a.match_hashes(&chain(1, 2), 32, 0.0);
    b.release(m.lease);
}

#[test]
fn admission_drops_no_host_victim_when_it_ends_up_rejecting() {
    // Host of 3: a cold 1-block node and a hot 2-block node. A 2-block newcomer would need both
    // gone, and loses to the hot one, so the cold one must stay too.
    let mut cfg = CacheConfig::new(PolicyKind::HotPrefix, 16, 1024, 2, 3);
    cfg.hotness.half_life_turnovers = None;
    cfg.hotness.half_life_s = 10.0;
    let mut c = PrefixCache::new(cfg).unwrap();
    let cold = chain(1, 1);
    let hot = chain(2, 2);
    request(&mut c, &cold, 0.0);
    for t in 1..6 {
        request(&mut c, &hot, t as f64);
    }
    request(&mut c, &chain(3, 2), 10.0); // pushes both to host
    assert_eq!(c.peek(&cold).host_blocks, 1);
    assert_eq!(c.peek(&hot).host_blocks, 2);
    let evicted = c.stats().host_evicted_blocks;
    request(&mut c, &chain(4, 2), 30.0); // evicts chain 3 (cooled): rejected
    assert_eq!(
        c.stats().host_evicted_blocks,
        evicted,
        "no victim was dropped for nothing"
    );
    assert_eq!(c.peek(&cold).host_blocks, 1);
}

#[test]
fn a_node_being_written_through_is_not_evicted_until_the_copy_is_done() {
    let mut cfg = CacheConfig::new(PolicyKind::HotPrefix, 16, 1024, 4, 8);
    cfg.hotness.write_through_hotness = Some(1.5);
    let mut c = PrefixCache::new(cfg).unwrap();
    let a = chain(1, 4);
    request(&mut c, &a, 0.0);
    let m = c.match_hashes(&a, 64, 1.0); // second access: write-through planned
    let stores = c.take_transfers();
    assert!(
        stores
            .iter()
            .any(|t| t.cause == TransferCause::WriteThrough),
        "{stores:?}"
    );
    c.release(m.lease);
    // The copy still reads the device slots: they cannot be handed out.
    assert!(c.allocate(4, 2.0).is_err());
    finish_transfers_from(&mut c, stores);
    assert_eq!(c.allocate(4, 3.0).unwrap().len(), 4);
    c.check_invariants().unwrap();
}

#[test]
fn host_slots_of_a_dropped_node_wait_for_its_store() {
    // lru-offload, device 4, host 2: evicting the child stores it; evicting the parent finds
    // the host full of an in-flight write, is rejected, and drops the child with it. The
    // child's host slots stay reserved until its store reports back.
    let mut c = cache(PolicyKind::LruOffload, 4, 2);
    let a = chain(1, 4);
    let m = c.match_hashes(&a[..2], 32, 0.0);
    let mut lease = m.lease;
    let s = c.allocate(2, 0.0).unwrap();
    c.insert(&mut lease, &a[..2], &s, 0.0).unwrap();
    let s = c.allocate(2, 0.0).unwrap();
    c.insert(&mut lease, &a[2..], &s, 0.0).unwrap();
    c.release(lease);
    c.allocate(2, 1.0).unwrap(); // evicts the child a[2..]: store to host
    let store = c.take_transfers();
    assert_eq!(store.len(), 1);
    c.allocate(2, 2.0).unwrap(); // evicts the parent: rejected, child dropped
    assert_eq!(c.usage().host_held, 2);
    assert_eq!(
        c.usage().host_free,
        0,
        "the in-flight copy's slots are not reused"
    );
    c.check_invariants().unwrap();
    c.complete_transfer(store[0].id);
    assert_eq!(c.usage().host_held, 0);
    assert_eq!(c.usage().host_free, 2);
    c.check_invariants().unwrap();
}

#[test]
fn a_queued_request_keeps_its_prefix_warm_under_hotprefix_only() {
    // Device of 8: prefix `a` and then `b` are cached. A request for `a` is queued (hinted);
    // a new prefix then needs room. With the hint, `b` is the colder one and goes.
    for (policy, a_survives) in [(PolicyKind::HotPrefix, true), (PolicyKind::Lru, false)] {
        let mut c = cache(policy, 8, 0);
        let (a, b) = (chain(1, 4), chain(2, 4));
        request(&mut c, &a, 0.0);
        request(&mut c, &b, 1.0);
        c.hint_queued(&a, 2.0);
        request(&mut c, &chain(3, 4), 3.0);
        assert_eq!(c.peek(&a).device_blocks == 4, a_survives, "{policy}");
        assert_eq!(c.peek(&b).device_blocks == 4, !a_survives, "{policy}");
        c.check_invariants().unwrap();
    }
}

#[test]
fn slots_not_handed_out_are_refused_by_free_and_insert() {
    let mut c = cache(PolicyKind::Lru, 8, 0);
    let s = c.allocate(2, 0.0).unwrap();
    let err = c.free(vec![SlotId(7)]).unwrap_err();
    assert_eq!(err, hotprefix_cache::CacheError::NotHandedOut(SlotId(7)));
    assert!(c.free(vec![s[0], s[0]]).is_err(), "a slot listed twice");
    let m = c.match_hashes(&chain(1, 2), 32, 0.0);
    let mut lease = m.lease;
    assert!(
        c.insert(&mut lease, &chain(1, 2), &[s[0], SlotId(6)], 0.0)
            .is_err()
    );
    assert_eq!(c.usage().device_outstanding, 2, "nothing changed");
    c.insert(&mut lease, &chain(1, 2), &s, 0.0).unwrap();
    assert!(
        c.free(s.clone()).is_err(),
        "inserted slots belong to the tree"
    );
    c.release(lease);
    c.check_invariants().unwrap();
}

#[test]
fn a_node_recomputed_while_its_eviction_store_is_in_flight_stays_evictable() {
    // The store reads the old device slots (already free again); the fresh copy inserted by a
    // new request is nobody's source and must not block the device.
    let mut c = cache(PolicyKind::LruOffload, 4, 8);
    let a = chain(1, 4);
    request(&mut c, &a, 0.0);
    let evicting = c.allocate(4, 1.0).unwrap(); // evicts `a`: its store is now in flight
    let store = c.take_transfers();
    assert_eq!(store.len(), 1);
    c.free(evicting).unwrap();
    let m = c.match_hashes(&a, 64, 2.0);
    assert_eq!(
        m.blocks(),
        0,
        "a host copy still being written is not matchable"
    );
    let mut lease = m.lease;
    let s = c.allocate(4, 2.0).unwrap();
    c.insert(&mut lease, &a, &s, 2.0).unwrap();
    c.release(lease);
    assert_eq!(c.reclaimable_device_blocks(), 4);
    assert_eq!(c.allocate(1, 3.0).unwrap().len(), 1);
    c.check_invariants().unwrap();
    finish_transfers_from(&mut c, store);
    c.check_invariants().unwrap();
}

#[test]
fn fits_does_not_overflow_on_huge_requests() {
    let mut c = cache(PolicyKind::LruOffload, 4, 8);
    let a = chain(1, 2);
    request(&mut c, &a, 0.0);
    request(&mut c, &chain(2, 4), 1.0); // `a` goes to host
    assert_eq!(c.peek(&a).host_blocks, 2);
    assert!(!c.fits(&a, usize::MAX));
    assert!(c.fits(&a, 2));
}

#[test]
fn a_promotion_that_cannot_make_room_evicts_nothing() {
    let mut cfg = CacheConfig::new(PolicyKind::HotPrefix, 16, 1024, 4, 16);
    cfg.hotness.promotion_budget_bytes = 2 * 1024;
    cfg.hotness.promotion_margin = Some(0.0);
    cfg.hotness.half_life_turnovers = None;
    let mut c = PrefixCache::new(cfg).unwrap();
    let (h, w, cold) = (chain(1, 2), chain(2, 3), chain(3, 1));
    for t in 0..5 {
        request(&mut c, &h, t as f64);
    }
    for t in 5..15 {
        request(&mut c, &w, t as f64); // pushes `h` to host
    }
    request(&mut c, &cold, 15.0);
    assert_eq!(c.peek(&h).host_blocks, 2);
    let evicted = c.stats().device_evicted_blocks;
    c.tick(16.0);
    // Room for `h` needs `cold` and `w` gone, and `w` is hotter than `h`: nothing happens.
    assert_eq!(c.stats().device_evicted_blocks, evicted);
    assert_eq!(c.stats().promoted_blocks, 0);
    assert_eq!(c.peek(&cold).device_blocks, 1);
    c.check_invariants().unwrap();
}
