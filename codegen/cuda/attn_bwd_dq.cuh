#pragma once
// attn_bwd_dq.cuh: attention backward, query gradient (flash style: P is recomputed tile by tile
// from q, k and attn_stats' lse2, never stored):
//   P(t, u) = exp2(s2(t, u) − lse2[t, h])   (0 where masked; masks/window/ALiBi as attention.cuh)
//   dP(t, u) = dout[t, h]·v[u, g]
//   dS = P·(dP − ρ[t, h])
//   dq[t, h] = (1/sqrt(D)) Σ_u dS(t, u)·k[u, g]           (bf16 out)
// The sink only enters through lse2 (its own gradient comes from attn_stats).
//
// Launch: grid (ceil(T/64), HEADS), block 128. Each warp owns 16 queries whose q and dout rows are
// held as mma A fragments (staged once through shared memory). K and V tiles of 64 keys stream
// through shared memory over the same key range as the forward; each tile is processed in two
// halves of 32 keys (S = Q·Kᵀ and dP = dO·Vᵀ on tensor cores, dS in f32, rounded to bf16 A
// fragments, dq += dS·K with K read by ldmatrix.trans). 35 KB shared memory at D = 128.
// Deterministic: fixed loop order; each dq element is one thread's sum. No atomics.
#include "vp_common.cuh"
#include "attention.cuh"

namespace vp {

template <int D, int HEADS, int GROUPS, int WINDOW, int ALIBI>
__device__ __forceinline__ void attn_bwd_dq(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                            const bf16* __restrict__ v, const int* __restrict__ doc,
                                            const float* __restrict__ stats, const bf16* __restrict__ dout,
                                            bf16* __restrict__ dq, int T, int S) {
    static_assert(D % 16 == 0 && D >= 16 && D <= 256, "head dim must be a multiple of 16 (mma k), at most 256");
    static_assert(GROUPS >= 1 && HEADS % GROUPS == 0, "heads must be a multiple of kv groups");
    constexpr int BQ = ATTN_TILE, BKV = ATTN_TILE, LD = D + 8, DN = D / 8;
    __shared__ __align__(128) bf16 sK[BKV * LD];
    __shared__ __align__(128) bf16 sV[BKV * LD];
    __shared__ int sDoc[BKV];

    require_block(ATT_NT);
    const int tid = threadIdx.x, lane = tid & 31;
    const int h = blockIdx.y, g = h / (HEADS / GROUPS);
    const int t0 = blockIdx.x * BQ;
    const bool vq = aligned(q, 16), vk = aligned(k, 16), vv = aligned(v, 16), vo = aligned(dout, 16);

    // ---- Q and dO tiles (64 × D) into per-warp A fragments ----
    stage_rows2<D, BQ, HEADS>(sK, q, vq, sV, dout, vo, h, t0, T - 1);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    unsigned int qf[D / 16][4], of[D / 16][4];
    warp_afrags<D>(qf, sK);
    warp_afrags<D>(of, sV);
    const QueryRows<WINDOW, ALIBI> qr(t0, T, S, doc);
    float lse2[2], rho[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        lse2[i] = 0.f;
        rho[i] = 0.f;
        if (qr.tq[i] >= 0) {
            lse2[i] = stats[((size_t)qr.tq[i] * HEADS + h) * 2];
            rho[i] = stats[((size_t)qr.tq[i] * HEADS + h) * 2 + 1];
        }
    }

    const float sc2 = LOG2E / sqrtf((float)D);
    const float slope2 = ALIBI ? alibi_slope(h, HEADS) * LOG2E : 0.f;
    float acc[DN][4];
#pragma unroll
    for (int n = 0; n < DN; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;

    for (int kv0 = qr.kv_lo; kv0 <= qr.kv_hi; kv0 += BKV) {
        __syncthreads();  // previous tile (and the staging) fully read
        stage_rows2<D, BKV, GROUPS>(sK, k, vk, sV, v, vv, g, kv0, qr.kv_hi);
        cp_async_commit();
        if (tid < BKV) sDoc[tid] = kv0 + tid <= qr.kv_hi ? doc[kv0 + tid] : 0;
        cp_async_wait<0>();
        __syncthreads();
        if (!qr.sees(kv0)) continue;  // warp-uniform
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            float s[4][4], dp[4][4];
#pragma unroll
            for (int n = 0; n < 4; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    s[n][e] = 0.f;
                    dp[n][e] = 0.f;
                }
            mma_abt2<D, 4>(s, qf, sK, dp, of, sV, half * 32);
#pragma unroll
            for (int n = 0; n < 4; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int i = e >> 1, col = half * 32 + n * 8 + (lane & 3) * 2 + (e & 1);
                    const int u = kv0 + col;
                    // score2's mask and scale, written out: exp2 only where the key is seen
                    // keeps the windowed instance clear of the 255-register spill cliff
                    const bool ok = u <= qr.tq[i] && u >= qr.lo[i] && sDoc[col] == qr.qdoc[i];
                    float val = s[n][e] * sc2;
                    if (ALIBI) val -= slope2 * (float)(qr.tq[i] - u);
                    const float p = ok ? exp2f(val - lse2[i]) : 0.f;
                    s[n][e] = p * (dp[n][e] - rho[i]);  // dS
                }
            unsigned int da[2][4];
            to_afrags<2>(da, s);
            mma_ab<D, 2>(acc, da, sK, half * 32);
        }
    }

    const float scale = 1.f / sqrtf((float)D);
#pragma unroll
    for (int i = 0; i < 2; ++i)
        if (qr.tq[i] >= 0) store_acc_row<D>(dq + ((size_t)qr.tq[i] * HEADS + h) * D, acc, i, scale);
}

}  // namespace vp
