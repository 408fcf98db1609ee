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
// K and V load as two cp.async groups, so V's load overlaps S = Q·Kᵀ. The sink starts the running
// max and joins the denominator at the end as exp2(sink − m). P̃ is rounded to bf16 against the
// running max after its tile, and earlier tiles are rescaled in f32 when a later one raises it;
// reference::TensorCore rounds at the same points (tile boundaries included). The denominator
// sums the unrounded f32 p. A running max of −∞ uses 0 as the exponent reference, so no
// −∞ − (−∞) is formed; 1/den is guarded by den > 0; padding queries (t ≥ T) are never stored.
// D must be a multiple of 16 and at most 256 (static_assert). exp2f is accurate to about 2 ulp.
// Deterministic: fixed loop order, no atomics. How a query's keys fall into tiles depends on its
// block's t0; with S % 64 == 0 (the locked config) blocks align with rows, so results do not
// depend on how sequences are batched.
// Limits: at D = 128 its register count (`vpmoec resources`) lets about 3 blocks (12 warps) fit
// per SM, and the next K tile is not double-buffered across the P·V phase. A Hopper version would use wgmma for S and O
// (FlashAttention-3 style), TMA loads and producer/consumer warpgroups. Key tiles that lie wholly
// before the queries' document start are computed and fully masked; a per-tile "any key in the
// queries' documents" test, or document starts from the data loader, would skip them (global
// layers on packed rows of short documents).
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

// ---- Tile pieces shared by the attention kernels (this file, attn_stats, attn_bwd_dq,
// attn_bwd_dkdv). All run 4 warps of 16 rows; staged tiles have rows of D bf16 padded to D + 8
// (conflict-free ldmatrix). ----
constexpr int ATT_NT = ATTENTION_THREADS;
static_assert(ATTN_STATS_THREADS == ATT_NT && ATTN_BWD_DQ_THREADS == ATT_NT && ATTN_BWD_DKDV_THREADS == ATT_NT,
              "the attention families share their tile loaders");

// Rows r < ROWS of a staged tile = row (row0 + r)·NH + h of src (rows of D), zero past row
// `last` (cp.async: the caller commits and waits).
template <int D, int ROWS, int NH>
__device__ __forceinline__ void stage_rows(bf16* s, const bf16* __restrict__ src, int h, int row0, int last, bool vec) {
    constexpr int LD = D + 8, CH = D / 8;
    for (int c = threadIdx.x; c < ROWS * CH; c += ATT_NT) {
        const int r = c / CH, dc = (c % CH) * 8, t = row0 + r;
        load_chunk8(&s[r * LD + dc], src + ((size_t)t * NH + h) * D + dc, t <= last ? 8 : 0, vec, src);
    }
}

// stage_rows for two sources with the same rows (k and v; q and dout), in one loop.
template <int D, int ROWS, int NH>
__device__ __forceinline__ void stage_rows2(bf16* s0, const bf16* __restrict__ src0, bool vec0, bf16* s1,
                                            const bf16* __restrict__ src1, bool vec1, int h, int row0, int last) {
    constexpr int LD = D + 8, CH = D / 8;
    for (int c = threadIdx.x; c < ROWS * CH; c += ATT_NT) {
        const int r = c / CH, dc = (c % CH) * 8, t = row0 + r;
        const size_t o = ((size_t)t * NH + h) * D + dc;
        load_chunk8(&s0[r * LD + dc], src0 + o, t <= last ? 8 : 0, vec0, src0);
        load_chunk8(&s1[r * LD + dc], src1 + o, t <= last ? 8 : 0, vec1, src1);
    }
}

// The mma A fragments of this warp's 16 rows of a staged tile, one per k16 step.
template <int D>
__device__ __forceinline__ void warp_afrags(unsigned int (&f)[D / 16][4], const bf16* s) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) ldsm_x4(f[kk], &s[(warp * 16 + (lane & 15)) * (D + 8) + kk * 16 + (lane >> 4) * 8]);
}

// This lane's ldmatrix.x4 address (offset in a staged tile) for the B fragments of rows r0 .. r0
// + 15 at k16 step kk, as mma's .col operand: matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15,
// k 0-7), (n 8-15, k 8-15), giving the b pairs of n8 tiles r0/8 and r0/8 + 1.
template <int D>
__device__ __forceinline__ int ldsm_b_off(int r0, int kk) {
    const int lane = threadIdx.x & 31;
    return (r0 + (lane & 7) + ((lane >> 4) << 3)) * (D + 8) + kk * 16 + ((lane >> 3) & 1) * 8;
}

// The same for ldmatrix.x4.trans over rows r0 .. r0 + 15 (the k16 step) at columns dn·16 .. +15:
// transposed 8x8 blocks (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15).
template <int D>
__device__ __forceinline__ int ldsm_bt_off(int r0, int dn) {
    const int lane = threadIdx.x & 31;
    return (r0 + (lane & 7) + ((lane >> 3) & 1) * 8) * (D + 8) + dn * 16 + (lane >> 4) * 8;
}

// acc[n] += A·Bᵀ, B = the 8·N8 rows from row r0 of a staged tile (Q·Kᵀ: a key per column).
template <int D, int N8>
__device__ __forceinline__ void mma_abt(float (&acc)[N8][4], const unsigned int (&a)[D / 16][4], const bf16* s, int r0) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
        for (int nj = 0; nj < N8 / 2; ++nj) {
            unsigned int r[4];
            ldsm_x4(r, &s[ldsm_b_off<D>(r0 + nj * 16, kk)]);
            const unsigned int b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
            mma_bf16_16816(acc[2 * nj], a[kk], b0);
            mma_bf16_16816(acc[2 * nj + 1], a[kk], b1);
        }
}

// acc[n] += A·B, A = KK k16 steps of bf16 fragments, B = the 16·KK rows from row r0 of a staged
// tile (P·V: a key per row), read transposed by ldmatrix.trans.
template <int D, int KK>
__device__ __forceinline__ void mma_ab(float (&acc)[D / 8][4], const unsigned int (&a)[KK][4], const bf16* s, int r0) {
#pragma unroll
    for (int j = 0; j < KK; ++j)
#pragma unroll
        for (int dn = 0; dn < D / 16; ++dn) {
            unsigned int r[4];
            ldsm_x4_trans(r, &s[ldsm_bt_off<D>(r0 + j * 16, dn)]);
            const unsigned int b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
            mma_bf16_16816(acc[2 * dn], a[j], b0);
            mma_bf16_16816(acc[2 * dn + 1], a[j], b1);
        }
}

// The two products of a backward pass over the same rows at once (Q·Kᵀ with dO·Vᵀ; dv's P·dO with
// dk's dS·Q): one loop, so each step's two loads and four MMAs issue together. Interleaved, the
// backward kernels stay under 255 registers without spilling; two separate loops push them
// past it.
template <int D, int N8>
__device__ __forceinline__ void mma_abt2(float (&acc0)[N8][4], const unsigned int (&a0)[D / 16][4], const bf16* s0,
                                         float (&acc1)[N8][4], const unsigned int (&a1)[D / 16][4], const bf16* s1,
                                         int r0) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
        for (int nj = 0; nj < N8 / 2; ++nj) {
            const int off = ldsm_b_off<D>(r0 + nj * 16, kk);
            unsigned int r[4];
            ldsm_x4(r, &s0[off]);
            const unsigned int b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
            mma_bf16_16816(acc0[2 * nj], a0[kk], b0);
            mma_bf16_16816(acc0[2 * nj + 1], a0[kk], b1);
            ldsm_x4(r, &s1[off]);
            const unsigned int c0[2] = {r[0], r[1]}, c1[2] = {r[2], r[3]};
            mma_bf16_16816(acc1[2 * nj], a1[kk], c0);
            mma_bf16_16816(acc1[2 * nj + 1], a1[kk], c1);
        }
}

template <int D, int KK>
__device__ __forceinline__ void mma_ab2(float (&acc0)[D / 8][4], const unsigned int (&a0)[KK][4], const bf16* s0,
                                        float (&acc1)[D / 8][4], const unsigned int (&a1)[KK][4], const bf16* s1,
                                        int r0) {
#pragma unroll
    for (int j = 0; j < KK; ++j)
#pragma unroll
        for (int dn = 0; dn < D / 16; ++dn) {
            const int off = ldsm_bt_off<D>(r0 + j * 16, dn);
            unsigned int r[4];
            ldsm_x4_trans(r, &s0[off]);
            const unsigned int b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
            mma_bf16_16816(acc0[2 * dn], a0[j], b0);
            mma_bf16_16816(acc0[2 * dn + 1], a0[j], b1);
            ldsm_x4_trans(r, &s1[off]);
            const unsigned int c0[2] = {r[0], r[1]}, c1[2] = {r[2], r[3]};
            mma_bf16_16816(acc1[2 * dn], a1[j], c0);
            mma_bf16_16816(acc1[2 * dn + 1], a1[j], c1);
        }
}

// f32 accumulators of n8 tiles 2j, 2j + 1 rounded to the bf16 A fragment of k16 step j (the two
// layouts coincide).
template <int KK>
__device__ __forceinline__ void to_afrags(unsigned int (&a)[KK][4], const float (&acc)[2 * KK][4]) {
#pragma unroll
    for (int j = 0; j < KK; ++j) {
        a[j][0] = pack_bf2(acc[2 * j][0], acc[2 * j][1]);
        a[j][1] = pack_bf2(acc[2 * j][2], acc[2 * j][3]);
        a[j][2] = pack_bf2(acc[2 * j + 1][0], acc[2 * j + 1][1]);
        a[j][3] = pack_bf2(acc[2 * j + 1][2], acc[2 * j + 1][3]);
    }
}

// Fragment row i (0: lane/4, 1: lane/4 + 8) of acc, times `scale`, into the D bf16 at row.
template <int D>
__device__ __forceinline__ void store_acc_row(bf16* row, const float (&acc)[D / 8][4], int i, float scale) {
    bf16* dst = row + (threadIdx.x & 3) * 2;
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
        *reinterpret_cast<unsigned int*>(dst + n * 8) = pack_bf2(acc[n][2 * i] * scale, acc[n][2 * i + 1] * scale);
}

// First key query t may attend: its sequence row's start, or t − WINDOW + 1 (keys are further
// limited to u ≤ t and the same document).
template <int WINDOW>
__device__ __forceinline__ int key_lo(int t, int S) {
    int lo = (t / S) * S;
    if (WINDOW > 0) lo = max(lo, t - WINDOW + 1);
    return lo;
}

// The queries of a 64-query block at t0 as its threads see them: this thread's two fragment rows
// (query, first key, document; query −1 for padding past T, which sees no key and is never
// stored), its warp's query range, and the keys [kv_lo, kv_hi] any of the block may see.
template <int WINDOW, int ALIBI>
struct QueryRows {
    int tq[2], lo[2], qdoc[2];
    int w_first, w_last, w_lo, kv_lo, kv_hi;
    bool w_live;

    __device__ __forceinline__ QueryRows(int t0, int T, int S, const int* __restrict__ doc) {
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int t = t0 + warp * 16 + (lane >> 2) + 8 * i;
            tq[i] = t < T ? t : -1;
            lo[i] = t < T ? key_lo<WINDOW>(t, S) : 0;
            qdoc[i] = t < T ? doc[t] : 0;
        }
        w_first = t0 + warp * 16;
        w_live = w_first < T;
        w_last = min(w_first + 15, T - 1);
        w_lo = w_live ? key_lo<WINDOW>(w_first, S) : 0;
        kv_lo = key_lo<WINDOW>(min(t0, T - 1), S);
        kv_hi = min(t0 + 63, T - 1);
    }
    // Whether the warp's queries may see a key of the 64-key tile at kv0 (warp-uniform).
    __device__ __forceinline__ bool sees(int kv0) const { return w_live && kv0 <= w_last && kv0 + 63 >= w_lo; }
    // Score s of query row i and key u (document du) in log2 units (sc2 = log2e/sqrt(D), slope2
    // the head's ALiBi slope·log2e), or −inf where the mask hides u.
    __device__ __forceinline__ float score2(int i, int u, int du, float s, float sc2, float slope2) const {
        float val = s * sc2;
        if (ALIBI) val -= slope2 * (float)(tq[i] - u);
        return u <= tq[i] && u >= lo[i] && du == qdoc[i] ? val : neg_inf();
    }
    // The raw products s of the 64-key tile at kv0 (keys staged in sK, documents in sdoc) with q
    // (A fragments qf) of this thread's fragment entries, turned into log2 scores, −inf where
    // masked; mx = each fragment row's max over the tile (the quad's four lanes agree).
    template <int D>
    __device__ __forceinline__ void tile_scores(float (&s)[8][4], float (&mx)[2], const unsigned int (&qf)[D / 16][4],
                                                const bf16* sK, const int* sdoc, int kv0, float sc2,
                                                float slope2) const {
        const int lane = threadIdx.x & 31;
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[n][e] = 0.f;
        mma_abt<D, 8>(s, qf, sK, 0);
        mx[0] = mx[1] = neg_inf();
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int i = e >> 1, col = n * 8 + (lane & 3) * 2 + (e & 1);
                s[n][e] = score2(i, kv0 + col, sdoc[col], s[n][e], sc2, slope2);
                mx[i] = fmaxf(mx[i], s[n][e]);
            }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(FULL_MASK, mx[i], 1));
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(FULL_MASK, mx[i], 2));
        }
    }
};

template <int D, int HEADS, int GROUPS, int WINDOW, int ALIBI, int SINKS>
__device__ __forceinline__ void attention(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                          const bf16* __restrict__ v, const int* __restrict__ doc,
                                          const float* __restrict__ sinks, bf16* __restrict__ out, int T, int S) {
    static_assert(D % 16 == 0 && D >= 16 && D <= 256, "head dim must be a multiple of 16 (mma k), at most 256");
    static_assert(GROUPS >= 1 && HEADS % GROUPS == 0, "heads must be a multiple of kv groups");
    constexpr int BQ = ATTN_TILE, BKV = ATTN_TILE;
    constexpr int LD = D + 8;     // padded shared row (bf16): conflict-free ldmatrix
    constexpr int DN = D / 8;     // n8 tiles over the head dim (P·V)
    constexpr int KN = BKV / 8;   // n8 tiles over a key tile (Q·Kᵀ)
    constexpr int KK = BKV / 16;  // k16 steps over a key tile (P·V)
    __shared__ __align__(128) bf16 sK[BKV * LD];
    __shared__ __align__(128) bf16 sV[BKV * LD];
    __shared__ int sDoc[BKV];

    require_block(ATT_NT);
    const int tid = threadIdx.x, lane = tid & 31;
    const int h = blockIdx.y, g = h / (HEADS / GROUPS);
    const int t0 = blockIdx.x * BQ;
    const bool vq = aligned(q, 16), vk = aligned(k, 16), vv = aligned(v, 16);

    // ---- Q tile (64 × D) through sK into per-warp A fragments (rows ≥ T are zero) ----
    stage_rows<D, BQ, HEADS>(sK, q, h, t0, T - 1, vq);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    unsigned int qf[D / 16][4];
    warp_afrags<D>(qf, sK);
    const QueryRows<WINDOW, ALIBI> qr(t0, T, S, doc);

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

    for (int kv0 = qr.kv_lo; kv0 <= qr.kv_hi; kv0 += BKV) {
        __syncthreads();  // previous tile (and the Q staging) fully read
        stage_rows<D, BKV, GROUPS>(sK, k, g, kv0, qr.kv_hi, vk);
        cp_async_commit();
        stage_rows<D, BKV, GROUPS>(sV, v, g, kv0, qr.kv_hi, vv);
        cp_async_commit();
        if (tid < BKV) sDoc[tid] = kv0 + tid <= qr.kv_hi ? doc[kv0 + tid] : 0;
        cp_async_wait<1>();  // K landed (V may still be in flight)
        __syncthreads();

        const bool active = qr.sees(kv0);  // warp-uniform
        unsigned int pa[KK][4];             // P as bf16 A fragments
        if (active) {
            float s[KN][4], mx[2];  // masked log2 scores, tile row max
            qr.template tile_scores<D>(s, mx, qf, sK, sDoc, kv0, sc2, slope2);
            float mu[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
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
            to_afrags<KK>(pa, s);
        }
        cp_async_wait<0>();  // V landed
        __syncthreads();
        if (active) mma_ab<D, KK>(o, pa, sV, 0);
    }

    // ---- normalise and store ----
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        float den = l[i];
        den += __shfl_xor_sync(FULL_MASK, den, 1);
        den += __shfl_xor_sync(FULL_MASK, den, 2);
        if (SINKS) den += exp2f(sink2 - m[i]);  // m ≥ sink2, so this is in (0, 1]
        const float inv = den > 0.f ? 1.f / den : 0.f;
        if (qr.tq[i] >= 0) store_acc_row<D>(out + ((size_t)qr.tq[i] * HEADS + h) * D, o, i, inv);
    }
}

}  // namespace vp
