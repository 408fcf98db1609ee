#pragma once
// seq_aux_bwd.cuh: sequence aux-loss backward to the router scores σ (MODEL.md §4.10/§5).
// With aux = (1/B) Σ_b E/(K·S²) Σ_e P_{b,e}·c_{b,e} and upstream gradient daux (a device scalar):
//   a_e = daux·inv_rows·E/(K·S²)·counts[b(t), e]        (∂aux/∂s̃[t, e]; counts not differentiated)
//   U = Σ_e σ[t, e] + 1e-20,  s̃_e = σ_e/U
//   dscores[t, e] = (a_e − Σ_e' a_e'·s̃_e') / U            (f32 out)
//
// Launch: grid T, block 256, one token per block; the two row sums are f64 fixed-tree block sums
// (block_sum<256>). Deterministic.
#include "vp_common.cuh"

namespace vp {

template <int E, int K>
__device__ __forceinline__ void seq_aux_bwd(const float* __restrict__ scores, const float* __restrict__ counts,
                                            const float* __restrict__ daux, float* __restrict__ dscores, int T, int S,
                                            float inv_rows) {
    constexpr int NT = SEQ_AUX_BWD_THREADS, EJ = (E + NT - 1) / NT;
    require_block(NT);
    const int t = blockIdx.x, tid = threadIdx.x;
    if (t >= T) return;  // whole block
    const float* sr = scores + (size_t)t * E;
    const float* cr = counts + (size_t)(t / S) * E;
    const double coef = (double)daux[0] * (double)inv_rows * (double)E / ((double)K * (double)S * (double)S);
    double sv[EJ], av[EJ];
    double u = 0.0;
#pragma unroll
    for (int j = 0; j < EJ; ++j) {
        const int e = tid + NT * j;
        sv[j] = e < E ? (double)sr[e] : 0.0;
        av[j] = e < E ? coef * (double)cr[e] : 0.0;
        u += sv[j];
    }
    u = block_sum<NT>(u) + 1e-20;
    double dot = 0.0;
#pragma unroll
    for (int j = 0; j < EJ; ++j) dot += av[j] * (sv[j] / u);
    dot = block_sum<NT>(dot);
#pragma unroll
    for (int j = 0; j < EJ; ++j) {
        const int e = tid + NT * j;
        if (e < E) dscores[(size_t)t * E + e] = (float)((av[j] - dot) / u);
    }
}

}  // namespace vp
