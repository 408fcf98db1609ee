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
// rows/64 + E. Block x-index b is mapped to (expert, 64-row tile) by `expert_tile` (gemm.cuh);
// blocks past the last tile return at once. The tile itself is gemm.cuh's 64x64 tensor-core tile with the row
// range clipped to the expert's rows, so empty experts cost nothing and an expert holding every
// row is just a tall GEMM. With `src`, each thread resolves the two x rows it loads once, before
// the K loop (gemm_mainloop's `gather`), so cp.async reads token rows in place: the same 16-byte
// chunks as a contiguous tile, from up to 64 scattered rows. Deterministic (no atomics; each
// output element is one thread's sum).
// Limits: as gemm.cuh; in addition experts with few rows waste most of a 64-row tile (fine at the
// locked shape, T·K/E ≈ 256 rows each), and a persistent-CTA scheduler walking (expert, tile)
// pairs would avoid launching E idle blocks.
#include "vp_common.cuh"
#include "gemm.cuh"

namespace vp {

template <int N, int KD, int EPI, int E>
__device__ __forceinline__ void grouped_gemm(const bf16* x, const int* src, const int* offsets, const bf16* w,
                                             const bf16* bias, bf16* y, int rows) {
    static_assert(EPI == EPI_NONE || EPI == EPI_RELU2, "grouped_gemm has no residual epilogue");
    constexpr int NT = gemm_cfg::THREADS, BM = gemm_cfg::BM;
    (void)rows;
    require_block(NT);
    int row0 = 0, row_end = 0;
    const int e = expert_tile<NT, BM, E>(offsets, blockIdx.x, row0, row_end);
    if (e < 0) return;  // beyond the last tile: the whole block leaves
    const bf16* be = bias != nullptr ? bias + (size_t)e * N : nullptr;
    gemm_tile<N, KD, EPI, 0>(x, w + (size_t)e * N * KD, be, nullptr, y, row0, row_end, blockIdx.y * gemm_cfg::BN,
                             N, 0.f, 0.f, 0.f, src);
}

}  // namespace vp
