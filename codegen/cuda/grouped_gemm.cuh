#pragma once
// grouped_gemm.cuh: the routed experts' linear layers on ragged, expert-major row ranges.
//
//   for each expert e, rows r in [offsets[e], offsets[e+1]):  y[r] = epi(x[src(r)] · W[e]ᵀ + bias[e])
//   x [·, KD], w [E, N, KD], bias [E, N] (nullable), y [rows, N]; epi NONE or RELU2.
//   src(r) = src[r] when `src` is given (the first layer reads token rows through the dispatch
//   permutation, so no permuted copy of the tokens exists), else r.
//
// Launch: grid (ceil(rows/64) + E, ceil(N/64)), block 128 (rows = T·K). `offsets` lives on the
// device and the host never reads it, so the grid is the worst case: Σ_e ceil(n_e/64) ≤
// rows/64 + E. Block x-index b is mapped to (expert, 64-row tile) by a block-wide prefix sum of
// the per-expert tile counts (tile c of expert e starts at row offsets[e] + 64c); blocks past the
// last tile return at once. The tile itself is gemm.cuh's 64x64 tensor-core tile with the row
// range clipped to the expert's rows, so empty experts cost nothing and an expert holding every
// row is just a tall GEMM. Deterministic (no atomics; each output element is one thread's sum).
#include "vp_common.cuh"
#include "gemm.cuh"

namespace vp {

template <int N, int KD, int EPI, int E>
__device__ __forceinline__ void grouped_gemm(const bf16* x, const int* src, const int* offsets, const bf16* w,
                                             const bf16* bias, bf16* y, int rows) {
    static_assert(EPI == EPI_NONE || EPI == EPI_RELU2, "grouped_gemm has no residual epilogue");
    constexpr int NT = gemm_cfg::THREADS, BM = gemm_cfg::BM;
    __shared__ int s_pick[2];  // (expert, tile within the expert) of this block, or expert -1
    (void)rows;
    require_block(NT);

    const int b = blockIdx.x;
    if (threadIdx.x == 0) {
        s_pick[0] = -1;
        s_pick[1] = 0;
    }
    __syncthreads();
    int carry = 0;  // tiles of experts before this chunk (block-uniform)
    for (int e0 = 0; e0 < E; e0 += NT) {
        const int e = e0 + (int)threadIdx.x;
        const int tiles = e < E ? cdiv(offsets[e + 1] - offsets[e], BM) : 0;
        int total;
        const int first = carry + block_exclusive_scan<NT>(tiles, total);
        if (b >= first && b < first + tiles) {
            s_pick[0] = e;
            s_pick[1] = b - first;
        }
        carry += total;
        if (carry > b) break;  // found in this chunk (carry is the same in every thread)
    }
    __syncthreads();
    const int e = s_pick[0];
    if (e < 0) return;  // beyond the last tile: the whole block leaves
    const int row0 = offsets[e] + BM * s_pick[1];
    const bf16* be = bias != nullptr ? bias + (size_t)e * N : nullptr;
    gemm_tile<N, KD, EPI, 0>(x, w + (size_t)e * N * KD, be, nullptr, y, row0, offsets[e + 1], blockIdx.y * gemm_cfg::BN,
                             N, 0.f, 0.f, 0.f, src);
}

}  // namespace vp
