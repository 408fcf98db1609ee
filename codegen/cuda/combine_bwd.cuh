#pragma once
// combine_bwd.cuh: MoE combine backward, one token per block (H bf16 per row, gates f32):
//   dyp[row[t·K + k], :] = gate[t, k]·dh[t, :]          (every permuted row written exactly once)
//   dgate[t, k] = Σ_i dh[t, i]·yp[row[t·K + k], i]      (f32, fixed-order block reduction)
// The residual's and the shared expert's gradients are dh itself (IR `Op::passthrough`): no copy.
//
// Launch: grid T, block 128 (require_block: the dot products use block_sum<128>). Each thread
// owns 8 consecutive features on the 16-byte path (H % 8 == 0, aligned), element strides
// otherwise. Deterministic.
#include "vp_common.cuh"

namespace vp {

template <int H, int K>
__device__ __forceinline__ void combine_bwd(const bf16* __restrict__ yp, const int* __restrict__ row,
                                            const float* __restrict__ gate, const bf16* __restrict__ dh,
                                            bf16* __restrict__ dyp, float* __restrict__ dgate, int T) {
    constexpr int NT = COMBINE_BWD_THREADS;
    static_assert(K >= 1 && K <= NT, "top-k must fit the block");
    __shared__ int s_row[K];
    __shared__ float s_gate[K];
    require_block(NT);
    const int t = blockIdx.x, tid = threadIdx.x;
    if (t >= T) return;  // whole block
    if (tid < K) {
        s_row[tid] = row[(size_t)t * K + tid];
        s_gate[tid] = gate[(size_t)t * K + tid];
    }
    __syncthreads();
    const bf16* g = dh + (size_t)t * H;
    float dot[K];
#pragma unroll
    for (int k = 0; k < K; ++k) dot[k] = 0.f;
    const bool vec = (H % 8 == 0) && aligned(yp, 16) && aligned(dh, 16) && aligned(dyp, 16);
    if (vec) {
        for (int c = tid; c < H / 8; c += NT) {
            const uint4 gu = reinterpret_cast<const uint4*>(g)[c];
            float gv[8], yv[8], o[8];
            unpack8(gu, gv);
#pragma unroll
            for (int k = 0; k < K; ++k) {
                unpack8(reinterpret_cast<const uint4*>(yp + (size_t)s_row[k] * H)[c], yv);
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    dot[k] += gv[j] * yv[j];
                    o[j] = s_gate[k] * gv[j];
                }
                reinterpret_cast<uint4*>(dyp + (size_t)s_row[k] * H)[c] = pack8(o);
            }
        }
    } else {
        for (int i = tid; i < H; i += NT) {
            const bf16 gb = g[i];
            const float gv = bf2f(gb);
            for (int k = 0; k < K; ++k) {
                dot[k] += gv * bf2f(yp[(size_t)s_row[k] * H + i]);
                dyp[(size_t)s_row[k] * H + i] = f2bf(s_gate[k] * gv);
            }
        }
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
        const float s = block_sum<NT>(dot[k]);
        if (tid == 0) dgate[(size_t)t * K + k] = s;
    }
}

}  // namespace vp
