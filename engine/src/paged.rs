//! Paged KV storage: fixed-size blocks in an arena, addressed through a sequence's block table
//! of slot ids handed out by the prefix cache. The engine keeps two arenas (device tier and host
//! tier) and copies blocks between them as the cache's transfer plans say.

use hotprefix_cache::SlotId;

use crate::model::{KvStore, LlamaConfig};

/// Block storage for every layer's keys and values: `blocks` blocks of `block_size` positions.
#[derive(Debug, Clone)]
pub struct KvArena {
    block_size: usize,
    kv_dim: usize,
    blocks: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl KvArena {
    /// An arena of `blocks` blocks for a model of shape `cfg`.
    pub fn new(cfg: &LlamaConfig, block_size: usize, blocks: usize) -> KvArena {
        let kv_dim = cfg.kv_heads * cfg.head_dim;
        let per_layer = blocks * block_size * kv_dim;
        KvArena {
            block_size,
            kv_dim,
            blocks,
            k: vec![vec![0.0; per_layer]; cfg.layers],
            v: vec![vec![0.0; per_layer]; cfg.layers],
        }
    }

    /// Positions per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the arena.
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    fn range(&self, slot: SlotId, offset: usize) -> std::ops::Range<usize> {
        let start = (slot.0 as usize * self.block_size + offset) * self.kv_dim;
        start..start + self.kv_dim
    }

    fn block_range(&self, slot: SlotId) -> std::ops::Range<usize> {
        let start = slot.0 as usize * self.block_size * self.kv_dim;
        start..start + self.block_size * self.kv_dim
    }

    /// Copies block `src_slot` of `src` into block `dst_slot` of `dst`, every layer (a tier
    /// transfer of one block).
    pub fn copy_block(src: &KvArena, src_slot: SlotId, dst: &mut KvArena, dst_slot: SlotId) {
        let (s, d) = (src.block_range(src_slot), dst.block_range(dst_slot));
        for l in 0..src.k.len() {
            dst.k[l][d.clone()].copy_from_slice(&src.k[l][s.clone()]);
            dst.v[l][d.clone()].copy_from_slice(&src.v[l][s.clone()]);
        }
    }
}

/// One sequence's view of an arena: its block table and how many positions it holds.
#[derive(Debug)]
pub struct PagedKv<'a> {
    arena: &'a mut KvArena,
    table: &'a [SlotId],
    len: usize,
}

impl<'a> PagedKv<'a> {
    /// A sequence whose first `len` positions are already in the blocks of `table`.
    ///
    /// # Panics
    /// If the table cannot hold `len` positions.
    pub fn new(arena: &'a mut KvArena, table: &'a [SlotId], len: usize) -> Self {
        assert!(
            len <= table.len() * arena.block_size,
            "block table too short"
        );
        PagedKv { arena, table, len }
    }

    fn at(&self, pos: usize) -> std::ops::Range<usize> {
        let bs = self.arena.block_size;
        self.arena.range(self.table[pos / bs], pos % bs)
    }
}

impl KvStore for PagedKv<'_> {
    fn len(&self) -> usize {
        self.len
    }
    fn write(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let r = self.at(pos);
        self.arena.k[layer][r.clone()].copy_from_slice(k);
        self.arena.v[layer][r].copy_from_slice(v);
    }
    fn key(&self, layer: usize, pos: usize) -> &[f32] {
        &self.arena.k[layer][self.at(pos)]
    }
    fn value(&self, layer: usize, pos: usize) -> &[f32] {
        &self.arena.v[layer][self.at(pos)]
    }
    fn commit(&mut self, n: usize) {
        self.len += n;
    }
}
