#pragma once
// router.cuh: sigmoid router selection and gates for one token per block.
//
//   scores[t, e] = σ(logits[t, e])                      (f32; logits already include the bias)
//   sel_e = scores[t, e] (+ expert_bias[e] when EBIAS)
//   GROUPS > 0: the E experts form GROUPS contiguous groups; a group's score is the sum of its
//     top K/GTOPK sel values; the GTOPK best groups stay eligible, the others get sel = −∞
//   idx[t, 0..K) = top-K of sel, largest first, ties to the lower index (reference::topk)
//   gate[t, k] = scale·scores[t, e_k] / (Σ_k scores[t, e_k] + 1e-20)   (unbiased scores)
//
// Launch: grid T, block 256. σ is evaluated in f64 and rounded once, as reference::sigmoid, so
// selection ties resolve identically. Every top-k is a repeated arg-max over 64-bit rank keys
// (order-preserving value bits | ~index; vp_common.cuh), i.e. exactly total_cmp order with
// lower-index tie breaks; each thread owns the keys of experts tid, tid+256, … and clears its own
// winner, so rounds need no extra barrier. Group scores: one warp per group runs K/GTOPK rounds of
// a warp arg-max, summed in f64 in selection order; thread 0 picks the kept groups by the same key
// order; the final selection is K rounds of block_max_u64. Sums for the gates are in f64 like the
// reference. Exact: emulated results match the reference bit for bit, ties included.
// Limits: about 2 barriers per top-K round, latency-bound at E = 256, K = 4 but small next to the
// GEMMs. One warp with 8 keys per lane could do the whole selection without block barriers.
#include "vp_common.cuh"

namespace vp {

template <int E, int K, int GROUPS, int GTOPK, int EBIAS>
__device__ __forceinline__ void router(const float* __restrict__ logits, const float* __restrict__ expert_bias,
                                       int* __restrict__ idx, float* __restrict__ gate, float* __restrict__ scores,
                                       int T, float scale) {
    constexpr int NT = ROUTER_THREADS, NW = NT / 32;
    static_assert(K >= 1 && K <= E, "top-k larger than the expert count");
    static_assert(GROUPS == 0 || (E % GROUPS == 0 && GTOPK >= 1 && GTOPK <= GROUPS), "group limit");
    __shared__ float s_score[E];
    __shared__ float s_sel[E];
    __shared__ unsigned long long s_key[E];
    __shared__ int s_pick[K];
    require_block(NT);
    const int t = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    if (t >= T) return;  // whole block

    for (int e = tid; e < E; e += NT) {
        const float sc = (float)(1.0 / (1.0 + exp(-(double)logits[(size_t)t * E + e])));
        const float sel = EBIAS ? sc + expert_bias[e] : sc;
        s_score[e] = sc;
        s_sel[e] = sel;
        s_key[e] = rank_key(sel, e);
        scores[(size_t)t * E + e] = sc;
    }

    if constexpr (GROUPS > 0) {
        constexpr int PER = E / GROUPS;
        constexpr int TAKE = (K / GTOPK) < PER ? (K / GTOPK) : PER;
        constexpr int PJ = (PER + 31) / 32;  // group entries per lane
        static_assert(PJ <= 32, "group larger than 1024 experts");
        __shared__ float s_gscore[GROUPS];
        __shared__ int s_keep[GROUPS];
        __syncthreads();
        for (int grp = warp; grp < GROUPS; grp += NW) {  // warp-uniform loop
            double sum = 0.0;
            unsigned int taken = 0;  // bit j: entry lane + 32j already chosen
            for (int r = 0; r < TAKE; ++r) {
                unsigned long long best = 0;
#pragma unroll
                for (int j = 0; j < PJ; ++j) {
                    const int ge = lane + 32 * j;
                    if (ge < PER && !((taken >> j) & 1u)) {
                        const unsigned long long kk = s_key[grp * PER + ge];
                        best = kk > best ? kk : best;
                    }
                }
                best = warp_max_u64(best);
                const int eb = rank_index(best);
#pragma unroll
                for (int j = 0; j < PJ; ++j)
                    if (grp * PER + lane + 32 * j == eb) taken |= 1u << j;
                sum += (double)s_sel[eb];
            }
            if (lane == 0) s_gscore[grp] = (float)sum;
        }
        __syncthreads();
        if (tid == 0) {  // GTOPK best groups (a few dozen compares)
            for (int g = 0; g < GROUPS; ++g) s_keep[g] = 0;
            for (int r = 0; r < GTOPK; ++r) {
                unsigned long long best = 0;
                for (int g = 0; g < GROUPS; ++g) {
                    const unsigned long long kk = s_keep[g] ? 0ull : rank_key(s_gscore[g], g);
                    best = kk > best ? kk : best;
                }
                s_keep[rank_index(best)] = 1;
            }
        }
        __syncthreads();
        for (int e = tid; e < E; e += NT)
            if (!s_keep[e / PER]) s_key[e] = rank_key(__int_as_float(0xff800000), e);  // -inf, still rankable
    }

    // top-K: K rounds of block arg-max; the owner thread clears the winner's key.
    for (int r = 0; r < K; ++r) {
        unsigned long long best = 0;
        for (int e = tid; e < E; e += NT) best = s_key[e] > best ? s_key[e] : best;
        best = block_max_u64<NT>(best);  // begins and ends with a barrier-protected exchange
        const int eb = rank_index(best);
        if (eb % NT == tid) s_key[eb] = 0;
        if (tid == 0) s_pick[r] = eb;
    }
    if (tid == 0) {
        double z = 0.0;
        for (int r = 0; r < K; ++r) z += (double)s_score[s_pick[r]];
        z += 1e-20;
        for (int r = 0; r < K; ++r) {
            const int e = s_pick[r];
            idx[(size_t)t * K + r] = e;
            gate[(size_t)t * K + r] = (float)((double)scale * (double)s_score[e] / z);
        }
    }
}

}  // namespace vp
