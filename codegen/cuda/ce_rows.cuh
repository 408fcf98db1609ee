#pragma once
// ce_rows.cuh: per-token cross-entropy of f32 logits rows of V.
//   mask[t] == 0: token_loss[t] = 0, weighted[t] = 0
//   else: ce = logsumexp(logits[t, :]) − logits[t, labels[t]],  token_loss[t] = ce,
//         weighted[t] = ce · scale[span[t]] · weight[t]   (weight: confidence weights, conf_weight.cuh)
//
// Launch: grid T, block 256. One streaming pass per row (16-byte loads when V % 4 == 0 and
// aligned): each thread keeps an online (max, Σ exp(x − max)) pair, pairs are merged by a warp
// butterfly (symmetric, so every lane agrees) and then in warp order: a fixed tree, deterministic.
// lse and ce are finished in f64. Masked tokens return before touching the row.
#include "vp_common.cuh"

namespace vp {

struct LseAcc {
    float m, s;
};
// Merge two online-softmax partials; symmetric in its arguments (max and + commute).
__device__ __forceinline__ LseAcc lse_merge(LseAcc a, LseAcc b) {
    const float m = fmaxf(a.m, b.m);
    return LseAcc{m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

template <int V>
__device__ __forceinline__ void ce_rows(const float* __restrict__ logits, const int* __restrict__ labels,
                                        const unsigned char* __restrict__ mask, const unsigned char* __restrict__ span,
                                        const float* __restrict__ scale, const float* __restrict__ weight,
                                        float* __restrict__ token_loss,
                                        float* __restrict__ weighted, int T) {
    constexpr int NT = 256, NW = NT / 32;
    require_block(NT);
    const int t = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    if (t >= T) return;  // whole block
    if (mask[t] == 0) {  // block-uniform
        if (tid == 0) {
            token_loss[t] = 0.f;
            weighted[t] = 0.f;
        }
        return;
    }
    const float* rowp = logits + (size_t)t * V;
    // Start from the lowest finite float, not -inf, so exp(m_old − m_new) is never exp(NaN).
    LseAcc acc{-3.402823466e38f, 0.f};
    if (V % 4 == 0 && aligned(logits, 16)) {
        const float4* r4 = reinterpret_cast<const float4*>(rowp);
        for (int i = tid; i < V / 4; i += NT) {
            const float4 q = r4[i];
            const float mq = fmaxf(fmaxf(q.x, q.y), fmaxf(q.z, q.w));
            if (mq > acc.m) {
                acc.s *= expf(acc.m - mq);
                acc.m = mq;
            }
            acc.s += expf(q.x - acc.m) + expf(q.y - acc.m) + expf(q.z - acc.m) + expf(q.w - acc.m);
        }
    } else {
        for (int i = tid; i < V; i += NT) {
            const float xv = rowp[i];
            if (xv > acc.m) {
                acc.s *= expf(acc.m - xv);
                acc.m = xv;
            }
            acc.s += expf(xv - acc.m);
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        LseAcc b{__shfl_xor_sync(FULL_MASK, acc.m, o), __shfl_xor_sync(FULL_MASK, acc.s, o)};
        acc = lse_merge(acc, b);
    }
    __shared__ LseAcc s_part[NW];
    if (lane == 0) s_part[warp] = acc;
    __syncthreads();
    if (tid == 0) {
        LseAcc a = s_part[0];
        for (int w = 1; w < NW; ++w) a = lse_merge(a, s_part[w]);
        const double lse = (double)a.m + log((double)a.s);
        const float ce = (float)(lse - (double)rowp[labels[t]]);
        token_loss[t] = ce;
        weighted[t] = ce * scale[span[t]] * weight[t];
    }
}

}  // namespace vp
