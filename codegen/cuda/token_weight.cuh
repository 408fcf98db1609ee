#pragma once
// token_weight.cuh: the weight of each token's loss, IR `token_weight`, by mode teacher[t]:
//   0: 1 (plain CE)
//   1: clip(exp((teacher_logp[t] − m) / T), w_min, w_max)   (stage 2's confidence, DISTILL.md 2B)
//   2: min(exp(lp − sampler_logp[t]), c) · (teacher_logp[t] − lp),  lp = −token_loss[t]
//      (stage 3's OPD advantage at the current weights with its truncated importance ratio)
// with kd = [m, T, w_min, w_max, c] (runtime scalars in device memory). A teacher logp of −inf
// gives exp(−inf) = 0, clipped to w_min. Computed in f32 (expf); the reference uses f64.
//
// Launch: grid ceil(T/256), block 256, one token per thread. Elementwise: deterministic.
#include "vp_common.cuh"

namespace vp {

__device__ __forceinline__ void token_weight(const float* __restrict__ token_loss,
                                             const float* __restrict__ teacher_logp,
                                             const float* __restrict__ sampler_logp,
                                             const unsigned char* __restrict__ teacher, const float* __restrict__ kd,
                                             float* __restrict__ weight, int T) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    float w = 1.f;
    if (teacher[t] == 1) {
        w = fminf(fmaxf(expf((teacher_logp[t] - kd[0]) / kd[1]), kd[2]), kd[3]);
    } else if (teacher[t] == 2) {
        const float lp = -token_loss[t];
        w = fminf(expf(lp - sampler_logp[t]), kd[4]) * (teacher_logp[t] - lp);
    }
    weight[t] = w;
}

}  // namespace vp
