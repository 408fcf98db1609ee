#pragma once
// grape_bwd.cuh: GRAPE-M backward (MODEL.md §5) for q and k together, with per-block partials of
// the log-frequency gradient.
//
// For token t at position p = t % S, c_i = cos θ, s_i = sin θ, θ = p·f_i, f_i = exp(l_i/scale)
// (f32, as grape.cuh), each head vector u = (u¹, u²) of q (`heads`) and k (`groups`) with upstream
// gradient g = (g¹, g²):
//   du¹ = g¹c + g²s,   du² = g²c − g¹s                               (bf16 out)
//   ∂θ_{t,i} = Σ_{heads of q and k} (g²_i·u'¹_i − g¹_i·u'²_i),   u' recomputed from u in f32
//   partial[b, i] = (f_i/scale) · Σ_{tokens t of block b} p·∂θ_{t,i}   (f64 inside, f32 out)
// The last block to finish (`last_block`, ticket 0) adds the gridDim.x partials in block order
// into dl (put_grad with `accum`): ∂L/∂l_i. A null dy (unseeded output) counts as zero.
//
// Launch: grid NB (fixed), block 128; block b takes tokens b, b + NB, …. Per token the (cos, sin)
// table goes to shared memory, all threads compute du over the (head, i) pairs, and thread i
// (i < D/2) sums ∂θ_i over the heads in a fixed order (q heads then k groups) into its own f64
// accumulator. Deterministic (fixed per-block token order and fixed final order).
#include "vp_common.cuh"

namespace vp {

template <int D>
__device__ __forceinline__ void grape_bwd(const bf16* __restrict__ xq, const bf16* __restrict__ xk,
                                          const float* __restrict__ log_freq, const bf16* __restrict__ dyq,
                                          const bf16* __restrict__ dyk, bf16* __restrict__ dxq,
                                          bf16* __restrict__ dxk, float* __restrict__ partial, int heads, int groups,
                                          int T, int S, float scale, float* __restrict__ dl,
                                          int* __restrict__ tickets, int accum) {
    static_assert(D % 2 == 0, "rotate-half needs an even head dim");
    constexpr int HD = D / 2, NT = GRAPE_BWD_THREADS;
    static_assert(HD <= NT, "grape_bwd: D/2 must fit the block");
    __shared__ float s_cos[HD], s_sin[HD];
    require_block(NT);
    const int tid = threadIdx.x;
    const float fi = tid < HD ? expf(log_freq[tid] / scale) : 0.f;
    double acc = 0.0;
    for (int t = blockIdx.x; t < T; t += gridDim.x) {
        const float pos = (float)(t % S);
        if (tid < HD) {
            float sn, cs;
            sincosf(pos * fi, &sn, &cs);
            s_cos[tid] = cs;
            s_sin[tid] = sn;
        }
        __syncthreads();
        for (int pass = 0; pass < 2; ++pass) {
            const bf16* x = pass ? xk : xq;
            const bf16* dy = pass ? dyk : dyq;
            bf16* dx = pass ? dxk : dxq;
            const int nh = pass ? groups : heads;
            const size_t base = (size_t)t * nh * D;
            for (int p = tid; p < nh * HD; p += NT) {
                const int hd = p / HD, i = p % HD;
                const size_t o = base + (size_t)hd * D + i;
                const float g1 = dy ? bf2f(dy[o]) : 0.f, g2 = dy ? bf2f(dy[o + HD]) : 0.f;
                const float c = s_cos[i], s = s_sin[i];
                dx[o] = f2bf(g1 * c + g2 * s);
                dx[o + HD] = f2bf(g2 * c - g1 * s);
            }
            if (tid < HD && dy != nullptr) {
                const float c = s_cos[tid], s = s_sin[tid];
                float dth = 0.f;
                for (int hd = 0; hd < nh; ++hd) {
                    const size_t o = base + (size_t)hd * D + tid;
                    const float a = bf2f(x[o]), b = bf2f(x[o + HD]);
                    const float g1 = bf2f(dy[o]), g2 = bf2f(dy[o + HD]);
                    dth += g2 * (a * c - b * s) - g1 * (b * c + a * s);
                }
                acc += (double)pos * (double)dth;
            }
        }
        __syncthreads();  // the table is rewritten for the next token
    }
    if (tid < HD) partial[(size_t)blockIdx.x * HD + tid] = (float)(acc * (double)fi / (double)scale);
    if (!last_block(tickets, (int)gridDim.x)) return;
    if (tid < HD) put_grad(dl + tid, sum_parts_at(partial, HD, gridDim.x, tid), accum);
}

}  // namespace vp
