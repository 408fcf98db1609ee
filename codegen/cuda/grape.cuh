#pragma once
// grape.cuh: GRAPE-M rotation (RoPE, rotate-half convention, learnable shared frequencies).
//
// For each head vector u of token t at position p (t % S in training, pos[t] in the decode
// program), the `heads` of xq [T, heads, D] and the `groups` of xk [T, groups, D] (queries and
// keys in one launch, sharing the angles):
//   f_i = exp(log_freq[i] / scale),  θ_i = p·f_i (f32),  i < D/2
//   u'[i] = u[i]·cos θ_i − u[i+D/2]·sin θ_i,   u'[i+D/2] = u[i+D/2]·cos θ_i + u[i]·sin θ_i
//
// Launch: grid T, block 128. The D/2 (cos, sin) pairs of the token are computed once into shared
// memory (accurate sincosf: θ reaches S·f_0 = thousands of radians), then threads sweep the
// (head, i) pairs, q heads then k heads; each pair is read and written by one thread, so y may
// alias x. CUDA's expf and sincosf are accurate to 1–2 ulp, against Rust's libm in the reference.
// Limits: the (cos, sin) table is recomputed per token; a per-step [S, D/2] table, or fusing with
// QK-norm, would save it.
#include "vp_common.cuh"

namespace vp {

// Rotates token t's heads by position `pos` (the whole block; see above).
template <int D>
__device__ __forceinline__ void grape_token(const bf16* xq, const bf16* xk, const float* __restrict__ log_freq,
                                            bf16* yq, bf16* yk, int heads, int groups, int t, float pos, float scale) {
    static_assert(D % 2 == 0, "rotate-half needs an even head dim");
    constexpr int HD = D / 2;
    __shared__ float s_cos[HD], s_sin[HD];
    for (int i = threadIdx.x; i < HD; i += blockDim.x) {
        const float th = pos * expf(log_freq[i] / scale);
        float sn, cs;
        sincosf(th, &sn, &cs);
        s_cos[i] = cs;
        s_sin[i] = sn;
    }
    __syncthreads();
    for (int p = threadIdx.x; p < (heads + groups) * HD; p += blockDim.x) {
        int hd = p / HD;
        const int i = p % HD;
        const bf16* x = xq;
        bf16* y = yq;
        int nh = heads;
        if (hd >= heads) hd -= heads, x = xk, y = yk, nh = groups;
        const size_t o = ((size_t)t * nh + hd) * D + i;
        const float a = bf2f(x[o]), b = bf2f(x[o + HD]);
        const float c = s_cos[i], s = s_sin[i];
        y[o] = f2bf(a * c - b * s);
        y[o + HD] = f2bf(b * c + a * s);
    }
}

// Training: token t of rows of S tokens is at position t % S.
template <int D>
__device__ __forceinline__ void grape(const bf16* xq, const bf16* xk, const float* __restrict__ log_freq, bf16* yq,
                                      bf16* yk, int heads, int groups, int T, int S, float scale) {
    const int t = blockIdx.x;
    if (t >= T) return;  // whole block
    grape_token<D>(xq, xk, log_freq, yq, yk, heads, groups, t, (float)(t % S), scale);
}

// The decode program (grape_m_at): token t is at position pos[t] of its sequence.
template <int D>
__device__ __forceinline__ void grape_at(const bf16* xq, const bf16* xk, const float* __restrict__ log_freq,
                                         const int* __restrict__ pos, bf16* yq, bf16* yk, int heads, int groups, int T,
                                         float scale) {
    const int t = blockIdx.x;
    if (t >= T) return;  // whole block
    grape_token<D>(xq, xk, log_freq, yq, yk, heads, groups, t, (float)pos[t], scale);
}

}  // namespace vp
