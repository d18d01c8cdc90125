// A CPU emulation of the CUDA thread model, so that the kernels in kernels/*.cu run on a machine
// without a GPU (CI) and their results can be checked against plain loops.
//
// Every thread of a block is a real OS thread: __syncthreads is a barrier over the block,
// warp shuffles and mma.sync exchange values through a per-warp buffer between two barriers
// over the warp, and blocks of a grid run one after another (so `__shared__` storage can be
// static). This checks indexing, synchronisation structure and fragment layouts as this file
// models them; it says nothing about speed, and the mma.sync model is the PTX ISA's documented
// fragment layout, which only a GPU run confirms.
#pragma once

#define HP_EMULATE 1

#include <algorithm>
#include <array>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

#include <math.h>

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint4 {
    unsigned x, y, z, w;
};
struct float4 {
    float x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
#define __launch_bounds__(...)

using std::max;
using std::min;

inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}

struct EmuState {
    std::unique_ptr<std::barrier<>> block_barrier;
    std::vector<std::unique_ptr<std::barrier<>>> warp_barrier;
    // Per warp, per lane: 8 words for shuffles and mma fragments.
    std::vector<std::array<std::array<uint64_t, 12>, 32>> exchange;
    alignas(16) unsigned char dyn_smem[256 * 1024];
};
inline EmuState emu;

#define HP_SMEM_DYN(T, name) T* name = reinterpret_cast<T*>(emu.dyn_smem)

inline void __syncthreads() { emu.block_barrier->arrive_and_wait(); }

template <class T>
inline T emu_shfl(T v, int src) {
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    std::memcpy(&emu.exchange[w][lane][0], &v, sizeof(T));
    emu.warp_barrier[w]->arrive_and_wait();
    T r;
    std::memcpy(&r, &emu.exchange[w][src & 31][0], sizeof(T));
    emu.warp_barrier[w]->arrive_and_wait();
    return r;
}
#define __shfl_xor_sync(mask, v, o) emu_shfl((v), (int)(threadIdx.x % 32) ^ (o))
#define __shfl_sync(mask, v, src) emu_shfl((v), (src))

// f32 -> bf16, round to nearest even, NaN kept quiet: what cvt.rn.bf16.f32 does.
inline unsigned short hp_f2bf(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

inline float emu_bf(unsigned bits16) { return __uint_as_float(bits16 << 16); }

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 with the PTX ISA's fragment layout:
// lane = 4 * group + t; A: {a0,a1}=(g, 2t..), {a2,a3}=(g+8, 2t..), {a4,a5}=(g, 2t+8..),
// {a6,a7}=(g+8, 2t+8..); B: {b0,b1}=(k 2t.., n g), {b2,b3}=(k 2t+8.., n g);
// C/D: {c0,c1}=(g, 2t..), {c2,c3}=(g+8, 2t..).
inline void hp_mma_16816(float* d, const unsigned* a, const unsigned* b) {
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    auto& ex = emu.exchange[w];
    for (int i = 0; i < 4; ++i) ex[lane][i] = a[i];
    for (int i = 0; i < 2; ++i) ex[lane][4 + i] = b[i];
    for (int i = 0; i < 4; ++i) {
        unsigned u = __float_as_uint(d[i]);
        ex[lane][6 + i] = u;
    }
    emu.warp_barrier[w]->arrive_and_wait();
    float A[16][16], B[16][8], C[16][8];
    for (int L = 0; L < 32; ++L) {
        const int g = L >> 2, t = L & 3;
        auto lo = [&](int i) { return emu_bf((unsigned)(ex[L][i] & 0xffffu)); };
        auto hi = [&](int i) { return emu_bf((unsigned)((ex[L][i] >> 16) & 0xffffu)); };
        A[g][2 * t] = lo(0);
        A[g][2 * t + 1] = hi(0);
        A[g + 8][2 * t] = lo(1);
        A[g + 8][2 * t + 1] = hi(1);
        A[g][2 * t + 8] = lo(2);
        A[g][2 * t + 9] = hi(2);
        A[g + 8][2 * t + 8] = lo(3);
        A[g + 8][2 * t + 9] = hi(3);
        B[2 * t][g] = lo(4);
        B[2 * t + 1][g] = hi(4);
        B[2 * t + 8][g] = lo(5);
        B[2 * t + 9][g] = hi(5);
        C[g][2 * t] = __uint_as_float((unsigned)ex[L][6]);
        C[g][2 * t + 1] = __uint_as_float((unsigned)ex[L][7]);
        C[g + 8][2 * t] = __uint_as_float((unsigned)ex[L][8]);
        C[g + 8][2 * t + 1] = __uint_as_float((unsigned)ex[L][9]);
    }
    emu.warp_barrier[w]->arrive_and_wait();
    const int g = lane >> 2, t = lane & 3;
    const int rows[4] = {g, g, g + 8, g + 8};
    const int cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
    for (int i = 0; i < 4; ++i) {
        float acc = C[rows[i]][cols[i]];
        for (int k = 0; k < 16; ++k) acc += A[rows[i]][k] * B[k][cols[i]];
        d[i] = acc;
    }
}

// Runs `kernel` (a callable that calls one kernel with its arguments) over `grid` x `block`.
inline void emu_launch(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& kernel) {
    if (smem_bytes > sizeof(emu.dyn_smem)) throw std::runtime_error("emu: dynamic shared memory");
    if (block.y != 1 || block.z != 1) throw std::runtime_error("emu: 1-D blocks only");
    const unsigned n = block.x;
    blockDim = block;
    gridDim = grid;
    emu.block_barrier = std::make_unique<std::barrier<>>(n);
    const unsigned warps = (n + 31) / 32;
    emu.warp_barrier.clear();
    for (unsigned w = 0; w < warps; ++w) {
        const unsigned size = std::min(32u, n - 32 * w);
        emu.warp_barrier.push_back(std::make_unique<std::barrier<>>(size));
    }
    emu.exchange.assign(warps, {});
    std::memset(emu.dyn_smem, 0xff, smem_bytes);
    std::vector<std::thread> threads;
    threads.reserve(n);
    for (unsigned tid = 0; tid < n; ++tid) {
        threads.emplace_back([&, tid] {
            threadIdx = dim3(tid, 0, 0);
            for (unsigned z = 0; z < grid.z; ++z)
                for (unsigned y = 0; y < grid.y; ++y)
                    for (unsigned x = 0; x < grid.x; ++x) {
                        blockIdx = dim3(x, y, z);
                        kernel();
                        // A block's threads all finish before the next block reuses the
                        // static shared memory.
                        emu.block_barrier->arrive_and_wait();
                    }
        });
    }
    for (auto& t : threads) t.join();
}
