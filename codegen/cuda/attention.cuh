#pragma once
// attention.cuh: causal, document-masked, optionally windowed / ALiBi / sink attention, flash
// style (online softmax, no S×S scores in memory), on tensor cores.
//
//   out[t, h, :] = Σ_u softmax_u(score(t, u) [, sink_h]) · v[u, g(h), :]
//   score(t, u) = q[t,h]·k[u,g]/sqrt(D) − slope_h·(t − u)   (ALiBi term only when ALIBI)
//   key u allowed for query t iff same sequence row, u ≤ t, doc[u] == doc[t], and for WINDOW > 0
//   t − u < WINDOW. The sink logit sinks[h] (unscaled, unmasked) joins the max and the
//   denominator but carries no value. A row with no allowed key (and no sink) gives 0, never NaN.
//
// Launch: grid (ceil(T/64), HEADS), block 128. A block owns 64 consecutive query tokens of head h
// (they may straddle sequence rows: every mask test is per query, on absolute token indices, so
// position differences are t − u). Each of the 4 warps owns 16 queries, held as mma A fragments
// in registers (staged once through shared memory). Keys/values stream through shared memory in
// tiles of 64 tokens, from the first key any of the block's queries may see (row start, or
// t0 − WINDOW + 1) to its last query. Per tile: S = Q·Kᵀ (mma m16n8k16, f32), mask + scale in
// the log2 domain, online max/sum update (quad shuffles), P rounded to bf16 and reused as A
// fragments for O += P·V (V read with ldmatrix.trans). A warp skips the math of tiles entirely
// outside its queries' ranges (beyond its last query, or before its first query's window).
// Shared memory: K and V tiles (64 × (D+8) bf16 each, padded rows) + 64 doc ids: 35 KB at D=128.
// Deterministic: fixed loop order, no atomics.
#include "vp_common.cuh"

namespace vp {

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// ALiBi slope of head h of n, as reference::alibi_slopes: the first c = 2^floor(log2 n) heads get
// 2^(-8(h+1)/c); the remaining n − c heads take every other slope of the 2c-head series,
// 2^(-4(2j+1)/c). Computed in f64, rounded once to f32.
__device__ __forceinline__ float alibi_slope(int h, int n) {
    int c = 1;
    while (c * 2 <= n) c *= 2;
    double e = h < c ? -8.0 * (double)(h + 1) / (double)c : -4.0 * (double)(2 * (h - c) + 1) / (double)c;
    return (float)exp2(e);
}

template <int D, int HEADS, int GROUPS, int WINDOW, int ALIBI, int SINKS>
__device__ __forceinline__ void attention(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                          const bf16* __restrict__ v, const int* __restrict__ doc,
                                          const float* __restrict__ sinks, bf16* __restrict__ out, int T, int S) {
    static_assert(D % 16 == 0 && D >= 16 && D <= 256, "head dim must be a multiple of 16 (mma k), at most 256");
    static_assert(GROUPS >= 1 && HEADS % GROUPS == 0, "heads must be a multiple of kv groups");
    constexpr int BQ = 64, BKV = 64, NT = 128;
    constexpr int LD = D + 8;     // padded shared row (bf16): conflict-free ldmatrix
    constexpr int DK = D / 16;    // k16 steps over the head dim (Q·Kᵀ)
    constexpr int DN = D / 8;     // n8 tiles over the head dim (P·V)
    constexpr int KN = BKV / 8;   // n8 tiles over a key tile (Q·Kᵀ)
    constexpr int KK = BKV / 16;  // k16 steps over a key tile (P·V)
    constexpr int CH = D / 8;     // 16-byte chunks per row
    __shared__ __align__(128) bf16 sK[BKV * LD];
    __shared__ __align__(128) bf16 sV[BKV * LD];
    __shared__ int sDoc[BKV];

    require_block(NT);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int h = blockIdx.y, g = h / (HEADS / GROUPS);
    const int t0 = blockIdx.x * BQ;
    // First key token query t may attend (keys are further limited to u ≤ t and same doc).
    auto key_lo = [S](int t) {
        int lo = (t / S) * S;
        if (WINDOW > 0) lo = max(lo, t - WINDOW + 1);
        return lo;
    };
    const bool vq = aligned(q, 16), vk = aligned(k, 16), vv = aligned(v, 16);

    // ---- Q tile (64 × D) through sK into per-warp A fragments (rows ≥ T are zero) ----
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

    // ---- this thread's two query rows (fragment rows g8 and g8 + 8 of the warp's 16) ----
    int tq[2], lo[2], dq[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int t = t0 + warp * 16 + (lane >> 2) + 8 * i;
        if (t < T) {
            tq[i] = t;
            lo[i] = key_lo(t);
            dq[i] = doc[t];
        } else {  // padding query: u ≤ -1 never holds, so every key is masked; never stored
            tq[i] = -1;
            lo[i] = 0;
            dq[i] = 0;
        }
    }
    const int w_first = t0 + warp * 16;
    const int w_last = min(w_first + 15, T - 1);
    const int w_lo = w_first < T ? key_lo(w_first) : 0;
    const int kv_lo = key_lo(t0), kv_hi = min(t0 + BQ - 1, T - 1);

    const float sc2 = LOG2E / sqrtf((float)D);  // scores kept in log2 units: exp2(x·log2e) = e^x
    const float slope2 = ALIBI ? alibi_slope(h, HEADS) * LOG2E : 0.f;
    const float sink2 = SINKS ? sinks[h] * LOG2E : 0.f;
    float m[2], l[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        m[i] = SINKS ? sink2 : neg_inf();  // the sink takes part in the running max from the start
        l[i] = 0.f;                         // this thread's share of the denominator (without sink)
    }
    float o[DN][4];
#pragma unroll
    for (int n = 0; n < DN; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[n][e] = 0.f;

    for (int kv0 = kv_lo; kv0 <= kv_hi; kv0 += BKV) {
        __syncthreads();  // previous tile (and the Q staging) fully read
        for (int c = tid; c < BKV * CH; c += NT) {
            const int r = c / CH, dc = (c % CH) * 8, u = kv0 + r;
            load_chunk8(&sK[r * LD + dc], k + ((size_t)u * GROUPS + g) * D + dc, u <= kv_hi ? 8 : 0, vk, k);
        }
        cp_async_commit();
        for (int c = tid; c < BKV * CH; c += NT) {
            const int r = c / CH, dc = (c % CH) * 8, u = kv0 + r;
            load_chunk8(&sV[r * LD + dc], v + ((size_t)u * GROUPS + g) * D + dc, u <= kv_hi ? 8 : 0, vv, v);
        }
        cp_async_commit();
        if (tid < BKV) sDoc[tid] = kv0 + tid <= kv_hi ? doc[kv0 + tid] : 0;
        cp_async_wait<1>();  // K landed (V may still be in flight)
        __syncthreads();

        const bool active = w_first < T && kv0 <= w_last && kv0 + BKV - 1 >= w_lo;  // warp-uniform
        unsigned int pa[KK][4];  // P as bf16 A fragments
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
            // mask + scale (+ ALiBi), tile row max
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
            float mu[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                mx[i] = fmaxf(mx[i], __shfl_xor_sync(FULL_MASK, mx[i], 1));
                mx[i] = fmaxf(mx[i], __shfl_xor_sync(FULL_MASK, mx[i], 2));
                const float mn = fmaxf(m[i], mx[i]);
                mu[i] = mn == neg_inf() ? 0.f : mn;  // nothing seen yet: any finite reference works
                const float alpha = exp2f(m[i] - mu[i]);  // 0 when m was -inf
                m[i] = mn;
                l[i] *= alpha;
#pragma unroll
                for (int n = 0; n < DN; ++n) {
                    o[n][2 * i] *= alpha;
                    o[n][2 * i + 1] *= alpha;
                }
            }
#pragma unroll
            for (int n = 0; n < KN; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float p = exp2f(s[n][e] - mu[e >> 1]);  // masked: exp2(-inf) = 0
                    s[n][e] = p;
                    l[e >> 1] += p;
                }
            // accumulator layout of n8 tiles 2j, 2j+1 == A fragment layout of k16 step j
#pragma unroll
            for (int j = 0; j < KK; ++j) {
                pa[j][0] = pack_bf2(s[2 * j][0], s[2 * j][1]);
                pa[j][1] = pack_bf2(s[2 * j][2], s[2 * j][3]);
                pa[j][2] = pack_bf2(s[2 * j + 1][0], s[2 * j + 1][1]);
                pa[j][3] = pack_bf2(s[2 * j + 1][2], s[2 * j + 1][3]);
            }
        }
        cp_async_wait<0>();  // V landed
        __syncthreads();
        if (active) {
#pragma unroll
            for (int j = 0; j < KK; ++j)
#pragma unroll
                for (int dn = 0; dn < DN / 2; ++dn) {
                    // transposed 8x8 blocks: (keys 0-7, d 0-7), (keys 8-15, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 8-15)
                    unsigned int r[4];
                    ldsm_x4_trans(r, &sV[(j * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + dn * 16 + (lane >> 4) * 8]);
                    const unsigned int b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
                    mma_bf16_16816(o[2 * dn], pa[j], b0);
                    mma_bf16_16816(o[2 * dn + 1], pa[j], b1);
                }
        }
    }

    // ---- normalise and store ----
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        float den = l[i];
        den += __shfl_xor_sync(FULL_MASK, den, 1);
        den += __shfl_xor_sync(FULL_MASK, den, 2);
        if (SINKS) den += exp2f(sink2 - m[i]);  // m ≥ sink2, so this is in (0, 1]
        const float inv = den > 0.f ? 1.f / den : 0.f;
        if (tq[i] < 0) continue;
        bf16* dst = out + ((size_t)tq[i] * HEADS + h) * D + (lane & 3) * 2;
#pragma unroll
        for (int n = 0; n < DN; ++n)
            *reinterpret_cast<unsigned int*>(dst + n * 8) = pack_bf2(o[n][2 * i] * inv, o[n][2 * i + 1] * inv);
    }
}

}  // namespace vp
