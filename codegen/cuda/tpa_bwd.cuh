#pragma once
// tpa_bwd.cuh: tensor-product attention backward through the factor products (MODEL.md §5):
// from the recomputed factor row f (layout of tpa_combine.cuh:
// [a_q (HEADS·RQ) | a_k (GROUPS·R) | a_v (GROUPS·R) | b_q (RQ·D) | b_k (R·D) | b_v (R·D)]) and the
// gradients dq [T, HEADS, D], dk, dv [T, GROUPS, D] (null = zero) it writes the factor gradient
// row df (same layout, bf16):
//   da_q[h, r] = (1/RQ) Σ_c dq[h, c]·b_q[r, c]         db_q[r, c] = (1/RQ) Σ_h a_q[h, r]·dq[h, c]
//   da_k[g, r] = (1/R)  Σ_c dk[g, c]·b_k[r, c]         db_k[r, c] = (1/R)  Σ_g a_k[g, r]·dk[g, c]
//   (v likewise). The packed-bias gradient is not formed here (qkv_pack + colsum).
//
// Launch: grid T, block 128, one token per block. The gradients and factors of the token are
// staged in shared memory as f32; the b-factor gradients are one column per thread (fixed head
// order), the a-factor gradients one length-D dot per warp (lane-strided, then a warp butterfly).
// f32 accumulation, one rounding. Deterministic.
#include "vp_common.cuh"

namespace vp {

template <int HEADS, int GROUPS, int D, int RQ, int R>
__device__ __forceinline__ void tpa_bwd(const bf16* __restrict__ f, const bf16* __restrict__ dq,
                                        const bf16* __restrict__ dk, const bf16* __restrict__ dv,
                                        bf16* __restrict__ df, int T) {
    static_assert(GROUPS >= 1 && HEADS % GROUPS == 0, "heads must be a multiple of kv groups");
    constexpr int OAK = HEADS * RQ, OAV = OAK + GROUPS * R, OBQ = OAV + GROUPS * R;
    constexpr int OBK = OBQ + RQ * D, OBV = OBK + R * D, W = OBV + R * D;
    constexpr int GQ = HEADS * D, GK = GROUPS * D;
    __shared__ float s_f[W];
    __shared__ float s_g[GQ + 2 * GK];  // dq | dk | dv
    const int t = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = blockDim.x / 32;
    if (t >= T) return;  // whole block
    const bf16* fr = f + (size_t)t * W;
    bf16* dfr = df + (size_t)t * W;
    for (int i = tid; i < W; i += blockDim.x) s_f[i] = bf2f(fr[i]);
    for (int i = tid; i < GQ; i += blockDim.x) s_g[i] = dq ? bf2f(dq[(size_t)t * GQ + i]) : 0.f;
    for (int i = tid; i < GK; i += blockDim.x) {
        s_g[GQ + i] = dk ? bf2f(dk[(size_t)t * GK + i]) : 0.f;
        s_g[GQ + GK + i] = dv ? bf2f(dv[(size_t)t * GK + i]) : 0.f;
    }
    __syncthreads();
    // b-factor gradients: thread per column c.
    for (int c = tid; c < D; c += blockDim.x) {
#pragma unroll
        for (int r = 0; r < RQ; ++r) {
            float s = 0.f;
            for (int h = 0; h < HEADS; ++h) s += s_f[h * RQ + r] * s_g[h * D + c];
            dfr[OBQ + r * D + c] = f2bf(s / (float)RQ);
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
            float sk = 0.f, sv = 0.f;
            for (int g = 0; g < GROUPS; ++g) {
                sk += s_f[OAK + g * R + r] * s_g[GQ + g * D + c];
                sv += s_f[OAV + g * R + r] * s_g[GQ + GK + g * D + c];
            }
            dfr[OBK + r * D + c] = f2bf(sk / (float)R);
            dfr[OBV + r * D + c] = f2bf(sv / (float)R);
        }
    }
    // a-factor gradients: one dot of length D per warp.
    for (int j = warp; j < OBQ; j += nw) {  // warp-uniform
        const float* gvec;
        const float* bvec;
        float inv;
        if (j < OAK) {
            gvec = s_g + (j / RQ) * D;
            bvec = s_f + OBQ + (j % RQ) * D;
            inv = 1.f / (float)RQ;
        } else if (j < OAV) {
            gvec = s_g + GQ + ((j - OAK) / R) * D;
            bvec = s_f + OBK + ((j - OAK) % R) * D;
            inv = 1.f / (float)R;
        } else {
            gvec = s_g + GQ + GK + ((j - OAV) / R) * D;
            bvec = s_f + OBV + ((j - OAV) % R) * D;
            inv = 1.f / (float)R;
        }
        float s = 0.f;
        for (int c = lane; c < D; c += 32) s += gvec[c] * bvec[c];
        s = warp_sum(s);
        if (lane == 0) dfr[j] = f2bf(s * inv);
    }
}

}  // namespace vp
