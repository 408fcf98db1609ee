#pragma once
// ce_bwd.cuh: span-normalised CE backward to the f32 logits (MODEL.md §5/§6):
//   w_t = dloss·scale[span[t]]·weight[t]·mask[t]
//   dlogits[t, j] = w_t·(softmax(logits[t])_j − [j == labels[t]])     (f32, every element written)
// The row's log-sum-exp is not recomputed: the forward's token loss is ce = lse − logits[label]
// (f32, ce_rows.cuh), so lse = ce + logits[t, label] in f64 (error ≤ ½ ulp(ce), i.e. ~1e-6
// relative on the probabilities). This saves a full pass over the T×V logits.
//
// Launch: grid T, block 256, one row per block, 16-byte float4 accesses when V % 4 == 0 and both
// pointers are aligned. Masked rows (w = 0) are written as zeros. Pure elementwise: deterministic.
#include "vp_common.cuh"

namespace vp {

template <int V>
__device__ __forceinline__ void ce_bwd(const float* __restrict__ logits, const int* __restrict__ labels,
                                       const unsigned char* __restrict__ mask, const unsigned char* __restrict__ span,
                                       const float* __restrict__ scale, const float* __restrict__ weight,
                                       const float* __restrict__ token_loss,
                                       const float* __restrict__ dloss, float* __restrict__ dlogits, int T) {
    constexpr int NT = 256;
    require_block(NT);
    const int t = blockIdx.x, tid = threadIdx.x;
    if (t >= T) return;  // whole block
    const float* xr = logits + (size_t)t * V;
    float* dr = dlogits + (size_t)t * V;
    const float wt = (mask[t] && dloss != nullptr) ? dloss[0] * scale[span[t]] * weight[t] : 0.f;  // null: unseeded
    const bool vec = V % 4 == 0 && aligned(logits, 16) && aligned(dlogits, 16);
    if (wt == 0.f) {  // block-uniform
        if (vec) {
            for (int i = tid; i < V / 4; i += NT) reinterpret_cast<float4*>(dr)[i] = make_float4(0.f, 0.f, 0.f, 0.f);
        } else {
            for (int i = tid; i < V; i += NT) dr[i] = 0.f;
        }
        return;
    }
    const int lab = labels[t];
    const float lse = (float)((double)token_loss[t] + (double)xr[lab]);
    if (vec) {
        for (int i = tid; i < V / 4; i += NT) {
            const float4 x = reinterpret_cast<const float4*>(xr)[i];
            float4 o;
            o.x = wt * (expf(x.x - lse) - (4 * i + 0 == lab ? 1.f : 0.f));
            o.y = wt * (expf(x.y - lse) - (4 * i + 1 == lab ? 1.f : 0.f));
            o.z = wt * (expf(x.z - lse) - (4 * i + 2 == lab ? 1.f : 0.f));
            o.w = wt * (expf(x.w - lse) - (4 * i + 3 == lab ? 1.f : 0.f));
            reinterpret_cast<float4*>(dr)[i] = o;
        }
    } else {
        for (int i = tid; i < V; i += NT) dr[i] = wt * (expf(xr[i] - lse) - (i == lab ? 1.f : 0.f));
    }
}

}  // namespace vp
