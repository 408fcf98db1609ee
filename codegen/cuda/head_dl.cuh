#pragma once
// head_dl.cuh: the logit gradient of head_ce, recomputed tile by tile from the forward's lse.
//   logits = z·Wᵀ as in head_lse.cuh (same gemm_mainloop, so the same f32 bits), then
//   w_t = dtok[t]·mask[t]   (dtok: the token losses' gradient, span_weight.cuh)
//   dl[t, c − col0] = bf16(w_t·(exp(logits[t, c] − lse[t]) − [c == labels[t]]))
//   for the vocabulary chunk col0 ≤ c < min(col0 + C, V): bf16 [T, C], so the backward holds one
//   chunk of the [T, V] gradient at a time (col0 a multiple of 64).
//   Rows with w_t = 0 (masked, zero weight, unseeded: dtok null) are written as exact zeros.
//   lse is the forward's f32 value, so probabilities carry an extra relative error of about
//   |lse|·2⁻²⁴ (≈ 1e-6) against the reference.
//   The bf16 rounding is the one the gradient GEMMs apply anyway (tensor cores take bf16 A), so
//   the chunk's dz += dl·W[chunk] (gemm_nn) and dW[chunk] = dlᵀ·z (gemm_tn) read it with AMODE 0.
//
// Launch: grid (ceil(T/64), ceil(width/64)), block 128 (gemm.cuh's tile). Elementwise after the
// GEMM: deterministic.
// The vjp runs in HEAD_CHUNKS = 8 vocabulary chunks, each followed at once by its two gradient
// GEMMs, so only a bf16 [T, V/8] slice exists (103 MB at 2048 tokens instead of 0.82 GB) plus an
// f32 [T, H] dz that sums the chunks (the last chunk's gemm_nn adds it and stores bf16). Each
// chunk writes its own rows of dW through `Arg::ValueAt` (the parameter's gradient sum, `offset`
// elements in). The chunks reassociate dz's f32 sum and nothing else; the head GEMMs still see
// ≥ 25k-deep or 25k-wide operands, so the split costs no tensor-core efficiency, only launches.
#include "gemm.cuh"

namespace vp {

template <int V, int H, int C>
__device__ __forceinline__ void head_dl(const bf16* __restrict__ z, const bf16* __restrict__ w,
                                        const int* __restrict__ labels, const unsigned char* __restrict__ mask,
                                        const float* __restrict__ lse, const float* __restrict__ dtok,
                                        bf16* __restrict__ dl, int T, int col0) {
    require_block(gemm_cfg::THREADS);
    static_assert(C % 64 == 0, "chunks are whole tiles");
    const int row0 = blockIdx.x * 64, tile0 = col0 + blockIdx.y * 64, end = min(col0 + C, V);
    if (row0 >= T || tile0 >= end) return;  // whole block
    float acc[2][4][4];
    gemm_mainloop<V, H>(z, w, row0, T, tile0, acc);
    const int lane = threadIdx.x & 31, wm = threadIdx.x >> 6, wn = (threadIdx.x >> 5) & 1;
    const bool pair_ok = aligned(dl, 4);  // C and c − col0 are even
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int r = row0 + wm * 32 + mi * 16 + (lane >> 2) + half * 8;
            if (r >= T) continue;
            const float wt = mask[r] && dtok != nullptr ? dtok[r] : 0.f;
            const int lab = labels[r];
            const float l = lse[r];
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
                const int c = tile0 + wn * 32 + ni * 8 + (lane & 3) * 2;
                if (c >= end) continue;
                float v[2];
#pragma unroll
                for (int j = 0; j < 2; ++j)
                    v[j] = wt == 0.f ? 0.f : wt * (expf(acc[mi][ni][2 * half + j] - l) - (c + j == lab ? 1.f : 0.f));
                store_pair<0>(dl, (size_t)r * C + (c - col0), v[0], v[1], c + 1 < end, pair_ok);
            }
        }
}

}  // namespace vp
