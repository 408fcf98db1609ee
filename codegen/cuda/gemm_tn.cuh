#pragma once
// gemm_tn.cuh: weight-gradient GEMM, fp32 output, dense (optionally split over rows) or per expert.
//
//   Y[N, K] = Σ_{m in range} A[m, n] · B'[m, k]        (dW = dYᵀ·X of a linear layer)
//   A: [M, ≥N] row stride lda (the output gradient; AMODE as gemm_nn: 0 bf16, 1 f32 split into
//      hi+lo). B: bf16 [M, ≥K] row stride ldb (the layer input); BRELU2: B' = ReLU²(B)
//      (B holds a pre-activation z; the product uses bf16(max(z, 0)²), applied to the fragments in
//      registers), else B' = B. With `bsrc` (E > 0 only), row m of B is row bsrc[m] of b: the
//      first expert layer's input read through the dispatch permutation.
//   Grid (ceil(K/64), ceil(N/64), Z), block 128: the k tiles are the fastest axis, so the blocks
//   that stream the same 64 columns of A over all rows run back to back and share them through
//   L2 (A is the large operand: the LM head's bf16 [T, V/8] logit-gradient chunk). Slice
//   z = blockIdx.z writes Y + z·N·K:
//     E > 0: z is the expert, rows [offsets[e], offsets[e+1]) (Z = E; an empty expert writes 0);
//     E = 0: rows [z·ch, min(M, (z+1)·ch)), ch = ceil(M/Z). Z = 1 writes the gradient itself;
//            Z > 1 (a split-K for small outputs such as the TPA factors or the router) stores Z
//            partial sums in Y, and the last of a tile's Z blocks to finish (`last_block`, one
//            ticket per (x, y) tile) adds them in slice order into `out` [N, K].
//   accum: the gradient (Y, or `out` when split) is added into (put_grad) instead of stored,
//   where it is a gradient sum. `out` and `tickets` are null unless E = 0 and Z > 1.
//   BIAS (AMODE 0 only): the layer's bias gradient db[n] = Σ_m A[m, n] comes out of the same
//   launch: the k-tile-0 blocks (blockIdx.x = 0) also sum the A tiles they stage, column by
//   column, into db + z·N (E > 0: one row per expert), or, when split, into partial rows
//   Y + Z·N·K + z·N that the tile's last block adds in slice order. The same `accum` applies (W
//   and b of one layer are summed alike). So the separate colsum pass over A is not needed. An f32
//   A (AMODE 1, the router) is staged as bf16 hi + lo, which is not its exact value, so its bias
//   gradient is a colsum.
//   The body (`gemm_tn_rows`) writes the gradient's rows through a row map (`Rows`, or
//   `RowBlocks` for tpa_wgrad's six weights).
//
// Tiles: 64 (n) x 64 (k) outputs per block, four warps of 32x32; the reduction dimension m is
// walked in slices of 32 through a 3-stage ring. Both operand tiles are stored as loaded (32 m-rows
// x 64 columns, rows padded to 144 B) and read with ldmatrix.trans, which yields exactly the
// m-pairs the mma fragments need (Aᵀ as the row-major A operand, B as the "col" B operand).
// Deterministic: each output element is one thread's fixed-order sum over its range, and a split's
// partials are added in slice order whichever block adds them.
#include "vp_common.cuh"
#include "gemm_nn.cuh"

namespace vp {

namespace gemm_tn_cfg {
constexpr int BN = GEMM_TILE, BK2 = GEMM_TILE, BM = 32, STAGES = 3, THREADS = GEMM_TN_THREADS;
constexpr int LDT = 64 + 8;  // 144 B rows
}  // namespace gemm_tn_cfg

__device__ __forceinline__ unsigned int relu2_bf2(unsigned int u) {
    float lo = fmaxf(bf_lo(u), 0.f), hi = fmaxf(bf_hi(u), 0.f);
    return pack_bf2(lo * lo, hi * hi);
}

// A split's second stage: the last of a tile's gridDim.z blocks adds the partials into `out`.
// Not inlined: its registers stay out of the main loop's count.
template <int N, int K, int BIAS, class D>
__device__ VP_NOINLINE void gemm_tn_finish(const float* y, const D out, float* db, int* tickets, int accum) {
    using namespace gemm_tn_cfg;
    if (!last_block(tickets + blockIdx.y * gridDim.x + blockIdx.x, (int)gridDim.z)) return;
    const int n0 = blockIdx.y * BN, k0 = blockIdx.x * BK2;
    for (int i = threadIdx.x; i < BN * BK2; i += THREADS) {
        const int r = n0 + i / BK2, c = k0 + i % BK2;
        if (r < N && c < K) put_grad(out.row(r) + c, sum_parts_at(y, (size_t)N * K, gridDim.z, (size_t)r * K + c), accum);
    }
    if constexpr (BIAS) {
        const int n = n0 + threadIdx.x;
        if (blockIdx.x == 0 && threadIdx.x < BN && n < N)
            put_grad(db + n, sum_parts_at(y + (size_t)gridDim.z * N * K, N, gridDim.z, n), accum);
    }
}

// The kernel body: the gradient's rows go to `dst` (`Rows` or `RowBlocks`, row stride K): written
// by the tiles themselves, or, when split, by the finish while the tiles store partials in `y`.
template <int N, int K, int E, int AMODE, int BRELU2, int BIAS, class D>
__device__ __forceinline__ void gemm_tn_rows(const void* a, const bf16* b, const int* bsrc, const int* offsets,
                                             float* y, int M, int lda, int ldb, int accum, const D& dst, float* db,
                                             int* tickets) {
    using namespace gemm_tn_cfg;
    static_assert(N > 0 && K > 0, "empty GEMM");
    static_assert(AMODE == 0 || AMODE == 1, "AMODE");
    // The staged hi + lo of an f32 A is not its exact value: its column sums stay with colsum.
    static_assert(BIAS == 0 || AMODE == 0, "BIAS needs a bf16 A");
    __shared__ __align__(128) bf16 sA[STAGES][BM * LDT];
    __shared__ __align__(128) bf16 sAlo[AMODE == 1 ? STAGES : 1][AMODE == 1 ? BM * LDT : 8];
    __shared__ __align__(128) bf16 sB[STAGES][BM * LDT];
    require_block(THREADS);

    const int z = blockIdx.z;
    int m_beg, m_end;
    if constexpr (E > 0) {
        m_beg = offsets[z];
        m_end = offsets[z + 1];
    } else {
        const int ch = cdiv(M, (int)gridDim.z);
        m_beg = min(M, z * ch);
        m_end = min(M, m_beg + ch);
    }
    const bool split = E == 0 && gridDim.z > 1;
    const int yaccum = split ? 0 : accum;  // partials are stored; the sum goes into `out`
    float* yz = y + (size_t)z * N * K;
    const int n0 = blockIdx.y * BN, k0 = blockIdx.x * BK2;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 1, wn = warp & 1;
    const int MT = cdiv(m_end - m_beg, BM);

    const bf16* abf = reinterpret_cast<const bf16*>(a);
    const float* af = reinterpret_cast<const float*>(a);
    const bool vec_a = AMODE == 0 ? (lda % 8 == 0) && aligned(a, 16) : (lda % 4 == 0) && aligned(a, 16);
    const bool vec_b = (ldb % 8 == 0) && aligned(b, 16);

    auto load_tile = [&](int mt, int s) {
        const int m0 = m_beg + mt * BM;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int c = tid + i * THREADS;
            const int r = c >> 3, cc = (c & 7) * 8;  // 32 rows x 8 chunks of 8
            const int gm = m0 + r;
            const bool rv = gm < m_end;
            {
                const int gn = n0 + cc;
                const int nv = rv ? N - gn : 0;
                if (AMODE == 0) {
                    load_chunk8(&sA[s][r * LDT + cc], abf + (size_t)gm * lda + gn, nv, vec_a, abf);
                } else {
                    load_f32_split8(&sA[s][r * LDT + cc], &sAlo[AMODE == 1 ? s : 0][AMODE == 1 ? r * LDT + cc : 0],
                                           af + (nv > 0 ? (size_t)gm * lda + gn : 0), nv, vec_a);
                }
            }
            {
                const int gk = k0 + cc;
                const int bm = rv && bsrc != nullptr ? bsrc[gm] : gm;
                load_chunk8(&sB[s][r * LDT + cc], b + (size_t)bm * ldb + gk, rv ? K - gk : 0, vec_b, b);
            }
        }
    };

    float acc[2][4][4];
    zero_acc(acc);
    // Bias: thread t sums columns n0 + 2(t % 32) + {0, 1} over rows 8(t / 32) .. +7 of each staged
    // A slice (rows past the range and columns past N are staged as zeros) and adds that into its
    // own two running sums in sBias, slice by slice (in shared memory, not registers: the main
    // loop's register count stays that of the plain GEMM).
    __shared__ float sBias[4][BN];
    if constexpr (BIAS) {
        sBias[warp][2 * lane] = 0.f;
        sBias[warp][2 * lane + 1] = 0.f;
    }
    cp_async_ring<STAGES>(MT, load_tile, [&](int slot) {
        const bf16* a_s = sA[slot];
        const bf16* b_s = sB[slot];
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk) {
            unsigned int fa[2][4], fl[2][4], fb[4][2];
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
                // matrices: (m 0-7, n 0-7), (m 0-7, n 8-15), (m 8-15, n 0-7), (m 8-15, n 8-15) of the
                // stored tile; transposed they are A-fragment registers a0..a3 of Aᵀ (rows n, cols m).
                const int off = (kk * 16 + (lane & 7) + (lane >> 4) * 8) * LDT + wm * 32 + mi * 16 + ((lane >> 3) & 1) * 8;
                ldsm_x4_trans(fa[mi], a_s + off);
                if (AMODE == 1) ldsm_x4_trans(fl[mi], sAlo[AMODE == 1 ? slot : 0] + off);
            }
#pragma unroll
            for (int nj = 0; nj < 2; ++nj) {
                unsigned int r[4];
                ldsm_x4_trans(r, b_s + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDT + wn * 32 + nj * 16 +
                                     (lane >> 4) * 8);
                if (BRELU2) {
#pragma unroll
                    for (int j = 0; j < 4; ++j) r[j] = relu2_bf2(r[j]);
                }
                fb[2 * nj][0] = r[0];
                fb[2 * nj][1] = r[1];
                fb[2 * nj + 1][0] = r[2];
                fb[2 * nj + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) {
                    mma_bf16_16816(acc[mi][ni], fa[mi], fb[ni]);
                    if (AMODE == 1) mma_bf16_16816(acc[mi][ni], fl[mi], fb[ni]);
                }
        }
        // After the slice's MMAs, so its loads do not hold registers beside their fragments.
        if constexpr (BIAS) {
            if (blockIdx.x == 0) {
                float s0 = 0.f, s1 = 0.f;
#pragma unroll
                for (int i = 0; i < BM / 4; ++i) {
                    const unsigned int u =
                        *reinterpret_cast<const unsigned int*>(a_s + ((warp * (BM / 4) + i) * LDT + 2 * lane));
                    s0 += bf_lo(u);
                    s1 += bf_hi(u);
                }
                sBias[warp][2 * lane] += s0;
                sBias[warp][2 * lane + 1] += s1;
            }
        }
    });

    const bool pair_ok = (K % 2 == 0) && (split ? aligned(y, 8) : dst.aligned_to(8));
    for_acc_pairs(acc, n0, k0, [&](int r, int c, float v0, float v1) {
        if (r >= N || c >= K) return;
        const bool has1 = c + 1 < K;
        float* yo = split ? yz + (size_t)r * K + c : dst.row(r) + c;
        if (has1 && pair_ok) {
            float2* y2 = reinterpret_cast<float2*>(yo);
            if (yaccum) {
                const float2 old = *y2;
                v0 = old.x + v0;
                v1 = old.y + v1;
            }
            *y2 = make_float2(v0, v1);
        } else {
            put_grad(yo, v0, yaccum);
            if (has1) put_grad(yo + 1, v1, yaccum);
        }
    });

    if constexpr (BIAS) {
        if (blockIdx.x == 0) {
            // The four row groups' sums per column, added in group order.
            __syncthreads();
            const int n = n0 + tid;
            if (tid < BN && n < N) {
                const float s = ((sBias[0][tid] + sBias[1][tid]) + sBias[2][tid]) + sBias[3][tid];
                if (split) y[(size_t)gridDim.z * N * K + (size_t)z * N + n] = s;
                else put_grad(db + (size_t)z * N + n, s, accum);
            }
        }
    }
    if (split) gemm_tn_finish<N, K, BIAS>(y, dst, db, tickets, accum);
}

template <int N, int K, int E, int AMODE, int BRELU2, int BIAS>
__device__ __forceinline__ void gemm_tn(const void* a, const bf16* b, const int* bsrc, const int* offsets, float* y,
                                        int M, int lda, int ldb, int accum, float* out, float* db, int* tickets) {
    const bool split = E == 0 && gridDim.z > 1;
    const Rows<float> dst{split ? out : y + (size_t)blockIdx.z * N * K, K};
    gemm_tn_rows<N, K, E, AMODE, BRELU2, BIAS>(a, b, bsrc, offsets, y, M, lda, ldb, accum, dst, db, tickets);
}

}  // namespace vp
