#pragma once
// vp_common.cuh: device helpers shared by every vpmoe kernel family.
//
// Contents: bf16 <-> f32 conversion and 16-byte packing, deterministic warp/block reductions and
// scans (fixed shuffle/tree order, no atomics), a total-order key for top-k selection, and thin
// wrappers over the sm_80+ PTX the matrix kernels use (cp.async, ldmatrix, mma.sync m16n8k16 bf16).
//
// NVRTC compiles these headers from memory with only the CUDA include directory (cuda_bf16.h and
// what it pulls in): no <cstdint>, no mma.h, no CCCL. Integer widths are spelled out
// (unsigned int = 32 bit, unsigned long long = 64 bit).
//
// Every PTX wrapper has an `#else` branch calling a `vp_emu_*` function. NVRTC always defines
// __CUDA_ARCH__, so those branches never reach the GPU build; they let a host-side emulator
// (threads as fibers, see docs/kernels.md) compile and check these very templates on a machine
// without a GPU.
#include <cuda_bf16.h>

#include "vp_consts.cuh"

namespace vp {

typedef __nv_bfloat16 bf16;

constexpr unsigned FULL_MASK = 0xffffffffu;
constexpr float LOG2E = 1.4426950408889634f;

// ---------------------------------------------------------------------------------------------
// Conversions
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float bf2f(bf16 x) { return __bfloat162float(x); }
// Round to nearest even (the only rounding used on stores).
__device__ __forceinline__ bf16 f2bf(float x) { return __float2bfloat16(x); }

// Two floats -> packed bf16x2 (`lo` in the low half, i.e. at the lower address).
__device__ __forceinline__ unsigned int pack_bf2(float lo, float hi) {
    unsigned int l = __bfloat16_as_ushort(__float2bfloat16(lo));
    unsigned int h = __bfloat16_as_ushort(__float2bfloat16(hi));
    return l | (h << 16);
}
__device__ __forceinline__ float bf_lo(unsigned int u) { return __uint_as_float(u << 16); }
__device__ __forceinline__ float bf_hi(unsigned int u) { return __uint_as_float(u & 0xffff0000u); }

// 8 bf16 in a uint4 <-> 8 floats.
__device__ __forceinline__ void unpack8(const uint4& u, float (&f)[8]) {
    f[0] = bf_lo(u.x); f[1] = bf_hi(u.x);
    f[2] = bf_lo(u.y); f[3] = bf_hi(u.y);
    f[4] = bf_lo(u.z); f[5] = bf_hi(u.z);
    f[6] = bf_lo(u.w); f[7] = bf_hi(u.w);
}
__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
    uint4 u;
    u.x = pack_bf2(f[0], f[1]);
    u.y = pack_bf2(f[2], f[3]);
    u.z = pack_bf2(f[4], f[5]);
    u.w = pack_bf2(f[6], f[7]);
    return u;
}

__device__ __forceinline__ bool aligned(const void* p, unsigned long long bytes) {
    return ((unsigned long long)p & (bytes - 1)) == 0;
}

__device__ __forceinline__ int cdiv(int a, int b) { return (a + b - 1) / b; }

// Row addressing of a GEMM's weight (or weight-gradient) operand. `Rows<T>` is one row-major
// matrix; `RowBlocks<T>` is one logical matrix kept as up to six separately allocated row blocks
// (TPA's six factor weights, and their gradient sums, live in different optimizer groups): block
// i holds rows [end[i-1], end[i]). `row` resolves with unrolled selects, so the pointers stay in
// registers. The GEMM templates take either (`as_rows` wraps a plain pointer).
template <typename T>
struct Rows {
    T* p;
    int ld;
    __device__ __forceinline__ T* row(int r) const { return p + (size_t)r * ld; }
    __device__ __forceinline__ bool aligned_to(unsigned long long bytes) const { return aligned(p, bytes); }
};
template <typename T>
struct RowBlocks {
    T* p[6];
    int end[6];  // cumulative row counts; unused blocks repeat the last end
    int ld;
    __device__ __forceinline__ T* row(int r) const {
        T* q = p[0];
        int s = 0;
#pragma unroll
        for (int i = 1; i < 6; ++i)
            if (r >= end[i - 1]) {
                q = p[i];
                s = end[i - 1];
            }
        return q + (size_t)(r - s) * ld;
    }
    __device__ __forceinline__ bool aligned_to(unsigned long long bytes) const {
        bool ok = true;
#pragma unroll
        for (int i = 0; i < 6; ++i) ok = ok && aligned(p[i], bytes);
        return ok;
    }
};
template <typename T>
__device__ __forceinline__ Rows<T> as_rows(T* p, int ld) { return {p, ld}; }
template <typename T>
__device__ __forceinline__ RowBlocks<T> as_rows(const RowBlocks<T>& b, int) { return b; }

// Writes a parameter gradient: stores it, or (`accum`: an earlier micro-batch of the step is
// already there) adds it into the step's f32 sum. The kernels that finalise gradients write
// through this, so the sum costs no pass of its own; one f32 add, as a separate accumulation.
__device__ __forceinline__ void put_grad(float* p, float v, int accum) { *p = accum ? *p + v : v; }

// Keeps a rarely run tail (a split's finish) out of its caller's register count; plain on the host.
#ifdef __CUDA_ARCH__
#define VP_NOINLINE __noinline__
#else
#define VP_NOINLINE
#endif

// Split reductions finish in their last block. The `nparts` blocks of a group each store an f32
// partial, then call `last_block` (every thread, after its partial stores): each thread fences
// its stores device-wide, and thread 0 draws a ticket. The block that draws the last one returns
// true and puts the ticket back to 0 for the next launch (every block of the group has drawn by
// then); it then adds the group's partials with `sum_parts_at`, in ascending part order: the
// same f32 sum a separate pass would make, so the result does not depend on which block happens
// to finish last. The ticket is an integer counter, never a float atomic: no value depends on
// scheduling. Tickets live in one zeroed buffer that the runtime keeps (`Arg::Tickets`); launches
// on one stream never overlap, so each launch finds them all at 0.
__device__ __forceinline__ bool last_block(int* ticket, int nparts) {
    __shared__ int s_last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        s_last = atomicAdd(ticket, 1) == nparts - 1;
        if (s_last) *ticket = 0;
    }
    __syncthreads();
    const bool last = s_last != 0;
    if (last) __threadfence();
    return last;
}

// Σ_p parts[p·stride + i] for p ascending, read from L2 (other blocks wrote them; L1 is not
// coherent across blocks).
__device__ __forceinline__ float sum_parts_at(const float* parts, size_t stride, int nparts, size_t i) {
    float s = 0.f;
    for (int p = 0; p < nparts; ++p) s += __ldcg(parts + (size_t)p * stride + i);
    return s;
}

// Chunk x of X of a sequence of S tokens: [begin, end) with ch = ceil(S/X) tokens each (the
// sequence aux loss spreads a sequence over X blocks); begin >= S for an empty chunk.
__device__ __forceinline__ void seq_chunk(int S, int x, int X, int& begin, int& end) {
    const int ch = cdiv(S, X);
    begin = x * ch;
    end = min(S, begin + ch);
}

// Online-softmax partial (max, Σ exp(x − max)). Empty partials start from the lowest finite float,
// not -inf, so exp(m_old − m_new) is never exp(NaN). `lse_merge` is symmetric (max and + commute),
// so butterfly partners agree bit for bit.
constexpr float LOWEST_F = -3.402823466e38f;
struct LseAcc {
    float m, s;
};
__device__ __forceinline__ LseAcc lse_merge(LseAcc a, LseAcc b) {
    const float m = fmaxf(a.m, b.m);
    return LseAcc{m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

// Kernels whose reductions, scans or tiles are sized for the contract's block size call this
// first: a launch with another block size traps (a launch failure) instead of computing garbage.
__device__ __forceinline__ void require_block(unsigned int nt) {
    if (blockDim.x != nt || blockDim.y != 1 || blockDim.z != 1) __trap();
}

// ---------------------------------------------------------------------------------------------
// Total order for top-k: `order_key` maps a float to an unsigned whose integer order is Rust's
// f32::total_cmp order (-NaN < -inf < ... < -0 < +0 < ... < +inf < +NaN). `rank_key` packs
// (value, index) into 64 bits so that the plain integer maximum is "largest value, ties to the
// lower index", exactly `reference::topk`'s order. 0 is never a valid rank key (the low word is
// ~index != 0 for index < 2^32-1), so 0 marks "already taken / absent".
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ unsigned int order_key(float f) {
    unsigned int u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ unsigned long long rank_key(float v, int idx) {
    return ((unsigned long long)order_key(v) << 32) | (unsigned long long)(~(unsigned int)idx);
}
__device__ __forceinline__ int rank_index(unsigned long long key) { return (int)(~(unsigned int)(key & 0xffffffffull)); }

// ---------------------------------------------------------------------------------------------
// Warp reductions (xor butterfly: every lane ends with the same, order-fixed result).
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}
__device__ __forceinline__ unsigned long long warp_max_u64(unsigned long long v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        unsigned long long w = __shfl_xor_sync(FULL_MASK, v, o);
        v = w > v ? w : v;
    }
    return v;
}

// ---------------------------------------------------------------------------------------------
// Block reductions for a block of NT threads (NT a multiple of 32, all threads call). The warp
// partials are combined in warp order by every thread, so the result is identical everywhere and
// run to run. Each call ends with a barrier so it may be called again right away.
// ---------------------------------------------------------------------------------------------
template <int NT, typename T>
__device__ __forceinline__ T block_sum(T v) {
    static_assert(NT % 32 == 0 && NT <= 1024, "block size");
    __shared__ T red[NT / 32];
    v = warp_sum(v);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) red[warp] = v;
    __syncthreads();
    T s = red[0];
#pragma unroll
    for (int i = 1; i < NT / 32; ++i) s += red[i];
    __syncthreads();
    return s;
}

// out = scale · Σ_{i<n} parts[i] (put_grad: stored, or added with `accum`), by all NT threads of
// one block: each thread sums a fixed strided subset in f64, then block_sum's fixed tree. The
// same bits whichever block runs it, so it serves `sum` and the last block of a scalar split
// (reads from L2: other blocks wrote the parts).
template <int NT>
__device__ __forceinline__ void sum_to(const float* parts, int n, float scale, float* out, int accum) {
    double acc = 0.0;
    for (int i = threadIdx.x; i < n; i += NT) acc += (double)__ldcg(parts + i);
    acc = block_sum<NT>(acc);
    if (threadIdx.x == 0) put_grad(out, (float)((double)scale * acc), accum);
}

template <int NT>
__device__ __forceinline__ float block_max(float v) {
    static_assert(NT % 32 == 0 && NT <= 1024, "block size");
    __shared__ float red[NT / 32];
    v = warp_max(v);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float m = red[0];
#pragma unroll
    for (int i = 1; i < NT / 32; ++i) m = fmaxf(m, red[i]);
    __syncthreads();
    return m;
}

template <int NT>
__device__ __forceinline__ unsigned long long block_max_u64(unsigned long long v) {
    static_assert(NT % 32 == 0 && NT <= 1024, "block size");
    __shared__ unsigned long long red[NT / 32];
    v = warp_max_u64(v);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) red[warp] = v;
    __syncthreads();
    unsigned long long m = red[0];
#pragma unroll
    for (int i = 1; i < NT / 32; ++i) m = red[i] > m ? red[i] : m;
    __syncthreads();
    return m;
}

// Exclusive prefix sum over a block of NT threads (thread order); `total` gets the block sum.
template <int NT>
__device__ __forceinline__ int block_exclusive_scan(int v, int& total) {
    static_assert(NT % 32 == 0 && NT <= 1024, "block size");
    __shared__ int wsum[NT / 32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        int n = __shfl_up_sync(FULL_MASK, incl, o);
        if (lane >= o) incl += n;
    }
    if (lane == 31) wsum[warp] = incl;
    __syncthreads();
    int before = 0, tot = 0;
#pragma unroll
    for (int i = 0; i < NT / 32; ++i) {
        before += (i < warp) ? wsum[i] : 0;
        tot += wsum[i];
    }
    __syncthreads();
    total = tot;
    return before + incl - v;
}

// ---------------------------------------------------------------------------------------------
// PTX wrappers (sm_80+ instructions; all available on sm_90a).
// ---------------------------------------------------------------------------------------------
#ifndef __CUDA_ARCH__
}  // namespace vp
// Host emulation hooks (never compiled by NVRTC).
void vp_emu_cp_async16(void* smem, const void* gmem, int src_bytes);
void vp_emu_cp_async_commit();
void vp_emu_cp_async_wait(int n);
void vp_emu_ldmatrix_x4(unsigned int (&r)[4], const void* smem, bool trans);
void vp_emu_mma16816(float (&d)[4], const unsigned int (&a)[4], const unsigned int (&b)[2]);
namespace vp {
#endif

__device__ __forceinline__ unsigned int smem_addr(const void* p) {
#ifdef __CUDA_ARCH__
    return (unsigned int)__cvta_generic_to_shared(p);
#else
    return 0;
#endif
}

// 16-byte global->shared asynchronous copy; when !valid the 16 bytes are zero-filled (src-size 0,
// nothing is read from `gmem`, which must still be a mapped address: pass a base pointer).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
#ifdef __CUDA_ARCH__
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
                 "r"(valid ? 16 : 0)
                 : "memory");
#else
    vp_emu_cp_async16(smem, gmem, valid ? 16 : 0);
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef __CUDA_ARCH__
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#else
    vp_emu_cp_async_commit();
#endif
}
// Wait until at most N of this thread's committed cp.async groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef __CUDA_ARCH__
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#else
    vp_emu_cp_async_wait(N);
#endif
}

// The cp.async ring of the 64x64 GEMM tiles: slices 0 .. STAGES-2 in flight (one commit group
// each, possibly empty), then for each slice t: wait until it has landed (this thread's copies,
// then everyone's, which also frees slot (t-1) % STAGES), issue slice t + STAGES - 1, and run
// `compute(slot)` on slot t % STAGES. `load(t, slot)` issues slice t into a slot.
template <int STAGES, class Load, class Compute>
__device__ __forceinline__ void cp_async_ring(int slices, Load&& load, Compute&& compute) {
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < slices) load(s, s);
        cp_async_commit();
    }
    for (int t = 0; t < slices; ++t) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        const int next = t + STAGES - 1;
        if (next < slices) load(next, next % STAGES);
        cp_async_commit();
        compute(t % STAGES);
    }
    cp_async_wait<0>();
}

// The 2 x 4 m16n8k16 accumulator fragments of a warp's 32x32 tile, zeroed.
__device__ __forceinline__ void zero_acc(float (&acc)[2][4][4]) {
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;
}

// Four 8x8 b16 matrices from shared memory; lane l supplies the row address of row (l % 8) of
// matrix (l / 8); register i holds matrix i (lane l: row l/4, columns 2(l%4), 2(l%4)+1; with
// .trans the transposed element pair: rows 2(l%4), 2(l%4)+1 of column l/4).
__device__ __forceinline__ void ldsm_x4(unsigned int (&r)[4], const void* smem) {
#ifdef __CUDA_ARCH__
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(smem))
                 : "memory");
#else
    vp_emu_ldmatrix_x4(r, smem, false);
#endif
}
__device__ __forceinline__ void ldsm_x4_trans(unsigned int (&r)[4], const void* smem) {
#ifdef __CUDA_ARCH__
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(smem))
                 : "memory");
#else
    vp_emu_ldmatrix_x4(r, smem, true);
#endif
}

// D += A·B for one warp: A 16x16 bf16 (row-major fragment a[4]), B 16x8 bf16 ("col": b[2]),
// D 16x8 f32. Fragment layout (g = lane/4, q = lane%4):
//   a[0] = A[g][2q..2q+1]   a[1] = A[g+8][2q..]   a[2] = A[g][2q+8..]   a[3] = A[g+8][2q+8..]
//   b[0] = B[2q..2q+1][g]   b[1] = B[2q+8..2q+9][g]
//   d[0..1] = D[g][2q..2q+1]   d[2..3] = D[g+8][2q..2q+1]
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const unsigned int (&a)[4], const unsigned int (&b)[2]) {
#ifdef __CUDA_ARCH__
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    vp_emu_mma16816(d, a, b);
#endif
}

// Copies 8 bf16 (16 bytes) from global to shared memory: the first `n_valid` (clamped to 0..8)
// elements are read from `gmem`, the rest zero-filled. When `vec` (the caller's promise that
// `gmem` and `smem` are 16-byte aligned) and the chunk is all-or-nothing, it is one asynchronous
// 16-byte cp.async (`base`, any mapped address, stands in for `gmem` when nothing is read);
// otherwise a synchronous element-by-element copy. Every tile loader goes through this, so odd
// shapes and unaligned column slices stay correct while the common case stays vectorised.
__device__ __forceinline__ void load_chunk8(bf16* smem, const bf16* gmem, int n_valid, bool vec, const bf16* base) {
    if (vec && (n_valid >= 8 || n_valid <= 0)) {
        cp_async16(smem, n_valid > 0 ? gmem : base, n_valid > 0);
    } else {
        unsigned short tmp[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) tmp[j] = j < n_valid ? __bfloat16_as_ushort(gmem[j]) : (unsigned short)0;
        uint4 u;
        u.x = tmp[0] | ((unsigned int)tmp[1] << 16);
        u.y = tmp[2] | ((unsigned int)tmp[3] << 16);
        u.z = tmp[4] | ((unsigned int)tmp[5] << 16);
        u.w = tmp[6] | ((unsigned int)tmp[7] << 16);
        *reinterpret_cast<uint4*>(smem) = u;
    }
}

}  // namespace vp
