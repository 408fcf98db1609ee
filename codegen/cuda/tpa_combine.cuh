#pragma once
// tpa_combine.cuh: tensor-product attention factors -> q, k, v (+ packed QKV bias).
//
// Per token the scratch row f (written by tpa_proj.cuh's one GEMM) is
//   [a_q (HEADS·RQ) | a_k (GROUPS·R) | a_v (GROUPS·R) | b_q (RQ·D) | b_k (R·D) | b_v (R·D)]
// and  q_h = (1/RQ) Σ_r a_q[h·RQ + r]·b_q[r·D : r·D + D],  k_g, v_g likewise with R, then the
// group-interleaved packed bias (nullable) is added at the element's packed position
// (group g block [q heads…, k_g, v_g], as qkv_split).
//
// Launch: grid T, block 128: one token per block. The A factors (a few dozen values) go to
// shared memory as f32; each thread owns columns c of the head dim, loads its b_*[r, c] once and
// produces that column for every head and group, so reads and writes are coalesced. f32 math:
// the rank-sum of bf16 products, divided by the rank, plus bias, rounded once to bf16 (the
// reference does the same in f64 and f32, so they agree to rounding).
// Limits: memory-bound on the 1064-wide scratch row. Fusing it into tpa_proj would need a block to
// own whole factor rows (all 17 column tiles of its 64 tokens), not one 64x64 tile.
#include "vp_common.cuh"

namespace vp {

template <int HEADS, int GROUPS, int D, int RQ, int R>
__device__ __forceinline__ void tpa_combine(const bf16* __restrict__ f, const bf16* __restrict__ bias,
                                            bf16* __restrict__ q, bf16* __restrict__ k, bf16* __restrict__ v, int T) {
    static_assert(GROUPS >= 1 && HEADS % GROUPS == 0, "heads must be a multiple of kv groups");
    static_assert(RQ >= 1 && R >= 1, "ranks");
    constexpr int GS = HEADS / GROUPS, GW = (GS + 2) * D;
    constexpr int OAK = HEADS * RQ, OAV = OAK + GROUPS * R, OBQ = OAV + GROUPS * R;
    constexpr int OBK = OBQ + RQ * D, OBV = OBK + R * D, W = OBV + R * D;
    __shared__ float sa[OBQ];
    const int t = blockIdx.x;
    if (t >= T) return;  // whole block
    const bf16* fr = f + (size_t)t * W;
    for (int i = threadIdx.x; i < OBQ; i += blockDim.x) sa[i] = bf2f(fr[i]);
    __syncthreads();
    for (int c = threadIdx.x; c < D; c += blockDim.x) {
        float bq[RQ], bk[R], bv[R];
#pragma unroll
        for (int r = 0; r < RQ; ++r) bq[r] = bf2f(fr[OBQ + r * D + c]);
#pragma unroll
        for (int r = 0; r < R; ++r) {
            bk[r] = bf2f(fr[OBK + r * D + c]);
            bv[r] = bf2f(fr[OBV + r * D + c]);
        }
        for (int hh = 0; hh < HEADS; ++hh) {
            float s = 0.f;
#pragma unroll
            for (int r = 0; r < RQ; ++r) s += sa[hh * RQ + r] * bq[r];
            s = s / (float)RQ;
            if (bias != nullptr) s += bf2f(bias[(hh / GS) * GW + (hh % GS) * D + c]);
            q[((size_t)t * HEADS + hh) * D + c] = f2bf(s);
        }
        for (int grp = 0; grp < GROUPS; ++grp) {
            float sk = 0.f, sv = 0.f;
#pragma unroll
            for (int r = 0; r < R; ++r) {
                sk += sa[OAK + grp * R + r] * bk[r];
                sv += sa[OAV + grp * R + r] * bv[r];
            }
            sk = sk / (float)R;
            sv = sv / (float)R;
            if (bias != nullptr) {
                sk += bf2f(bias[grp * GW + GS * D + c]);
                sv += bf2f(bias[grp * GW + (GS + 1) * D + c]);
            }
            k[((size_t)t * GROUPS + grp) * D + c] = f2bf(sk);
            v[((size_t)t * GROUPS + grp) * D + c] = f2bf(sv);
        }
    }
}

}  // namespace vp
