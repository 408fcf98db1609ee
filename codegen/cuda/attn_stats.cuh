#pragma once
// attn_stats.cuh: first stage of the flash-style attention backward (FlashAttention-2 without
// atomics, in three passes: attn_stats, attn_bwd_dq, attn_bwd_dkdv; no S×S tensor is ever
// formed). Per (query t, head h): the softmax statistics the forward did not keep, and the row
// term ρ of MODEL.md §5:
//   stats[t, h, 0] = lse2 = log2(exp2(sink2) + Σ_u exp2(s2(t, u)))    (log2 units, s2 = score·log2e;
//                    +inf when no key and no sink: every probability is then 0, never NaN)
//   stats[t, h, 1] = ρ = Σ_d dout[t, h, d]·out[t, h, d]     (= Σ_u P·dP, the sink has no value)
//   dsink[t, h]    = −P_sink·ρ, P_sink = exp2(sink2 − lse2)  (SINKS; colsum.cuh sums it over t
//                                                             into ∂L/∂sinks in fixed order)
// Masks, window, ALiBi and sinks exactly as attention.cuh (the score pass is its code without the
// P·V product). attn_bwd_dq / attn_bwd_dkdv then recompute P = exp2(s2 − lse2) tile by tile.
//
// Launch: grid (ceil(T/64), HEADS), block 128, 4 warps x 16 queries; K tiles of 64 stream through
// shared memory. Deterministic (fixed loop order, fixed quad/warp butterflies), no atomics.
// Limits: the scores are computed three times in the backward (here, dq, dkdv). Keeping lse2
// from the forward would save this pass, but the forward would have to output it (a contract
// change).
#include "vp_common.cuh"
#include "attention.cuh"

namespace vp {

template <int D, int HEADS, int GROUPS, int WINDOW, int ALIBI, int SINKS>
__device__ __forceinline__ void attn_stats(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                           const int* __restrict__ doc, const float* __restrict__ sinks,
                                           const bf16* __restrict__ out, const bf16* __restrict__ dout,
                                           float* __restrict__ stats, float* __restrict__ dsink, int T, int S) {
    static_assert(D % 16 == 0 && D >= 16 && D <= 256, "head dim must be a multiple of 16 (mma k), at most 256");
    static_assert(GROUPS >= 1 && HEADS % GROUPS == 0, "heads must be a multiple of kv groups");
    constexpr int BQ = ATTN_TILE, BKV = ATTN_TILE, LD = D + 8, KN = BKV / 8;
    __shared__ __align__(128) bf16 sK[BKV * LD];
    __shared__ int sDoc[BKV];
    __shared__ float sLse[BQ];

    require_block(ATT_NT);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int h = blockIdx.y, g = h / (HEADS / GROUPS);
    const int t0 = blockIdx.x * BQ;
    const bool vq = aligned(q, 16), vk = aligned(k, 16);

    stage_rows<D, BQ, HEADS>(sK, q, h, t0, T - 1, vq);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    unsigned int qf[D / 16][4];
    warp_afrags<D>(qf, sK);
    const QueryRows<WINDOW, ALIBI> qr(t0, T, S, doc);

    const float sc2 = LOG2E / sqrtf((float)D);
    const float slope2 = ALIBI ? alibi_slope(h, HEADS) * LOG2E : 0.f;
    const float sink2 = SINKS ? sinks[h] * LOG2E : 0.f;
    float m[2], l[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        m[i] = SINKS ? sink2 : neg_inf();
        l[i] = 0.f;
    }

    for (int kv0 = qr.kv_lo; kv0 <= qr.kv_hi; kv0 += BKV) {
        __syncthreads();
        stage_rows<D, BKV, GROUPS>(sK, k, g, kv0, qr.kv_hi, vk);
        cp_async_commit();
        if (tid < BKV) sDoc[tid] = kv0 + tid <= qr.kv_hi ? doc[kv0 + tid] : 0;
        cp_async_wait<0>();
        __syncthreads();
        if (qr.sees(kv0)) {
            float s[KN][4], mx[2];
            qr.template tile_scores<D>(s, mx, qf, sK, sDoc, kv0, sc2, slope2);
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const float mn = fmaxf(m[i], mx[i]);
                const float mu = mn == neg_inf() ? 0.f : mn;
                l[i] *= exp2f(m[i] - mu);
                m[i] = mn;
            }
#pragma unroll
            for (int n = 0; n < KN; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float mu = m[e >> 1] == neg_inf() ? 0.f : m[e >> 1];
                    l[e >> 1] += exp2f(s[n][e] - mu);
                }
        }
    }

    // lse2 per query row (owner lanes: lane % 4 == 0), then ρ and the sink term per query.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        float den = l[i];
        den += __shfl_xor_sync(FULL_MASK, den, 1);
        den += __shfl_xor_sync(FULL_MASK, den, 2);
        if (SINKS) den += exp2f(sink2 - m[i]);
        const float lse2 = den > 0.f ? m[i] + log2f(den) : __int_as_float(0x7f800000);
        if ((lane & 3) == 0) sLse[warp * 16 + (lane >> 2) + 8 * i] = lse2;
    }
    __syncthreads();
    for (int r = 0; r < 16; ++r) {  // warp-uniform
        const int t = qr.w_first + r;
        if (t >= T) break;
        const size_t base = ((size_t)t * HEADS + h) * D;
        float dot = 0.f;
        for (int d = lane; d < D; d += 32) dot += bf2f(dout[base + d]) * bf2f(out[base + d]);
        dot = warp_sum(dot);
        if (lane == 0) {
            const float lse2 = sLse[warp * 16 + r];
            stats[((size_t)t * HEADS + h) * 2] = lse2;
            stats[((size_t)t * HEADS + h) * 2 + 1] = dot;
            if (SINKS) dsink[(size_t)t * HEADS + h] = -exp2f(sink2 - lse2) * dot;
        }
    }
}

}  // namespace vp
