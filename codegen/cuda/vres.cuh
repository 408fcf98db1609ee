#pragma once
// vres.cuh: value residual, y = λ·v + (1 − λ)·v1 with λ = sigmoid(*logit) in f32 (D2), over n
// bf16 elements.
//
// Launch: grid ceil(n/256), block 256, one element per thread. λ is evaluated in f64 and rounded
// to f32 exactly like reference::sigmoid (one exp per thread, negligible), then the blend in f32.
// Limits: memory-bound; it could be an epilogue of the V producer (qkv_split or tpa_combine).
#include "vp_common.cuh"

namespace vp {

__device__ __forceinline__ void vres(const bf16* __restrict__ v, const bf16* __restrict__ v1, const float* __restrict__ logit,
                                     bf16* __restrict__ y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float lam = (float)(1.0 / (1.0 + exp(-(double)logit[0])));
    y[i] = f2bf(lam * bf2f(v[i]) + (1.f - lam) * bf2f(v1[i]));
}

}  // namespace vp
