#pragma once
// embed_bwd.cuh: second stage of the deterministic embedding backward (after embed_sort):
//   dtable[v, :] = Σ_{t : tokens[t] == v, ascending t} dh[t, :]     (f32 [V, H], every row written)
//
// Launch: grid V (one vocabulary row per block), block 128. For each 2048-token chunk in order the
// block binary-searches the chunk's sorted ids for the first v (all threads walk the same search,
// so the loads are broadcasts) and then adds the matching dh rows in their (ascending) token
// order; thread i owns columns i, i + 128, … with f32 accumulators (H/128 per thread). A row no
// token uses costs one search per chunk and a store of zeros. Sort-free for the vocabulary, no
// atomics, and the sum order is exactly the token order: bitwise deterministic. `accum`: the row
// is added into dtable (put_grad).
// Limits: each vocabulary row costs one dependent binary search (11 steps) per 2048-token chunk
// plus a store of its H f32 values (823 MB for the locked table, every step); at T = 64k that is
// 32 searches per row. A per-chunk table of first occurrences, or one block per run of distinct
// ids, would remove most of them.
#include "vp_common.cuh"

namespace vp {

template <int H>
__device__ __forceinline__ void embed_bwd(const int* __restrict__ sorted, const bf16* __restrict__ dh,
                                          float* __restrict__ dtable, int T, int V,
                                          int accum) {
    constexpr int NT = EMBED_BWD_THREADS, CH = EMBED_SORT_CHUNK, HJ = (H + NT - 1) / NT;
    require_block(NT);
    const int v = blockIdx.x, tid = threadIdx.x;
    if (v >= V) return;  // whole block
    float acc[HJ];
#pragma unroll
    for (int j = 0; j < HJ; ++j) acc[j] = 0.f;
    for (int c0 = 0; c0 < T; c0 += CH) {
        const int n = min(CH, T - c0);
        const int* ids = sorted + 2 * (size_t)c0;
        int lo = 0, hi = n;  // first slot with id >= v
        while (lo < hi) {
            const int mid = (lo + hi) >> 1;
            if (ids[2 * mid] < v)
                lo = mid + 1;
            else
                hi = mid;
        }
        for (int i = lo; i < n && ids[2 * i] == v; ++i) {
            const bf16* g = dh + (size_t)ids[2 * i + 1] * H;
#pragma unroll
            for (int j = 0; j < HJ; ++j) {
                const int col = tid + NT * j;
                if (col < H) acc[j] += bf2f(g[col]);
            }
        }
    }
    float* out = dtable + (size_t)v * H;
#pragma unroll
    for (int j = 0; j < HJ; ++j) {
        const int col = tid + NT * j;
        if (col < H) put_grad(out + col, acc[j], accum);
    }
}

}  // namespace vp
