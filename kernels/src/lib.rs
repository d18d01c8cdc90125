//! The CUDA backend's kernels as CUDA C source text, embedded at build time and compiled at run
//! time by NVRTC for the device the engine finds (see `hotprefix_engine::backend::cuda`).
//!
//! The sources are plain `.cu` files beside this crate's `src/` so they read (and diff) as CUDA
//! C; this crate only names them. They include no CUDA header: [`PRELUDE`] defines the few
//! helpers they share, so NVRTC needs nothing but its own built-ins, and the same text compiles
//! as C++ under the CPU emulation in `emu/` that CI runs them with.

/// Shared types and helpers (bf16 conversion, mma.sync, warp and block reductions).
pub const PRELUDE: &str = include_str!("../common.cuh");

/// The kernel sources, by file name, in the order they are compiled after [`PRELUDE`].
pub const SOURCES: &[(&str, &str)] = &[
    ("elementwise.cu", include_str!("../elementwise.cu")),
    ("kv.cu", include_str!("../kv.cu")),
    ("attention.cu", include_str!("../attention.cu")),
];

/// Every `extern "C"` kernel the sources define, as the backend loads them.
pub const KERNELS: &[&str] = &[
    "hp_embed",
    "hp_rms_norm",
    "hp_add_bias",
    "hp_rope",
    "hp_silu_mul",
    "hp_add",
    "hp_to_bf16",
    "hp_gather_rows",
    "hp_argmax",
    "hp_write_kv",
    "hp_kv_copy",
    "hp_attention_simple",
    "hp_attention_mma",
    "hp_attention_combine",
];

/// Keys per shared-memory tile of `hp_attention_simple` (`HP_SIMPLE_KT` in attention.cu).
pub const SIMPLE_KEY_TILE: usize = 32;
/// Keys per shared-memory tile of `hp_attention_mma` (`HP_MMA_KT`).
pub const MMA_KEY_TILE: usize = 64;
/// The largest head dimension `hp_attention_mma` takes (`HP_MMA_MAX_HD`).
pub const MMA_MAX_HEAD_DIM: usize = 128;
/// Query rows (token x grouped head) per block of `hp_attention_mma`: four warps of 16.
pub const MMA_QUERY_ROWS: usize = 64;
/// Threads per block of `hp_attention_mma`.
pub const MMA_THREADS: usize = 128;
/// Warps per block of `hp_attention_simple` at most (one per query head of a token).
pub const SIMPLE_MAX_WARPS: usize = 16;

/// The whole program NVRTC compiles: the prelude, then every source.
pub fn program() -> String {
    let mut s = String::from(PRELUDE);
    for (name, src) in SOURCES {
        s.push_str("\n// ---- ");
        s.push_str(name);
        s.push_str(" ----\n");
        s.push_str(src);
    }
    s
}

/// Bytes of dynamic shared memory `hp_attention_simple` needs for `warps` warps.
pub fn simple_smem_bytes(head_dim: usize, warps: usize) -> usize {
    (SIMPLE_KEY_TILE * (head_dim + 4) + SIMPLE_KEY_TILE * head_dim + warps * head_dim) * 4
}

/// Bytes of dynamic shared memory `hp_attention_mma` needs.
pub fn mma_smem_bytes(head_dim: usize) -> usize {
    (MMA_KEY_TILE * (head_dim + 8) + head_dim * (MMA_KEY_TILE + 8)) * 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_kernel_is_defined_once_with_launch_bounds_and_every_defined_kernel_is_named() {
        let prog = program();
        let defined: Vec<&str> = prog
            .match_indices("extern \"C\" __global__ void ")
            .map(|(i, m)| {
                let rest = &prog[i + m.len()..];
                // Launch bounds let the compiler budget registers for the block size the host
                // launches with; a kernel without them could fail to launch after a JIT
                // change.
                let rest = rest
                    .strip_prefix("__launch_bounds__(")
                    .and_then(|r| r.split_once(')'))
                    .map(|(_, r)| r.trim_start())
                    .unwrap_or_else(|| {
                        panic!("a kernel without __launch_bounds__: {}", &rest[..40])
                    });
                &rest[..rest.find('(').unwrap_or(rest.len())]
            })
            .collect();
        let mut sorted = defined.clone();
        sorted.sort_unstable();
        let mut named = KERNELS.to_vec();
        named.sort_unstable();
        assert_eq!(sorted, named);
    }

    #[test]
    fn tile_constants_match_the_sources() {
        let prog = program();
        for (name, value) in [
            ("HP_SIMPLE_KT", SIMPLE_KEY_TILE),
            ("HP_MMA_KT", MMA_KEY_TILE),
            ("HP_MMA_MAX_HD", MMA_MAX_HEAD_DIM),
        ] {
            assert!(
                prog.contains(&format!("#define {name} {value}\n")),
                "{name} is not {value} in attention.cu"
            );
        }
    }

    #[test]
    fn shared_memory_fits_the_default_48_kib_for_the_supported_shapes() {
        assert!(mma_smem_bytes(128) <= 48 * 1024);
        assert!(simple_smem_bytes(128, SIMPLE_MAX_WARPS) <= 48 * 1024);
    }
}
