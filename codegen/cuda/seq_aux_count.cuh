#pragma once
// seq_aux_count.cuh: the (non-differentiated) routing counts of the sequence aux loss, recomputed
// for its backward: counts[b, e] = #tokens of sequence b whose plain top-K of
// s̃ = scores/(Σ scores + 1e-20) (rounded to f32 as in seq_aux.cuh, ties to the lower index)
// contains e. Stored as f32 (exact small integers).
//
// Launch: grid (X, B), block 256, chunked like seq_aux.cuh: block (x, b) counts chunk x of
// sequence b into row b·S + x·ch of `pc` ([T, E] ints), one token per warp at a time with the
// same selection code path (f64 warp butterfly row sums, K rounds of warp arg-max over rank
// keys), the 8 warps' counts added in warp order; the last block to finish (one ticket) adds
// each sequence's chunks. Integer sums: exact whichever block finishes last.
#include "vp_common.cuh"

namespace vp {

template <int E, int K>
__device__ __forceinline__ void seq_aux_count(const float* __restrict__ scores, float* __restrict__ counts, int S,
                                              int* __restrict__ pc, int* __restrict__ tickets) {
    constexpr int NT = SEQ_AUX_COUNT_THREADS, NW = NT / 32, EJ = (E + 31) / 32;
    static_assert(EJ <= 32, "at most 1024 experts");
    static_assert(K >= 1 && K <= E, "top-k larger than the expert count");
    __shared__ int sC[NW][E];
    require_block(NT);
    const int b = blockIdx.y, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    int s_begin, s_end;
    seq_chunk(S, blockIdx.x, gridDim.x, s_begin, s_end);
    int C[EJ];
#pragma unroll
    for (int j = 0; j < EJ; ++j) C[j] = 0;
    for (int s = s_begin + warp; s < s_end; s += NW) {  // warp-uniform
        const float* rowp = scores + ((size_t)b * S + s) * E;
        float x[EJ];
        double u = 0.0;
#pragma unroll
        for (int j = 0; j < EJ; ++j) {
            const int e = lane + 32 * j;
            x[j] = e < E ? rowp[e] : 0.f;
            u += (double)x[j];
        }
        u = warp_sum(u);
        float nrm[EJ];
#pragma unroll
        for (int j = 0; j < EJ; ++j) nrm[j] = (float)((double)x[j] / (u + 1e-20));
        unsigned int taken = 0;
        for (int r = 0; r < K; ++r) {
            unsigned long long best = 0;
#pragma unroll
            for (int j = 0; j < EJ; ++j) {
                const int e = lane + 32 * j;
                if (e < E && !((taken >> j) & 1u)) {
                    const unsigned long long kk = rank_key(nrm[j], e);
                    best = kk > best ? kk : best;
                }
            }
            best = warp_max_u64(best);
            const int eb = rank_index(best);
#pragma unroll
            for (int j = 0; j < EJ; ++j)
                if (lane + 32 * j == eb) {
                    taken |= 1u << j;
                    C[j] += 1;
                }
        }
    }
#pragma unroll
    for (int j = 0; j < EJ; ++j) {
        const int e = lane + 32 * j;
        if (e < E) sC[warp][e] = C[j];
    }
    __syncthreads();
    if (s_begin < S) {
        const size_t row = (size_t)b * S + s_begin;
        for (int e = tid; e < E; e += NT) {
            int c = 0;
#pragma unroll
            for (int w = 0; w < NW; ++w) c += sC[w][e];
            pc[row * E + e] = c;
        }
    }
    if (!last_block(tickets, (int)(gridDim.x * gridDim.y))) return;
    for (int bb = 0; bb < (int)gridDim.y; ++bb)
        for (int e = tid; e < E; e += NT) {
            int c = 0;
            for (int x = 0; x < (int)gridDim.x; ++x) {
                int c0, c1;
                seq_chunk(S, x, gridDim.x, c0, c1);
                if (c0 >= S) break;
                c += __ldcg(pc + ((size_t)bb * S + c0) * E + e);
            }
            counts[(size_t)bb * E + e] = (float)c;
        }
}

}  // namespace vp
