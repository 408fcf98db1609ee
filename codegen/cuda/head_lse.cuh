#pragma once
// head_lse.cuh: the LM head's logits, reduced before they leave the block (head_ce forward).
//   For the 64x64 tile (tokens t, vocabulary columns of tile j) of logits = z·Wᵀ (gemm_mainloop:
//   bf16 in, f32 accumulate):
//     part[t, j] = (m, s),  m = max_c logits[t, c],  s = Σ_c exp(logits[t, c] − m)
//     label_logit[t] = logits[t, labels[t]]      (written by the one tile that holds the label)
//   ce_lse.cuh merges the partials. No logit is stored: T·ceil(V/64)·8 bytes of partials stand in
//   for T·V·4 bytes of f32 logits (32x less; 51 MB instead of 1.65 GB for the locked config).
//
// Launch: grid (ceil(T/64), ceil(V/64)), block 128 (gemm.cuh's tile). Each thread holds 8 columns
// of 4 rows; a row's partial is reduced over its thread's 8 values, then by butterfly over the 4
// lanes sharing the row, then over the two column-half warps in order: deterministic, no atomics.
// Cost: the head GEMM's FLOPs plus one expf per logit, and no f32 logits written or re-read. The
// backward recomputes the GEMM (head_dl.cuh): +0.41 GFLOP per token (+11 % over the model's
// 3.785, not counted by the MFU convention), against 3.3 GB of f32 logits and their gradient per
// 2048 tokens.
#include "gemm.cuh"

namespace vp {

template <int V, int H>
__device__ __forceinline__ void head_lse(const bf16* __restrict__ z, const bf16* __restrict__ w,
                                         const int* __restrict__ labels, float* __restrict__ part,
                                         float* __restrict__ label_logit, int T) {
    constexpr int NTILE = (V + GEMM_TILE - 1) / GEMM_TILE;
    require_block(gemm_cfg::THREADS);
    const int row0 = blockIdx.x * 64, col0 = blockIdx.y * 64;
    if (row0 >= T) return;  // whole block: never happens with the contract's grid
    float acc[2][4][4];
    gemm_mainloop<V, H>(z, w, row0, T, col0, acc);
    const int tid = threadIdx.x, lane = tid & 31, wm = tid >> 6, wn = (tid >> 5) & 1;
    __shared__ LseAcc s_half[2][64];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int lr = wm * 32 + mi * 16 + (lane >> 2) + half * 8, r = row0 + lr;
            const int lab = r < T ? labels[r] : -1;
            float m = LOWEST_F, s = 0.f;
#pragma unroll
            for (int ni = 0; ni < 4; ++ni)
#pragma unroll
                for (int j = 0; j < 2; ++j)
                    if (col0 + wn * 32 + ni * 8 + (lane & 3) * 2 + j < V) m = fmaxf(m, acc[mi][ni][2 * half + j]);
#pragma unroll
            for (int ni = 0; ni < 4; ++ni)
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    const int c = col0 + wn * 32 + ni * 8 + (lane & 3) * 2 + j;
                    const float v = acc[mi][ni][2 * half + j];
                    if (c < V) s += expf(v - m);
                    if (c == lab) label_logit[r] = v;
                }
            LseAcc a{m, s};
#pragma unroll
            for (int o = 1; o < 4; o <<= 1)
                a = lse_merge(a, LseAcc{__shfl_xor_sync(FULL_MASK, a.m, o), __shfl_xor_sync(FULL_MASK, a.s, o)});
            if ((lane & 3) == 0) s_half[wn][lr] = a;
        }
    __syncthreads();
    if (tid < 64 && row0 + tid < T) {
        const LseAcc a = lse_merge(s_half[0][tid], s_half[1][tid]);
        float* p = part + ((size_t)(row0 + tid) * NTILE + blockIdx.y) * 2;
        p[0] = a.m;
        p[1] = a.s;
    }
}

}  // namespace vp
