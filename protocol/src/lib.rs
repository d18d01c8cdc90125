//! The HotPrefix wire contract shared by the cache, the engine, the router and the simulator.
//!
//! This crate is the only definition of how a prefix is identified: a run of full KV blocks is named
//! by the chained [`BlockHash`] of its last block, computed by [`hash_blocks`]. The engine (which
//! stores KV under those names) and the router (which looks them up in the engines' summaries) both
//! call the same function, so a prefix hashes the same on both sides by construction.
//!
//! # The block hash scheme (version [`BLOCK_HASH_SCHEME`])
//!
//! For a token sequence cut into blocks of `block_size` tokens, only *full* blocks are hashed:
//!
//! ```text
//! h_0     = BlockHash::ROOT (0)
//! h_i     = xxh3_64( le64(h_{i-1}) ++ le64(salt) ++ le32(t_{i,0}) ++ ... ++ le32(t_{i,block_size-1}) )
//! ```
//!
//! `xxh3_64` is XXH3 with 64-bit output and the default secret and seed 0 (the `xxhash-rust`
//! crate's `xxh3::xxh3_64`). XXH3 was chosen because it is among the fastest non-cryptographic
//! hashes for short inputs (a 16-token block is 80 bytes), it is specified byte-for-byte
//! independent of platform and endianness, and independent implementations exist in C, Go,
//! Python and Rust, so a non-Rust client can reproduce the names. All integers are serialised
//! little-endian so the result does not depend on the host.
//!
//! The salt ([`Salt`]) covers everything besides the tokens that changes the KV of a block: the
//! model identity, a LoRA adapter, and a per-request cache salt. Requests with different salts
//! never share blocks.
//!
//! A 64-bit name can collide. With `n` resident blocks a lookup of a block that is not cached
//! aliases a resident one with probability about `n / 2^64` (5e-14 for a million blocks), far
//! below the rate of hardware memory errors; the scheme is the same as vLLM's default
//! prefix-cache hashing in this respect.

pub mod cluster;

use serde::{Deserialize, Serialize};
use std::fmt;
use xxhash_rust::xxh3::xxh3_64;

/// Version of the block hash scheme. Bump it (and the pinned values in the tests) whenever
/// [`hash_blocks`] changes, so that engines and routers of different versions never silently
/// disagree on names.
pub const BLOCK_HASH_SCHEME: u32 = 1;

/// Default number of tokens per KV block.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// Chained hash naming one full KV block and, through the chain, the whole prefix that ends in it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BlockHash(pub u64);

impl BlockHash {
    /// The parent of the first block of every sequence.
    pub const ROOT: BlockHash = BlockHash(0);

    /// Hash of the block that follows `parent` and holds `tokens`, under `salt`.
    pub fn chain(parent: BlockHash, salt: Salt, tokens: &[u32]) -> BlockHash {
        /// Blocks up to this many tokens are serialised on the stack: hashing is the largest
        /// cost of matching a prompt, and building each block's bytes in a `Vec` one token at
        /// a time tripled it.
        const STACK_TOKENS: usize = 64;
        if tokens.len() == DEFAULT_BLOCK_SIZE {
            // The common block size gets a constant-length input, which lets xxh3's short-input
            // path be specialised: half the time of the general case.
            let mut buf = [0u8; 16 + 4 * DEFAULT_BLOCK_SIZE];
            Self::serialise(&mut buf, parent, salt, tokens);
            BlockHash(xxh3_64(&buf))
        } else if tokens.len() <= STACK_TOKENS {
            let mut buf = [0u8; 16 + 4 * STACK_TOKENS];
            let len = 16 + 4 * tokens.len();
            Self::serialise(&mut buf[..len], parent, salt, tokens);
            BlockHash(xxh3_64(&buf[..len]))
        } else {
            let mut buf = vec![0u8; 16 + 4 * tokens.len()];
            Self::serialise(&mut buf, parent, salt, tokens);
            BlockHash(xxh3_64(&buf))
        }
    }

    /// Writes `le64(parent) ++ le64(salt) ++ le32(token)...` into `out`, which has exactly that
    /// length.
    fn serialise(out: &mut [u8], parent: BlockHash, salt: Salt, tokens: &[u32]) {
        out[..8].copy_from_slice(&parent.0.to_le_bytes());
        out[8..16].copy_from_slice(&salt.0.to_le_bytes());
        for (dst, t) in out[16..].chunks_exact_mut(4).zip(tokens) {
            dst.copy_from_slice(&t.to_le_bytes());
        }
    }
}

impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockHash({:016x})", self.0)
    }
}

impl fmt::Display for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Everything besides the tokens that changes a block's KV, folded into one word.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Salt(pub u64);

impl Salt {
    /// No salt: used by the simulator, whose traces name blocks directly.
    pub const NONE: Salt = Salt(0);

    /// Salt for a model, an optional adapter and an optional per-request cache salt.
    ///
    /// Each part is length-prefixed before hashing so that `("ab", "c")` and `("a", "bc")` differ.
    pub fn new(model: &str, adapter: Option<&str>, cache_salt: Option<&str>) -> Salt {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(b"hotprefix-salt-v1");
        for part in [Some(model), adapter, cache_salt] {
            match part {
                Some(s) => {
                    buf.push(1);
                    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
                    buf.extend_from_slice(s.as_bytes());
                }
                None => buf.push(0),
            }
        }
        Salt(xxh3_64(&buf))
    }
}

/// Hashes every full block of `tokens`, chaining from `parent` (use [`BlockHash::ROOT`] for a
/// whole sequence). A trailing partial block is not hashed: it cannot be shared.
///
/// # Panics
/// Panics if `block_size` is zero, which no validated configuration allows.
pub fn hash_blocks(
    tokens: &[u32],
    block_size: usize,
    salt: Salt,
    parent: BlockHash,
) -> Vec<BlockHash> {
    assert!(block_size > 0, "block_size must be positive");
    let mut out = Vec::with_capacity(tokens.len() / block_size);
    let mut prev = parent;
    for block in tokens.chunks_exact(block_size) {
        prev = BlockHash::chain(prev, salt, block);
        out.push(prev);
    }
    out
}

/// Stable identity of one engine replica (in Kubernetes, the StatefulSet pod name).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ReplicaId(pub String);

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The tier a block lives in.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Accelerator memory: usable by attention without a copy.
    Device,
    /// Host memory: must be loaded to the device before use.
    Host,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pins the scheme: if this test fails, the hash of a prefix changed, which breaks every
    /// engine/router pair of mixed versions. Change it only together with `BLOCK_HASH_SCHEME`.
    #[test]
    fn block_hash_scheme_v1_values_are_pinned() {
        assert_eq!(BLOCK_HASH_SCHEME, 1);
        let tokens: Vec<u32> = (0..48).collect();
        let h = hash_blocks(&tokens, 16, Salt::NONE, BlockHash::ROOT);
        let got: Vec<u64> = h.iter().map(|b| b.0).collect();
        assert_eq!(got, PINNED_NONE, "got {got:#x?}");
        let salted = hash_blocks(
            &tokens,
            16,
            Salt::new("smollm2-135m", None, None),
            BlockHash::ROOT,
        );
        let got: Vec<u64> = salted.iter().map(|b| b.0).collect();
        assert_eq!(got, PINNED_SALTED, "got {got:#x?}");
        assert_eq!(Salt::new("smollm2-135m", None, None).0, PINNED_SALT);
    }

    // Cross-checked against the Python `xxhash` package's xxh3_64_intdigest on the same bytes.
    const PINNED_NONE: [u64; 3] = [0x83ccdaa3ad28b1b0, 0xba607674210422db, 0x74e531aec965ef7c];
    const PINNED_SALTED: [u64; 3] = [0x80b117dfdcd4e15b, 0x768bcd0d6004e58d, 0x2a8a700c64fab84f];
    const PINNED_SALT: u64 = 0xb174a1ca4e6dc195;

    #[test]
    fn only_full_blocks_are_hashed() {
        let tokens: Vec<u32> = (0..47).collect();
        assert_eq!(
            hash_blocks(&tokens, 16, Salt::NONE, BlockHash::ROOT).len(),
            2
        );
        assert!(hash_blocks(&tokens[..15], 16, Salt::NONE, BlockHash::ROOT).is_empty());
    }

    #[test]
    fn hashes_chain_through_the_prefix() {
        let a: Vec<u32> = (0..32).collect();
        let mut b = a.clone();
        b[0] = 99;
        let ha = hash_blocks(&a, 16, Salt::NONE, BlockHash::ROOT);
        let hb = hash_blocks(&b, 16, Salt::NONE, BlockHash::ROOT);
        // Second blocks hold the same tokens but follow different first blocks.
        assert_ne!(ha[1], hb[1]);
        // Hashing in two steps from the parent gives the same chain.
        let tail = hash_blocks(&a[16..], 16, Salt::NONE, ha[0]);
        assert_eq!(tail[0], ha[1]);
        assert_eq!(BlockHash::chain(ha[0], Salt::NONE, &a[16..]), ha[1]);
        // Blocks too large for the stack buffer hash the same bytes.
        let big: Vec<u32> = (0..200).collect();
        let mut bytes = vec![0u8; 16];
        bytes.extend(big.iter().flat_map(|t| t.to_le_bytes()));
        assert_eq!(
            BlockHash::chain(BlockHash::ROOT, Salt::NONE, &big),
            BlockHash(xxh3_64(&bytes))
        );
    }

    #[test]
    fn salt_separates_models_adapters_and_cache_salts() {
        let base = Salt::new("m", None, None);
        assert_ne!(base, Salt::new("m", Some("lora"), None));
        assert_ne!(base, Salt::new("m", None, Some("")));
        assert_ne!(
            Salt::new("ab", Some("c"), None),
            Salt::new("a", Some("bc"), None)
        );
        let t: Vec<u32> = (0..16).collect();
        assert_ne!(
            hash_blocks(&t, 16, base, BlockHash::ROOT),
            hash_blocks(&t, 16, Salt::NONE, BlockHash::ROOT)
        );
    }

    #[test]
    fn wire_types_serialise_transparently() {
        assert_eq!(serde_json::to_string(&BlockHash(7)).unwrap(), "7");
        assert_eq!(
            serde_json::to_string(&ReplicaId("engine-0".into())).unwrap(),
            "\"engine-0\""
        );
        assert_eq!(serde_json::to_string(&Tier::Host).unwrap(), "\"host\"");
    }
}
