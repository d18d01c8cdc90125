// The paged KV pools: writing a step's keys and values into their block slots, and copying
// blocks between the device pool and the host tier.
//
// Layout of one block slot, in both tiers: [layer][k or v][offset in block][kv_dim] bf16, so a
// block's data for one layer is one contiguous chunk (what the layer-wise overlap copies).

// Stores row r's keys and values (f32, kv_dim each) at offset row_off[r] of slot row_slot[r]
// for `layer`. One thread per value.
extern "C" __global__ void __launch_bounds__(256) hp_write_kv(const float* __restrict__ k, const float* __restrict__ v,
                                       bf16_t* __restrict__ pool,
                                       const u32* __restrict__ row_slot,
                                       const u32* __restrict__ row_off, int rows, int kv_dim,
                                       int layer, int layers, int block_size) {
    const u64 total = (u64)rows * (u64)kv_dim;
    const u64 plane = (u64)block_size * (u64)kv_dim;
    for (u64 idx = blockIdx.x * (u64)blockDim.x + threadIdx.x; idx < total;
         idx += (u64)gridDim.x * blockDim.x) {
        const u64 row = idx / (u64)kv_dim;
        const u64 d = idx % (u64)kv_dim;
        const u64 base = ((u64)row_slot[row] * (u64)layers + (u64)layer) * 2 * plane +
                         (u64)row_off[row] * (u64)kv_dim + d;
        pool[base] = hp_f2bf(k[idx]);
        pool[base + plane] = hp_f2bf(v[idx]);
    }
}

// For every (src slot, dst slot) pair, copies `chunk` 16-byte words starting `offset` words
// into the slot, from `src` to `dst` (blocks of `block_words` words each). Either side may be
// the pinned host arena, read or written in place through its device mapping: the copy then
// crosses PCIe inside the kernel, with several loads in flight per thread. Blocks stride over
// the pairs (grid x, a few per multiprocessor at most, so copies never crowd out compute) and
// split each pair's chunk (grid y).
extern "C" __global__ void __launch_bounds__(256) hp_kv_copy(const uint4* __restrict__ src,
                                                            uint4* __restrict__ dst,
                                                            const u32* __restrict__ pairs,
                                                            u32 npairs, u64 block_words,
                                                            u64 offset, u64 chunk) {
    const u64 step = (u64)blockDim.x * gridDim.y;
    for (u32 p = blockIdx.x; p < npairs; p += gridDim.x) {
        const uint4* s = src + (u64)pairs[2 * p] * block_words + offset;
        uint4* d = dst + (u64)pairs[2 * p + 1] * block_words + offset;
        u64 i = (u64)blockIdx.y * blockDim.x + threadIdx.x;
        // Four independent loads before their stores keep several PCIe reads in flight.
        for (; i + 3 * step < chunk; i += 4 * step) {
            const uint4 a = s[i], b = s[i + step], c = s[i + 2 * step], e = s[i + 3 * step];
            d[i] = a;
            d[i + step] = b;
            d[i + 2 * step] = c;
            d[i + 3 * step] = e;
        }
        for (; i < chunk; i += step) d[i] = s[i];
    }
}
