#pragma once
// sum_parts.cuh: out[i] = Σ_{p < nparts} parts[p·n + i] in ascending p (f32): the second,
// deterministic stage of every split reduction (gemm_tn slices, colsum partial rows, rmsnorm_bwd
// and grape_bwd per-block partials). `accum`: add into `out` (put_grad).
//
// Launch: grid ceil(n/256), block 256, one output per thread.
#include "vp_common.cuh"

namespace vp {

__device__ __forceinline__ void sum_parts(const float* __restrict__ parts, float* __restrict__ out, int n, int nparts,
                                          int accum) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float s = 0.f;
    for (int p = 0; p < nparts; ++p) s += parts[(size_t)p * n + i];
    put_grad(out + i, s, accum);
}

}  // namespace vp
