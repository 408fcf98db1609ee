#pragma once
// rmsnorm_bwd.cuh: RMSNorm backward (MODEL.md §5) for rows of D, with per-block weight-gradient
// partials.
//
//   r = sqrt(mean(x²) + eps), x̂ = x/r, g = dy ⊙ w
//   dx = (1/r)·(g − x̂·mean(g ⊙ x̂))                 (bf16 out)
//   partial[b, :] = Σ_{rows of block b} dy ⊙ x̂      (f32 scratch [gridDim.x, D])
//   dw = Σ_b partial[b, :] in block order, added by the last block to finish (`last_block`,
//        ticket 0) into dw (put_grad with `accum`): dw summed over tokens and heads.
//   dy == nullptr (an output whose gradient is absent): dx = 0 and partials 0.
//   acc != nullptr (a running gradient of x, [rows, D] bf16): dx = bf16(acc + dx) with the sum
//   in f32 and one rounding, so an earlier gradient contribution needs no separate `add`.
//
// Launch: grid NB (a fixed block count, independent of T), block 256. Warp-per-row: warp w of
// block b handles rows b·8 + w, + 8·NB, …; lane l owns elements l, l+32, … (D/32 per lane), so
// the row statistics are warp butterflies and the kernel suits D = 128 (QK-norm, T·heads rows) as
// well as D = 1024. 1/r is computed exactly as the forward rmsnorm kernel does (f32). Each lane
// keeps its dw accumulators in registers across its rows; at the end the 8 warps' accumulators
// are added in warp order through shared memory: a fixed order for a fixed grid, so dw is
// bitwise reproducible.
#include "vp_common.cuh"

namespace vp {

template <int D>
__device__ __forceinline__ void rmsnorm_bwd(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                            const bf16* __restrict__ dy, const bf16* __restrict__ acc,
                                            bf16* __restrict__ dx,
                                            float* __restrict__ partial, int rows, float eps,
                                            float* __restrict__ dw, int* __restrict__ tickets, int accum) {
    constexpr int NT = RMSNORM_BWD_THREADS, NW = NT / 32, CH = (D + 31) / 32;
    static_assert(D >= 1 && D <= 1024, "rmsnorm_bwd: D up to 1024");
    __shared__ float s_w[D];
    __shared__ float s_dw[NW][D];
    require_block(NT);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    for (int i = tid; i < D; i += NT) s_w[i] = bf2f(w[i]);
    __syncthreads();

    float dwacc[CH];
#pragma unroll
    for (int j = 0; j < CH; ++j) dwacc[j] = 0.f;

    const int stride = (int)gridDim.x * NW;
    for (int r = blockIdx.x * NW + warp; r < rows; r += stride) {  // warp-uniform
        const bf16* xr = x + (size_t)r * D;
        const bf16* accr = acc != nullptr ? acc + (size_t)r * D : nullptr;
        bf16* dxr = dx + (size_t)r * D;
        if (dy == nullptr) {
#pragma unroll
            for (int j = 0; j < CH; ++j) {
                const int i = lane + 32 * j;
                if (i < D) dxr[i] = accr != nullptr ? accr[i] : f2bf(0.f);
            }
            continue;
        }
        const bf16* dyr = dy + (size_t)r * D;
        float xv[CH], gv[CH];
        float ss = 0.f;
#pragma unroll
        for (int j = 0; j < CH; ++j) {
            const int i = lane + 32 * j;
            xv[j] = i < D ? bf2f(xr[i]) : 0.f;
            gv[j] = i < D ? bf2f(dyr[i]) : 0.f;
            ss += xv[j] * xv[j];
        }
        const float inv = 1.f / sqrtf(warp_sum(ss) / (float)D + eps);
        float dot = 0.f;
#pragma unroll
        for (int j = 0; j < CH; ++j) {
            const int i = lane + 32 * j;
            const float xh = xv[j] * inv;
            const float gw = i < D ? gv[j] * s_w[i] : 0.f;
            dot += gw * xh;
            dwacc[j] += gv[j] * xh;
        }
        const float c = warp_sum(dot) / (float)D;
#pragma unroll
        for (int j = 0; j < CH; ++j) {
            const int i = lane + 32 * j;
            if (i < D) {
                const float d = inv * (gv[j] * s_w[i] - xv[j] * inv * c);
                dxr[i] = f2bf(accr != nullptr ? bf2f(accr[i]) + d : d);
            }
        }
    }
#pragma unroll
    for (int j = 0; j < CH; ++j) {
        const int i = lane + 32 * j;
        if (i < D) s_dw[warp][i] = dwacc[j];
    }
    __syncthreads();
    for (int i = tid; i < D; i += NT) {
        float s = s_dw[0][i];
#pragma unroll
        for (int wv = 1; wv < NW; ++wv) s += s_dw[wv][i];
        partial[(size_t)blockIdx.x * D + i] = s;
    }
    if (!last_block(tickets, (int)gridDim.x)) return;
    for (int i = tid; i < D; i += NT) put_grad(dw + i, sum_parts_at(partial, D, gridDim.x, i), accum);
}

}  // namespace vp
