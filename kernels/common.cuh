// HotPrefix CUDA kernels: the prelude every kernel source is compiled with.
//
// The kernels include no CUDA header: bf16 values are stored as raw 16-bit words and converted
// with one PTX instruction each way, so NVRTC needs nothing but its own built-ins at run time
// (a CUDA runtime image carries libnvrtc but not the toolkit's headers). Everything here is
// also valid C++ under the CPU emulation of the CUDA thread model in kernels/emu/emu.hpp
// (HP_EMULATE), which is how CI executes the kernels without a GPU.

typedef unsigned short bf16_t;
typedef unsigned int u32;
typedef unsigned long long u64;

#ifndef HP_EMULATE
// Every kernel's dynamic shared memory is one byte array (a translation unit may declare it
// with one type only), cast to what the kernel stores in it.
#define HP_SMEM_DYN(T, name)                                  \
    extern __shared__ __align__(16) unsigned char hp_smem_raw[]; \
    T* name = reinterpret_cast<T*>(hp_smem_raw)

// f32 -> bf16, round to nearest even (NaN stays NaN): one instruction on sm_80 and later.
__device__ __forceinline__ bf16_t hp_f2bf(float f) {
    bf16_t r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}

// d += a * b for one warp: a is 16x16 (row-major fragments), b is 16x8 (column-major), d is
// 16x8 f32, bf16 inputs, f32 accumulation (PTX ISA, "mma.m16n8k16" fragment layouts).
__device__ __forceinline__ void hp_mma_16816(float* d, const u32* a, const u32* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

#define HP_FULL_MASK 0xffffffffu
#define HP_NEG_INF (__int_as_float(0xff800000))

__device__ __forceinline__ float hp_bf2f(bf16_t h) {
    return __uint_as_float(((u32)h) << 16);
}

// Two bf16 values in one 32-bit word, `lo` in the low half (the element with the lower index).
__device__ __forceinline__ u32 hp_pack2(float lo, float hi) {
    return (u32)hp_f2bf(lo) | ((u32)hp_f2bf(hi) << 16);
}

__device__ __forceinline__ float hp_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(HP_FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float hp_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(HP_FULL_MASK, v, o));
    return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ __forceinline__ float hp_block_sum(float v, float* scratch32) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
    v = hp_warp_sum(v);
    if (lane == 0) scratch32[warp] = v;
    __syncthreads();
    float t = (lane < warps) ? scratch32[lane] : 0.0f;
    t = hp_warp_sum(t);
    // Every warp reduced the same values; wait before the scratch is reused.
    __syncthreads();
    return t;
}
