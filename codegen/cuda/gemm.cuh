#pragma once
// gemm.cuh: dense linear layer on tensor cores.
//
//   Y[M, N] = epi(X[M, KD] · W[N, KD]ᵀ (+ bias[N]))       Y row stride `ldy`, f32 or bf16 (OUT)
//   EPI_NONE: z     EPI_RELU2: max(z, 0)²     EPI_RESID: z + resid[M, N] (resid row stride N)
//   EPI_POLY: ec·z + eb·resid[M, N] + ea·[row == col]   (Polar Express's a·I + b·A + c·A·A, optim.cuh)
//
// Launch: grid (ceil(M/64), ceil(N/64)), block 128. Each block computes one 64x64 tile of Y; its
// four warps form a 2x2 grid of 32x32 warp tiles, each 2x4 mma.sync m16n8k16 (bf16 in, f32
// accumulate). K is walked in slices of 32 through a 3-stage cp.async ring in static shared
// memory (30 KB, rows padded to 80 bytes so the ldmatrix row reads hit 8 distinct bank groups).
// N and KD are compile-time; neither has to be a multiple of 64 or 8: edge rows/columns/K are
// zero-filled on load and masked on store, and when KD % 8 != 0 or a pointer is not 16-byte
// aligned the loader falls back to element copies (still correct, slower).
// Deterministic: every output element is one thread's fixed-order sum; no atomics.
//
// Fragments: A from ldmatrix.x4 (rows lane % 16, k-half lane / 16); B from ldmatrix.x4 over W's
// [n][k] rows, which is exactly the mma's "col" operand. The epilogue runs straight from the
// accumulator fragments: bias, then ReLU², then the residual, in the reference's order; column
// pairs are stored as bf16x2 / float2 when ldy % 2 == 0 and Y is aligned, element by element
// otherwise. The weight operand is any row-addressed matrix (`Rows` or `RowBlocks`, vp_common.cuh):
// a plain pointer, or up to six separately allocated row blocks (tpa_proj.cuh).
//
// Shared with the other tensor-core families: `gemm_mainloop` (the tile's K loop, also head_lse's
// and head_dl's), `gemm_tile` (the whole tile: grouped_gemm on one expert's ragged row range,
// tpa_proj, the optimizer's pe_gram and pe_poly), `for_acc_pairs` and `store_pair` (the
// accumulator walk and pair store of gemm_nn, gemm_tn and head_dl too) and `expert_tile`
// (grouped_gemm, grouped gemm_nn).
//
// Limits on H100: mma.sync runs at roughly half of Hopper's dense bf16 peak. The next step that
// fits this contract is one warpgroup per block (the block already is one, on one 64x64 tile)
// issuing wgmma.m64n64k16 from 128B-swizzled shared memory fed by TMA (cp.async.bulk.tensor) with
// mbarrier stages. Larger tiles (128x128 or 128x256 with two warpgroups) would change the
// contract's grid and block. Epilogue stores are 8 or 4 bytes per thread; staging through shared
// memory for 16-byte or TMA stores would help f32 outputs most.
#include "vp_common.cuh"

namespace vp {

namespace gemm_cfg {
constexpr int BM = GEMM_TILE, BN = GEMM_TILE, BK = 32, STAGES = 3, THREADS = GEMM_THREADS;
constexpr int LDS = BK + 8;  // shared row stride in bf16 (80 bytes: conflict-free ldmatrix)
}  // namespace gemm_cfg

// The f32 accumulators of one 64x64 tile: rows [row0, min(row0 + 64, row_end)) of x (row stride
// KD) times columns [col0, min(col0 + 64, N)) of W (rows of w, row stride KD); rows and columns
// past the edge hold 0. `acc[mi][ni][e]` is element (row, col) of the tile with
//   row = (warp >> 1)*32 + mi*16 + (lane >> 2) + (e >> 1)*8,  col = (warp & 1)*32 + ni*8 + (lane & 3)*2 + (e & 1).
// With `gather`, tile row r reads row gather[r] of x (grouped_gemm reading tokens through the
// dispatch permutation instead of a permuted copy). Must be called by all 128 threads.
template <int N, int KD, class W>
__device__ __forceinline__ void gemm_mainloop(const bf16* __restrict__ x, const W& w_, int row0, int row_end, int col0,
                                              float (&acc)[2][4][4], const int* __restrict__ gather = nullptr) {
    using namespace gemm_cfg;
    static_assert(N > 0 && KD > 0, "empty GEMM");
    constexpr int KT = (KD + BK - 1) / BK;
    __shared__ __align__(128) bf16 sA[STAGES][BM * LDS];
    __shared__ __align__(128) bf16 sB[STAGES][BN * LDS];

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 1, wn = warp & 1;  // warp tile: rows wm*32.., cols wn*32..
    const auto w = as_rows(w_, KD);
    const bf16* w0 = w.row(0);
    const bool vec_x = (KD % 8 == 0) && aligned(x, 16);
    const bool vec_w = (KD % 8 == 0) && w.aligned_to(16);

    // The two A rows this thread loads are the same in every K tile: resolve them once.
    const bf16* xrow[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int gr = row0 + ((tid + i * THREADS) >> 2);
        xrow[i] = gr < row_end ? x + (size_t)(gather != nullptr ? gather[gr] : gr) * KD : nullptr;
    }

    // Tile kt (K columns kt*32 .. +32) into ring slot s: 64 rows x 4 chunks of 8 for A and for B,
    // 2 chunks of each per thread.
    auto load_tile = [&](int kt, int s) {
        const int k0 = kt * BK;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int c = tid + i * THREADS;
            const int r = c >> 2, kc = (c & 3) * 8;
            const int gk = k0 + kc;
            const int gn = col0 + r;
            load_chunk8(&sA[s][r * LDS + kc], xrow[i] != nullptr ? xrow[i] + gk : x, xrow[i] != nullptr ? KD - gk : 0,
                        vec_x, x);
            load_chunk8(&sB[s][r * LDS + kc], gn < N ? w.row(gn) + gk : w0, gn < N ? KD - gk : 0, vec_w, w0);
        }
    };

    zero_acc(acc);
    cp_async_ring<STAGES>(KT, load_tile, [&](int slot) {
        const bf16* a_s = sA[slot];
        const bf16* b_s = sB[slot];
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
            unsigned int a[2][4], b[4][2];
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)
                ldsm_x4(a[mi], a_s + (wm * 32 + mi * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8);
#pragma unroll
            for (int nj = 0; nj < 2; ++nj) {
                // matrices: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
                unsigned int r[4];
                ldsm_x4(r, b_s + (wn * 32 + nj * 16 + (lane & 7) + ((lane >> 4) << 3)) * LDS + kk * 16 +
                               ((lane >> 3) & 1) * 8);
                b[2 * nj][0] = r[0];
                b[2 * nj][1] = r[1];
                b[2 * nj + 1][0] = r[2];
                b[2 * nj + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) mma_bf16_16816(acc[mi][ni], a[mi], b[ni]);
        }
    });
}

// f(r, c, v0, v1) for each accumulator pair of a 64x64 tile from gemm_mainloop (or a mainloop
// of the same fragment layout): v0, v1 are the tile's elements (r, c), (r, c + 1), r counted from
// row0 and c from col0; each thread owns column pairs of rows g and g + 8 of each 16x8 piece.
template <class F>
__device__ __forceinline__ void for_acc_pairs(const float (&acc)[2][4][4], int row0, int col0, F&& f) {
    const int lane = threadIdx.x & 31, wm = threadIdx.x >> 6, wn = (threadIdx.x >> 5) & 1;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int half = 0; half < 2; ++half)
                f(row0 + wm * 32 + mi * 16 + (lane >> 2) + half * 8, col0 + wn * 32 + ni * 8 + (lane & 3) * 2,
                  acc[mi][ni][2 * half], acc[mi][ni][2 * half + 1]);
}

// Element o and, when `has1`, o + 1 of y (f32 when OUT, else bf16) = (v0, v1): one 8- or 4-byte
// store when the pair exists and `pair_ok` (y and its row stride allow it), else one by one.
template <int OUT>
__device__ __forceinline__ void store_pair(void* __restrict__ y, size_t o, float v0, float v1, bool has1, bool pair_ok) {
    if (OUT) {
        float* yo = reinterpret_cast<float*>(y) + o;
        if (has1 && pair_ok) {
            *reinterpret_cast<float2*>(yo) = make_float2(v0, v1);
        } else {
            yo[0] = v0;
            if (has1) yo[1] = v1;
        }
    } else {
        bf16* yo = reinterpret_cast<bf16*>(y) + o;
        if (has1 && pair_ok) {
            *reinterpret_cast<unsigned int*>(yo) = pack_bf2(v0, v1);
        } else {
            yo[0] = f2bf(v0);
            if (has1) yo[1] = f2bf(v1);
        }
    }
}

// Block b of a launch over E experts' ragged, expert-major row ranges (offsets[e] .. offsets[e+1],
// on the device) -> (expert, BM-row tile): a block-wide prefix sum of the per-expert tile counts
// ceil(n_e/BM), tile c of expert e starting at row offsets[e] + BM·c. Returns the expert and sets
// [row0, row_end), the same in every thread; -1 for a block past the last tile. Empty experts own
// no tile; the grid covers the worst case Σ_e ceil(n_e/BM) ≤ rows/BM + E. All NT threads call it.
template <int NT, int BM, int E>
__device__ __forceinline__ int expert_tile(const int* __restrict__ offsets, int b, int& row0, int& row_end) {
    __shared__ int s_pick[2];  // (expert, tile within the expert), or expert -1
    if (threadIdx.x == 0) {
        s_pick[0] = -1;
        s_pick[1] = 0;
    }
    __syncthreads();
    int carry = 0;  // tiles of experts before this chunk (block-uniform)
    for (int e0 = 0; e0 < E; e0 += NT) {
        const int e = e0 + (int)threadIdx.x;
        const int tiles = e < E ? cdiv(offsets[e + 1] - offsets[e], BM) : 0;
        int total;
        const int first = carry + block_exclusive_scan<NT>(tiles, total);
        if (b >= first && b < first + tiles) {
            s_pick[0] = e;
            s_pick[1] = b - first;
        }
        carry += total;
        if (carry > b) break;  // found in this chunk (carry is the same in every thread)
    }
    __syncthreads();
    const int e = s_pick[0];
    if (e >= 0) {
        row0 = offsets[e] + BM * s_pick[1];
        row_end = offsets[e + 1];
    }
    return e;
}

// One 64x64 tile of Y (see gemm_mainloop; `gather` maps its rows of x). `resid` (EPI_RESID) has
// row stride N.
template <int N, int KD, int EPI, int OUT, class W>
__device__ __forceinline__ void gemm_tile(const bf16* __restrict__ x, const W& w,
                                          const bf16* __restrict__ bias, const bf16* __restrict__ resid,
                                          void* __restrict__ y, int row0, int row_end, int col0, int ldy,
                                          float ea = 0.f, float eb = 0.f, float ec = 0.f,
                                          const int* __restrict__ gather = nullptr) {
    float acc[2][4][4];
    gemm_mainloop<N, KD>(x, w, row0, row_end, col0, acc, gather);
    // Epilogue straight from the accumulator fragments.
    const bool pair_ok = (ldy % 2 == 0) && aligned(y, OUT ? 8 : 4);
    for_acc_pairs(acc, row0, col0, [&](int r, int c, float v0, float v1) {
        if (r >= row_end || c >= N) return;
        const bool has1 = c + 1 < N;
        if (bias != nullptr) {
            v0 += bf2f(bias[c]);
            if (has1) v1 += bf2f(bias[c + 1]);
        }
        if (EPI == EPI_RELU2) {
            v0 = fmaxf(v0, 0.f);
            v1 = fmaxf(v1, 0.f);
            v0 *= v0;
            v1 *= v1;
        }
        if (EPI == EPI_RESID) {
            const bf16* rr = resid + (size_t)r * N + c;
            v0 += bf2f(rr[0]);
            if (has1) v1 += bf2f(rr[1]);
        }
        if (EPI == EPI_POLY) {
            const bf16* rr = resid + (size_t)r * N + c;
            v0 = ec * v0 + eb * bf2f(rr[0]) + (r == c ? ea : 0.f);
            if (has1) v1 = ec * v1 + eb * bf2f(rr[1]) + (r == c + 1 ? ea : 0.f);
        }
        store_pair<OUT>(y, (size_t)r * (size_t)ldy + (size_t)c, v0, v1, has1, pair_ok);
    });
}

template <int N, int KD, int EPI, int OUT>
__device__ __forceinline__ void gemm(const bf16* x, const bf16* w, const bf16* bias, const bf16* resid, void* y, int M,
                                     int ldy) {
    require_block(gemm_cfg::THREADS);
    const int row0 = blockIdx.x * gemm_cfg::BM;
    if (row0 >= M) return;  // whole block: never happens with the contract's grid
    gemm_tile<N, KD, EPI, OUT>(x, w, bias, resid, y, row0, M, blockIdx.y * gemm_cfg::BN, ldy);
}

}  // namespace vp
