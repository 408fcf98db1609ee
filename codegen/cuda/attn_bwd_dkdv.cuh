#pragma once
// attn_bwd_dkdv.cuh: attention backward, key and value gradients of one KV group (flash style,
// transposed: keys are the rows, P is recomputed from q, k and attn_stats' lse2):
//   Pᵀ(u, t) = exp2(s2(t, u) − lse2[t, h]),  dPᵀ(u, t) = v[u]·dout[t, h],  dSᵀ = Pᵀ·(dPᵀ − ρ[t, h])
//   dv[u, g] = Σ_{h in g} Σ_t Pᵀ(u, t)·dout[t, h]                 (bf16 out)
//   dk[u, g] = (1/sqrt(D)) Σ_{h in g} Σ_t dSᵀ(u, t)·q[t, h]
// Key u is seen by query t iff t is in u's sequence row, u ≤ t, doc[t] == doc[u] and (WINDOW)
// t − u < WINDOW: the masks of attention.cuh, seen from the key side.
//
// HSPLIT = 1 (global layers): grid (ceil(T/64), HEADS), block (x, h) takes only head h of group
// g = h/GS and stores its f32 share of the two sums, dk scaled, into part[u, h, 0|1, :] ([T,
// HEADS, 2, D]); attn_dkdv_sum adds the GS heads of each group in head order and rounds. A causal
// key tile near the start of a row is seen by every later query: with one block per (tile, group)
// the first tiles' blocks would walk all queries of all GS heads while the grid (64 blocks at
// 2,048 tokens) leaves most SMs idle; per head each walk is GS× shorter and the grid GS× larger.
// Windowed layers see at most WINDOW + 63 queries per key tile and keep HSPLIT = 0. The split
// sums per head over tiles, then over heads, so dk and dv can differ from the unsplit order in
// the last bf16 bit; both are checked against the same reference (host_emu `bwd-attn`).
//
// Launch: grid (ceil(T/64), GROUPS), block 128: a block owns 64 consecutive keys of group g, each
// warp 16 of them (k rows held as mma A fragments, v rows resident in shared memory). Query tiles
// of 32 tokens stream through shared memory (q and dout of one head at a time, with their lse2,
// ρ and doc), from the block's first key to the last query any of its keys can be seen by; for
// each tile and each of the group's HEADS/GROUPS heads: Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ (mma), Pᵀ and dSᵀ
// in f32, then dv += Pᵀ·dO and dk += dSᵀ·Q (bf16 operands, ldmatrix.trans on the query tiles).
// Warps skip tiles outside their keys' visible query range. 35 KB shared memory at D = 128.
// Deterministic: fixed (tile, head) order, each output element one thread's sum; no atomics.
// Limits: at D = 128 the kernel sits at the 255-register limit, so 2 blocks (8 warps) fit per SM;
// an FA3-style wgmma version would keep the accumulators in the warpgroup register file.
#include "vp_common.cuh"
#include "attention.cuh"

namespace vp {

template <int D, int HEADS, int GROUPS, int WINDOW, int ALIBI, int HSPLIT>
__device__ __forceinline__ void attn_bwd_dkdv(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                              const bf16* __restrict__ v, const int* __restrict__ doc,
                                              const float* __restrict__ stats, const bf16* __restrict__ dout,
                                              bf16* __restrict__ dk, bf16* __restrict__ dv, int T, int S,
                                              float* __restrict__ part) {
    static_assert(D % 16 == 0 && D >= 16 && D <= 256, "head dim must be a multiple of 16 (mma k), at most 256");
    static_assert(GROUPS >= 1 && HEADS % GROUPS == 0, "heads must be a multiple of kv groups");
    constexpr int BKV = ATTN_TILE, BQ = 32, GS = HEADS / GROUPS;
    constexpr int LD = D + 8, DK = D / 16, DN = D / 8;
    __shared__ __align__(128) bf16 sV[BKV * LD];
    __shared__ __align__(128) bf16 sQO[2 * BQ * LD];  // q tile | dout tile (also stages the K tile)
    __shared__ float sLse[BQ], sRho[BQ];
    __shared__ int sDocQ[BQ];
    bf16* sQ = sQO;
    bf16* sO = sQO + BQ * LD;

    require_block(ATT_NT);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    // HSPLIT: this block's one head (the others are skipped, block-uniformly); else all GS heads
    // of group blockIdx.y.
    const int g = HSPLIT ? (int)blockIdx.y / GS : (int)blockIdx.y;
    const int u0 = blockIdx.x * BKV;
    if (u0 >= T) return;  // whole block (never with the contract's grid)
    // Last query that can see key u.
    auto q_last = [S, T](int u) {
        int hi = min(T, (u / S + 1) * S) - 1;
        if (WINDOW > 0) hi = min(hi, u + WINDOW - 1);
        return hi;
    };
    const bool vq = aligned(q, 16), vk = aligned(k, 16), vv = aligned(v, 16), vo = aligned(dout, 16);

    // ---- K tile through sQO into A fragments, V tile resident ----
    stage_rows2<D, BKV, GROUPS>(sQO, k, vk, sV, v, vv, g, u0, T - 1);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    unsigned int kf[DK][4];
    warp_afrags<D>(kf, sQO);

    int uk[2], qhi[2], dk_[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int u = u0 + warp * 16 + (lane >> 2) + 8 * i;
        if (u < T) {
            uk[i] = u;
            qhi[i] = q_last(u);
            dk_[i] = doc[u];
        } else {  // padding key: no query sees it; never stored
            uk[i] = -1;
            qhi[i] = -1;
            dk_[i] = 0;
        }
    }
    const int w_first = u0 + warp * 16;
    const int w_qhi = w_first < T ? q_last(min(w_first + 15, T - 1)) : -1;
    const int q_hi = q_last(min(u0 + BKV - 1, T - 1));

    const float sc2 = LOG2E / sqrtf((float)D);
    float dka[DN][4], dva[DN][4];
#pragma unroll
    for (int n = 0; n < DN; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            dka[n][e] = 0.f;
            dva[n][e] = 0.f;
        }

    for (int qt0 = u0; qt0 <= q_hi; qt0 += BQ) {
        for (int hh = 0; hh < GS; ++hh) {
            const int h = g * GS + hh;
            if (HSPLIT && h != (int)blockIdx.y) continue;
            __syncthreads();  // previous tile fully read (and the K staging)
            stage_rows2<D, BQ, HEADS>(sQ, q, vq, sO, dout, vo, h, qt0, q_hi);
            cp_async_commit();
            if (tid < BQ) {
                const int t = qt0 + tid;
                const bool ok = t <= q_hi;
                sLse[tid] = ok ? stats[((size_t)t * HEADS + h) * 2] : 0.f;
                sRho[tid] = ok ? stats[((size_t)t * HEADS + h) * 2 + 1] : 0.f;
                sDocQ[tid] = ok ? doc[t] : 0;
            }
            cp_async_wait<0>();
            __syncthreads();
            const bool active = w_first < T && qt0 <= w_qhi && qt0 + BQ - 1 >= w_first;  // warp-uniform
            if (!active) continue;
            const float slope2 = ALIBI ? alibi_slope(h, HEADS) * LOG2E : 0.f;

            float st[4][4], dpt[4][4];
#pragma unroll
            for (int n = 0; n < 4; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    st[n][e] = 0.f;
                    dpt[n][e] = 0.f;
                }
#pragma unroll
            for (int kk = 0; kk < DK; ++kk) {
                unsigned int va[4];
                ldsm_x4(va, &sV[(warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8]);
#pragma unroll
                for (int nj = 0; nj < 2; ++nj) {
                    const int off = ldsm_b_off<D>(nj * 16, kk);
                    unsigned int r[4];
                    ldsm_x4(r, &sQ[off]);
                    const unsigned int b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
                    mma_bf16_16816(st[2 * nj], kf[kk], b0);
                    mma_bf16_16816(st[2 * nj + 1], kf[kk], b1);
                    ldsm_x4(r, &sO[off]);
                    const unsigned int c0[2] = {r[0], r[1]}, c1[2] = {r[2], r[3]};
                    mma_bf16_16816(dpt[2 * nj], va, c0);
                    mma_bf16_16816(dpt[2 * nj + 1], va, c1);
                }
            }
            // Pᵀ into st, dSᵀ into dpt
#pragma unroll
            for (int n = 0; n < 4; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int i = e >> 1, col = n * 8 + (lane & 3) * 2 + (e & 1), t = qt0 + col, u = uk[i];
                    const bool ok = u >= 0 && u <= t && t <= qhi[i] && sDocQ[col] == dk_[i];
                    float val = st[n][e] * sc2;
                    if (ALIBI) val -= slope2 * (float)(t - u);
                    const float p = ok ? exp2f(val - sLse[col]) : 0.f;
                    st[n][e] = p;
                    dpt[n][e] = p * (dpt[n][e] - sRho[col]);
                }
            unsigned int pa[2][4], da[2][4];
            to_afrags<2>(pa, st);
            to_afrags<2>(da, dpt);
            mma_ab2<D, 2>(dva, pa, sO, dka, da, sQ, 0);
        }
    }

    const float scale = 1.f / sqrtf((float)D);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        if (uk[i] < 0) continue;
        if (HSPLIT) {
            float* pr = part + ((size_t)uk[i] * HEADS + blockIdx.y) * 2 * D + (lane & 3) * 2;
#pragma unroll
            for (int n = 0; n < DN; ++n) {
                *reinterpret_cast<float2*>(pr + n * 8) = make_float2(dka[n][2 * i] * scale, dka[n][2 * i + 1] * scale);
                *reinterpret_cast<float2*>(pr + D + n * 8) = make_float2(dva[n][2 * i], dva[n][2 * i + 1]);
            }
            continue;
        }
        const size_t o = ((size_t)uk[i] * GROUPS + g) * D + (lane & 3) * 2;
#pragma unroll
        for (int n = 0; n < DN; ++n) {
            *reinterpret_cast<unsigned int*>(dk + o + n * 8) = pack_bf2(dka[n][2 * i] * scale, dka[n][2 * i + 1] * scale);
            *reinterpret_cast<unsigned int*>(dv + o + n * 8) = pack_bf2(dva[n][2 * i], dva[n][2 * i + 1]);
        }
    }
}

}  // namespace vp
