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
    constexpr int BQ = 64, BKV = 64, NT = 128;
    constexpr int LD = D + 8, DK = D / 16, DN = D / 8, CH = D / 8;
    __shared__ __align__(128) bf16 sK[BKV * LD];
    __shared__ __align__(128) bf16 sV[BKV * LD];
    __shared__ int sDoc[BKV];

    require_block(NT);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int h = blockIdx.y, g = h / (HEADS / GROUPS);
    const int t0 = blockIdx.x * BQ;
    auto key_lo = [S](int t) {
        int lo = (t / S) * S;
        if (WINDOW > 0) lo = max(lo, t - WINDOW + 1);
        return lo;
    };
    const bool vq = aligned(q, 16), vk = aligned(k, 16), vv = aligned(v, 16), vo = aligned(dout, 16);

    // ---- Q and dO tiles (64 × D) into per-warp A fragments ----
    for (int c = tid; c < BQ * CH; c += NT) {
        const int r = c / CH, dc = (c % CH) * 8, t = t0 + r;
        load_chunk8(&sK[r * LD + dc], q + ((size_t)t * HEADS + h) * D + dc, t < T ? 8 : 0, vq, q);
        load_chunk8(&sV[r * LD + dc], dout + ((size_t)t * HEADS + h) * D + dc, t < T ? 8 : 0, vo, dout);
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    unsigned int qf[DK][4], of[DK][4];
#pragma unroll
    for (int kk = 0; kk < DK; ++kk) {
        ldsm_x4(qf[kk], &sK[(warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8]);
        ldsm_x4(of[kk], &sV[(warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8]);
    }

    int tq[2], lo[2], dc_[2];
    float lse2[2], rho[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int t = t0 + warp * 16 + (lane >> 2) + 8 * i;
        if (t < T) {
            tq[i] = t;
            lo[i] = key_lo(t);
            dc_[i] = doc[t];
            lse2[i] = stats[((size_t)t * HEADS + h) * 2];
            rho[i] = stats[((size_t)t * HEADS + h) * 2 + 1];
        } else {
            tq[i] = -1;
            lo[i] = 0;
            dc_[i] = 0;
            lse2[i] = 0.f;
            rho[i] = 0.f;
        }
    }
    const int w_first = t0 + warp * 16;
    const int w_last = min(w_first + 15, T - 1);
    const int w_lo = w_first < T ? key_lo(w_first) : 0;
    const int kv_lo = key_lo(min(t0, T - 1)), kv_hi = min(t0 + BQ - 1, T - 1);

    const float sc2 = LOG2E / sqrtf((float)D);
    const float slope2 = ALIBI ? alibi_slope(h, HEADS) * LOG2E : 0.f;
    float acc[DN][4];
#pragma unroll
    for (int n = 0; n < DN; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;

    for (int kv0 = kv_lo; kv0 <= kv_hi; kv0 += BKV) {
        __syncthreads();  // previous tile (and the staging) fully read
        for (int c = tid; c < BKV * CH; c += NT) {
            const int r = c / CH, dc = (c % CH) * 8, u = kv0 + r;
            load_chunk8(&sK[r * LD + dc], k + ((size_t)u * GROUPS + g) * D + dc, u <= kv_hi ? 8 : 0, vk, k);
            load_chunk8(&sV[r * LD + dc], v + ((size_t)u * GROUPS + g) * D + dc, u <= kv_hi ? 8 : 0, vv, v);
        }
        cp_async_commit();
        if (tid < BKV) sDoc[tid] = kv0 + tid <= kv_hi ? doc[kv0 + tid] : 0;
        cp_async_wait<0>();
        __syncthreads();
        const bool active = w_first < T && kv0 <= w_last && kv0 + BKV - 1 >= w_lo;  // warp-uniform
        if (!active) continue;
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
#pragma unroll
            for (int kk = 0; kk < DK; ++kk)
#pragma unroll
                for (int nj = 0; nj < 2; ++nj) {
                    const int off =
                        (half * 32 + nj * 16 + (lane & 7) + ((lane >> 4) << 3)) * LD + kk * 16 + ((lane >> 3) & 1) * 8;
                    unsigned int r[4];
                    ldsm_x4(r, &sK[off]);
                    const unsigned int b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
                    mma_bf16_16816(s[2 * nj], qf[kk], b0);
                    mma_bf16_16816(s[2 * nj + 1], qf[kk], b1);
                    ldsm_x4(r, &sV[off]);
                    const unsigned int c0[2] = {r[0], r[1]}, c1[2] = {r[2], r[3]};
                    mma_bf16_16816(dp[2 * nj], of[kk], c0);
                    mma_bf16_16816(dp[2 * nj + 1], of[kk], c1);
                }
#pragma unroll
            for (int n = 0; n < 4; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int i = e >> 1, col = half * 32 + n * 8 + (lane & 3) * 2 + (e & 1), u = kv0 + col;
                    const bool ok = u <= tq[i] && u >= lo[i] && sDoc[col] == dc_[i];
                    float val = s[n][e] * sc2;
                    if (ALIBI) val -= slope2 * (float)(tq[i] - u);
                    const float p = ok ? exp2f(val - lse2[i]) : 0.f;
                    s[n][e] = p * (dp[n][e] - rho[i]);  // dS
                }
            unsigned int da[2][4];
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                da[j][0] = pack_bf2(s[2 * j][0], s[2 * j][1]);
                da[j][1] = pack_bf2(s[2 * j][2], s[2 * j][3]);
                da[j][2] = pack_bf2(s[2 * j + 1][0], s[2 * j + 1][1]);
                da[j][3] = pack_bf2(s[2 * j + 1][2], s[2 * j + 1][3]);
            }
#pragma unroll
            for (int j = 0; j < 2; ++j)
#pragma unroll
                for (int dn = 0; dn < DN / 2; ++dn) {
                    unsigned int r[4];
                    ldsm_x4_trans(r, &sK[(half * 32 + j * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + dn * 16 +
                                         (lane >> 4) * 8]);
                    const unsigned int b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
                    mma_bf16_16816(acc[2 * dn], da[j], b0);
                    mma_bf16_16816(acc[2 * dn + 1], da[j], b1);
                }
        }
    }

    const float scale = 1.f / sqrtf((float)D);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        if (tq[i] < 0) continue;
        bf16* dst = dq + ((size_t)tq[i] * HEADS + h) * D + (lane & 3) * 2;
#pragma unroll
        for (int n = 0; n < DN; ++n)
            *reinterpret_cast<unsigned int*>(dst + n * 8) = pack_bf2(acc[n][2 * i] * scale, acc[n][2 * i + 1] * scale);
    }
}

}  // namespace vp
