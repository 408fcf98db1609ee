#pragma once
// optim.cuh: the optimizer step on the device (MODEL.md §7.1–7.3, D9, D10), the transcription of
// ir/src/optim.rs. The runtime keeps masters, accumulated gradients and optimizer state in
// per-group buffers (a Normuon shape family, or an AdamW dtype/decay class) laid out member after
// member, so each family is one contiguous `[matrices, R, C]` batch and nothing is gathered.
//
//   opt_sumsq   out[unit] = Σ g² over one optimizer unit (f64)     global grad norm, in fixed order
//   opt_adamw   AdamW on a group, writing the bf16/f32 model copy
//   pe_start    Normuon momentum (clip folded in) and Polar Express's normalisation: X = bf16(U/‖U‖…)
//   pe_gram     A = X·Xᵀ                    \
//   pe_poly     B = a·I + b·A + c·A·A        > one Polar Express iteration, batched over matrices
//   pe_apply    X ← B·X                     /
//   pe_finish   Normuon row normalisation, norm restoration, shape scale, update, model copy
//
// Element-wise arithmetic is f64 with one rounding per stored value, exactly the reference's:
// products and sums go through __dmul_rn/__dadd_rn so the compiler cannot contract them into
// FMAs (Rust never does), which makes AdamW, the momentum and the final update bitwise equal to
// the host for the same inputs. Reductions are deterministic block trees (not the host's
// sequential order: the f64 sums agree to ~1e-16 relative). Polar Express runs on tensor cores
// as in the reference's CUDA path (MODEL.md §7.2: bf16 X); B is kept in f32 and enters the
// X-update GEMM split into two bf16 halves (~16 bits), so the a·X term folded into B's diagonal
// loses nothing against the reference's separate bf16 a·X; the last iteration writes O in f32.
// ir::optim::polar_iteration_tc (reference::TensorCore) rounds at exactly these points, and the
// GPU test holds the update to it under parity::NORMUON.
//
// Launches (the runtime's runtime::cuda::optim; "stride" = min(ceil(n/256), 2048) blocks):
//   opt_sumsq     units × 256, one launch per group (its units tile it); the host adds the sums in
//                 unit order, and the first non-finite one names the parameter
//   opt_adamw     stride × 256, one launch per AdamW class
//   pe_start      matrices × 256;  pe_finish  matrices × 256
//   pe_gram       (ceil(M/64), ceil(M/64), matrices) × 128, gemm_tile
//   pe_poly       (ceil(M/64), ceil(M/64), matrices) × 128, gemm_tile with EPI_POLY
//   pe_apply      (ceil(NW/64), ceil(M/64), matrices) × 128, gemm_nn_tile with B as bf16 hi + lo
// A Normuon family runs in chunks of at most 1 GiB of scratch (U/O f32, two X bf16, A bf16, B f32
// per matrix) and 65,535 matrices (the grid's z): 17 launches per chunk (start, 5 × 3 GEMMs,
// finish). pe_finish keeps one f64 per row in shared memory, so a Normuon matrix has at most 5,120
// rows (static_assert). With --host-momentum the momenta pe_start reads and writes are pinned host
// memory mapped into the device: the same kernel, PCIe-bound.
#include "vp_common.cuh"
#include "gemm.cuh"
#include "gemm_nn.cuh"

namespace vp {

namespace opt_cfg {
constexpr int THREADS = OPT_SUMSQ_THREADS;
}

__device__ __forceinline__ double dmul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double dadd(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double dsub(double a, double b) { return __dadd_rn(a, -b); }
__device__ __forceinline__ float to_f32(double x) { return __double2float_rn(x); }

__device__ __forceinline__ long long grid_thread() { return (long long)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ long long grid_threads() { return (long long)gridDim.x * blockDim.x; }

// ------------------------------------------------------------------------------------------------
// The global gradient norm (the gradient sums are written by the kernels that finalise them:
// put_grad in vp_common.cuh)
// ------------------------------------------------------------------------------------------------
// One f64 sum per optimizer unit (dist::zero: a Normuon matrix, an AdamW block): block b sums
// g[starts[b] .. starts[b+1]) with the same thread split and tree wherever the unit lies, so a
// ZeRO-1 owner holding it in its shard gets the bits one rank holding everything gets. NaN/Inf
// propagate into the unit's sum.
__device__ __forceinline__ void opt_sumsq(const float* __restrict__ g, const long long* __restrict__ starts,
                                          double* __restrict__ out) {
    require_block(opt_cfg::THREADS);
    const long long lo = starts[blockIdx.x], hi = starts[blockIdx.x + 1];
    double s = 0.0;
    for (long long i = lo + threadIdx.x; i < hi; i += opt_cfg::THREADS) s = dadd(s, dmul((double)g[i], (double)g[i]));
    s = block_sum<opt_cfg::THREADS, double>(s);
    if (threadIdx.x == 0) out[blockIdx.x] = s;
}

// ------------------------------------------------------------------------------------------------
// AdamW (§7.3): m ← β₁m + (1−β₁)g, s ← β₂s + (1−β₂)g², u = (m/bc1)/(sqrt(s/bc2) + ε),
// W ← W(1 − lr·wd) − lr·u; g is the clipped gradient f32(g·coef). OUT: 0 bf16 model copy, 1 f32.
// ------------------------------------------------------------------------------------------------
template <int OUT>
__device__ __forceinline__ void opt_adamw(const float* __restrict__ g, float* __restrict__ m, float* __restrict__ s,
                                          float* __restrict__ w, void* __restrict__ model, long long n, float coef,
                                          double b1, double b2, double eps, double bc1, double bc2, double lr,
                                          double wd) {
    const double keep = dsub(1.0, dmul(lr, wd)), c1 = dsub(1.0, b1), c2 = dsub(1.0, b2);
    for (long long i = grid_thread(); i < n; i += grid_threads()) {
        const double gv = (double)__fmul_rn(g[i], coef);
        const float mv = to_f32(dadd(dmul(b1, (double)m[i]), dmul(c1, gv)));
        const float sv = to_f32(dadd(dmul(b2, (double)s[i]), dmul(dmul(c2, gv), gv)));
        m[i] = mv;
        s[i] = sv;
        const double u = __ddiv_rn(__ddiv_rn((double)mv, bc1), dadd(__dsqrt_rn(__ddiv_rn((double)sv, bc2)), eps));
        const float wn = to_f32(dsub(dmul((double)w[i], keep), dmul(lr, u)));
        w[i] = wn;
        if (OUT) reinterpret_cast<float*>(model)[i] = wn;
        else reinterpret_cast<bf16*>(model)[i] = f2bf(wn);
    }
}

// ------------------------------------------------------------------------------------------------
// Normuon (§7.2), one block per R×C matrix of a family chunk (blockIdx.x = matrix). The iterated
// X is wide: m×n = (min(R,C), max(R,C)), i.e. Xᵀ of a tall matrix.
// ------------------------------------------------------------------------------------------------

// Steps 1–2 and the normalisation: M ← μM + (1−μ)G, U = (1−μ)G + μM (Nesterov) or M, written to
// `u` (f32, R×C) and as X = bf16(f32(U/(‖U‖_F·(1+safety) + eps))) (wide layout) to `x`.
template <int R, int C>
__device__ __forceinline__ void pe_start(const float* __restrict__ g, float* __restrict__ mom, float* __restrict__ u,
                                         bf16* __restrict__ x, float coef, double mu, int nesterov, double safety,
                                         double eps) {
    constexpr int NT = opt_cfg::THREADS;
    constexpr long long SZ = (long long)R * C;
    require_block(NT);
    const long long base = (long long)blockIdx.x * SZ;
    g += base;
    mom += base;
    u += base;
    x += base;
    const double c1 = dsub(1.0, mu);
    double ss = 0.0;
    for (long long i = threadIdx.x; i < SZ; i += NT) {
        const double gv = (double)__fmul_rn(g[i], coef);
        const float mn = to_f32(dadd(dmul(mu, (double)mom[i]), dmul(c1, gv)));
        mom[i] = mn;
        const float uv = nesterov ? to_f32(dadd(dmul(c1, gv), dmul(mu, (double)mn))) : mn;
        u[i] = uv;
        ss = dadd(ss, dmul((double)uv, (double)uv));
    }
    ss = block_sum<NT, double>(ss);  // ends with a barrier: every u[] store above is visible
    const double denom = dadd(dmul(__dsqrt_rn(ss), dadd(1.0, safety)), eps);
    constexpr bool TALL = R > C;
    constexpr int NW = TALL ? R : C;
    for (long long k = threadIdx.x; k < SZ; k += NT) {
        const long long i = k / NW, j = k % NW;  // X[i][j]
        const float uv = TALL ? u[j * C + i] : u[k];
        x[k] = f2bf(to_f32(__ddiv_rn((double)uv, denom)));
    }
}

// Steps 4–6 from the final X (`o`, f32, wide layout): per row r of the R×C matrix
// ss_r = Σ_c O², v_r ← f32(β₂v_r + (1−β₂)·ss_r/C), s_r = 1/sqrt(v_r + ε); restore =
// ‖O‖_F/max(‖diag(s)O‖_F, ε); Δ = f32(O·(s_r·restore·sqrt(max(1, R/C)))); W ← f32(W(1 − lr·wd) −
// lr·Δ); model = bf16(W).
template <int R, int C>
__device__ __forceinline__ void pe_finish(const float* __restrict__ o, float* __restrict__ v, float* __restrict__ w,
                                          bf16* __restrict__ model, double beta2, double eps, double lr, double wd) {
    constexpr int NT = opt_cfg::THREADS;
    constexpr long long SZ = (long long)R * C;
    constexpr bool TALL = R > C;
    static_assert(R * 8 <= 40 * 1024, "pe_finish keeps one f64 row scale per row in shared memory");
    require_block(NT);
    __shared__ double srow[R];
    const long long base = (long long)blockIdx.x * SZ;
    o += base;
    w += base;
    model += base;
    v += (long long)blockIdx.x * R;
    // O(r, c): a tall matrix's rows are the columns of the wide X.
    auto at = [&](int r, int c) -> float { return TALL ? o[(long long)c * R + r] : o[(long long)r * C + c]; };

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    // Row sums of squares: a warp per row (wide: contiguous), a thread per row (tall: the rows
    // are columns of X, so consecutive threads read consecutive addresses).
    if (TALL) {
        for (int r = threadIdx.x; r < R; r += NT) {
            double s = 0.0;
            for (int c = 0; c < C; ++c) s = dadd(s, dmul((double)at(r, c), (double)at(r, c)));
            srow[r] = s;
        }
    } else {
        for (int r = warp; r < R; r += NT / 32) {
            double s = 0.0;
            for (int c = lane; c < C; c += 32) s = dadd(s, dmul((double)at(r, c), (double)at(r, c)));
            s = warp_sum(s);
            if (lane == 0) srow[r] = s;
        }
    }
    __syncthreads();
    const double c2 = dsub(1.0, beta2);
    double norm_sq = 0.0, scaled_sq = 0.0;
    for (int r = threadIdx.x; r < R; r += NT) {
        const double ss = srow[r];
        const float vr = to_f32(dadd(dmul(beta2, (double)v[r]), dmul(c2, __ddiv_rn(ss, (double)C))));
        v[r] = vr;
        const double s = __ddiv_rn(1.0, __dsqrt_rn(dadd((double)vr, eps)));
        srow[r] = s;
        norm_sq = dadd(norm_sq, ss);
        scaled_sq = dadd(scaled_sq, dmul(dmul(s, s), ss));
    }
    norm_sq = block_sum<NT, double>(norm_sq);
    scaled_sq = block_sum<NT, double>(scaled_sq);  // its barrier also publishes srow
    const double scaled = __dsqrt_rn(scaled_sq);
    const double restore = __ddiv_rn(__dsqrt_rn(norm_sq), scaled > eps ? scaled : eps);
    const double shape = __dsqrt_rn(R > C ? __ddiv_rn((double)R, (double)C) : 1.0);
    const double keep = dsub(1.0, dmul(lr, wd));
    for (long long k = threadIdx.x; k < SZ; k += NT) {
        const int r = (int)(k / C), c = (int)(k % C);
        const double f = dmul(dmul(srow[r], restore), shape);
        const float d = to_f32(dmul((double)at(r, c), f));
        const float wn = to_f32(dsub(dmul((double)w[k], keep), dmul(lr, (double)d)));
        w[k] = wn;
        model[k] = f2bf(wn);
    }
}

// ------------------------------------------------------------------------------------------------
// One Polar Express iteration, batched: blockIdx.z is the matrix of the chunk, M×NW the wide X.
// ------------------------------------------------------------------------------------------------

// A = X·Xᵀ (bf16). Grid (ceil(M/64), ceil(M/64), matrices), block 128.
template <int M, int NW>
__device__ __forceinline__ void pe_gram(const bf16* __restrict__ x, bf16* __restrict__ a) {
    require_block(gemm_cfg::THREADS);
    const long long z = blockIdx.z;
    const bf16* xi = x + z * M * NW;
    gemm_tile<M, NW, EPI_NONE, 0>(xi, xi, nullptr, nullptr, a + z * M * M, blockIdx.x * gemm_cfg::BM, M,
                                  blockIdx.y * gemm_cfg::BN, M);
}

// B = ca·I + cb·A + cc·A·A (f32; A is symmetric, so A·A = A·Aᵀ). Grid (ceil(M/64), ceil(M/64),
// matrices), block 128.
template <int M>
__device__ __forceinline__ void pe_poly(const bf16* __restrict__ a, float* __restrict__ b, float ca, float cb,
                                        float cc) {
    require_block(gemm_cfg::THREADS);
    const long long z = blockIdx.z;
    const bf16* ai = a + z * M * M;
    gemm_tile<M, M, EPI_POLY, 1>(ai, ai, nullptr, ai, b + z * M * M, blockIdx.x * gemm_cfg::BM, M,
                                 blockIdx.y * gemm_cfg::BN, M, ca, cb, cc);
}

// Y = B·X (B f32 split into bf16 hi + lo, X bf16 [M, NW] as gemm_nn's W). OUT: 0 bf16 (the next
// iteration's X), 1 f32 (the last iteration: Normuon's O). Grid (ceil(NW/64), ceil(M/64),
// matrices), block 128.
template <int M, int NW, int OUT>
__device__ __forceinline__ void pe_apply(const float* __restrict__ b, const bf16* __restrict__ x, void* __restrict__ y) {
    require_block(gemm_nn_cfg::THREADS);
    const long long z = blockIdx.z;
    void* yi = OUT ? (void*)(reinterpret_cast<float*>(y) + z * M * NW) : (void*)(reinterpret_cast<bf16*>(y) + z * M * NW);
    gemm_nn_tile<NW, M, 1, EPI_NONE, OUT>(b + z * M * M, x + z * M * NW, nullptr, nullptr, yi,
                                          blockIdx.y * gemm_nn_cfg::BM, M, blockIdx.x * gemm_nn_cfg::BN, M, NW);
}

}  // namespace vp
