// Row-wise and element-wise kernels of the decoder: embedding lookup, RMSNorm, bias, RoPE in
// both layouts, SiLU-and-mul, residual add, f32 -> bf16 conversion, row gathers and argmax.
//
// Activations are row-major f32. Kernels whose output feeds a matrix product (RMSNorm,
// SiLU-and-mul) also write a bf16 copy, so cuBLAS reads bf16 without a separate conversion.

// out[r, :] = table[tokens[r], :] (bf16 table, f32 out). One block per row.
extern "C" __global__ void __launch_bounds__(256) hp_embed(const bf16_t* __restrict__ table,
                                    const u32* __restrict__ tokens, float* __restrict__ out,
                                    int cols) {
    const u64 row = blockIdx.x;
    const bf16_t* src = table + (u64)tokens[row] * (u64)cols;
    float* dst = out + row * (u64)cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = hp_bf2f(src[c]);
}

// out = x / sqrt(mean(x^2) + eps) * w per row, in f32 and bf16. One block per row.
extern "C" __global__ void __launch_bounds__(256) hp_rms_norm(const float* __restrict__ x, const float* __restrict__ w,
                                       float* __restrict__ out, bf16_t* __restrict__ out_bf,
                                       int cols, float eps) {
    __shared__ float scratch[32];
    const u64 row = blockIdx.x;
    const float* xr = x + row * (u64)cols;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = xr[c];
        ss += v * v;
    }
    ss = hp_block_sum(ss, scratch);
    const float inv = 1.0f / sqrtf(ss / (float)cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float o = xr[c] * inv * w[c];
        out[row * (u64)cols + c] = o;
        out_bf[row * (u64)cols + c] = hp_f2bf(o);
    }
}

// x[r, c] += b[c].
extern "C" __global__ void __launch_bounds__(256) hp_add_bias(float* __restrict__ x, const float* __restrict__ b,
                                       u64 n, int cols) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x) {
        x[i] += b[i % (u64)cols];
    }
}

// Rotates every head_dim-wide head of row r by position pos[r]: pairs (2i, 2i+1) when
// interleaved, (i, i + head_dim/2) when half-split; angle pos * inv_freq[i] (inv_freq computed
// on the host exactly as the CPU backend computes it). One thread per rotated pair.
extern "C" __global__ void __launch_bounds__(256) hp_rope(float* __restrict__ x, const u32* __restrict__ pos,
                                   const float* __restrict__ inv_freq, int rows, int cols,
                                   int head_dim, int half_split) {
    const int half = head_dim / 2;
    const u64 pairs_per_row = (u64)(cols / 2);
    const u64 total = (u64)rows * pairs_per_row;
    for (u64 idx = blockIdx.x * (u64)blockDim.x + threadIdx.x; idx < total;
         idx += (u64)gridDim.x * blockDim.x) {
        const u64 row = idx / pairs_per_row;
        const int r = (int)(idx % pairs_per_row);
        const int head = r / half, i = r % half;
        float s, c;
        sincosf((float)pos[row] * inv_freq[i], &s, &c);
        float* h = x + row * (u64)cols + (u64)head * head_dim;
        const int ia = half_split ? i : 2 * i;
        const int ib = half_split ? i + half : 2 * i + 1;
        const float a = h[ia], b = h[ib];
        h[ia] = a * c - b * s;
        h[ib] = a * s + b * c;
    }
}

// gate = silu(gate) * up, in f32 and bf16.
extern "C" __global__ void __launch_bounds__(256) hp_silu_mul(float* __restrict__ gate, const float* __restrict__ up,
                                       bf16_t* __restrict__ gate_bf, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x) {
        const float g = gate[i];
        const float o = g / (1.0f + expf(-g)) * up[i];
        gate[i] = o;
        gate_bf[i] = hp_f2bf(o);
    }
}

// x += y.
extern "C" __global__ void __launch_bounds__(256) hp_add(float* __restrict__ x, const float* __restrict__ y, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x) {
        x[i] += y[i];
    }
}

// y = bf16(x).
extern "C" __global__ void __launch_bounds__(256) hp_to_bf16(const float* __restrict__ x, bf16_t* __restrict__ y,
                                      u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x) {
        y[i] = hp_f2bf(x[i]);
    }
}

// out[i, :] = x[rows[i], :]. One block per output row.
extern "C" __global__ void __launch_bounds__(256) hp_gather_rows(const float* __restrict__ x,
                                          const u32* __restrict__ rows, float* __restrict__ out,
                                          int cols) {
    const u64 i = blockIdx.x;
    const float* src = x + (u64)rows[i] * (u64)cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) out[i * (u64)cols + c] = src[c];
}

// out[r] = the first index of the largest value of row r (as the CPU's argmax: NaN never
// wins). One block per row, blockDim.x a multiple of 32.
extern "C" __global__ void __launch_bounds__(1024) hp_argmax(const float* __restrict__ x, u32* __restrict__ out,
                                     int cols) {
    __shared__ float best_v[32];
    __shared__ u32 best_i[32];
    const u64 row = blockIdx.x;
    const float* xr = x + row * (u64)cols;
    float v = HP_NEG_INF;
    u32 idx = 0xffffffffu;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float e = xr[c];
        if (e > v || (idx == 0xffffffffu && !(e != e))) {
            v = e;
            idx = (u32)c;
        }
    }
    // Warp, then block: larger value wins, ties go to the lower index.
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(HP_FULL_MASK, v, o);
        const u32 oi = __shfl_xor_sync(HP_FULL_MASK, idx, o);
        if (ov > v || (ov == v && oi < idx)) {
            v = ov;
            idx = oi;
        }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        best_v[warp] = v;
        best_i[warp] = idx;
    }
    __syncthreads();
    if (warp == 0) {
        const int warps = (blockDim.x + 31) >> 5;
        v = lane < warps ? best_v[lane] : HP_NEG_INF;
        idx = lane < warps ? best_i[lane] : 0xffffffffu;
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(HP_FULL_MASK, v, o);
            const u32 oi = __shfl_xor_sync(HP_FULL_MASK, idx, o);
            if (ov > v || (ov == v && oi < idx)) {
                v = ov;
                idx = oi;
            }
        }
        if (lane == 0) out[row] = idx == 0xffffffffu ? 0u : idx;
    }
}
