#pragma once
// vres_bwd.cuh: value-residual backward (MODEL.md §5, D2: λ = sigmoid(logit) in f32, live):
//   dv = λ·dy,  dv1 = (1 − λ)·dy                                    (bf16 out)
//   partial[b] = λ(1 − λ) · Σ_{elements of block b} dy·(v − v1)     (f64 inside, f32 out)
// The last block to finish (`last_block`, one ticket) adds the gridDim.x partials (`sum_to`, a
// fixed tree) into dl = ∂L/∂logit, a gradient sum (`accum`).
//
// Launch: grid NB (fixed), block 256, grid-stride over the n elements; block_sum in a fixed tree.
// λ is evaluated like vres.cuh (f64, rounded once to f32). Deterministic; no atomics.
#include "vp_common.cuh"

namespace vp {

__device__ __forceinline__ void vres_bwd(const bf16* __restrict__ v, const bf16* __restrict__ v1,
                                         const float* __restrict__ logit, const bf16* __restrict__ dy,
                                         bf16* __restrict__ dv, bf16* __restrict__ dv1, float* __restrict__ partial,
                                         int n, float* dl, int* tickets, int accum) {
    constexpr int NT = VRES_BWD_THREADS;
    require_block(NT);
    const float lam = (float)(1.0 / (1.0 + exp(-(double)logit[0])));
    double acc = 0.0;
    for (int i = blockIdx.x * NT + threadIdx.x; i < n; i += gridDim.x * NT) {
        const float g = bf2f(dy[i]);
        dv[i] = f2bf(lam * g);
        dv1[i] = f2bf((1.f - lam) * g);
        acc += (double)g * (double)(bf2f(v[i]) - bf2f(v1[i]));
    }
    acc = block_sum<NT>(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = (float)((double)lam * (1.0 - (double)lam) * acc);
    if (last_block(tickets, (int)gridDim.x)) sum_to<NT>(partial, (int)gridDim.x, 1.f, dl, accum);
}

}  // namespace vp
