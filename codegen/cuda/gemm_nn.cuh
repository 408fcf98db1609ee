#pragma once
// gemm_nn.cuh: input-gradient GEMM of a linear layer (weight NOT transposed), dense or per expert.
//
//   Y[M, N] = epi(A[M, KD] · W[KD, N] (+ acc[M, N]))       W row-major [KD, N]: the forward weight
//                                                           [out = KD, in = N] as stored
//   EPI_NONE: z      EPI_DRELU2: z · 2·max(aux[r, c], 0)   (ReLU² backward; aux = pre-activation,
//                                                           bf16 [M, N], row stride N)
//   EPI_RESID: z + aux[r, c]   (aux a bf16 running gradient [M, N], row stride N: the router's
//                               vjp with `acc=true`)
//   AMODE 0: A bf16.  AMODE 1: A f32 split on load into hi = bf16(a) and lo = bf16(a − hi), both
//   multiplied (two mma per step): ~16 mantissa bits, the "fp32 GEMM" of the router backward at
//   tensor-core speed.
//   acc (nullable): f32 [M, N] with row stride ldy, added to the product before the epilogue
//   (chains several products into one rounding, e.g. TPA's six input gradients).
//   OUT: 0 bf16, 1 f32.  A has row stride lda (column slices of a wider scratch are fine).
//   E > 0: grouped over experts, rows [offsets[e], offsets[e+1]) use W + e·KD·N (grouped_gemm's
//   block → (expert, tile) mapping on blockIdx.y; grid (ceil(N/64), ceil(M/64) + E)). E = 0: grid
//   (ceil(N/64), ceil(M/64)). Column tiles are the fastest grid axis (unlike gemm.cuh), so the
//   blocks that share one 64-row slab of A run back to back and re-read it from L2, not DRAM: A
//   is the large operand here (the LM head's bf16 [T, V/8] logit-gradient chunk, head_dl.cuh).
//   Row tiles are on y, so T·K/64 + E ≤ 65,535: at most 1M tokens per micro-batch at K = 4.
//
// Block 128: one 64x64 tile of Y, four warps of 32x32 (2x4 mma.sync m16n8k16, f32 accumulate),
// K walked in slices of 32 through a 3-stage ring. bf16 tiles arrive by cp.async (load_chunk8);
// f32 A tiles are loaded and converted synchronously into the same ring (their shared stores
// precede the ring's barrier, so the pipeline order is unchanged). A tile: 64 rows x 32 k, rows
// padded to 80 B (ldmatrix as in gemm.cuh); W tile: 32 k-rows x 64 n, padded to 144 B, read with
// ldmatrix.trans (k pairs per register, like V in attention.cuh). Edges are zero-filled/masked.
// Deterministic: each output element is one thread's fixed-order sum; no atomics.
#include "vp_common.cuh"
#include "gemm.cuh"

namespace vp {

namespace gemm_nn_cfg {
constexpr int BM = GEMM_TILE, BN = GEMM_TILE, BK = 32, STAGES = 3, THREADS = GEMM_NN_THREADS;
constexpr int LDA = BK + 8;  // 80 B rows
constexpr int LDB = BN + 8;  // 144 B rows
}  // namespace gemm_nn_cfg

// Loads 8 consecutive f32 of A (the first n_valid, clamped) and splits them into bf16 hi and lo.
__device__ __forceinline__ void load_f32_split8(bf16* hi, bf16* lo, const float* src, int n_valid, bool vec) {
    float f[8];
    if (vec && n_valid >= 8) {
        const float4 u0 = reinterpret_cast<const float4*>(src)[0];
        const float4 u1 = reinterpret_cast<const float4*>(src)[1];
        f[0] = u0.x; f[1] = u0.y; f[2] = u0.z; f[3] = u0.w;
        f[4] = u1.x; f[5] = u1.y; f[6] = u1.z; f[7] = u1.w;
    } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) f[j] = j < n_valid ? src[j] : 0.f;
    }
    *reinterpret_cast<uint4*>(hi) = pack8(f);
    float r[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) r[j] = f[j] - bf2f(f2bf(f[j]));
    *reinterpret_cast<uint4*>(lo) = pack8(r);
}

template <int N, int KD, int AMODE, int EPI, int OUT, class W>
__device__ __forceinline__ void gemm_nn_tile(const void* __restrict__ a, const W& w_,
                                             const float* acc_in, const bf16* __restrict__ aux, void* y, int row0,
                                             int row_end, int col0, int lda, int ldy) {
    using namespace gemm_nn_cfg;
    static_assert(N > 0 && KD > 0, "empty GEMM");
    static_assert(AMODE == 0 || AMODE == 1, "AMODE");
    static_assert(EPI == EPI_NONE || EPI == EPI_DRELU2 || EPI == EPI_RESID, "gemm_nn epilogue");
    constexpr int KT = (KD + BK - 1) / BK;
    __shared__ __align__(128) bf16 sA[STAGES][BM * LDA];
    __shared__ __align__(128) bf16 sAlo[AMODE == 1 ? STAGES : 1][AMODE == 1 ? BM * LDA : 8];
    __shared__ __align__(128) bf16 sB[STAGES][BK * LDB];

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 1, wn = warp & 1;
    const bf16* abf = reinterpret_cast<const bf16*>(a);
    const float* af = reinterpret_cast<const float*>(a);
    const bool vec_a = AMODE == 0 ? (lda % 8 == 0) && aligned(a, 16) : (lda % 4 == 0) && aligned(a, 16);
    const auto w = as_rows(w_, N);  // row k of W: the forward weight's output unit k
    const bf16* w0 = w.row(0);
    const bool vec_w = (N % 8 == 0) && w.aligned_to(16);

    auto load_tile = [&](int kt, int s) {
        const int k0 = kt * BK;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int c = tid + i * THREADS;
            {  // A: 64 rows x 4 chunks of 8 k
                const int r = c >> 2, kc = (c & 3) * 8;
                const int gr = row0 + r, gk = k0 + kc;
                const int nv = gr < row_end ? KD - gk : 0;
                if (AMODE == 0) {
                    load_chunk8(&sA[s][r * LDA + kc], abf + (size_t)gr * lda + gk, nv, vec_a, abf);
                } else {
                    load_f32_split8(&sA[s][r * LDA + kc], &sAlo[AMODE == 1 ? s : 0][AMODE == 1 ? r * LDA + kc : 0],
                                           af + (size_t)(nv > 0 ? gr : 0) * lda + (nv > 0 ? gk : 0), nv, vec_a);
                }
            }
            {  // W: 32 k-rows x 8 chunks of 8 n
                const int r = c >> 3, nc = (c & 7) * 8;
                const int gk = k0 + r, gn = col0 + nc;
                load_chunk8(&sB[s][r * LDB + nc], gk < KD ? w.row(gk) + gn : w0, gk < KD ? N - gn : 0, vec_w, w0);
            }
        }
    };

    float acc[2][4][4];
    zero_acc(acc);
    cp_async_ring<STAGES>(KT, load_tile, [&](int slot) {
        const bf16* a_s = sA[slot];
        const bf16* b_s = sB[slot];
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
            unsigned int af_[2][4], alo[2][4], b[4][2];
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
                const int off = (wm * 32 + mi * 16 + (lane & 15)) * LDA + kk * 16 + (lane >> 4) * 8;
                ldsm_x4(af_[mi], a_s + off);
                if (AMODE == 1) ldsm_x4(alo[mi], sAlo[AMODE == 1 ? slot : 0] + off);
            }
#pragma unroll
            for (int nj = 0; nj < 2; ++nj) {
                // matrices: (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15)
                unsigned int r[4];
                ldsm_x4_trans(r, b_s + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDB + wn * 32 + nj * 16 +
                                     (lane >> 4) * 8);
                b[2 * nj][0] = r[0];
                b[2 * nj][1] = r[1];
                b[2 * nj + 1][0] = r[2];
                b[2 * nj + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) {
                    mma_bf16_16816(acc[mi][ni], af_[mi], b[ni]);
                    if (AMODE == 1) mma_bf16_16816(acc[mi][ni], alo[mi], b[ni]);
                }
        }
    });

    const bool pair_ok = (ldy % 2 == 0) && aligned(y, OUT ? 8 : 4);
    for_acc_pairs(acc, row0, col0, [&](int r, int c, float v0, float v1) {
        if (r >= row_end || c >= N) return;
        const bool has1 = c + 1 < N;
        const size_t o = (size_t)r * (size_t)ldy + (size_t)c;
        if (acc_in != nullptr) {
            v0 += acc_in[o];
            if (has1) v1 += acc_in[o + 1];
        }
        if (EPI == EPI_DRELU2) {
            const bf16* zr = aux + (size_t)r * N + c;
            v0 *= 2.f * fmaxf(bf2f(zr[0]), 0.f);
            if (has1) v1 *= 2.f * fmaxf(bf2f(zr[1]), 0.f);
        }
        if (EPI == EPI_RESID) {
            const bf16* ar = aux + (size_t)r * N + c;
            v0 = bf2f(ar[0]) + v0;
            if (has1) v1 = bf2f(ar[1]) + v1;
        }
        store_pair<OUT>(y, o, v0, v1, has1, pair_ok);
    });
}

template <int N, int KD, int E, int AMODE, int EPI, int OUT>
__device__ __forceinline__ void gemm_nn(const void* a, const int* offsets, const bf16* w, const float* acc,
                                        const bf16* aux, void* y, int M, int lda, int ldy) {
    constexpr int NT = gemm_nn_cfg::THREADS, BM = gemm_nn_cfg::BM;
    require_block(NT);
    if constexpr (E == 0) {
        const int row0 = blockIdx.y * BM;
        if (row0 >= M) return;  // whole block
        gemm_nn_tile<N, KD, AMODE, EPI, OUT>(a, w, acc, aux, y, row0, M, blockIdx.x * gemm_nn_cfg::BN, lda, ldy);
    } else {
        int row0 = 0, row_end = 0;
        const int e = expert_tile<NT, BM, E>(offsets, blockIdx.y, row0, row_end);
        if (e < 0) return;  // beyond the last tile
        gemm_nn_tile<N, KD, AMODE, EPI, OUT>(a, w + (size_t)e * KD * N, acc, aux, y, row0, row_end,
                                             blockIdx.x * gemm_nn_cfg::BN, lda, ldy);
        (void)M;
    }
}

}  // namespace vp
