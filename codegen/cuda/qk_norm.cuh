#pragma once
// qk_norm.cuh: QK-norm forward, queries and keys in one launch. Per head vector of D:
//   yq[r] = xq[r] / sqrt(mean(xq[r]²) + eps) ⊙ wq      r < rows_q (= T·heads)
//   yk[r] = xk[r] / sqrt(mean(xk[r]²) + eps) ⊙ wk      r < rows_k (= T·groups)
//
// Launch: grid ceil((rows_q + rows_k)/8), block 256. Warp-per-row: warp w of block b handles row
// b·8 + w of the q rows followed by the k rows; lane l owns elements l, l+32, …, so the
// statistics are a warp butterfly and 1/r is computed exactly as rmsnorm_bwd computes it (same
// grouping and order), so forward and backward agree bitwise on it. y = (x·inv)·w rounded once to
// bf16. Deterministic.
// Limits: bandwidth-bound. Fusing QK-norm with GRAPE and the split would remove passes over q and k.
#include "vp_common.cuh"

namespace vp {

template <int D>
__device__ __forceinline__ void qk_norm(const bf16* __restrict__ xq, const bf16* __restrict__ xk,
                                        const bf16* __restrict__ wq, const bf16* __restrict__ wk, bf16* __restrict__ yq,
                                        bf16* __restrict__ yk, int rows_q, int rows_k, float eps) {
    constexpr int NW = QK_NORM_THREADS / 32, CH = (D + 31) / 32;
    require_block(NW * 32);
    const int lane = threadIdx.x & 31;
    int r = blockIdx.x * NW + (threadIdx.x >> 5);
    const bf16 *x = xq, *w = wq;
    bf16* y = yq;
    if (r >= rows_q) {
        r -= rows_q;
        x = xk, w = wk, y = yk;
        if (r >= rows_k) return;  // warp-uniform
    }
    const bf16* xr = x + (size_t)r * D;
    float v[CH];
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < CH; ++j) {
        const int i = lane + 32 * j;
        v[j] = i < D ? bf2f(xr[i]) : 0.f;
        ss += v[j] * v[j];
    }
    const float inv = 1.f / sqrtf(warp_sum(ss) / (float)D + eps);
#pragma unroll
    for (int j = 0; j < CH; ++j) {
        const int i = lane + 32 * j;
        if (i < D) y[(size_t)r * D + i] = f2bf(v[j] * inv * bf2f(w[i]));
    }
}

}  // namespace vp
