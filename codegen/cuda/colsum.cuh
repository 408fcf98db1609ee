#pragma once
// colsum.cuh: column sums over all rows (bias gradients of an f32 A, sink gradients), f32 out.
//
//   out[c] = Σ_r x[r, c]       x: [rows, N] bf16 or f32 (IN_F32), row stride N
//   Block p sums rows [p·ch, min(rows, (p+1)·ch)), ch = ceil(rows/P), P = gridDim.x (grid (P,
//   ceil(N/256))), into partial row p of `parts` [P, N]; the last of a column block's P blocks to
//   finish (`last_block`, ticket blockIdx.y) adds the P partials in order into `out`. So a long
//   column is summed by P blocks in parallel. (The bias gradient of a layer with a bf16 output
//   gradient comes from its weight-gradient launch instead: gemm_tn's BIAS.)
//
// `accum`: add into `out` (put_grad).
//
// Block 256: thread c owns one column and sums its rows in ascending order in f32 (D9); loads are
// coalesced across the block. Deterministic: a fixed sequential order per output; the partials
// are added in range order whichever block adds them.
#include "vp_common.cuh"

namespace vp {

// The body shared with qkv_colsum.cuh: `col(c, r0, r1)` is column c's f32 sum over rows [r0, r1)
// in ascending order.
template <int N, class Col>
__device__ __forceinline__ void colsum_body(const Col& col, float* __restrict__ out, int rows, int accum,
                                            float* __restrict__ parts, int* __restrict__ tickets) {
    const int p = blockIdx.x;
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    const int ch = cdiv(rows, (int)gridDim.x);
    const int r0 = min(rows, p * ch), r1 = min(rows, r0 + ch);
    if (c < N) parts[(size_t)p * N + c] = col(c, r0, r1);
    if (!last_block(tickets + blockIdx.y, (int)gridDim.x)) return;
    if (c < N) put_grad(out + c, sum_parts_at(parts, N, gridDim.x, c), accum);
}

// Column c of a bf16 matrix whose rows are `stride` elements apart, from `x` (its row 0 entry).
__device__ __forceinline__ float colsum_bf16(const bf16* __restrict__ x, size_t stride, int r0, int r1) {
    float s = 0.f;
    for (int r = r0; r < r1; ++r) s += bf2f(x[(size_t)r * stride]);
    return s;
}

template <int N, int IN_F32>
__device__ __forceinline__ void colsum(const void* __restrict__ x, float* __restrict__ out, int rows, int accum,
                                       float* __restrict__ parts, int* __restrict__ tickets) {
    colsum_body<N>(
        [&](int c, int r0, int r1) {
            if (!IN_F32) return colsum_bf16(reinterpret_cast<const bf16*>(x) + c, N, r0, r1);
            const float* xf = reinterpret_cast<const float*>(x) + c;
            float s = 0.f;
            for (int r = r0; r < r1; ++r) s += xf[(size_t)r * N];
            return s;
        },
        out, rows, accum, parts, tickets);
}

}  // namespace vp
