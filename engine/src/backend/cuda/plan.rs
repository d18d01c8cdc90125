//! What one step's kernels need to know about the batch, computed once per step on the host and
//! uploaded in one copy: every row's position and KV destination, the block tables, and the
//! attention work items and key splits for either attention kernel. Pure functions, so the
//! layout the kernels rely on is unit-tested without a GPU.

use hotprefix_kernels::{MMA_KEY_TILE, MMA_QUERY_ROWS, SIMPLE_MAX_WARPS};

use crate::backend::{BackendError, StepBatch};

/// u32 words per attention work item: position of its first token, batch row of its first
/// token, tokens, offset of its sequence's block table, keys its last token sees.
pub const ITEM_WORDS: usize = 5;

/// Which attention kernel a step runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKernel {
    /// CUDA cores, one warp per query head (`hp_attention_simple`).
    Simple,
    /// Tensor cores, 64 query rows per block (`hp_attention_mma`).
    Mma,
}

/// Items and key splits for one attention kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttentionPlan {
    /// The kernel.
    pub kernel: AttentionKernel,
    /// Tokens per item at most.
    pub tokens_per_item: usize,
    /// `ITEM_WORDS` words per item.
    pub items: Vec<u32>,
    /// Key splits (grid z); 1 writes the output directly.
    pub splits: usize,
    /// Keys per split, a multiple of the kernel's key tile.
    pub split_len: usize,
}

impl AttentionPlan {
    /// Work items.
    pub fn item_count(&self) -> usize {
        self.items.len() / ITEM_WORDS
    }
}

/// A step's metadata, laid out as the kernels read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepPlan {
    /// Position of every row.
    pub positions: Vec<u32>,
    /// Device slot every row's keys and values go to.
    pub row_slot: Vec<u32>,
    /// Offset within that slot's block.
    pub row_off: Vec<u32>,
    /// Every sequence's block table, one after another.
    pub tables: Vec<u32>,
    /// The attention launch.
    pub attention: AttentionPlan,
    /// Keys the longest sequence's last token sees.
    pub max_context: usize,
}

impl StepPlan {
    /// Every array in one buffer, with the word offset of each: positions, row slots, row
    /// offsets, tables, items.
    pub fn packed(&self) -> (Vec<u32>, [usize; 5]) {
        let mut v = Vec::with_capacity(
            self.positions.len() * 3 + self.tables.len() + self.attention.items.len(),
        );
        let mut offs = [0usize; 5];
        for (i, part) in [
            &self.positions,
            &self.row_slot,
            &self.row_off,
            &self.tables,
            &self.attention.items,
        ]
        .into_iter()
        .enumerate()
        {
            offs[i] = v.len();
            v.extend_from_slice(part);
        }
        (v, offs)
    }
}

/// The model's attention shape, as the planner needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Dimensions per head.
    pub head_dim: usize,
}

impl AttentionShape {
    /// Query heads per key/value head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads.max(1)
    }

    /// Whether the tensor-core kernel takes this shape (head_dim a multiple of 16 up to 128,
    /// at most 64 grouped heads).
    pub fn mma_supported(&self) -> bool {
        self.head_dim.is_multiple_of(16)
            && self.head_dim <= hotprefix_kernels::MMA_MAX_HEAD_DIM
            && self.group() <= MMA_QUERY_ROWS
    }

    /// Whether the CUDA-core kernel takes this shape (head_dim a multiple of 4 up to 256, at
    /// most 16 grouped heads).
    pub fn simple_supported(&self) -> bool {
        self.head_dim.is_multiple_of(4) && self.head_dim <= 256 && self.group() <= SIMPLE_MAX_WARPS
    }
}

/// How the backend picks the attention kernel (`HOTPREFIX_CUDA_ATTENTION`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionChoice {
    /// Tensor cores when any sequence of the step has at least [`MMA_MIN_TOKENS`] new tokens
    /// (prefill), CUDA cores for decode-only steps.
    Auto,
    /// Always the CUDA-core kernel.
    Simple,
    /// Always the tensor-core kernel.
    Mma,
}

/// New tokens of one sequence from which a step runs the tensor-core kernel under `Auto`:
/// below it a block of 64 query rows would be mostly empty.
pub const MMA_MIN_TOKENS: usize = 8;

/// Refuses a step whose block tables name a slot outside the device pool of `device_blocks`
/// blocks: the kernels index the pool with these numbers unchecked, so a bad one would write
/// outside it.
pub fn check_slots(batch: &StepBatch, device_blocks: usize) -> Result<(), BackendError> {
    for s in &batch.seqs {
        if let Some(bad) = s.table.iter().find(|slot| slot.0 as usize >= device_blocks) {
            return Err(BackendError::Shape(format!(
                "block table names slot {} of a device pool of {device_blocks} blocks",
                bad.0
            )));
        }
    }
    Ok(())
}

/// Builds the step's metadata. `sms` is the device's multiprocessor count: key splits are
/// added until the grid has about two blocks per multiprocessor, so one long sequence still
/// fills the device (flash-decoding).
pub fn plan_step(
    batch: &StepBatch,
    shape: AttentionShape,
    choice: AttentionChoice,
    sms: usize,
) -> Result<StepPlan, BackendError> {
    batch.validate()?;
    let bs = batch.block_size;
    let rows = batch.rows();
    let mut positions = Vec::with_capacity(rows);
    let mut row_slot = Vec::with_capacity(rows);
    let mut row_off = Vec::with_capacity(rows);
    let mut tables = Vec::new();
    let mut table_offs = Vec::with_capacity(batch.seqs.len());
    let mut max_context = 0usize;
    let mut longest_new = 0usize;
    for s in &batch.seqs {
        table_offs.push(u32_of(tables.len(), "block tables")?);
        tables.extend(s.table.iter().map(|slot| slot.0));
        for i in 0..s.rows.len() {
            let pos = s.start + i;
            positions.push(u32_of(pos, "position")?);
            row_slot.push(s.table[pos / bs].0);
            row_off.push((pos % bs) as u32);
        }
        max_context = max_context.max(s.start + s.rows.len());
        longest_new = longest_new.max(s.rows.len());
    }
    let kernel = match choice {
        AttentionChoice::Simple => AttentionKernel::Simple,
        AttentionChoice::Mma => AttentionKernel::Mma,
        AttentionChoice::Auto => {
            if longest_new >= MMA_MIN_TOKENS && shape.mma_supported() {
                AttentionKernel::Mma
            } else {
                AttentionKernel::Simple
            }
        }
    };
    let supported = match kernel {
        AttentionKernel::Mma => shape.mma_supported(),
        AttentionKernel::Simple => shape.simple_supported(),
    };
    if !supported {
        return Err(BackendError::Unavailable(format!(
            "no CUDA attention kernel for {} heads, {} KV heads, head dim {} ({kernel:?})",
            shape.heads, shape.kv_heads, shape.head_dim
        )));
    }
    let tokens_per_item = match kernel {
        AttentionKernel::Mma => MMA_QUERY_ROWS / shape.group(),
        // A warp per query head of each token: a decode-only step (one token per sequence)
        // gets blocks of one token's heads, not blocks of mostly idle warps.
        AttentionKernel::Simple => (SIMPLE_MAX_WARPS / shape.group())
            .max(1)
            .min(longest_new.max(1)),
    };
    let mut items = Vec::new();
    for (s, &toff) in batch.seqs.iter().zip(&table_offs) {
        let n = s.rows.len();
        for t0 in (0..n).step_by(tokens_per_item) {
            let ntok = tokens_per_item.min(n - t0);
            let pos0 = s.start + t0;
            items.extend([
                u32_of(pos0, "position")?,
                u32_of(s.rows.start + t0, "row")?,
                ntok as u32,
                toff,
                u32_of(pos0 + ntok, "context")?,
            ]);
        }
    }
    let (splits, split_len) =
        splits_for(items.len() / ITEM_WORDS, shape.kv_heads, max_context, sms);
    Ok(StepPlan {
        positions,
        row_slot,
        row_off,
        tables,
        attention: AttentionPlan {
            kernel,
            tokens_per_item,
            items,
            splits,
            split_len,
        },
        max_context,
    })
}

/// Key splits so that `items x kv_heads x splits` blocks make about two per multiprocessor,
/// each split at least one key tile long; and the keys per split.
pub fn splits_for(items: usize, kv_heads: usize, max_context: usize, sms: usize) -> (usize, usize) {
    let tile = MMA_KEY_TILE;
    let tiles = max_context.div_ceil(tile).max(1);
    let blocks = (items * kv_heads).max(1);
    let target = 2 * sms.max(1);
    let wanted = if blocks >= target {
        1
    } else {
        target.div_ceil(blocks).min(tiles).min(64)
    };
    let split_len = tiles.div_ceil(wanted) * tile;
    // Rounding the length up may leave trailing splits empty: drop them.
    let splits = max_context.div_ceil(split_len).max(1);
    (splits, split_len)
}

fn u32_of(v: usize, what: &str) -> Result<u32, BackendError> {
    u32::try_from(v).map_err(|_| BackendError::Shape(format!("{what} {v} exceeds u32")))
}

#[cfg(test)]
mod tests {
    use hotprefix_cache::SlotId;

    use super::*;
    use crate::backend::SeqSpan;

    fn batch() -> StepBatch {
        // A decode token at position 40 (3 blocks), then a 20-token prefill chunk after a
        // 16-token cached prefix (3 blocks).
        StepBatch {
            seqs: vec![
                SeqSpan {
                    rows: 0..1,
                    start: 40,
                    table: vec![SlotId(7), SlotId(2), SlotId(9)],
                },
                SeqSpan {
                    rows: 1..21,
                    start: 16,
                    table: vec![SlotId(4), SlotId(5), SlotId(11)],
                },
            ],
            block_size: 16,
        }
    }

    const LLAMA: AttentionShape = AttentionShape {
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
    };

    #[test]
    fn a_slot_outside_the_device_pool_is_refused() {
        // The largest slot of the batch is 11.
        assert!(check_slots(&batch(), 12).is_ok());
        let e = check_slots(&batch(), 11).unwrap_err();
        assert!(e.to_string().contains("slot 11"), "{e}");
    }

    #[test]
    fn rows_get_their_positions_slots_and_offsets() {
        let p = plan_step(&batch(), LLAMA, AttentionChoice::Auto, 132).unwrap();
        assert_eq!(p.positions[0], 40);
        assert_eq!((p.row_slot[0], p.row_off[0]), (9, 8));
        assert_eq!(p.positions[1..], (16..36).collect::<Vec<u32>>()[..]);
        assert_eq!((p.row_slot[1], p.row_off[1]), (5, 0));
        assert_eq!((p.row_slot[20], p.row_off[20]), (11, 3));
        assert_eq!(p.tables, vec![7, 2, 9, 4, 5, 11]);
        assert_eq!(p.max_context, 41);
    }

    #[test]
    fn items_cover_every_row_once_with_their_context() {
        for choice in [AttentionChoice::Simple, AttentionChoice::Mma] {
            let p = plan_step(&batch(), LLAMA, choice, 132).unwrap();
            let a = &p.attention;
            let mut covered = vec![0; 21];
            for it in a.items.chunks_exact(ITEM_WORDS) {
                let (pos0, row0, n, toff, ctx) = (it[0], it[1], it[2], it[3], it[4]);
                assert!(n as usize <= a.tokens_per_item && n > 0);
                assert_eq!(ctx, pos0 + n);
                for r in row0..row0 + n {
                    covered[r as usize] += 1;
                    assert_eq!(p.positions[r as usize], pos0 + (r - row0));
                }
                assert_eq!(toff, if row0 == 0 { 0 } else { 3 });
            }
            assert!(covered.iter().all(|&c| c == 1), "{choice:?}: {covered:?}");
        }
    }

    #[test]
    fn auto_takes_tensor_cores_for_prefill_and_cuda_cores_for_decode() {
        let p = plan_step(&batch(), LLAMA, AttentionChoice::Auto, 132).unwrap();
        assert_eq!(p.attention.kernel, AttentionKernel::Mma);
        assert_eq!(p.attention.tokens_per_item, 16);
        let mut decode = batch();
        decode.seqs.truncate(1);
        let p = plan_step(&decode, LLAMA, AttentionChoice::Auto, 132).unwrap();
        assert_eq!(p.attention.kernel, AttentionKernel::Simple);
        assert_eq!(
            p.attention.tokens_per_item, 1,
            "one token's heads per block"
        );
        let p = plan_step(&batch(), LLAMA, AttentionChoice::Simple, 132).unwrap();
        assert_eq!(p.attention.tokens_per_item, 4);
        // A head dim above 128 runs on CUDA cores only.
        let odd = AttentionShape {
            heads: 8,
            kv_heads: 8,
            head_dim: 192,
        };
        let p = plan_step(&batch(), odd, AttentionChoice::Auto, 132).unwrap();
        assert_eq!(p.attention.kernel, AttentionKernel::Simple);
        assert!(plan_step(&batch(), odd, AttentionChoice::Mma, 132).is_err());
    }

    #[test]
    fn a_lone_long_decode_is_split_to_fill_the_device_and_a_big_batch_is_not() {
        // One sequence, 8 KV heads, 4,096 keys: 8 blocks without splits.
        let (splits, len) = splits_for(1, 8, 4096, 132);
        assert!(splits * 8 >= 132, "{splits}");
        assert_eq!(len % MMA_KEY_TILE, 0);
        assert!(splits * len >= 4096 && (splits - 1) * len < 4096);
        assert_eq!(splits_for(128, 8, 4096, 132), (1, 4096));
        // A short context is never split below one tile per split.
        let (s, l) = splits_for(1, 8, 100, 132);
        assert_eq!((s, l), (2, 64));
        assert_eq!(splits_for(1, 1, 1, 132), (1, 64));
    }

    #[test]
    fn packed_offsets_point_at_each_array() {
        let p = plan_step(&batch(), LLAMA, AttentionChoice::Auto, 132).unwrap();
        let (v, offs) = p.packed();
        assert_eq!(v[offs[0]..offs[0] + 21], p.positions[..]);
        assert_eq!(v[offs[1]..offs[1] + 21], p.row_slot[..]);
        assert_eq!(v[offs[2]..offs[2] + 21], p.row_off[..]);
        assert_eq!(v[offs[3]..offs[3] + 6], p.tables[..]);
        assert_eq!(v[offs[4]..], p.attention.items[..]);
    }
}
