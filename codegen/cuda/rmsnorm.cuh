#pragma once
// rmsnorm.cuh: y[r, :] = x[r, :] / sqrt(mean(x[r, :]²) + eps) ⊙ w, per row of D (bf16 in/out).
//
// Launch: grid rows, block 256 (rows = T: the block norms; QK-norm is qk_norm.cuh). Statistics in
// f32: each thread squares and sums its elements (kept in registers), a fixed-order block
// reduction gives Σx², then y = (x·inv)·w rounded once to bf16, in the order of
// reference::rms_row. 8-byte (4 × bf16) accesses when D % 4 == 0 and pointers allow, element
// accesses otherwise. Deterministic (fixed reduction tree).
// Precision: the statistics are f32 where the reference uses f64; the difference stays within
// bf16 output rounding. One row per block suits D = 1024 (4 elements per thread); a small D would
// leave most of the block idle (a warp per row, as qk_norm.cuh, suits it).
#include "vp_common.cuh"

namespace vp {

template <int D>
__device__ __forceinline__ void rmsnorm(const bf16* __restrict__ x, const bf16* __restrict__ w, bf16* __restrict__ y,
                                        int rows, float eps) {
    constexpr int NT = RMSNORM_THREADS;
    require_block(NT);
    const int row = blockIdx.x;
    if (row >= rows) return;  // whole block
    const int tid = threadIdx.x;
    const bf16* xr = x + (size_t)row * D;
    bf16* yr = y + (size_t)row * D;
    const bool vec = (D % 4 == 0) && aligned(x, 8) && aligned(y, 8) && aligned(w, 8);
    if (vec) {
        constexpr int C4 = D / 4, CH = (C4 + NT - 1) / NT;
        float vals[CH][4];
        float ss = 0.f;
#pragma unroll
        for (int j = 0; j < CH; ++j) {
            const int c = tid + j * NT;
            if (c < C4) {
                const uint2 u = reinterpret_cast<const uint2*>(xr)[c];
                vals[j][0] = bf_lo(u.x);
                vals[j][1] = bf_hi(u.x);
                vals[j][2] = bf_lo(u.y);
                vals[j][3] = bf_hi(u.y);
            } else {
#pragma unroll
                for (int e = 0; e < 4; ++e) vals[j][e] = 0.f;
            }
#pragma unroll
            for (int e = 0; e < 4; ++e) ss += vals[j][e] * vals[j][e];
        }
        const float inv = 1.f / sqrtf(block_sum<NT>(ss) / (float)D + eps);
#pragma unroll
        for (int j = 0; j < CH; ++j) {
            const int c = tid + j * NT;
            if (c < C4) {
                const uint2 wu = reinterpret_cast<const uint2*>(w)[c];
                uint2 o;
                o.x = pack_bf2(vals[j][0] * inv * bf_lo(wu.x), vals[j][1] * inv * bf_hi(wu.x));
                o.y = pack_bf2(vals[j][2] * inv * bf_lo(wu.y), vals[j][3] * inv * bf_hi(wu.y));
                reinterpret_cast<uint2*>(yr)[c] = o;
            }
        }
    } else {
        constexpr int CH = (D + NT - 1) / NT;
        float vals[CH];
        float ss = 0.f;
#pragma unroll
        for (int j = 0; j < CH; ++j) {
            const int i = tid + j * NT;
            vals[j] = i < D ? bf2f(xr[i]) : 0.f;
            ss += vals[j] * vals[j];
        }
        const float inv = 1.f / sqrtf(block_sum<NT>(ss) / (float)D + eps);
#pragma unroll
        for (int j = 0; j < CH; ++j) {
            const int i = tid + j * NT;
            if (i < D) yr[i] = f2bf(vals[j] * inv * bf2f(w[i]));
        }
    }
}

}  // namespace vp
