#pragma once
// seq_aux.cuh: sequence-level load-balancing loss, one partial per sequence b (S tokens):
//   s̃[t, e] = scores[t, e] / (Σ_e' scores[t, e'] + 1e-20)
//   c_e = #tokens whose plain top-K of s̃ (ties to the lower index) contains e,  P_e = Σ_t s̃[t, e]
//   partial[b] = E / (K·S²) · Σ_e P_e·c_e
//   loss = scale · Σ_b partial[b]                     (scale = 1/B)
//
// Launch: grid (X, B), block 256. Block (x, b) takes chunk x of sequence b, tokens
// [x·ch, min(S, (x+1)·ch)) with ch = ceil(S/X) (`seq_chunk`), so a sequence is spread over X
// SMs; it stores its chunk's P_e (f64, two words of the f32 scratch `pp`) and c_e at row
// b·S + x·ch of `pp` / `pc` ([T, E]; an empty chunk stores nothing). Each warp takes TB = 4
// tokens at a time (four independent shuffle chains hide each other's latency); lane l owns experts l, l+32, … and keeps its P_e
// (f64) and c_e in registers across the warp's tokens. The row sum is an f64 warp butterfly, s̃
// is rounded to f32 as in the reference, the top-K is K rounds of warp arg-max over rank keys.
// The 8 warps' sums are combined in warp order. The last block to finish (`last_block`, one
// ticket for the grid) adds each sequence's chunks in chunk order, forms partial[b] with a
// fixed-order block sum, and then the loss (`sum_to`): deterministic, and the same whichever
// block finishes last. The 8 warps' sums go through 24 KB of shared memory.
// Limits: fusing it into the router kernel, which already holds each token's scores, would remove
// the re-read of the scores.
#include "vp_common.cuh"

namespace vp {

template <int E, int K>
__device__ __forceinline__ void seq_aux(const float* __restrict__ scores, float* __restrict__ partial, int S,
                                        float* loss, float scale, int* tickets, float* __restrict__ pp_words,
                                        int* __restrict__ pc) {
    constexpr int NT = SEQ_AUX_THREADS, NW = NT / 32, EJ = (E + 31) / 32, TB = 4;
    static_assert(EJ <= 32, "at most 1024 experts");
    static_assert(K >= 1 && K <= E, "top-k larger than the expert count");
    __shared__ double sP[NW][E];
    __shared__ int sC[NW][E];
    require_block(NT);
    double* pp = reinterpret_cast<double*>(pp_words);  // f64 sums in an f32 scratch (the IR has no f64)
    const int b = blockIdx.y, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    int s_begin, s_end;
    seq_chunk(S, blockIdx.x, gridDim.x, s_begin, s_end);

    double P[EJ];
    int C[EJ];
#pragma unroll
    for (int j = 0; j < EJ; ++j) {
        P[j] = 0.0;
        C[j] = 0;
    }
    for (int s0 = s_begin + warp * TB; s0 < s_end; s0 += NW * TB) {  // warp-uniform
        float x[TB][EJ];
        double u[TB];
#pragma unroll
        for (int tb = 0; tb < TB; ++tb) {
            const bool valid = s0 + tb < s_end;
            const float* rowp = scores + ((size_t)b * S + s0 + tb) * E;
            u[tb] = 0.0;
#pragma unroll
            for (int j = 0; j < EJ; ++j) {
                const int e = lane + 32 * j;
                x[tb][j] = (valid && e < E) ? rowp[e] : 0.f;
                u[tb] += (double)x[tb][j];
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
#pragma unroll
            for (int tb = 0; tb < TB; ++tb) u[tb] += __shfl_xor_sync(FULL_MASK, u[tb], o);
        float nrm[TB][EJ];
#pragma unroll
        for (int tb = 0; tb < TB; ++tb)
#pragma unroll
            for (int j = 0; j < EJ; ++j) {
                nrm[tb][j] = (float)((double)x[tb][j] / (u[tb] + 1e-20));
                P[j] += (double)nrm[tb][j];  // 0 for padding tokens and experts
            }
        unsigned int taken[TB];
#pragma unroll
        for (int tb = 0; tb < TB; ++tb) taken[tb] = 0;
        for (int r = 0; r < K; ++r) {
            unsigned long long best[TB];
#pragma unroll
            for (int tb = 0; tb < TB; ++tb) {
                best[tb] = 0;
#pragma unroll
                for (int j = 0; j < EJ; ++j) {
                    const int e = lane + 32 * j;
                    if (e < E && !((taken[tb] >> j) & 1u)) {
                        const unsigned long long kk = rank_key(nrm[tb][j], e);
                        best[tb] = kk > best[tb] ? kk : best[tb];
                    }
                }
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1)
#pragma unroll
                for (int tb = 0; tb < TB; ++tb) {
                    const unsigned long long w = __shfl_xor_sync(FULL_MASK, best[tb], o);
                    best[tb] = w > best[tb] ? w : best[tb];
                }
#pragma unroll
            for (int tb = 0; tb < TB; ++tb) {
                const int eb = rank_index(best[tb]);
                const int add = s0 + tb < s_end ? 1 : 0;
#pragma unroll
                for (int j = 0; j < EJ; ++j)
                    if (lane + 32 * j == eb) {
                        taken[tb] |= 1u << j;
                        C[j] += add;
                    }
            }
        }
    }
#pragma unroll
    for (int j = 0; j < EJ; ++j) {
        const int e = lane + 32 * j;
        if (e < E) {
            sP[warp][e] = P[j];
            sC[warp][e] = C[j];
        }
    }
    __syncthreads();
    if (s_begin < S) {
        const size_t row = (size_t)b * S + s_begin;
        for (int e = tid; e < E; e += NT) {
            double pe = 0.0;
            int ce = 0;
#pragma unroll
            for (int w = 0; w < NW; ++w) {
                pe += sP[w][e];
                ce += sC[w][e];
            }
            pp[row * E + e] = pe;
            pc[row * E + e] = ce;
        }
    }
    if (!last_block(tickets, (int)(gridDim.x * gridDim.y))) return;
    for (int bb = 0; bb < (int)gridDim.y; ++bb) {
        double dot = 0.0;
        for (int e = tid; e < E; e += NT) {
            double pe = 0.0;
            int ce = 0;
            for (int x = 0; x < (int)gridDim.x; ++x) {
                int c0, c1;
                seq_chunk(S, x, gridDim.x, c0, c1);
                if (c0 >= S) break;
                const size_t row = (size_t)bb * S + c0;
                pe += __ldcg(pp + row * E + e);
                ce += __ldcg(pc + row * E + e);
            }
            dot += pe * (double)ce;
        }
        dot = block_sum<NT>(dot);
        if (tid == 0) partial[bb] = (float)((double)E / ((double)K * (double)S * (double)S) * dot);
    }
    __threadfence();
    __syncthreads();
    sum_to<NT>(partial, (int)gridDim.y, scale, loss, 0);
}

}  // namespace vp
