#pragma once
// cached_attention.cuh: the decode program's attention over per-sequence key/value caches
// (cached_window_attention, cached_global_attention) and the cache write that follows it.
//
// A call holds new tokens of several sequence slots, each slot's tokens contiguous and in
// ascending positions that continue what the slot's cache holds. Token t (slot s, position p, its
// slot's first token in the call t0 at position p0) attends over positions lo..p of its slot,
// lo = max(0, p − WINDOW + 1) for a window layer, else 0:
//   positions ≥ p0 from the call's own k, v (row t0 + j − p0), earlier ones from the cache:
//   a window layer's ring kcache[s][j % WINDOW], a global layer's pool
//   kcache[blocks[s·blocks_per_slot + j / KV_BLOCK]][j % KV_BLOCK] (rows of GROUPS·D bf16).
//   score(j) = q·k_j / sqrt(D) − slope_h·(p − j) (ALiBi only when ALIBI), softmax with the sink
//   logit (SINKS: it joins the max and the denominator, carries no value), out = Σ_j p_j v_j.
// So a ring of WINDOW positions serves a call of any length (training's masks, position
// differences as distances), and the math is training's attention with f32 probabilities (the
// training kernel rounds them to bf16 for its tensor-core P·V; the parity table covers both).
//
// cached_attention — launch: grid (T, HEADS), block 128. One block per (token, head): q in
// shared f32; keys in chunks of 128, one per thread (the dot product in f32, in dimension
// order); the chunk's max and probability sum by the fixed-order block reductions; an online
// rescale between chunks; each thread owns output dimensions d ≡ tid (mod 128) and sums the
// chunk's p_j·v_j[d] in key order. Deterministic: no atomics, fixed orders. expf is accurate to
// about 2 ulp. A row with no key and no sink gives 0.
// Limits: one block per (token, head) re-reads the group's keys once per head; a decode step at
// long context would stage a key tile in shared memory for all heads of a group (split-K across
// blocks for batch 1, flash-decoding style).
//
// cache_write — launch: grid T, block 128: token t's k and v rows into its slot's cache entry for
// position p. Where a call holds more than WINDOW positions of a slot, only its last WINDOW
// write (the ring keeps those), so no two blocks write one entry. It runs after cached_attention
// (stream order), which reads the cache as it was before the call.
#include "vp_common.cuh"
#include "attention.cuh"

namespace vp {

// First and last index of token t's slot's run of tokens in the call.
__device__ __forceinline__ void slot_run(const int* __restrict__ slot, int T, int t, int& first, int& last) {
    first = t;
    while (first > 0 && slot[first - 1] == slot[t]) --first;
    last = t;
    while (last + 1 < T && slot[last + 1] == slot[t]) ++last;
}

// The cache row (GROUPS·D values) of position j of slot s.
template <int WIDTH, int WINDOW>
__device__ __forceinline__ size_t cache_row(int s, int j, const int* __restrict__ blocks, int blocks_per_slot) {
    if (WINDOW > 0) return ((size_t)s * WINDOW + j % WINDOW) * WIDTH;
    return ((size_t)blocks[(size_t)s * blocks_per_slot + j / KV_BLOCK] * KV_BLOCK + j % KV_BLOCK) * WIDTH;
}

template <int D, int HEADS, int GROUPS, int WINDOW, int ALIBI, int SINKS>
__device__ __forceinline__ void cached_attention(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                                 const bf16* __restrict__ v, const int* __restrict__ pos,
                                                 const int* __restrict__ slot, const float* __restrict__ sinks,
                                                 const bf16* __restrict__ kcache, const bf16* __restrict__ vcache,
                                                 const int* __restrict__ blocks, int blocks_per_slot,
                                                 bf16* __restrict__ out, int T) {
    static_assert(GROUPS >= 1 && HEADS % GROUPS == 0, "heads must be a multiple of kv groups");
    constexpr int NT = CACHED_ATTENTION_THREADS, W = GROUPS * D, DT = (D + NT - 1) / NT;
    __shared__ float sq[D];
    __shared__ float sp[NT];
    require_block(NT);
    const int t = blockIdx.x, h = blockIdx.y, g = h / (HEADS / GROUPS), tid = threadIdx.x;
    if (t >= T) return;  // whole block
    int t0, t1;
    slot_run(slot, T, t, t0, t1);
    const int p = pos[t], s = slot[t], p0 = pos[t0];
    const int lo = WINDOW > 0 ? max(0, p - WINDOW + 1) : 0;
    for (int d = tid; d < D; d += NT) sq[d] = bf2f(q[((size_t)t * HEADS + h) * D + d]);
    __syncthreads();
    const float scale = 1.f / sqrtf((float)D);
    const float slope = ALIBI ? alibi_slope(h, HEADS) : 0.f;
    float m = SINKS ? sinks[h] : neg_inf(), l = 0.f;  // running max, denominator (without sink)
    float o[DT];
#pragma unroll
    for (int i = 0; i < DT; ++i) o[i] = 0.f;
    for (int c0 = lo; c0 <= p; c0 += NT) {
        const int j = c0 + tid;
        float sc = neg_inf();
        if (j <= p) {
            const bf16* kj = j >= p0 ? k + (size_t)(t0 + j - p0) * W + g * D
                                     : kcache + cache_row<W, WINDOW>(s, j, blocks, blocks_per_slot) + g * D;
            float dot = 0.f;
            for (int d = 0; d < D; ++d) dot += sq[d] * bf2f(kj[d]);
            sc = dot * scale - (ALIBI ? slope * (float)(p - j) : 0.f);
        }
        const float mn = fmaxf(m, block_max<NT>(sc));
        const float ref = mn == neg_inf() ? 0.f : mn;  // nothing seen yet: any finite reference
        const float pj = expf(sc - ref);                // masked: exp(-inf) = 0
        sp[tid] = pj;
        const float alpha = expf(m - ref);  // 0 when m was -inf
        l = l * alpha + block_sum<NT>(pj);  // block_sum's barrier also publishes sp
        m = mn;
        const int n = min(NT, p - c0 + 1);
#pragma unroll
        for (int i = 0; i < DT; ++i) {
            const int d = tid + i * NT;
            if (d >= D) break;
            float acc = o[i] * alpha;
            for (int u = 0; u < n; ++u) {
                const int ju = c0 + u;
                const bf16* vj = ju >= p0 ? v + (size_t)(t0 + ju - p0) * W + g * D
                                          : vcache + cache_row<W, WINDOW>(s, ju, blocks, blocks_per_slot) + g * D;
                acc += sp[u] * bf2f(vj[d]);
            }
            o[i] = acc;
        }
        __syncthreads();  // sp is rewritten by the next chunk
    }
    float den = l;
    if (SINKS) den += expf(sinks[h] - m);  // m ≥ sink, so this is in (0, 1]
    const float inv = den > 0.f ? 1.f / den : 0.f;
#pragma unroll
    for (int i = 0; i < DT; ++i) {
        const int d = tid + i * NT;
        if (d < D) out[((size_t)t * HEADS + h) * D + d] = f2bf(o[i] * inv);
    }
}

template <int WIDTH, int WINDOW>
__device__ __forceinline__ void cache_write(const bf16* __restrict__ k, const bf16* __restrict__ v,
                                            const int* __restrict__ pos, const int* __restrict__ slot,
                                            const int* __restrict__ blocks, int blocks_per_slot,
                                            bf16* __restrict__ kcache, bf16* __restrict__ vcache, int T) {
    const int t = blockIdx.x;
    if (t >= T) return;  // whole block
    int t0, t1;
    slot_run(slot, T, t, t0, t1);
    if (WINDOW > 0 && pos[t1] - pos[t] >= WINDOW) return;  // a later token of the call takes the entry
    const size_t row = cache_row<WIDTH, WINDOW>(slot[t], pos[t], blocks, blocks_per_slot);
    for (int i = threadIdx.x; i < WIDTH; i += CACHE_WRITE_THREADS) {
        kcache[row + i] = k[(size_t)t * WIDTH + i];
        vcache[row + i] = v[(size_t)t * WIDTH + i];
    }
}

}  // namespace vp
