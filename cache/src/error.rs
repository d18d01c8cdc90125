//! Errors the cache reports to its caller.

use thiserror::Error;

/// Failures of cache operations. None of them leaves the cache inconsistent.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CacheError {
    /// The configuration failed validation.
    #[error("invalid cache configuration: {0}")]
    InvalidConfig(String),
    /// Not enough device blocks could be freed: everything left is locked by running requests
    /// or in flight. The caller should wait for requests to finish or preempt one.
    #[error("out of device blocks: requested {requested}, at most {available} can be freed now")]
    OutOfBlocks {
        /// Blocks asked for.
        requested: usize,
        /// Blocks that are free or evictable right now.
        available: usize,
    },
    /// A lease was given to a cache that did not issue it.
    #[error("the lease was issued by another cache")]
    ForeignLease,
    /// A slot given to `insert` or `free` was not handed out by `allocate` (or was already
    /// returned, or is listed twice).
    #[error("slot {} was not handed out by allocate, or was already returned", .0.0)]
    NotHandedOut(crate::SlotId),
    /// `insert` was given a different number of hashes and slots.
    #[error("insert got {hashes} block hashes but {slots} slots")]
    LengthMismatch {
        /// Number of hashes.
        hashes: usize,
        /// Number of slots.
        slots: usize,
    },
}
