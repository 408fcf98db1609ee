#pragma once
// router_bwd.cuh: sigmoid-router backward to the logits (MODEL.md §5), one token per block.
//
//   Z = Σ_k σ[e_k] + 1e-20 (the forward's renormaliser, f64), G = Σ_k dgate[k]·σ[e_k]
//   dσ[e_k] = scale·(dgate[k] − G/Z)/Z   for the K selected experts e_k = idx[t, k]
//   dσ[e]  += dscores[t, e]              (the sequence aux-loss path; null = none)
//   dl[t, e] = dσ[e]·σ[e]·(1 − σ[e])     (f32 [T, E]; selection itself is not differentiated)
// dgate null (gates not seeded) counts as zero. The logit gradient then feeds fp32-quality GEMMs
// (gemm_nn / gemm_tn with AMODE 1) and a colsum for the bias.
//
// Launch: grid T, block 256; thread e handles experts e, e + 256, …. Every thread recomputes the
// K-term sums Z and G in the same order (f64): deterministic.
#include "vp_common.cuh"

namespace vp {

template <int E, int K>
__device__ __forceinline__ void router_bwd(const float* __restrict__ scores, const int* __restrict__ idx,
                                           const float* __restrict__ dgate, const float* __restrict__ dscores,
                                           float* __restrict__ dl, int T, float scale) {
    static_assert(K >= 1 && K <= E, "top-k larger than the expert count");
    const int t = blockIdx.x;
    if (t >= T) return;  // whole block
    const float* sr = scores + (size_t)t * E;
    int sel[K];
    float dg[K];
    double z = 0.0, gsum = 0.0;
#pragma unroll
    for (int k = 0; k < K; ++k) {
        sel[k] = idx[(size_t)t * K + k];
        dg[k] = dgate ? dgate[(size_t)t * K + k] : 0.f;
        z += (double)sr[sel[k]];
        gsum += (double)dg[k] * (double)sr[sel[k]];
    }
    z += 1e-20;
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        double ds = dscores ? (double)dscores[(size_t)t * E + e] : 0.0;
#pragma unroll
        for (int k = 0; k < K; ++k)
            if (sel[k] == e) ds += (double)scale * ((double)dg[k] - gsum / z) / z;
        const double s = (double)sr[e];
        dl[(size_t)t * E + e] = (float)(ds * s * (1.0 - s));
    }
}

}  // namespace vp
