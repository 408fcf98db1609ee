#pragma once
// span_weight.cuh: the per-token terms of IR `span_loss` (D6) and of its gradient:
//   out[t] = x[t] · scale[span[t]] · weight[t] · g[0]
// where a null x or g stands for 1. Forward: x = token_loss, g null, then sum.cuh adds the
// terms into the loss. Backward: x null, g = dloss, out = the token losses' gradient.
//
// Launch: grid ceil(T/256), block 256, one token per thread. Elementwise: deterministic.
#include "vp_common.cuh"

namespace vp {

__device__ __forceinline__ void span_weight(const float* __restrict__ x, const unsigned char* __restrict__ span,
                                            const float* __restrict__ scale, const float* __restrict__ weight,
                                            const float* __restrict__ g, float* __restrict__ out, int T) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    float v = scale[span[t]] * weight[t];
    if (x != nullptr) v = x[t] * v;
    if (g != nullptr) v *= g[0];
    out[t] = v;
}

}  // namespace vp
