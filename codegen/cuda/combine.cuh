#pragma once
// combine.cuh: MoE output combine, out[t] = resid[t] (+ shared[t]) + Σ_k gate[t, k]·yp[row[t·K + k]]
// (H bf16 per token; gates f32).
//
// Launch: grid T, block 128. The token's K (row, gate) pairs go to shared memory; each thread
// owns 8 consecutive features (one 16-byte load per operand when H % 8 == 0 and aligned; H = 1024
// is exactly one chunk per thread), accumulates in f32 in the reference's order (resid, shared,
// then k = 0..K-1) and rounds once. A gather, not a scatter-add, so no atomics: deterministic.
// Limits: memory-bound (K + 2 reads and 1 write of H bf16 per token). Fusing it into the second
// grouped GEMM would need a scatter-add, which gives up determinism.
#include "vp_common.cuh"

namespace vp {

template <int H, int K, int SHARED>
__device__ __forceinline__ void combine(const bf16* __restrict__ yp, const int* __restrict__ row,
                                        const float* __restrict__ gate, const bf16* __restrict__ resid,
                                        const bf16* __restrict__ shared, bf16* __restrict__ out, int T) {
    static_assert(K >= 1 && K <= 128, "top-k must fit the block");
    __shared__ int s_row[K];
    __shared__ float s_gate[K];
    const int t = blockIdx.x, tid = threadIdx.x;
    if (t >= T) return;  // whole block
    if (tid < K) {
        s_row[tid] = row[(size_t)t * K + tid];
        s_gate[tid] = gate[(size_t)t * K + tid];
    }
    __syncthreads();
    const bool vec = (H % 8 == 0) && aligned(yp, 16) && aligned(resid, 16) && aligned(out, 16) &&
                     (!SHARED || aligned(shared, 16));
    if (vec) {
        for (int c = tid; c < H / 8; c += blockDim.x) {
            float acc[8], tmp[8];
            unpack8(reinterpret_cast<const uint4*>(resid + (size_t)t * H)[c], acc);
            if (SHARED) {
                unpack8(reinterpret_cast<const uint4*>(shared + (size_t)t * H)[c], tmp);
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[j] += tmp[j];
            }
#pragma unroll
            for (int kk = 0; kk < K; ++kk) {
                unpack8(reinterpret_cast<const uint4*>(yp + (size_t)s_row[kk] * H)[c], tmp);
                const float gk = s_gate[kk];
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[j] += gk * tmp[j];
            }
            reinterpret_cast<uint4*>(out + (size_t)t * H)[c] = pack8(acc);
        }
    } else {
        for (int i = tid; i < H; i += blockDim.x) {
            float acc = bf2f(resid[(size_t)t * H + i]);
            if (SHARED) acc += bf2f(shared[(size_t)t * H + i]);
            for (int kk = 0; kk < K; ++kk) acc += s_gate[kk] * bf2f(yp[(size_t)s_row[kk] * H + i]);
            out[(size_t)t * H + i] = f2bf(acc);
        }
    }
}

}  // namespace vp
