#pragma once
// add.cuh: elementwise sum of gradient contributions (IR `add`, the fan-in of a value read by
// several nodes): y[i] = (acc ? acc[i] : 0) + x0[i] + x1[i] + ... + x_{NI-1}[i], summed in f32 in
// that fixed order (D9), stored as f32 (OUT_F32) or rounded once to bf16. `accum` (f32 out only):
// the sum is added into y (put_grad).
//
// Template: IN_F32 (inputs are f32, else bf16), OUT_F32, NI (1..4 input slots; a null pointer in
// slots 1..3 reads as 0, so the lowering always uses NI = 4 and the kernel set stays per shape). More than four inputs are chained through an f32 scratch (`acc`), which may alias
// `y` (each thread reads its element before writing it), so neither is __restrict__.
//
// Launch: grid ceil(n/256), block 256, one element per thread.
#include "vp_common.cuh"

namespace vp {

template <int IN_F32>
__device__ __forceinline__ float add_load(const void* p, int i) {
    if (IN_F32) return reinterpret_cast<const float*>(p)[i];
    return bf2f(reinterpret_cast<const bf16*>(p)[i]);
}

template <int IN_F32, int OUT_F32, int NI>
__device__ __forceinline__ void add(const void* x0, const void* x1, const void* x2, const void* x3, const float* acc,
                                    void* y, int n, int accum) {
    static_assert(NI >= 1 && NI <= 4, "add takes 1..4 inputs per launch");
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float s = acc ? acc[i] : 0.f;
    s += add_load<IN_F32>(x0, i);
    if (NI > 1 && x1) s += add_load<IN_F32>(x1, i);
    if (NI > 2 && x2) s += add_load<IN_F32>(x2, i);
    if (NI > 3 && x3) s += add_load<IN_F32>(x3, i);
    if (OUT_F32)
        put_grad(reinterpret_cast<float*>(y) + i, s, accum);
    else
        reinterpret_cast<bf16*>(y)[i] = f2bf(s);
}

}  // namespace vp
