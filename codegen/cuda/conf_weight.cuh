#pragma once
// conf_weight.cuh: confidence weights of stage-2 CE (DISTILL.md 2B), IR `confidence_weight`:
//   weight[t] = teacher[t] ? clip(exp((teacher_logp[t] − m) / T), w_min, w_max) : 1
// with kd = [m, T, w_min, w_max] (runtime scalars in device memory). A teacher logp of −inf
// gives exp(−inf) = 0, clipped to w_min. Computed in f32 (expf); the reference uses f64.
//
// Launch: grid ceil(T/256), block 256, one token per thread. Elementwise: deterministic.
#include "vp_common.cuh"

namespace vp {

__device__ __forceinline__ void conf_weight(const float* __restrict__ teacher_logp,
                                            const unsigned char* __restrict__ teacher, const float* __restrict__ kd,
                                            float* __restrict__ weight, int T) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    float w = 1.f;
    if (teacher[t]) w = fminf(fmaxf(expf((teacher_logp[t] - kd[0]) / kd[1]), kd[2]), kd[3]);
    weight[t] = w;
}

}  // namespace vp
