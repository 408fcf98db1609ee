#pragma once
// embed.cuh: token embedding gather, out[t, :] = table[tokens[t], :] (bf16 rows of H).
//
// Launch: grid T, block 128: one block per token, 16-byte copies when H % 8 == 0 and both tables
// are 16-byte aligned (H = 1024: one uint4 per thread), element copies otherwise. Token ids are
// validated against the vocabulary on the host before upload. Pure copy: bitwise deterministic.
// Limits: bandwidth-bound and coalesced. Fusing the gather into the first RMSNorm would save one
// write and one read of [T, H].
#include "vp_common.cuh"

namespace vp {

template <int H>
__device__ __forceinline__ void embed(const int* __restrict__ tokens, const bf16* __restrict__ table,
                                      bf16* __restrict__ out, int T) {
    const int t = blockIdx.x;
    if (t >= T) return;
    const bf16* src = table + (size_t)tokens[t] * H;
    bf16* dst = out + (size_t)t * H;
    if (H % 8 == 0 && aligned(table, 16) && aligned(out, 16)) {
        const uint4* s4 = reinterpret_cast<const uint4*>(src);
        uint4* d4 = reinterpret_cast<uint4*>(dst);
        for (int c = threadIdx.x; c < H / 8; c += blockDim.x) d4[c] = s4[c];
    } else {
        for (int i = threadIdx.x; i < H; i += blockDim.x) dst[i] = src[i];
    }
}

}  // namespace vp
