#pragma once
// moe_gather.cuh: dispatch backward, dx[t, :] = Σ_k dxp[row[t·K + k], :] (bf16 rows of H, summed
// in f32 in k order, rounded once). A gather over the token's K permuted copies: no scatter-add,
// no atomics, deterministic. acc (nullable): a bf16 [T, H] running gradient of x added first, in
// the same f32 sum (expert_ffn's vjp with `acc=true`).
//
// Launch: grid T, block 128; 16-byte chunks when H % 8 == 0 and aligned, element accesses otherwise.
#include "vp_common.cuh"

namespace vp {

template <int H, int K>
__device__ __forceinline__ void moe_gather(const bf16* __restrict__ dxp, const int* __restrict__ row,
                                           const bf16* __restrict__ acc_in, bf16* __restrict__ dx, int T) {
    static_assert(K >= 1 && K <= 128, "top-k must fit the block");
    __shared__ int s_row[K];
    const int t = blockIdx.x, tid = threadIdx.x;
    if (t >= T) return;  // whole block
    if (tid < K) s_row[tid] = row[(size_t)t * K + tid];
    __syncthreads();
    if (H % 8 == 0 && aligned(dxp, 16) && aligned(dx, 16) && aligned(acc_in, 16)) {
        for (int c = tid; c < H / 8; c += blockDim.x) {
            float acc[8], tmp[8];
            unpack8(reinterpret_cast<const uint4*>(dxp + (size_t)s_row[0] * H)[c], acc);
            if (acc_in != nullptr) {
                unpack8(reinterpret_cast<const uint4*>(acc_in + (size_t)t * H)[c], tmp);
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[j] = tmp[j] + acc[j];
            }
#pragma unroll
            for (int k = 1; k < K; ++k) {
                unpack8(reinterpret_cast<const uint4*>(dxp + (size_t)s_row[k] * H)[c], tmp);
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[j] += tmp[j];
            }
            reinterpret_cast<uint4*>(dx + (size_t)t * H)[c] = pack8(acc);
        }
    } else {
        for (int i = tid; i < H; i += blockDim.x) {
            // acc_in + row 0 first, as the vector path adds them.
            float acc = acc_in != nullptr ? bf2f(acc_in[(size_t)t * H + i]) : 0.f;
            for (int k = 0; k < K; ++k) acc += bf2f(dxp[(size_t)s_row[k] * H + i]);
            dx[(size_t)t * H + i] = f2bf(acc);
        }
    }
}

}  // namespace vp
