// Causal grouped-query attention over the paged KV pool, for prefill (new tokens attending to
// their cached prefix and to themselves) and decode (one new token per sequence) alike.
//
// Work is described by items, built on the host once per step: a run of up to `qt` consecutive
// new tokens of one sequence, as five u32 words (position of its first token, batch row of its
// first token, tokens, offset of the sequence's block table in `tables`, keys its last token
// sees). The grid is (items, kv heads, splits): a block takes one item's query heads of one KV
// head group over one split of the keys (flash-decoding), so a single long sequence still fills
// the GPU. With one split a block writes the normalised output; with several it writes its
// unnormalised partial sums and running max/sum, merged by hp_attention_combine.
//
// Queries arrive pre-scaled by nothing: `scale` (1/sqrt(head_dim)) multiplies each query once.

#define HP_SIMPLE_KT 32
#define HP_MMA_KT 64
#define HP_MMA_MAX_HD 128

// Offset of (layer, key) in the pool for KV head `kvh`, keys plane; values are `plane` later.
__device__ __forceinline__ u64 hp_kv_base(const u32* tables, u32 toff, u32 key, int block_size,
                                         int layer, int layers, u64 plane, u64 kvd, int kvh,
                                         int head_dim) {
    const u64 slot = tables[toff + key / (u32)block_size];
    return (slot * (u64)layers + (u64)layer) * 2 * plane + (u64)(key % (u32)block_size) * kvd +
           (u64)kvh * (u64)head_dim;
}

// CUDA-core attention: one warp per query head of one token (`qt` tokens x `group` heads per
// block), keys in tiles of 32 shared by the block, one key per lane for the scores and the
// head dimensions spread over lanes for the weighted sum. Any head_dim that is a multiple of 4
// up to 256. Best for decode, where the work is reading keys and values once.
extern "C" __global__ void __launch_bounds__(512) hp_attention_simple(
    const float* __restrict__ q, const bf16_t* __restrict__ pool, const u32* __restrict__ tables,
    const u32* __restrict__ items, float* __restrict__ out, bf16_t* __restrict__ out_bf,
    float* __restrict__ part_o, float* __restrict__ part_ml, int rows, int layer, int layers,
    int block_size, int heads, int kv_heads, int head_dim, int split_len, float scale) {
    HP_SMEM_DYN(float, smem);
    const int hd = head_dim, group = heads / kv_heads;
    const int kstride = hd + 4;
    float* ks = smem;
    float* vs = ks + HP_SIMPLE_KT * kstride;
    float* qs = vs + HP_SIMPLE_KT * hd;
    const u32* it = items + 5 * (u64)blockIdx.x;
    const u32 pos0 = it[0], row0 = it[1], ntok = it[2], toff = it[3], ctx = it[4];
    const int kvh = blockIdx.y, split = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int t = warp / group, g = warp % group;
    const bool active = (u32)t < ntok;
    const int head = kvh * group + g;
    const u32 my_pos = pos0 + (u32)t;
    const u64 row = (u64)row0 + (u64)t;
    const u64 qv = row * (u64)heads + (u64)head;
    const u64 kvd = (u64)kv_heads * (u64)hd;
    const u64 plane = (u64)block_size * kvd;
    if (active) {
        for (int d = lane; d < hd; d += 32) qs[warp * hd + d] = q[qv * (u64)hd + d] * scale;
    }
    const u32 k_begin = (u32)split * (u32)split_len;
    const u32 k_end = min(ctx, k_begin + (u32)split_len);
    float m = HP_NEG_INF, l = 0.0f;
    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
    for (u32 k0 = k_begin; k0 < k_end; k0 += HP_SIMPLE_KT) {
        // The previous tile is consumed (and, the first time, the queries are stored).
        __syncthreads();
        if (hd % 8 == 0) {
            // Eight bf16 values per 16-byte load (rows of a head are 16-byte aligned when the
            // head dim is a multiple of 8).
            const int chunks = hd / 8;
            for (int e = threadIdx.x; e < HP_SIMPLE_KT * chunks; e += blockDim.x) {
                const int j = e / chunks, c = e % chunks;
                const u32 key = k0 + (u32)j;
                uint4 kw = make_uint4(0u, 0u, 0u, 0u), vw = make_uint4(0u, 0u, 0u, 0u);
                if (key < k_end) {
                    const u64 base = hp_kv_base(tables, toff, key, block_size, layer, layers,
                                                plane, kvd, kvh, hd) + (u64)(8 * c);
                    kw = *(const uint4*)(pool + base);
                    vw = *(const uint4*)(pool + base + plane);
                }
                const u32 kk[4] = {kw.x, kw.y, kw.z, kw.w}, vv[4] = {vw.x, vw.y, vw.z, vw.w};
#pragma unroll
                for (int x = 0; x < 4; ++x) {
                    const int d = 8 * c + 2 * x;
                    ks[j * kstride + d] = hp_bf2f((bf16_t)(kk[x] & 0xffffu));
                    ks[j * kstride + d + 1] = hp_bf2f((bf16_t)(kk[x] >> 16));
                    vs[j * hd + d] = hp_bf2f((bf16_t)(vv[x] & 0xffffu));
                    vs[j * hd + d + 1] = hp_bf2f((bf16_t)(vv[x] >> 16));
                }
            }
        } else {
            for (int e = threadIdx.x; e < HP_SIMPLE_KT * hd; e += blockDim.x) {
                const int j = e / hd, d = e % hd;
                const u32 key = k0 + (u32)j;
                float kv = 0.0f, vv = 0.0f;
                if (key < k_end) {
                    const u64 base = hp_kv_base(tables, toff, key, block_size, layer, layers,
                                                plane, kvd, kvh, hd) + (u64)d;
                    kv = hp_bf2f(pool[base]);
                    vv = hp_bf2f(pool[base + plane]);
                }
                ks[j * kstride + d] = kv;
                vs[j * hd + d] = vv;
            }
        }
        __syncthreads();
        if (!active) continue;
        const u32 key = k0 + (u32)lane;
        float s = HP_NEG_INF;
        if (key < k_end && key <= my_pos) {
            const float4* kr = (const float4*)(ks + lane * kstride);
            const float4* qr = (const float4*)(qs + warp * hd);
            float dot = 0.0f;
            for (int d4 = 0; d4 < hd / 4; ++d4) {
                const float4 a = kr[d4], b = qr[d4];
                dot += a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
            }
            s = dot;
        }
        const float m_new = fmaxf(m, hp_warp_max(s));
        // No key of this tile (nor before) is visible to this query yet.
        if (m_new == HP_NEG_INF) continue;
        const float p = s == HP_NEG_INF ? 0.0f : expf(s - m_new);
        const float corr = m == HP_NEG_INF ? 0.0f : expf(m - m_new);
        l = l * corr + hp_warp_sum(p);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] *= corr;
        for (int j = 0; j < HP_SIMPLE_KT; ++j) {
            const float pj = __shfl_sync(HP_FULL_MASK, p, j);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int d = lane + 32 * i;
                if (d < hd) acc[i] += pj * vs[j * hd + d];
            }
        }
        m = m_new;
    }
    if (!active) return;
    if (gridDim.z == 1) {
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int d = lane + 32 * i;
            if (d < hd) {
                const float o = acc[i] * inv;
                out[qv * (u64)hd + d] = o;
                out_bf[qv * (u64)hd + d] = hp_f2bf(o);
            }
        }
    } else {
        const u64 pi = (u64)split * (u64)rows * (u64)heads + qv;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int d = lane + 32 * i;
            if (d < hd) part_o[pi * (u64)hd + d] = acc[i];
        }
        if (lane == 0) {
            part_ml[2 * pi] = m;
            part_ml[2 * pi + 1] = l;
        }
    }
}

// Tensor-core attention (FlashAttention-2 style, mma.sync m16n8k16 bf16 with f32
// accumulation): a block of four warps takes 64 query rows, a row being one (token, query head)
// of the item's KV head group, so grouped heads share every key tile. Keys come in tiles of
// 64: K row-major and V transposed in shared memory; scores, the online softmax and the
// weighted sum stay in registers (the score fragments are reused as the A operand of P*V).
// head_dim a multiple of 16 up to 128; `qt` = 64 / group tokens per item.
extern "C" __global__ void __launch_bounds__(128, 2) hp_attention_mma(
    const float* __restrict__ q, const bf16_t* __restrict__ pool, const u32* __restrict__ tables,
    const u32* __restrict__ items, float* __restrict__ out, bf16_t* __restrict__ out_bf,
    float* __restrict__ part_o, float* __restrict__ part_ml, int rows, int layer, int layers,
    int block_size, int heads, int kv_heads, int head_dim, int split_len, float scale) {
    HP_SMEM_DYN(bf16_t, smem);
    const int hd = head_dim, group = heads / kv_heads;
    const int kstride = hd + 8;                  // bf16 per key row of K (pads banks)
    const int vstride = HP_MMA_KT + 8;           // bf16 per head dimension of V^T
    bf16_t* ks = smem;                           // HP_MMA_KT x kstride
    bf16_t* vt = smem + HP_MMA_KT * kstride;     // hd x vstride
    const u32* it = items + 5 * (u64)blockIdx.x;
    const u32 pos0 = it[0], row0 = it[1], ntok = it[2], toff = it[3], ctx = it[4];
    const int kvh = blockIdx.y, split = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g8 = lane >> 2, tq = lane & 3;
    const int ksteps = hd / 16, ntiles = hd / 8, chunks = hd / 8;
    const u64 kvd = (u64)kv_heads * (u64)hd;
    const u64 plane = (u64)block_size * kvd;
    const int qt = 64 / group;

    // This thread's two query rows: ra and rb = ra + 8 of the warp's sixteen.
    bool valid[2];
    u32 pos[2];
    u64 qv[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = warp * 16 + g8 + 8 * h;
        const int t = r / group;
        valid[h] = t < qt && (u32)t < ntok;
        pos[h] = pos0 + (u32)t;
        qv[h] = ((u64)row0 + (u64)t) * (u64)heads + (u64)(kvh * group + r % group);
    }
    // Query fragments (A operand, row-major 16x16 per k-step), scaled, in bf16.
    u32 qa[HP_MMA_MAX_HD / 16][4];
#pragma unroll
    for (int kk = 0; kk < HP_MMA_MAX_HD / 16; ++kk) {
#pragma unroll
        for (int x = 0; x < 4; ++x) qa[kk][x] = 0u;
        if (kk < ksteps) {
            const int c = 16 * kk + 2 * tq;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                if (valid[h]) {
                    const float* qr = q + qv[h] * (u64)hd;
                    qa[kk][h] = hp_pack2(qr[c] * scale, qr[c + 1] * scale);
                    qa[kk][h + 2] = hp_pack2(qr[c + 8] * scale, qr[c + 9] * scale);
                }
            }
        }
    }
    float o[HP_MMA_MAX_HD / 8][4];
#pragma unroll
    for (int n = 0; n < HP_MMA_MAX_HD / 8; ++n) {
#pragma unroll
        for (int x = 0; x < 4; ++x) o[n][x] = 0.0f;
    }
    float m[2] = {HP_NEG_INF, HP_NEG_INF}, l[2] = {0.0f, 0.0f};

    const u32 k_begin = (u32)split * (u32)split_len;
    const u32 k_end = min(ctx, k_begin + (u32)split_len);
    for (u32 k0 = k_begin; k0 < k_end; k0 += HP_MMA_KT) {
        __syncthreads();
        // K tile, row-major: a lane per 8-dimension chunk, so a warp stores whole rows.
        for (int e = threadIdx.x; e < HP_MMA_KT * chunks; e += blockDim.x) {
            const int j = e / chunks, c = e % chunks;
            const u32 key = k0 + (u32)j;
            uint4 w = make_uint4(0u, 0u, 0u, 0u);
            if (key < k_end) {
                const u64 base = hp_kv_base(tables, toff, key, block_size, layer, layers,
                                            plane, kvd, kvh, hd);
                w = *(const uint4*)(pool + base + 8 * c);
            }
            *(uint4*)(ks + j * kstride + 8 * c) = w;
        }
        // V tile, transposed: a lane per key, so the 16-bit stores of a warp are contiguous.
        for (int e = threadIdx.x; e < HP_MMA_KT * chunks; e += blockDim.x) {
            const int j = e % HP_MMA_KT, c = e / HP_MMA_KT;
            const u32 key = k0 + (u32)j;
            uint4 w = make_uint4(0u, 0u, 0u, 0u);
            if (key < k_end) {
                const u64 base = hp_kv_base(tables, toff, key, block_size, layer, layers,
                                            plane, kvd, kvh, hd);
                w = *(const uint4*)(pool + base + plane + 8 * c);
            }
            const u32 words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
            for (int x = 0; x < 4; ++x) {
                vt[(8 * c + 2 * x) * vstride + j] = (bf16_t)(words[x] & 0xffffu);
                vt[(8 * c + 2 * x + 1) * vstride + j] = (bf16_t)(words[x] >> 16);
            }
        }
        __syncthreads();

        // Scores: 8 n-tiles of 8 keys.
        float s[HP_MMA_KT / 8][4];
#pragma unroll
        for (int j = 0; j < HP_MMA_KT / 8; ++j) {
#pragma unroll
            for (int x = 0; x < 4; ++x) s[j][x] = 0.0f;
            const bf16_t* kr = ks + (8 * j + g8) * kstride + 2 * tq;
#pragma unroll
            for (int kk = 0; kk < HP_MMA_MAX_HD / 16; ++kk) {
                if (kk < ksteps) {
                    u32 b[2];
                    b[0] = *(const u32*)(kr + 16 * kk);
                    b[1] = *(const u32*)(kr + 16 * kk + 8);
                    hp_mma_16816(s[j], qa[kk], b);
                }
            }
        }
        // Mask, then the online softmax of each of the thread's two rows; a row's values are
        // spread over the four lanes of a quad.
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float mx = HP_NEG_INF;
#pragma unroll
            for (int j = 0; j < HP_MMA_KT / 8; ++j) {
#pragma unroll
                for (int x = 0; x < 2; ++x) {
                    const u32 key = k0 + (u32)(8 * j + 2 * tq + x);
                    const bool ok = valid[h] && key < k_end && key <= pos[h];
                    if (!ok) s[j][2 * h + x] = HP_NEG_INF;
                    mx = fmaxf(mx, s[j][2 * h + x]);
                }
            }
            mx = fmaxf(mx, __shfl_xor_sync(HP_FULL_MASK, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(HP_FULL_MASK, mx, 2));
            const float m_new = fmaxf(m[h], mx);
            float corr = 1.0f, sum = 0.0f;
            if (m_new == HP_NEG_INF) {
#pragma unroll
                for (int j = 0; j < HP_MMA_KT / 8; ++j) {
                    s[j][2 * h] = 0.0f;
                    s[j][2 * h + 1] = 0.0f;
                }
            } else {
                corr = m[h] == HP_NEG_INF ? 0.0f : expf(m[h] - m_new);
#pragma unroll
                for (int j = 0; j < HP_MMA_KT / 8; ++j) {
#pragma unroll
                    for (int x = 0; x < 2; ++x) {
                        const float v = s[j][2 * h + x];
                        const float p = v == HP_NEG_INF ? 0.0f : expf(v - m_new);
                        s[j][2 * h + x] = p;
                        sum += p;
                    }
                }
                m[h] = m_new;
            }
            sum += __shfl_xor_sync(HP_FULL_MASK, sum, 1);
            sum += __shfl_xor_sync(HP_FULL_MASK, sum, 2);
            l[h] = l[h] * corr + sum;
#pragma unroll
            for (int n = 0; n < HP_MMA_MAX_HD / 8; ++n) {
                o[n][2 * h] *= corr;
                o[n][2 * h + 1] *= corr;
            }
        }
        // O += P V: 4 k-steps of 16 keys; P's A fragments are two neighbouring score tiles.
#pragma unroll
        for (int kk = 0; kk < HP_MMA_KT / 16; ++kk) {
            u32 pa[4];
            pa[0] = hp_pack2(s[2 * kk][0], s[2 * kk][1]);
            pa[1] = hp_pack2(s[2 * kk][2], s[2 * kk][3]);
            pa[2] = hp_pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pa[3] = hp_pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int n = 0; n < HP_MMA_MAX_HD / 8; ++n) {
                if (n < ntiles) {
                    const bf16_t* vr = vt + (8 * n + g8) * vstride + 16 * kk + 2 * tq;
                    u32 b[2];
                    b[0] = *(const u32*)vr;
                    b[1] = *(const u32*)(vr + 8);
                    hp_mma_16816(o[n], pa, b);
                }
            }
        }
    }

#pragma unroll
    for (int h = 0; h < 2; ++h) {
        if (!valid[h]) continue;
        if (gridDim.z == 1) {
            const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
#pragma unroll
            for (int n = 0; n < HP_MMA_MAX_HD / 8; ++n) {
                if (n < ntiles) {
                    const u64 at = qv[h] * (u64)hd + (u64)(8 * n + 2 * tq);
                    const float a = o[n][2 * h] * inv, b = o[n][2 * h + 1] * inv;
                    out[at] = a;
                    out[at + 1] = b;
                    out_bf[at] = hp_f2bf(a);
                    out_bf[at + 1] = hp_f2bf(b);
                }
            }
        } else {
            const u64 pi = (u64)split * (u64)rows * (u64)heads + qv[h];
#pragma unroll
            for (int n = 0; n < HP_MMA_MAX_HD / 8; ++n) {
                if (n < ntiles) {
                    const u64 at = pi * (u64)hd + (u64)(8 * n + 2 * tq);
                    part_o[at] = o[n][2 * h];
                    part_o[at + 1] = o[n][2 * h + 1];
                }
            }
            if (tq == 0) {
                part_ml[2 * pi] = m[h];
                part_ml[2 * pi + 1] = l[h];
            }
        }
    }
}

// Merges the splits' partial results: out = sum_s o_s e^(m_s - M) / sum_s l_s e^(m_s - M).
// One block per (row, query head).
extern "C" __global__ void __launch_bounds__(128) hp_attention_combine(const float* __restrict__ part_o,
                                                const float* __restrict__ part_ml,
                                                float* __restrict__ out,
                                                bf16_t* __restrict__ out_bf, int rows,
                                                int heads, int head_dim, int splits) {
    const u64 qv = blockIdx.x;
    const u64 stride = (u64)rows * (u64)heads;
    float mx = HP_NEG_INF;
    for (int s = 0; s < splits; ++s) mx = fmaxf(mx, part_ml[2 * (s * stride + qv)]);
    float total = 0.0f;
    for (int s = 0; s < splits; ++s) {
        const float ms = part_ml[2 * (s * stride + qv)];
        if (ms != HP_NEG_INF) total += part_ml[2 * (s * stride + qv) + 1] * expf(ms - mx);
    }
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float acc = 0.0f;
        for (int s = 0; s < splits; ++s) {
            const float ms = part_ml[2 * (s * stride + qv)];
            if (ms != HP_NEG_INF) acc += part_o[(s * stride + qv) * (u64)head_dim + d] * expf(ms - mx);
        }
        const float r = acc * inv;
        out[qv * (u64)head_dim + d] = r;
        out_bf[qv * (u64)head_dim + d] = hp_f2bf(r);
    }
}
