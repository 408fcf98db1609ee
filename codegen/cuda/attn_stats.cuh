#pragma once
// attn_stats.cuh: first stage of the flash-style attention backward: per (query t, head h) the
// softmax statistics the forward did not keep, and the row term ρ of MODEL.md §5:
//   stats[t, h, 0] = lse2 = log2(exp2(sink2) + Σ_u exp2(s2(t, u)))    (log2 units, s2 = score·log2e;
//                    +inf when no key and no sink: every probability is then 0, never NaN)
//   stats[t, h, 1] = ρ = Σ_d dout[t, h, d]·out[t, h, d]     (= Σ_u P·dP, the sink has no value)
//   dsink[t, h]    = −P_sink·ρ, P_sink = exp2(sink2 − lse2)  (SINKS; summed over t by colsum +
//                                                             sum_parts into ∂L/∂sinks)
// Masks, window, ALiBi and sinks exactly as attention.cuh (the score pass is its code without the
// P·V product). attn_bwd_dq / attn_bwd_dkdv then recompute P = exp2(s2 − lse2) tile by tile.
//
// Launch: grid (ceil(T/64), HEADS), block 128, 4 warps x 16 queries; K tiles of 64 stream through
// shared memory. Deterministic (fixed loop order, fixed quad/warp butterflies), no atomics.
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
    constexpr int BQ = 64, BKV = 64, NT = 128;
    constexpr int LD = D + 8, DK = D / 16, KN = BKV / 8, CH = D / 8;
    __shared__ __align__(128) bf16 sK[BKV * LD];
    __shared__ int sDoc[BKV];
    __shared__ float sLse[BQ];

    require_block(NT);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int h = blockIdx.y, g = h / (HEADS / GROUPS);
    const int t0 = blockIdx.x * BQ;
    auto key_lo = [S](int t) {
        int lo = (t / S) * S;
        if (WINDOW > 0) lo = max(lo, t - WINDOW + 1);
        return lo;
    };
    const bool vq = aligned(q, 16), vk = aligned(k, 16);

    for (int c = tid; c < BQ * CH; c += NT) {
        const int r = c / CH, dc = (c % CH) * 8, t = t0 + r;
        load_chunk8(&sK[r * LD + dc], q + ((size_t)t * HEADS + h) * D + dc, t < T ? 8 : 0, vq, q);
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    unsigned int qf[DK][4];
#pragma unroll
    for (int kk = 0; kk < DK; ++kk) ldsm_x4(qf[kk], &sK[(warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8]);

    int tq[2], lo[2], dq[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int t = t0 + warp * 16 + (lane >> 2) + 8 * i;
        if (t < T) {
            tq[i] = t;
            lo[i] = key_lo(t);
            dq[i] = doc[t];
        } else {
            tq[i] = -1;
            lo[i] = 0;
            dq[i] = 0;
        }
    }
    const int w_first = t0 + warp * 16;
    const int w_last = min(w_first + 15, T - 1);
    const int w_lo = w_first < T ? key_lo(w_first) : 0;
    const int kv_lo = key_lo(min(t0, T - 1)), kv_hi = min(t0 + BQ - 1, T - 1);

    const float sc2 = LOG2E / sqrtf((float)D);
    const float slope2 = ALIBI ? alibi_slope(h, HEADS) * LOG2E : 0.f;
    const float sink2 = SINKS ? sinks[h] * LOG2E : 0.f;
    float m[2], l[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        m[i] = SINKS ? sink2 : neg_inf();
        l[i] = 0.f;
    }

    for (int kv0 = kv_lo; kv0 <= kv_hi; kv0 += BKV) {
        __syncthreads();
        for (int c = tid; c < BKV * CH; c += NT) {
            const int r = c / CH, dc = (c % CH) * 8, u = kv0 + r;
            load_chunk8(&sK[r * LD + dc], k + ((size_t)u * GROUPS + g) * D + dc, u <= kv_hi ? 8 : 0, vk, k);
        }
        cp_async_commit();
        if (tid < BKV) sDoc[tid] = kv0 + tid <= kv_hi ? doc[kv0 + tid] : 0;
        cp_async_wait<0>();
        __syncthreads();
        const bool active = w_first < T && kv0 <= w_last && kv0 + BKV - 1 >= w_lo;
        if (active) {
            float s[KN][4];
#pragma unroll
            for (int n = 0; n < KN; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[n][e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < DK; ++kk)
#pragma unroll
                for (int nj = 0; nj < KN / 2; ++nj) {
                    unsigned int r[4];
                    ldsm_x4(r, &sK[(nj * 16 + (lane & 7) + ((lane >> 4) << 3)) * LD + kk * 16 + ((lane >> 3) & 1) * 8]);
                    const unsigned int b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
                    mma_bf16_16816(s[2 * nj], qf[kk], b0);
                    mma_bf16_16816(s[2 * nj + 1], qf[kk], b1);
                }
            float mx[2] = {neg_inf(), neg_inf()};
#pragma unroll
            for (int n = 0; n < KN; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int i = e >> 1, col = n * 8 + (lane & 3) * 2 + (e & 1), u = kv0 + col;
                    const bool ok = u <= tq[i] && u >= lo[i] && sDoc[col] == dq[i];
                    float val = s[n][e] * sc2;
                    if (ALIBI) val -= slope2 * (float)(tq[i] - u);
                    s[n][e] = ok ? val : neg_inf();
                    mx[i] = fmaxf(mx[i], s[n][e]);
                }
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                mx[i] = fmaxf(mx[i], __shfl_xor_sync(FULL_MASK, mx[i], 1));
                mx[i] = fmaxf(mx[i], __shfl_xor_sync(FULL_MASK, mx[i], 2));
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
        const int t = w_first + r;
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
