#pragma once
// sum.cuh: out[0] = scale · Σ_{i<n} x[i] (f32 in and out); `accum`: added into out[0] (put_grad).
//
// Launch: 1 block of 1024. Each thread sums a fixed strided subset in f64, then a fixed-order
// block tree (warp butterflies, warp partials in order): the same bits every run, no atomics.
#include "vp_common.cuh"

namespace vp {

__device__ __forceinline__ void sum(const float* __restrict__ x, float* __restrict__ out, int n, float scale, int accum) {
    require_block(1024);
    sum_to<1024>(x, n, scale, out, accum);
}

}  // namespace vp
