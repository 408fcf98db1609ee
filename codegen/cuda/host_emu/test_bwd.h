// Backward kernel families vs f64 transcriptions of ir/src/backward.rs, plus finite-difference
// checks of those transcriptions against f64 forwards (so the reference formulas themselves are
// verified), and bitwise run-to-run determinism of the reductions. Included by test.cpp (uses its
// helpers: rbf, rf, Cmp, expect, POISON_*).
#include "add.cuh"
#include "gemm_nn.cuh"
#include "gemm_tn.cuh"
#include "colsum.cuh"
#include "rmsnorm_bwd.cuh"
#include "qk_norm_bwd.cuh"
#include "qkv_pack.cuh"
#include "qkv_colsum.cuh"
#include "tpa_bwd.cuh"
#include "tpa_proj.cuh"
#include "tpa_dgrad.cuh"
#include "tpa_wgrad.cuh"
#include "grape_bwd.cuh"
#include "vres_bwd.cuh"
#include "attn_stats.cuh"
#include "attn_bwd_dq.cuh"
#include "attn_bwd_dkdv.cuh"
#include "attn_dkdv_sum.cuh"
#include "router_bwd.cuh"
#include "moe_gather.cuh"
#include "combine_bwd.cuh"
#include "seq_aux_count.cuh"
#include "seq_aux_bwd.cuh"
#include "head_dl.cuh"
#include "embed_sort.cuh"
#include "embed_bwd.cuh"


static std::vector<float> tof(const std::vector<bf>& v) { std::vector<float> o(v.size()); for (size_t i = 0; i < v.size(); ++i) o[i] = fl(v[i]); return o; }
static float rbf1(float x) { return fl(tobf(x)); }  // round to bf16 and back
static bool same_bits(const std::vector<float>& a, const std::vector<float>& b) { return a.size() == b.size() && (a.empty() || memcmp(a.data(), b.data(), a.size() * 4) == 0); }
static bool same_bits(const std::vector<bf>& a, const std::vector<bf>& b) { if (a.size() != b.size()) return false; for (size_t i = 0; i < a.size(); ++i) if (a[i].x != b[i].x) return false; return true; }
// Central finite difference of f at x[i] (x is modified and restored).
static double fdiff(std::vector<double>& x, size_t i, const std::function<double()>& f, double h) {
    double x0 = x[i]; x[i] = x0 + h; double fp = f(); x[i] = x0 - h; double fm = f(); x[i] = x0; return (fp - fm) / (2 * h);
}

// ------------------------------------------------------------------ add
template <int INF, int OUTF, int NI>
void test_add(int n, bool with_acc) {
    std::vector<float> xf[4]; std::vector<bf> xb[4];
    for (int j = 0; j < 4; ++j) { xf[j] = rf(n, 1.0); xb[j] = rbf(n, 1.0); }
    auto acc = rf(n, 1.0);
    std::vector<float> yf(n + 1, POISON_F); std::vector<bf> yb(n + 1, POISON_BF);
    const void* p[4]; for (int j = 0; j < 4; ++j) p[j] = j < NI ? (INF ? (const void*)xf[j].data() : (const void*)xb[j].data()) : nullptr;
    void* y = OUTF ? (void*)yf.data() : (void*)yb.data();
    emu_launch((n + 255) / 256, 1, 256, [&] { vp::add<INF, OUTF, NI>(p[0], p[1], p[2], p[3], with_acc ? acc.data() : nullptr, y, n, 0); });
    char nm[100]; snprintf(nm, 100, "add IN_F32%d OUT_F32%d NI%d acc%d", INF, OUTF, NI, with_acc);
    bool ok = true;
    for (int i = 0; i < n; ++i) {
        float s = with_acc ? acc[i] : 0.f;
        for (int j = 0; j < NI; ++j) s += INF ? xf[j][i] : fl(xb[j][i]);
        ok &= OUTF ? yf[i] == s : yb[i].x == tobf(s).x;
    }
    ok &= OUTF ? std::isnan(yf[n]) : is_poison(yb[n]);
    expect(ok, nm); if (ok) printf("%-60s ok (bitwise)\n", nm);
}

// ------------------------------------------------------------------ gemm_nn
// A: [M, lda] (bf16 or f32), W: [KD, N]; acc: f32 [M, ldy]; aux: bf16 [M, N].
template <int N, int KD, int E, int AMODE, int EPI, int OUT>
void test_gemm_nn(std::vector<int> counts, int lda, int aoff, int ldy, bool with_acc) {
    int M = 0; std::vector<int> off{0}; for (int c : counts) { M += c; off.push_back(M); }
    auto ab = rbf((size_t)M * lda + aoff, 1.0); auto af = rf((size_t)M * lda + aoff, 1.0);
    auto w = rbf((size_t)std::max(E, 1) * KD * N, 1.0 / std::sqrt(KD)); auto aux = rbf((size_t)M * N, 1.0);
    auto acc = rf((size_t)M * ldy, 1.0);
    std::vector<bf> yb((size_t)M * ldy + 2, POISON_BF); std::vector<float> yf((size_t)M * ldy + 2, POISON_F);
    const void* a = AMODE ? (const void*)(af.data() + aoff) : (const void*)(ab.data() + aoff);
    void* y = OUT ? (void*)yf.data() : (void*)yb.data();
    const int gx = E ? (M + 63) / 64 + E : (M + 63) / 64;
    emu_launch((N + 63) / 64, gx, 128, [&] { vp::gemm_nn<N, KD, E, AMODE, EPI, OUT>(a, E ? off.data() : nullptr, w.data(), with_acc ? acc.data() : nullptr, aux.data(), y, M, lda, ldy); });
    char nm[200]; snprintf(nm, 200, "gemm_nn N%d KD%d E%d AMODE%d EPI%d OUT%d M%d lda%d aoff%d acc%d", N, KD, E, AMODE, EPI, OUT, M, lda, aoff, with_acc);
    // bf16 outputs: bf16 rounding; f32 outputs: exact bf16 products (AMODE 0) or the hi+lo
    // split's ~2^-16 relative error (AMODE 1).
    Cmp c(nm, OUT ? (AMODE == 1 ? 2e-4 : 1e-4) : 2e-2, OUT ? 1e-4 : 1e-2);
    bool untouched = true;
    for (int e = 0; e < (int)counts.size(); ++e)
        for (int r = off[e]; r < off[e + 1]; ++r) {
            for (int n = 0; n < N; ++n) {
                double s = 0;
                for (int k = 0; k < KD; ++k) {
                    double av = AMODE == 0 ? fl(ab[aoff + (size_t)r * lda + k]) : af[aoff + (size_t)r * lda + k];
                    s += av * fl(w[((size_t)(E ? e : 0) * KD + k) * N + n]);
                }
                if (with_acc) s += acc[(size_t)r * ldy + n];
                if (EPI == 3) s *= 2.0 * std::max(fl(aux[(size_t)r * N + n]), 0.f);
                if (EPI == 2) s += fl(aux[(size_t)r * N + n]);
                c.add(s, OUT ? yf[(size_t)r * ldy + n] : fl(yb[(size_t)r * ldy + n]), (long)r * N + n);
            }
            for (int n = N; n < ldy; ++n) untouched &= OUT ? std::isnan(yf[(size_t)r * ldy + n]) : is_poison(yb[(size_t)r * ldy + n]);
        }
    c.report(); expect(untouched, std::string(nm) + ": wrote outside its columns");
}

// ------------------------------------------------------------------ split reductions
// The runtime's zeroed tickets (`Arg::Tickets`): every launch that counts in them must leave them
// at 0, and a split's result must be bitwise the f32 sum of its partials in part order, whichever
// block finished last (the emulator runs blocks in a random order).
static void check_split(const std::string& nm, const float* parts, int nparts, const float* out, size_t n) {
    bool zero = true; for (int t : g_tickets) zero &= t == 0;
    bool same = true;
    for (size_t i = 0; i < n; ++i) {
        float s = 0.f; for (int p = 0; p < nparts; ++p) s += parts[(size_t)p * n + i];
        same &= memcmp(&s, &out[i], 4) == 0;
    }
    expect(zero, nm + ": left a ticket non-zero");
    expect(same, nm + ": the split's sum is not its partials added in part order");
}

// ------------------------------------------------------------------ gemm_tn (split: last blocks add the partials)
// Y[N, K] = Σ_m A[m, n]·B'[m, k]; A: [M, lda], B: bf16 [M, ldb].
template <int N, int K, int E, int AMODE, int BRELU2, int BIAS = 0>
void test_gemm_tn(std::vector<int> counts, int lda, int aoff, int ldb, int split, int gather_from = 0) {
    // gather_from > 0 (grouped only): B holds that many token rows, row m reads b[bsrc[m]].
    // BIAS: db[e, n] = Σ_m A[m, n] over the expert's (or all) rows, from the same launch.
    int M = 0; std::vector<int> off{0}; for (int c : counts) { M += c; off.push_back(M); }
    auto ab = rbf((size_t)M * lda + aoff, 1.0); auto af = rf((size_t)M * lda + aoff, 1.0);
    const int brows = gather_from > 0 ? gather_from : M;
    std::vector<int> bsrc(M);
    for (int m = 0; m < M; ++m) bsrc[m] = gather_from > 0 ? (int)(rng() % (unsigned)gather_from) : m;
    auto b = rbf((size_t)brows * ldb, 1.0);
    const int Z = E ? E : split;
    const bool sp = !E && split > 1;
    const size_t bparts = BIAS && sp ? (size_t)Z * N : 0;  // the split's bias partial rows, after Y's
    std::vector<float> y((size_t)Z * N * K + bparts + 1, POISON_F), out((size_t)N * K + 1, POISON_F);
    std::vector<float> db((size_t)(E ? E : 1) * N + 1, POISON_F);
    const void* a = AMODE ? (const void*)(af.data() + aoff) : (const void*)(ab.data() + aoff);
    emu_launch3((K + 63) / 64, (N + 63) / 64, Z, 128, [&] { vp::gemm_tn<N, K, E, AMODE, BRELU2, BIAS>(a, b.data(), gather_from > 0 ? bsrc.data() : nullptr, E ? off.data() : nullptr, y.data(), M, lda, ldb, 0, sp ? out.data() : nullptr, BIAS ? db.data() : nullptr, sp ? g_tickets : nullptr); });
    char nm[200]; snprintf(nm, 200, "gemm_tn N%d K%d E%d AMODE%d BRELU2%d BIAS%d M%d lda%d aoff%d split%d%s", N, K, E, AMODE, BRELU2, BIAS, M, lda, aoff, split, gather_from > 0 ? " gather" : "");
    if (sp) check_split(nm, y.data(), split, out.data(), (size_t)N * K);
    if (sp && BIAS) check_split(std::string(nm) + " bias", y.data() + (size_t)Z * N * K, split, db.data(), N);
    Cmp c(nm, AMODE == 1 ? 2e-4 : 3e-2, AMODE == 1 ? 1e-4 : 1e-2);
    Cmp cb(std::string(nm) + " bias", 1e-4, 1e-5);
    bool empty_zero = true;
    for (int e = 0; e < (E ? E : 1); ++e) {
        const int r0 = E ? off[e] : 0, r1 = E ? off[e + 1] : M;
        for (int n = 0; n < N; ++n) {
            double sb = 0;
            for (int m = r0; m < r1; ++m) sb += fl(ab[aoff + (size_t)m * lda + n]);
            if (BIAS) {
                cb.add(sb, db[(size_t)e * N + n], (long)e * N + n);
                if (r0 == r1) empty_zero &= db[(size_t)e * N + n] == 0.f;
            }
            for (int k = 0; k < K; ++k) {
                double s = 0;
                for (int m = r0; m < r1; ++m) {
                    double av = AMODE == 0 ? fl(ab[aoff + (size_t)m * lda + n]) : af[aoff + (size_t)m * lda + n];
                    float bv = fl(b[(size_t)bsrc[m] * ldb + k]);
                    if (BRELU2) { bv = std::max(bv, 0.f); bv = rbf1(bv * bv); }
                    s += av * bv;
                }
                const float got = E ? y[((size_t)e * N + n) * K + k] : split > 1 ? out[(size_t)n * K + k] : y[(size_t)n * K + k];
                c.add(s, got, ((long)e * N + n) * K + k);
                if (r0 == r1) empty_zero &= got == 0.f;
            }
        }
    }
    c.report(); if (BIAS) cb.report();
    expect(empty_zero, std::string(nm) + ": empty expert gradient not exactly 0");
    expect(std::isnan(db.back()), std::string(nm) + ": wrote past the bias gradient");  // still the NaN poison
}

// ------------------------------------------------------------------ colsum (last blocks add the partial rows)
template <int N, int INF>
void test_colsum(int M, int P) {
    auto xb = rbf((size_t)M * N, 1.0); auto xf = rf((size_t)M * N, 1.0);
    std::vector<float> part((size_t)P * N, POISON_F), out(N, POISON_F);
    const void* x = INF ? (const void*)xf.data() : (const void*)xb.data();
    emu_launch(P, (N + 255) / 256, 256, [&] { vp::colsum<N, INF>(x, out.data(), M, 0, part.data(), g_tickets); });
    char nm[100]; snprintf(nm, 100, "colsum N%d IN_F32%d M%d parts%d", N, INF, M, P);
    check_split(nm, part.data(), P, out.data(), N);
    Cmp c(nm, 1e-4, 1e-5);
    for (int n = 0; n < N; ++n) {
        double s = 0; for (int m = 0; m < M; ++m) s += INF ? xf[(size_t)m * N + n] : fl(xb[(size_t)m * N + n]);
        c.add(s, out[n], n);
    }
    c.report();
}

// ------------------------------------------------------------------ rmsnorm_bwd (last block adds the partials)
static void rms_bwd_ref(const std::vector<float>& x, const std::vector<float>& w, const std::vector<float>& g, int D, float eps, std::vector<double>& dx, std::vector<double>& dw) {
    int rows = x.size() / D; dx.assign(x.size(), 0); dw.assign(D, 0);
    for (int r = 0; r < rows; ++r) {
        double ms = 0; for (int j = 0; j < D; ++j) ms += (double)x[r * D + j] * x[r * D + j]; ms /= D;
        double inv = 1.0 / std::sqrt(ms + eps), m = 0;
        for (int j = 0; j < D; ++j) { double xh = x[r * D + j] * inv; m += g[r * D + j] * (double)w[j] * xh; dw[j] += g[r * D + j] * xh; }
        m /= D;
        for (int j = 0; j < D; ++j) dx[r * D + j] = inv * (g[r * D + j] * (double)w[j] - x[r * D + j] * inv * m);
    }
}
template <int D>
void test_rmsnorm_bwd(int rows, int nb, bool null_dy, bool with_acc = false) {
    // with_acc: dx is added to a running gradient (acc) before its one rounding.
    auto x = rbf((size_t)rows * D, 2.0), w = rbf(D, 1.0), g = rbf((size_t)rows * D, 1.0), acc = rbf((size_t)rows * D, 1.0);
    const float eps = 1e-5f;
    auto run = [&](std::vector<bf>& dx, std::vector<float>& dw) {
        dx.assign((size_t)rows * D, POISON_BF); std::vector<float> part((size_t)nb * D, POISON_F); dw.assign(D, POISON_F);
        emu_launch(nb, 1, 256, [&] { vp::rmsnorm_bwd<D>(x.data(), w.data(), null_dy ? nullptr : g.data(), with_acc ? acc.data() : nullptr, dx.data(), part.data(), rows, eps, dw.data(), g_tickets, 0); });
        check_split("rmsnorm_bwd dw", part.data(), nb, dw.data(), D);
    };
    std::vector<bf> dx, dx2; std::vector<float> dw, dw2;
    run(dx, dw); run(dx2, dw2);
    std::vector<double> rdx, rdw;
    auto gz = tof(g); if (null_dy) std::fill(gz.begin(), gz.end(), 0.f);
    rms_bwd_ref(tof(x), tof(w), gz, D, eps, rdx, rdw);
    if (with_acc) for (size_t i = 0; i < rdx.size(); ++i) rdx[i] += fl(acc[i]);
    char nm[100]; snprintf(nm, 100, "rmsnorm_bwd D%d rows%d nb%d null%d acc%d", D, rows, nb, null_dy, with_acc);
    Cmp cx(std::string(nm) + " dx", 2e-3, 1e-2), cw(std::string(nm) + " dw", 1e-3, 1e-4);
    for (size_t i = 0; i < rdx.size(); ++i) cx.add(rdx[i], fl(dx[i]), i);
    for (int j = 0; j < D; ++j) cw.add(rdw[j], dw[j], j);
    cx.report(); cw.report();
    if (null_dy && with_acc) expect(same_bits(dx, acc), std::string(nm) + ": dx is not the running gradient");
    expect(same_bits(dx, dx2) && same_bits(dw, dw2), std::string(nm) + ": not bitwise reproducible");
}
// Queries and keys in one launch: bitwise the two separate rmsnorm_bwd launches (same grid, same
// partial order), with each weight gradient added into its sum (accum).
template <int D>
void test_qk_norm_bwd(int T, int heads, int groups, int nb) {
    const int rq = T * heads, rk = T * groups;
    auto xq = rbf((size_t)rq * D, 2.0), xk = rbf((size_t)rk * D, 2.0), wq = rbf(D, 1.0), wk = rbf(D, 1.0), gq = rbf((size_t)rq * D, 1.0), gk = rbf((size_t)rk * D, 1.0);
    const float eps = 1e-5f;
    std::vector<bf> dxq((size_t)rq * D, POISON_BF), dxk((size_t)rk * D, POISON_BF), sq = dxq, sk = dxk;
    std::vector<float> part((size_t)2 * nb * D, POISON_F), p1((size_t)nb * D, POISON_F), base = rf(D, 1.0);
    std::vector<float> dwq = base, dwk = base, swq = base, swk = base;
    emu_launch(nb, 2, 256, [&] { vp::qk_norm_bwd<D>(xq.data(), xk.data(), wq.data(), wk.data(), gq.data(), gk.data(), dxq.data(), dxk.data(), part.data(), rq, rk, eps, dwq.data(), dwk.data(), g_tickets, 1); });
    emu_launch(nb, 1, 256, [&] { vp::rmsnorm_bwd<D>(xq.data(), wq.data(), gq.data(), nullptr, sq.data(), p1.data(), rq, eps, swq.data(), g_tickets, 1); });
    emu_launch(nb, 1, 256, [&] { vp::rmsnorm_bwd<D>(xk.data(), wk.data(), gk.data(), nullptr, sk.data(), p1.data(), rk, eps, swk.data(), g_tickets, 1); });
    std::string nm = "qk_norm_bwd D" + std::to_string(D) + " heads" + std::to_string(heads) + " groups" + std::to_string(groups);
    const bool ok = same_bits(dxq, sq) && same_bits(dxk, sk) && same_bits(dwq, swq) && same_bits(dwk, swk);
    expect(ok, nm + ": not bitwise the two rmsnorm_bwd launches");
    std::vector<double> rdx, rdw; rms_bwd_ref(tof(xk), tof(wk), tof(gk), D, eps, rdx, rdw);
    Cmp cw(nm + " dwk", 1e-3, 1e-4);
    for (int j = 0; j < D; ++j) cw.add(base[j] + rdw[j], dwk[j], j);
    cw.report();
    expect(g_tickets[0] == 0 && g_tickets[1] == 0, nm + ": tickets not back at 0");
    if (ok) printf("%-60s ok (bitwise = rmsnorm_bwd ×2)\n", nm.c_str());
}
// The reference formula itself against a finite difference of the f64 forward.
static void fd_rmsnorm() {
    const int D = 12, rows = 3; const float eps = 1e-5f;
    std::vector<double> x(rows * D), w(D), g(rows * D);
    for (auto& v : x) v = (float)nrm(); for (auto& v : w) v = (float)nrm(); for (auto& v : g) v = (float)nrm();
    auto loss = [&]() { double L = 0; for (int r = 0; r < rows; ++r) { double ms = 0; for (int j = 0; j < D; ++j) ms += x[r * D + j] * x[r * D + j]; double inv = 1 / std::sqrt(ms / D + eps); for (int j = 0; j < D; ++j) L += g[r * D + j] * x[r * D + j] * inv * w[j]; } return L; };
    std::vector<float> xf(x.begin(), x.end()), wf(w.begin(), w.end()), gf(g.begin(), g.end());
    std::vector<double> dx, dw; rms_bwd_ref(xf, wf, gf, D, eps, dx, dw);
    Cmp c("fd: rmsnorm reference formula", 1e-6, 1e-5);
    for (size_t i = 0; i < x.size(); ++i) c.add(fdiff(x, i, loss, 1e-5), dx[i], i);
    for (int j = 0; j < D; ++j) c.add(fdiff(w, j, loss, 1e-5), dw[j], 100 + j);
    c.report();
}

// ------------------------------------------------------------------ qkv_pack + tpa_bwd
template <int HEADS, int GROUPS, int D, int RQ, int R>
void test_tpa_bwd(int T, bool null_k) {
    constexpr int GS = HEADS / GROUPS, NP = (HEADS + 2 * GROUPS) * D;
    constexpr int OAK = HEADS * RQ, OAV = OAK + GROUPS * R, OBQ = OAV + GROUPS * R, OBK = OBQ + RQ * D, OBV = OBK + R * D, W = OBV + R * D;
    auto f = rbf((size_t)T * W, 1.0), gq = rbf((size_t)T * HEADS * D, 1.0), gk = rbf((size_t)T * GROUPS * D, 1.0), gv = rbf((size_t)T * GROUPS * D, 1.0);
    std::vector<bf> df((size_t)T * W, POISON_BF), mixed((size_t)T * NP, POISON_BF);
    const bf* pk = null_k ? nullptr : gk.data();
    emu_launch(T, 1, 128, [&] { vp::tpa_bwd<HEADS, GROUPS, D, RQ, R>(f.data(), gq.data(), pk, gv.data(), df.data(), T); });
    emu_launch(T, 1, 128, [&] { vp::qkv_pack<HEADS, GROUPS, D>(gq.data(), pk, gv.data(), mixed.data(), T); });
    std::string nm = "tpa_bwd H" + std::to_string(HEADS) + " G" + std::to_string(GROUPS) + " D" + std::to_string(D) + " RQ" + std::to_string(RQ) + " R" + std::to_string(R) + (null_k ? " null-dk" : "");
    Cmp c(nm, 2e-3, 1e-2);
    bool pack_ok = true;
    for (int t = 0; t < T; ++t) {
        const bf* fr = &f[(size_t)t * W];
        auto G = [&](int which, int hd, int col) -> double { if (which == 0) return fl(gq[((size_t)t * HEADS + hd) * D + col]); if (which == 1) return null_k ? 0.0 : fl(gk[((size_t)t * GROUPS + hd) * D + col]); return fl(gv[((size_t)t * GROUPS + hd) * D + col]); };
        auto chk = [&](int which, int oa, int ob, int nheads, int rank) {
            for (int h = 0; h < nheads; ++h) for (int r = 0; r < rank; ++r) { double s = 0; for (int cc = 0; cc < D; ++cc) s += G(which, h, cc) * fl(fr[ob + r * D + cc]); c.add(s / rank, fl(df[(size_t)t * W + oa + h * rank + r]), oa + h * rank + r); }
            for (int r = 0; r < rank; ++r) for (int cc = 0; cc < D; ++cc) { double s = 0; for (int h = 0; h < nheads; ++h) s += fl(fr[oa + h * rank + r]) * G(which, h, cc); c.add(s / rank, fl(df[(size_t)t * W + ob + r * D + cc]), ob + r * D + cc); }
        };
        chk(0, 0, OBQ, HEADS, RQ); chk(1, OAK, OBK, GROUPS, R); chk(2, OAV, OBV, GROUPS, R);
        for (int g = 0; g < GROUPS; ++g) { int base = g * (GS + 2) * D;
            for (int j = 0; j < GS; ++j) for (int cc = 0; cc < D; ++cc) pack_ok &= fl(mixed[(size_t)t * NP + base + j * D + cc]) == G(0, g * GS + j, cc);
            for (int cc = 0; cc < D; ++cc) { pack_ok &= fl(mixed[(size_t)t * NP + base + GS * D + cc]) == G(1, g, cc); pack_ok &= fl(mixed[(size_t)t * NP + base + (GS + 1) * D + cc]) == G(2, g, cc); } }
    }
    c.report(); expect(pack_ok, nm + ": qkv_pack"); if (pack_ok) printf("%-60s ok\n", ("qkv_pack (with " + nm + ")").c_str());
    // qkv_colsum reads the three gradients through the packed layout: bitwise colsum of the packed
    // copy (same rows per block, same order), which check_split and an f64 sum check too.
    const int P = 3;
    std::vector<float> part((size_t)P * NP, POISON_F), db(NP + 1, POISON_F), part2((size_t)P * NP, POISON_F), db2(NP, POISON_F);
    emu_launch(P, (NP + 255) / 256, 256, [&] { vp::qkv_colsum<HEADS, GROUPS, D>(gq.data(), pk, gv.data(), db.data(), T, 0, part.data(), g_tickets); });
    emu_launch(P, (NP + 255) / 256, 256, [&] { vp::colsum<NP, 0>(mixed.data(), db2.data(), T, 0, part2.data(), g_tickets); });
    check_split((nm + " qkv_colsum").c_str(), part.data(), P, db.data(), NP);
    Cmp cs(nm + " qkv_colsum", 1e-4, 1e-5);
    for (int e = 0; e < NP; ++e) { double s = 0; for (int t = 0; t < T; ++t) s += fl(mixed[(size_t)t * NP + e]); cs.add(s, db[e], e); }
    cs.report();
    expect(std::memcmp(db.data(), db2.data(), NP * sizeof(float)) == 0, nm + ": qkv_colsum is not bitwise colsum of the packed copy");
    expect(std::isnan(db[NP]), nm + ": qkv_colsum wrote past its output");
}

// ------------------------------------------------------------------ tpa_proj / tpa_dgrad / tpa_wgrad
// The six factor weights are six separate allocations (as in the optimizer's groups), so a row
// read from or written to the wrong block cannot pass by accident. Checks the forward product
// f = x·[W_i]ᵀ, the input gradient dx = df·[W_i] and the weight gradients dW_i = df_iᵀ·x (split
// into Z row ranges when Z > 1: bitwise the partials added in range order), and `accum`.
template <int HEADS, int GROUPS, int D, int RQ, int R, int H>
void test_tpa_gemms(int T, int Z) {
    constexpr int W = vp::tpa_width<HEADS, GROUPS, D, RQ, R>();
    const int widths[6] = {HEADS * RQ, GROUPS * R, GROUPS * R, RQ * D, R * D, R * D};
    int start[7] = {0};
    for (int i = 0; i < 6; ++i) start[i + 1] = start[i] + widths[i];
    std::vector<bf> w[6]; std::vector<float> dw[6], dw2[6];
    for (int i = 0; i < 6; ++i) w[i] = rbf((size_t)widths[i] * H + 5, 1.0 / std::sqrt(H));
    auto x = rbf((size_t)T * H, 1.0), df = rbf((size_t)T * W, 1.0);
    std::vector<bf> f((size_t)T * W + 3, POISON_BF), dx((size_t)T * H + 3, POISON_BF);
    std::vector<float> part((size_t)std::max(Z, 1) * W * H, POISON_F);
    auto wrow = [&](int r) { int i = 0; while (r >= start[i + 1]) ++i; return &w[i][(size_t)(r - start[i]) * H]; };
    char nm[160];
    snprintf(nm, 160, "tpa_proj H%d G%d D%d RQ%d R%d hidden%d T%d", HEADS, GROUPS, D, RQ, R, H, T);
    emu_launch((T + 63) / 64, (W + 63) / 64, 128, [&] { vp::tpa_proj<HEADS, GROUPS, D, RQ, R, H>(x.data(), w[0].data(), w[1].data(), w[2].data(), w[3].data(), w[4].data(), w[5].data(), f.data(), T); });
    { Cmp c(nm, 2e-2, 1e-2);
      for (int t = 0; t < T; ++t) for (int n = 0; n < W; ++n) { double s = 0; const bf* wr = wrow(n); for (int k = 0; k < H; ++k) s += fl(x[(size_t)t * H + k]) * fl(wr[k]); c.add(s, fl(f[(size_t)t * W + n]), (long)t * W + n); }
      c.report(); expect(is_poison(f[(size_t)T * W]), std::string(nm) + ": wrote past f"); }
    snprintf(nm, 160, "tpa_dgrad H%d G%d D%d RQ%d R%d hidden%d T%d", HEADS, GROUPS, D, RQ, R, H, T);
    emu_launch((H + 63) / 64, (T + 63) / 64, 128, [&] { vp::tpa_dgrad<HEADS, GROUPS, D, RQ, R, H>(df.data(), w[0].data(), w[1].data(), w[2].data(), w[3].data(), w[4].data(), w[5].data(), dx.data(), T); });
    { Cmp c(nm, 2e-2, 1e-2);
      for (int t = 0; t < T; ++t) for (int k = 0; k < H; ++k) { double s = 0; for (int n = 0; n < W; ++n) s += fl(df[(size_t)t * W + n]) * fl(wrow(n)[k]); c.add(s, fl(dx[(size_t)t * H + k]), (long)t * H + k); }
      c.report(); expect(is_poison(dx[(size_t)T * H]), std::string(nm) + ": wrote past dx"); }
    snprintf(nm, 160, "tpa_wgrad H%d G%d D%d RQ%d R%d hidden%d T%d split%d", HEADS, GROUPS, D, RQ, R, H, T, Z);
    auto run = [&](std::vector<float>* out, int acc) {
        emu_launch3((H + 63) / 64, (W + 63) / 64, Z, 128, [&] { vp::tpa_wgrad<HEADS, GROUPS, D, RQ, R, H>(df.data(), x.data(), Z > 1 ? part.data() : nullptr, out[0].data(), out[1].data(), out[2].data(), out[3].data(), out[4].data(), out[5].data(), T, acc, Z > 1 ? g_tickets : nullptr); });
    };
    for (int i = 0; i < 6; ++i) dw[i].assign((size_t)widths[i] * H + 1, POISON_F);
    run(dw, 0);
    std::vector<float> cat; for (int i = 0; i < 6; ++i) cat.insert(cat.end(), dw[i].begin(), dw[i].end() - 1);
    { Cmp c(nm, 1e-4, 1e-4); bool inside = true;
      for (int n = 0; n < W; ++n) for (int k = 0; k < H; ++k) { double s = 0; for (int t = 0; t < T; ++t) s += fl(df[(size_t)t * W + n]) * fl(x[(size_t)t * H + k]); c.add(s, cat[(size_t)n * H + k], (long)n * H + k); }
      for (int i = 0; i < 6; ++i) inside &= std::isnan(dw[i].back());
      c.report(); expect(inside, std::string(nm) + ": wrote past a weight's gradient"); }
    if (Z > 1) check_split(nm, part.data(), Z, cat.data(), (size_t)W * H);
    // accum = 1 adds into each gradient sum, bitwise base + stored.
    bool acc_ok = true;
    for (int i = 0; i < 6; ++i) dw2[i] = rf((size_t)widths[i] * H + 1, 1.0);
    std::vector<float> keep[6]; for (int i = 0; i < 6; ++i) keep[i] = dw2[i];
    run(dw2, 1);
    for (int i = 0; i < 6; ++i) for (size_t j = 0; j < dw2[i].size(); ++j) { float want = j + 1 < dw2[i].size() ? keep[i][j] + dw[i][j] : keep[i][j]; acc_ok &= memcmp(&want, &dw2[i][j], 4) == 0; }
    expect(acc_ok, std::string("accum: ") + nm + ": sum is not base + gradient bitwise");
    if (acc_ok) printf("%-60s ok (bitwise = base + stored)\n", (std::string("accum: ") + nm).c_str());
}

// ------------------------------------------------------------------ grape_bwd (last block adds the partials)
template <int D>
void test_grape_bwd(int T, int S, int heads, int groups, int nb) {
    constexpr int HD = D / 2;
    auto xq = rbf((size_t)T * heads * D, 1.0), xk = rbf((size_t)T * groups * D, 1.0), gq = rbf((size_t)T * heads * D, 1.0), gk = rbf((size_t)T * groups * D, 1.0);
    std::vector<float> lf(HD); for (int i = 0; i < HD; ++i) lf[i] = (float)(16.0 * std::log(std::pow(10000.0, -2.0 * i / D)));
    const float scale = 16.f;
    auto run = [&](std::vector<bf>& dq, std::vector<bf>& dk, std::vector<float>& dl) {
        dq.assign(xq.size(), POISON_BF); dk.assign(xk.size(), POISON_BF); dl.assign(HD, POISON_F); std::vector<float> part((size_t)nb * HD, POISON_F);
        emu_launch(nb, 1, 128, [&] { vp::grape_bwd<D>(xq.data(), xk.data(), lf.data(), gq.data(), gk.data(), dq.data(), dk.data(), part.data(), heads, groups, T, S, scale, dl.data(), g_tickets, 0); });
        check_split("grape_bwd dlog_freq", part.data(), nb, dl.data(), HD);
    };
    std::vector<bf> dq, dk, dq2, dk2; std::vector<float> dl, dl2; run(dq, dk, dl); run(dq2, dk2, dl2);
    // reference (backward.rs transcription)
    std::vector<double> rdl(HD, 0);
    char nm[100]; snprintf(nm, 100, "grape_bwd D%d T%d S%d heads%d groups%d", D, T, S, heads, groups);
    Cmp cx(std::string(nm) + " dq/dk", 2e-3, 1e-2), cl(std::string(nm) + " dlog_freq", 1e-3, 2e-4);
    for (int pass = 0; pass < 2; ++pass) {
        auto& x = pass ? xk : xq; auto& g = pass ? gk : gq; auto& dx = pass ? dk : dq; int nh = pass ? groups : heads;
        for (int t = 0; t < T; ++t) for (int h = 0; h < nh; ++h) for (int i = 0; i < HD; ++i) {
            float f = std::exp(lf[i] / scale); float th = (float)(t % S) * f; double s = std::sin(th), co = std::cos(th);
            size_t o = ((size_t)t * nh + h) * D; double a = fl(x[o + i]), b = fl(x[o + i + HD]), g1 = fl(g[o + i]), g2 = fl(g[o + i + HD]);
            cx.add(g1 * co + g2 * s, fl(dx[o + i]), o + i); cx.add(g2 * co - g1 * s, fl(dx[o + i + HD]), o + i + HD);
            rdl[i] += (g2 * (a * co - b * s) - g1 * (b * co + a * s)) * (t % S) * f / scale;
        }
    }
    for (int i = 0; i < HD; ++i) cl.add(rdl[i], dl[i], i);
    cx.report(); cl.report();
    expect(same_bits(dl, dl2) && same_bits(dq, dq2), std::string(nm) + ": not bitwise reproducible");
    // finite difference of the f64 forward in the log-frequencies
    std::vector<double> l(lf.begin(), lf.end());
    auto loss = [&]() { double L = 0; for (int pass = 0; pass < 2; ++pass) { auto& x = pass ? xk : xq; auto& g = pass ? gk : gq; int nh = pass ? groups : heads;
        for (int t = 0; t < T; ++t) for (int h = 0; h < nh; ++h) for (int i = 0; i < HD; ++i) { double th = (t % S) * std::exp(l[i] / scale); size_t o = ((size_t)t * nh + h) * D;
            double a = fl(x[o + i]), b = fl(x[o + i + HD]); L += fl(g[o + i]) * (a * std::cos(th) - b * std::sin(th)) + fl(g[o + i + HD]) * (b * std::cos(th) + a * std::sin(th)); } } return L; };
    Cmp cf(std::string("fd: ") + nm + " dlog_freq", 1e-3, 1e-3);
    for (int i = 0; i < HD; ++i) cf.add(fdiff(l, i, loss, 1e-4), rdl[i], i);
    cf.report();
}

// ------------------------------------------------------------------ vres_bwd (+ sum)
void test_vres_bwd(int n, int nb) {
    auto v = rbf(n, 1.0), v1 = rbf(n, 1.0), g = rbf(n, 1.0); float logit = 0.7f;
    std::vector<bf> dv(n + 1, POISON_BF), dv1(n + 1, POISON_BF); std::vector<float> part(nb, POISON_F), dl(1, POISON_F);
    emu_launch(nb, 1, 256, [&] { vp::vres_bwd(v.data(), v1.data(), &logit, g.data(), dv.data(), dv1.data(), part.data(), n, dl.data(), g_tickets, 0); });
    {   // the last block's sum: bitwise the same whichever block finished last, tickets back at 0
        std::vector<float> again(1, POISON_F);
        emu_launch(nb, 1, 256, [&] { vp::vres_bwd(v.data(), v1.data(), &logit, g.data(), dv.data(), dv1.data(), part.data(), n, again.data(), g_tickets, 0); });
        bool zero = true; for (int t : g_tickets) zero &= t == 0;
        expect(memcmp(&again[0], &dl[0], 4) == 0 && zero, "vres_bwd: ∂logit depends on which block finished last, or a ticket was left set");
    }
    double lam = (float)(1.0 / (1.0 + std::exp(-(double)logit))), s = 0;
    Cmp c("vres_bwd n" + std::to_string(n), 1e-3, 8e-3), cl("vres_bwd dlogit n" + std::to_string(n), 1e-4, 1e-5);
    for (int i = 0; i < n; ++i) { c.add(lam * fl(g[i]), fl(dv[i]), i); c.add((1 - lam) * fl(g[i]), fl(dv1[i]), n + i); s += fl(g[i]) * ((double)fl(v[i]) - fl(v1[i])); }
    cl.add(lam * (1 - lam) * s, dl[0], 0);
    c.report(); cl.report(); expect(is_poison(dv[n]) && is_poison(dv1[n]), "vres_bwd wrote past n");
}

// ------------------------------------------------------------------ attention backward
struct AttnRef { std::vector<double> out, dq, dk, dv, dsink; };
// f64 forward + backward of reference::attention (MODEL.md §5 formulas), inputs as doubles.
// With `outb` (the bf16-rounded forward output) it instead mirrors the kernels' rounding points:
// ρ = dout·bf16(out) (as attn_stats), and the bf16 mma operands bf16(dS), bf16(P); everything else
// exact. The exact version checks the precision (relative L2), the mirrored one the indexing,
// masking and reductions element by element with tight tolerances.
static AttnRef attn_ref(int D, int H, int G, int WINDOW, bool ALIBI, bool SINKS, int T, int S, const std::vector<int>& doc,
                        const std::vector<double>& q, const std::vector<double>& k, const std::vector<double>& v, const std::vector<double>& sinks, const std::vector<double>& g,
                        const std::vector<double>* outb = nullptr) {
    AttnRef r; r.out.assign((size_t)T * H * D, 0); r.dq.assign(q.size(), 0); r.dk.assign(k.size(), 0); r.dv.assign(v.size(), 0); r.dsink.assign(H, 0);
    auto slopes = alibi_ref(H); const double scale = 1.0 / std::sqrt((double)D);
    for (int t = 0; t < T; ++t) {
        int i = t % S, row0 = t - i;
        for (int h = 0; h < H; ++h) {
            int gg = h / (H / G);
            std::vector<int> keys; for (int j = 0; j <= i; ++j) if (doc[t] == doc[row0 + j] && (WINDOW == 0 || i - j < WINDOW)) keys.push_back(j);
            std::vector<double> s; double m = SINKS ? sinks[h] : -INFINITY;
            for (int j : keys) { double dot = 0; for (int d = 0; d < D; ++d) dot += q[((size_t)t * H + h) * D + d] * k[((size_t)(row0 + j) * G + gg) * D + d]; double sv = dot * scale + (ALIBI ? -slopes[h] * (double)(i - j) : 0.0); s.push_back(sv); m = std::max(m, sv); }
            if (m == -INFINITY) continue;
            double den = SINKS ? std::exp(sinks[h] - m) : 0; for (double sv : s) den += std::exp(sv - m);
            std::vector<double> p; for (double sv : s) p.push_back(std::exp(sv - m) / den);
            const double* gv = &g[((size_t)t * H + h) * D];
            std::vector<double> dp; double rho = 0;
            for (size_t n = 0; n < keys.size(); ++n) { const double* vv = &v[((size_t)(row0 + keys[n]) * G + gg) * D]; double dd = 0; for (int d = 0; d < D; ++d) { dd += gv[d] * vv[d]; r.out[((size_t)t * H + h) * D + d] += p[n] * vv[d]; } dp.push_back(dd); rho += p[n] * dd; }
            if (outb) { rho = 0; for (int d = 0; d < D; ++d) rho += gv[d] * (*outb)[((size_t)t * H + h) * D + d]; }
            if (SINKS) r.dsink[h] -= std::exp(sinks[h] - m) / den * rho;
            for (size_t n = 0; n < keys.size(); ++n) {
                double ds = p[n] * (dp[n] - rho), pv = p[n];
                if (outb) { ds = rbf1((float)ds); pv = rbf1((float)pv); }
                ds *= scale;
                size_t o = ((size_t)(row0 + keys[n]) * G + gg) * D;
                for (int d = 0; d < D; ++d) { r.dq[((size_t)t * H + h) * D + d] += ds * k[o + d]; r.dk[o + d] += ds * q[((size_t)t * H + h) * D + d]; r.dv[o + d] += pv * gv[d]; }
            }
        }
    }
    return r;
}
static std::vector<double> tod(const std::vector<bf>& v) { std::vector<double> o(v.size()); for (size_t i = 0; i < v.size(); ++i) o[i] = fl(v[i]); return o; }
template <int D, int H, int G, int WINDOW, int ALIBI, int SINKS>
void test_attn_bwd(int T, int S, std::vector<int> doc, double qscale, const char* tag) {
    auto q = rbf((size_t)T * H * D, qscale), k = rbf((size_t)T * G * D, 1.0), v = rbf((size_t)T * G * D, 1.0), g = rbf((size_t)T * H * D, 1.0);
    auto sinks = rf(H, 1.0);
    std::vector<double> sd(sinks.begin(), sinks.end());
    AttnRef ref = attn_ref(D, H, G, WINDOW, ALIBI, SINKS, T, S, doc, tod(q), tod(k), tod(v), sd, tod(g));
    std::vector<bf> out(ref.out.size()); for (size_t i = 0; i < out.size(); ++i) out[i] = tobf(ref.out[i]);  // what the forward kernel stores
    std::vector<bf> dks, dvs;  // the per-head split (HSPLIT = 1) + attn_dkdv_sum
    auto run = [&](std::vector<bf>& dq, std::vector<bf>& dk, std::vector<bf>& dv, std::vector<float>& dsink) {
        std::vector<float> stats((size_t)T * H * 2, POISON_F), dsc((size_t)T * H, POISON_F), part((size_t)4 * H, POISON_F);
        dq.assign(q.size(), POISON_BF); dk.assign(k.size(), POISON_BF); dv.assign(v.size(), POISON_BF); dsink.assign(H, POISON_F);
        emu_launch((T + 63) / 64, H, 128, [&] { vp::attn_stats<D, H, G, WINDOW, ALIBI, SINKS>(q.data(), k.data(), doc.data(), SINKS ? sinks.data() : nullptr, out.data(), g.data(), stats.data(), SINKS ? dsc.data() : nullptr, T, S); });
        emu_launch((T + 63) / 64, H, 128, [&] { vp::attn_bwd_dq<D, H, G, WINDOW, ALIBI>(q.data(), k.data(), v.data(), doc.data(), stats.data(), g.data(), dq.data(), T, S); });
        emu_launch((T + 63) / 64, G, 128, [&] { vp::attn_bwd_dkdv<D, H, G, WINDOW, ALIBI, 0>(q.data(), k.data(), v.data(), doc.data(), stats.data(), g.data(), dk.data(), dv.data(), T, S, nullptr); });
        std::vector<float> hp((size_t)T * H * 2 * D, POISON_F);
        dks.assign(k.size(), POISON_BF); dvs.assign(v.size(), POISON_BF);
        emu_launch((T + 63) / 64, H, 128, [&] { vp::attn_bwd_dkdv<D, H, G, WINDOW, ALIBI, 1>(q.data(), k.data(), v.data(), doc.data(), stats.data(), g.data(), nullptr, nullptr, T, S, hp.data()); });
        emu_launch(T, 1, 128, [&] { vp::attn_dkdv_sum<D, H, G>(hp.data(), dks.data(), dvs.data(), T); });
        if (SINKS) {
            emu_launch(4, 1, 256, [&] { vp::colsum<H, 1>(dsc.data(), dsink.data(), T, 0, part.data(), g_tickets); });
        }
    };
    std::vector<bf> dq, dk, dv, dq2, dk2, dv2; std::vector<float> ds, ds2;
    run(dq, dk, dv, ds); run(dq2, dk2, dv2, ds2);
    char nm[200]; snprintf(nm, 200, "attn_bwd D%d H%d G%d W%d A%d S%d T%d S%d %s", D, H, G, WINDOW, ALIBI, SINKS, T, S, tag);
    // (1) precision against the exact derivative: relative L2 error of each gradient
    auto rel = [](const std::vector<double>& r, const std::vector<bf>& gg) { double e = 0, n = 0; for (size_t i = 0; i < r.size(); ++i) { double d = fl(gg[i]) - r[i]; e += d * d; n += r[i] * r[i]; } return std::sqrt(e / std::max(n, 1e-30)); };
    const double eq = rel(ref.dq, dq), ek = rel(ref.dk, dk), ev = rel(ref.dv, dv);
    const bool prec_ok = eq < 1e-2 && ek < 1e-2 && ev < 1e-2;
    printf("%-60s %s  rel L2 vs exact: dq %.2e dk %.2e dv %.2e\n", (std::string(nm) + " exact").c_str(), prec_ok ? "ok  " : "FAIL", eq, ek, ev);
    if (!prec_ok) g_fail++;
    // (2) element by element against the reference with the kernels' rounding points
    std::vector<double> outd(out.size()); for (size_t i = 0; i < out.size(); ++i) outd[i] = fl(out[i]);
    AttnRef mref = attn_ref(D, H, G, WINDOW, ALIBI, SINKS, T, S, doc, tod(q), tod(k), tod(v), sd, tod(g), &outd);
    Cmp cq(std::string(nm) + " dq", 2e-3, 1e-2), ck(std::string(nm) + " dk", 2e-3, 1e-2), cv(std::string(nm) + " dv", 2e-3, 1e-2), cs(std::string(nm) + " dsinks", 1e-4, 1e-3);
    for (size_t i = 0; i < dq.size(); ++i) cq.add(mref.dq[i], fl(dq[i]), i);
    for (size_t i = 0; i < dk.size(); ++i) { ck.add(mref.dk[i], fl(dk[i]), i); cv.add(mref.dv[i], fl(dv[i]), i); }
    cq.report(); ck.report(); cv.report();
    Cmp cks(std::string(nm) + " dk (per-head split)", 2e-3, 1e-2), cvs(std::string(nm) + " dv (per-head split)", 2e-3, 1e-2);
    for (size_t i = 0; i < dk.size(); ++i) { cks.add(mref.dk[i], fl(dks[i]), i); cvs.add(mref.dv[i], fl(dvs[i]), i); }
    cks.report(); cvs.report();
    if (SINKS) { for (int h = 0; h < H; ++h) cs.add(mref.dsink[h], ds[h], h); cs.report(); }
    expect(same_bits(dq, dq2) && same_bits(dk, dk2) && same_bits(dv, dv2) && same_bits(ds, ds2), std::string(nm) + ": not bitwise reproducible");
}
// The reference backward against finite differences of its own f64 forward (document boundary,
// sink, ALiBi, GQA): verifies the formulas the kernels are compared with.
static void fd_attention() {
    const int D = 4, H = 2, G = 1, T = 10, S = 5;
    std::vector<int> doc{0, 0, 1, 1, 1, 2, 2, 2, 3, 3};
    std::vector<double> q(T * H * D), k(T * G * D), v(T * G * D), g(T * H * D), sk{0.3, -0.8};
    for (auto* vec : {&q, &k, &v, &g}) for (auto& x : *vec) x = nrm();
    AttnRef r = attn_ref(D, H, G, 0, true, true, T, S, doc, q, k, v, sk, g);
    auto loss = [&]() { AttnRef f = attn_ref(D, H, G, 0, true, true, T, S, doc, q, k, v, sk, g); double L = 0; for (size_t i = 0; i < f.out.size(); ++i) L += f.out[i] * g[i]; return L; };
    Cmp c("fd: attention reference (docs, sink, alibi, GQA)", 1e-6, 1e-5);
    for (size_t i = 0; i < q.size(); ++i) c.add(fdiff(q, i, loss, 1e-5), r.dq[i], i);
    for (size_t i = 0; i < k.size(); ++i) c.add(fdiff(k, i, loss, 1e-5), r.dk[i], 1000 + i);
    for (size_t i = 0; i < v.size(); ++i) c.add(fdiff(v, i, loss, 1e-5), r.dv[i], 2000 + i);
    for (int h = 0; h < H; ++h) c.add(fdiff(sk, h, loss, 1e-5), r.dsink[h], 3000 + h);
    c.report();
}

// ------------------------------------------------------------------ router_bwd
template <int E, int K>
void test_router_bwd(int T, bool with_dgate, bool with_dscores) {
    std::vector<float> logits = rf((size_t)T * E, 2.0), scores((size_t)T * E);
    for (size_t i = 0; i < scores.size(); ++i) scores[i] = (float)(1.0 / (1.0 + std::exp(-(double)logits[i])));
    std::vector<int> idx((size_t)T * K);
    for (int t = 0; t < T; ++t) { std::vector<float> row(scores.begin() + (size_t)t * E, scores.begin() + (size_t)(t + 1) * E); auto c = topk_ref(row, K); for (int kk = 0; kk < K; ++kk) idx[t * K + kk] = c[kk]; }
    auto dgate = rf((size_t)T * K, 1.0), dsc = rf((size_t)T * E, 0.1);
    std::vector<float> dl((size_t)T * E, POISON_F); const float scale = 2.5f;
    emu_launch(T, 1, 256, [&] { vp::router_bwd<E, K>(scores.data(), idx.data(), with_dgate ? dgate.data() : nullptr, with_dscores ? dsc.data() : nullptr, dl.data(), T, scale); });
    char nm[100]; snprintf(nm, 100, "router_bwd E%d K%d T%d dgate%d dscores%d", E, K, T, with_dgate, with_dscores);
    // finite differences of L(l) = Σ dgate·gate(σ(l)) + Σ dscores·σ(l) with the selection fixed
    Cmp c(std::string("fd: ") + nm, 1e-5, 1e-3);
    for (int t = 0; t < T; ++t) {
        std::vector<double> l(logits.begin() + (size_t)t * E, logits.begin() + (size_t)(t + 1) * E);
        auto loss = [&]() { std::vector<double> s(E); for (int e = 0; e < E; ++e) s[e] = 1.0 / (1.0 + std::exp(-l[e]));
            double z = 1e-20; for (int kk = 0; kk < K; ++kk) z += s[idx[t * K + kk]];
            double L = 0; if (with_dgate) for (int kk = 0; kk < K; ++kk) L += dgate[t * K + kk] * scale * s[idx[t * K + kk]] / z;
            if (with_dscores) for (int e = 0; e < E; ++e) L += dsc[(size_t)t * E + e] * s[e]; return L; };
        for (int e = 0; e < E; ++e) c.add(fdiff(l, e, loss, 1e-5), dl[(size_t)t * E + e], (long)t * E + e);
    }
    c.report();
}

// ------------------------------------------------------------------ moe_gather + combine_bwd
template <int H, int K>
void test_combine_bwd(int T) {
    std::vector<int> perm(T * K); for (int i = 0; i < T * K; ++i) perm[i] = i; std::shuffle(perm.begin(), perm.end(), rng);
    auto yp = rbf((size_t)T * K * H, 1.0), dh = rbf((size_t)T * H, 1.0), dxp = rbf((size_t)T * K * H, 1.0); auto gate = rf(T * K, 1.0);
    std::vector<bf> dyp((size_t)T * K * H, POISON_BF), dx((size_t)T * H, POISON_BF);
    std::vector<float> dgate(T * K, POISON_F);
    emu_launch(T, 1, 128, [&] { vp::combine_bwd<H, K>(yp.data(), perm.data(), gate.data(), dh.data(), dyp.data(), dgate.data(), T); });
    emu_launch(T, 1, 128, [&] { vp::moe_gather<H, K>(dxp.data(), perm.data(), nullptr, dx.data(), T); });
    // With a running gradient: dx = bf16(acc + Σ_k dxp), one f32 sum.
    auto run_acc = rbf((size_t)T * H, 1.0); std::vector<bf> dxa((size_t)T * H, POISON_BF);
    emu_launch(T, 1, 128, [&] { vp::moe_gather<H, K>(dxp.data(), perm.data(), run_acc.data(), dxa.data(), T); });
    Cmp ca(std::string("moe_gather acc H") + std::to_string(H) + " K" + std::to_string(K), 1e-3, 8e-3);
    for (int t = 0; t < T; ++t) for (int j = 0; j < H; ++j) {
        double s = fl(run_acc[(size_t)t * H + j]); for (int kk = 0; kk < K; ++kk) s += fl(dxp[(size_t)perm[t * K + kk] * H + j]);
        ca.add(s, fl(dxa[(size_t)t * H + j]), (long)t * H + j);
    }
    ca.report();
    char nm[100]; snprintf(nm, 100, "combine_bwd H%d K%d T%d", H, K, T);
    Cmp c(nm, 1e-3, 8e-3), cg(std::string(nm) + " dgate", 1e-4, 1e-4), cx(std::string("moe_gather H") + std::to_string(H) + " K" + std::to_string(K), 1e-3, 8e-3);
    for (int t = 0; t < T; ++t) {
        for (int kk = 0; kk < K; ++kk) { int r = perm[t * K + kk]; double s = 0;
            for (int j = 0; j < H; ++j) { s += (double)fl(dh[(size_t)t * H + j]) * fl(yp[(size_t)r * H + j]); c.add(gate[t * K + kk] * fl(dh[(size_t)t * H + j]), fl(dyp[(size_t)r * H + j]), (long)r * H + j); }
            cg.add(s, dgate[t * K + kk], t * K + kk); }
        for (int j = 0; j < H; ++j) {
            double s = 0; for (int kk = 0; kk < K; ++kk) s += fl(dxp[(size_t)perm[t * K + kk] * H + j]); cx.add(s, fl(dx[(size_t)t * H + j]), (long)t * H + j); }
    }
    c.report(); cg.report(); cx.report();
}

// ------------------------------------------------------------------ seq aux backward
template <int E, int K>
void test_seq_aux_bwd(int B, int S, int X) {
    const int T = B * S;
    std::vector<float> scores((size_t)T * E); for (auto& s : scores) s = (float)(1.0 / (1.0 + std::exp(-2.0 * nrm())));
    float daux = 0.37f, inv_rows = 1.0f / B;
    std::vector<float> counts((size_t)B * E, POISON_F), ds((size_t)T * E, POISON_F);
    std::vector<int> pc((size_t)T * E, -7);
    emu_launch(X, B, 256, [&] { vp::seq_aux_count<E, K>(scores.data(), counts.data(), S, pc.data(), g_tickets); });
    { bool zero = true; for (int t : g_tickets) zero &= t == 0; expect(zero, "seq_aux_count left a ticket set"); }
    emu_launch(T, 1, 256, [&] { vp::seq_aux_bwd<E, K>(scores.data(), counts.data(), &daux, ds.data(), T, S, inv_rows); });
    // reference counts, then a finite difference of daux·aux(scores) with the counts fixed
    std::vector<double> c((size_t)B * E, 0);
    for (int t = 0; t < T; ++t) { const float* row = &scores[(size_t)t * E]; double u = 1e-20; for (int e = 0; e < E; ++e) u += row[e];
        std::vector<float> nr(E); for (int e = 0; e < E; ++e) nr[e] = (float)(row[e] / u); for (int e : topk_ref(nr, K)) c[(size_t)(t / S) * E + e] += 1; }
    bool counts_ok = true; for (size_t i = 0; i < c.size(); ++i) counts_ok &= counts[i] == (float)c[i];
    char nm[100]; snprintf(nm, 100, "seq_aux_count+bwd E%d K%d B%d S%d X%d", E, K, B, S, X);
    expect(counts_ok, std::string(nm) + ": counts");
    Cmp cf(std::string("fd: ") + nm, 1e-9, 1e-4);
    for (int t = 0; t < T; t += std::max(1, T / 7)) {
        std::vector<double> x(scores.begin() + (size_t)t * E, scores.begin() + (size_t)(t + 1) * E);
        auto loss = [&]() { double u = 1e-20; for (double v : x) u += v; double L = 0; for (int e = 0; e < E; ++e) L += c[(size_t)(t / S) * E + e] * x[e] / u; return daux * inv_rows * E / ((double)K * S * S) * L; };
        for (int e = 0; e < E; ++e) cf.add(fdiff(x, e, loss, 1e-6), ds[(size_t)t * E + e], (long)t * E + e);
    }
    cf.report();
}

// ------------------------------------------------------------------ head_ce backward
// span_weight (the token losses' gradient), head_dl (recomputed logits → bf16 logit gradient),
// then the two gradient GEMMs the plan chains
// after it (gemm_nn AMODE 0: dz = dl·W; gemm_tn AMODE 0: dW = dlᵀ·z), one vocabulary chunk of C
// columns at a time as the plan runs them (dz summed over chunks in f32), against f64.
template <int V, int H, int C>
void test_head_dl(int T) {
    HeadCase hc(T, H, V);
    constexpr int NTILE = (V + 63) / 64, NCH = (V + C - 1) / C, LASTW = V - (NCH - 1) * C;
    std::vector<float> part((size_t)T * NTILE * 2), lab(T), tl(T), lse(T), wt(T);
    emu_launch((T + 63) / 64, NTILE, 128, [&] { vp::head_lse<V, H>(hc.z.data(), hc.w.data(), hc.labels.data(), part.data(), lab.data(), T); });
    emu_launch(T, 1, 256, [&] { vp::ce_lse<V>(part.data(), lab.data(), hc.mask.data(), tl.data(), lse.data(), T); });
    const float dloss = 0.8f;  // span_loss's gradient into the token losses' (span_weight)
    emu_launch((T + 255) / 256, 1, 256, [&] { vp::span_weight(nullptr, hc.span.data(), hc.scale.data(), hc.cw.data(), &dloss, wt.data(), T); });
    std::vector<bf> dl((size_t)T * V, POISON_BF), chunk((size_t)T * C), dz((size_t)T * H, POISON_BF);
    std::vector<float> dw((size_t)V * H, POISON_F), dzf((size_t)T * H, POISON_F);
    for (int j = 0; j < NCH; ++j) {
        const int c0 = j * C, width = j == NCH - 1 ? LASTW : C;
        std::fill(chunk.begin(), chunk.end(), POISON_BF);
        emu_launch((T + 63) / 64, (width + 63) / 64, 128, [&] { vp::head_dl<V, H, C>(hc.z.data(), hc.w.data(), hc.labels.data(), hc.mask.data(), lse.data(), wt.data(), chunk.data(), T, c0); });
        for (int t = 0; t < T; ++t) for (int c = 0; c < width; ++c) dl[(size_t)t * V + c0 + c] = chunk[(size_t)t * C + c];
        const float* acc = j > 0 ? dzf.data() : nullptr;
        const bf* w = hc.w.data() + (size_t)c0 * H;
        if (j == NCH - 1) {
            emu_launch((H + 63) / 64, (T + 63) / 64, 128, [&] { vp::gemm_nn<H, LASTW, 0, 0, 0, 0>(chunk.data(), nullptr, w, acc, nullptr, dz.data(), T, C, H); });
            emu_launch3((H + 63) / 64, (LASTW + 63) / 64, 1, 128, [&] { vp::gemm_tn<LASTW, H, 0, 0, 0, 0>(chunk.data(), hc.z.data(), nullptr, nullptr, dw.data() + (size_t)c0 * H, T, C, H, 0, nullptr, nullptr, nullptr); });
        } else {
            emu_launch((H + 63) / 64, (T + 63) / 64, 128, [&] { vp::gemm_nn<H, C, 0, 0, 0, 1>(chunk.data(), nullptr, w, acc, nullptr, dzf.data(), T, C, H); });
            emu_launch3((H + 63) / 64, (C + 63) / 64, 1, 128, [&] { vp::gemm_tn<C, H, 0, 0, 0, 0>(chunk.data(), hc.z.data(), nullptr, nullptr, dw.data() + (size_t)c0 * H, T, C, H, 0, nullptr, nullptr, nullptr); });
        }
    }
    char nm[100]; snprintf(nm, 100, "head_dl+gemm_nn+gemm_tn V%d H%d C%d T%d", V, H, C, T);
    Cmp cl(std::string(nm) + " dl", 1e-7, 8e-3), cz(std::string(nm) + " dz", 1e-6, 8e-3), cw(std::string(nm) + " dW", 1e-6, 1e-4);
    bool zeros = true;
    for (int t = 0; t < T; ++t) {
        const double w = hc.mask[t] ? (double)dloss * hc.scale[hc.span[t]] * hc.cw[t] : 0.0;
        auto l = hc.logits(t); const double L = HeadCase::lse(l);
        for (int c = 0; c < V; ++c) {
            const double r = w == 0 ? 0.0 : w * (std::exp(l[c] - L) - (c == hc.labels[t]));
            cl.add(r, fl(dl[(size_t)t * V + c]), (long)t * V + c);
            if (w == 0) zeros &= fl(dl[(size_t)t * V + c]) == 0.f && !std::signbit(fl(dl[(size_t)t * V + c]));
        }
    }
    // dz, dW in f64 from the kernel's bf16 dl (checked above against the exact gradient): what
    // remains is f32 accumulation and, for dz, its bf16 store.
    for (int t = 0; t < T; ++t) for (int k = 0; k < H; ++k) { double s = 0; for (int c = 0; c < V; ++c) s += (double)fl(dl[(size_t)t * V + c]) * fl(hc.w[(size_t)c * H + k]); cz.add(s, fl(dz[(size_t)t * H + k]), (long)t * H + k); }
    for (int c = 0; c < V; ++c) for (int k = 0; k < H; ++k) { double s = 0; for (int t = 0; t < T; ++t) s += (double)fl(dl[(size_t)t * V + c]) * fl(hc.z[(size_t)t * H + k]); cw.add(s, dw[(size_t)c * H + k], (long)c * H + k); }
    cl.report(); cz.report(); cw.report();
    expect(zeros, std::string(nm) + ": masked/zero-weight rows not exactly +0");
}

// ------------------------------------------------------------------ embedding backward
template <int H>
void test_embed_bwd(int T, int V) {
    std::vector<int> tok(T); for (auto& t : tok) t = rng() % V;
    for (int t = 0; t < T; t += 5) tok[t] = 3;  // a frequent id spanning every chunk
    tok[T - 1] = V - 1;
    auto dh = rbf((size_t)T * H, 1.0);
    auto run = [&](std::vector<float>& dt) {
        std::vector<int> sorted(2 * (size_t)T, -9); dt.assign((size_t)V * H, POISON_F);
        emu_launch((T + 2047) / 2048, 1, 1024, [&] { vp::embed_sort(tok.data(), sorted.data(), T); });
        emu_launch(V, 1, 128, [&] { vp::embed_bwd<H>(sorted.data(), dh.data(), dt.data(), T, V, 0); });
    };
    std::vector<float> d1, d2; run(d1); run(d2);
    std::vector<float> ref((size_t)V * H, 0.f);  // f32 sums in ascending token order
    for (int t = 0; t < T; ++t) for (int j = 0; j < H; ++j) ref[(size_t)tok[t] * H + j] += fl(dh[(size_t)t * H + j]);
    char nm[100]; snprintf(nm, 100, "embed_sort+embed_bwd H%d T%d V%d", H, T, V);
    bool ok = same_bits(d1, ref), det = same_bits(d1, d2);
    expect(ok, std::string(nm) + ": differs from the token-order f32 sum"); expect(det, std::string(nm) + ": not bitwise reproducible");
    if (ok && det) printf("%-60s ok (bitwise = token-order f32 sum, reproducible)\n", nm);
}

// ------------------------------------------------------------------ gradient sums (accum)
// The contract of every kernel that finalises a parameter gradient: with accum = 1 it leaves
// base + (what it stores with accum = 0) in each of its n outputs — the step's sum, one f32 add,
// bitwise as a separate accumulation pass — and nothing else changes. `run(y, accum)` launches it.
static void check_accum(const char* nm, size_t n, const std::function<void(float*, int)>& run) {
    std::vector<float> once(n + 1, POISON_F); run(once.data(), 0);
    auto base = rf(n + 1, 1.0); auto y = base; run(y.data(), 1);
    std::vector<float> want(n + 1);
    for (size_t i = 0; i < n; ++i) want[i] = base[i] + once[i];
    want[n] = base[n];
    bool written = true; for (size_t i = 0; i < n; ++i) written &= !std::isnan(once[i]);
    const bool ok = written && same_bits(y, want);
    char msg[160]; snprintf(msg, 160, "accum: %s", nm);
    expect(ok, std::string(msg) + (written ? ": sum is not base + gradient bitwise" : ": left an output unwritten"));
    if (ok) printf("%-60s ok (bitwise = base + stored)\n", msg);
}

static void test_accum() {
    const int M = 70, N = 40, K = 36;
    std::vector<int> off{0, 30, 30, 69, 70};  // four experts, one empty
    auto a = rbf((size_t)M * N, 1.0); auto b = rbf((size_t)M * K, 1.0);
    check_accum("gemm_tn N40 K36 (pairs)", (size_t)N * K, [&](float* y, int acc) {
        emu_launch3((K + 63) / 64, (N + 63) / 64, 1, 128, [&] { vp::gemm_tn<N, K, 0, 0, 0, 0>(a.data(), b.data(), nullptr, nullptr, y, M, N, K, acc, nullptr, nullptr, nullptr); });
    });
    check_accum("gemm_tn N40 K35 (scalar tail)", (size_t)N * 35, [&](float* y, int acc) {
        emu_launch3(1, 1, 1, 128, [&] { vp::gemm_tn<N, 35, 0, 0, 1, 0>(a.data(), b.data(), nullptr, nullptr, y, M, N, K, acc, nullptr, nullptr, nullptr); });
    });
    check_accum("gemm_tn E4 (empty expert)", (size_t)4 * N * K, [&](float* y, int acc) {
        emu_launch3(1, 1, 4, 128, [&] { vp::gemm_tn<N, K, 4, 0, 0, 0>(a.data(), b.data(), nullptr, off.data(), y, M, N, K, acc, nullptr, nullptr, nullptr); });
    });
    auto parts = rf(3 * 300, 1.0);
    std::vector<float> tn_parts((size_t)3 * N * K + 3 * N), tn_y((size_t)4 * N * K);
    check_accum("gemm_tn N40 K36 split 3 (last blocks add)", (size_t)N * K, [&](float* y, int acc) {
        emu_launch3(1, 1, 3, 128, [&] { vp::gemm_tn<N, K, 0, 0, 0, 0>(a.data(), b.data(), nullptr, nullptr, tn_parts.data(), M, N, K, acc, y, nullptr, g_tickets); });
    });
    // The bias gradient shares the weight gradient's accum (dW goes to a scratch here).
    check_accum("gemm_tn BIAS db E4 (empty expert)", (size_t)4 * N, [&](float* db, int acc) {
        emu_launch3(1, 1, 4, 128, [&] { vp::gemm_tn<N, K, 4, 0, 0, 1>(a.data(), b.data(), nullptr, off.data(), tn_y.data(), M, N, K, acc, nullptr, db, nullptr); });
    });
    check_accum("gemm_tn BIAS db split 3 (last block adds)", N, [&](float* db, int acc) {
        emu_launch3(1, 1, 3, 128, [&] { vp::gemm_tn<N, K, 0, 0, 0, 1>(a.data(), b.data(), nullptr, nullptr, tn_parts.data(), M, N, K, acc, tn_y.data(), db, g_tickets); });
    });
    std::vector<float> cs_parts((size_t)3 * K);
    check_accum("colsum P3 (last block adds)", K, [&](float* y, int acc) {
        emu_launch(3, 1, 256, [&] { vp::colsum<K, 0>(b.data(), y, M, acc, cs_parts.data(), g_tickets); });
    });
    {
        auto v = rbf(700, 1.0), v1 = rbf(700, 1.0), g = rbf(700, 1.0); float logit = -0.3f;
        std::vector<bf> dv(700), dv1(700); std::vector<float> part(5);
        check_accum("vres_bwd dlogit (last block adds)", 1, [&](float* y, int acc) {
            emu_launch(5, 1, 256, [&] { vp::vres_bwd(v.data(), v1.data(), &logit, g.data(), dv.data(), dv1.data(), part.data(), 700, y, g_tickets, acc); });
        });
    }
    check_accum("sum", 1, [&](float* y, int acc) {
        emu_launch(1, 1, 1024, [&] { vp::sum(parts.data(), y, 900, 0.5f, acc); });
    });
    auto x0 = rf(300, 1.0), x1 = rf(300, 1.0);
    check_accum("add IN_F32 OUT_F32", 300, [&](float* y, int acc) {
        emu_launch(2, 1, 256, [&] { vp::add<1, 1, 4>(x0.data(), x1.data(), nullptr, nullptr, nullptr, y, 300, acc); });
    });
    std::vector<int> tok(90); for (auto& t : tok) t = rng() % 11;
    auto dh = rbf(90 * 16, 1.0);
    std::vector<int> sorted(180);
    emu_launch(1, 1, 1024, [&] { vp::embed_sort(tok.data(), sorted.data(), 90); });
    check_accum("embed_bwd", 11 * 16, [&](float* y, int acc) {
        emu_launch(11, 1, 128, [&] { vp::embed_bwd<16>(sorted.data(), dh.data(), y, 90, 11, acc); });
    });
}

static void run_bwd_tests(const std::function<bool(const char*)>& want) {
    if (want("bwd-small")) {
        test_add<0, 0, 1>(300, false); test_add<0, 0, 3>(300, false); test_add<1, 1, 4>(300, true); test_add<0, 1, 4>(300, false); test_add<1, 0, 2>(300, true);
        fd_rmsnorm();
        test_rmsnorm_bwd<1024>(5, 3, false); test_rmsnorm_bwd<128>(37, 2, false); test_rmsnorm_bwd<36>(9, 4, false); test_rmsnorm_bwd<16>(6, 1, true);
        test_rmsnorm_bwd<1024>(5, 3, false, true); test_rmsnorm_bwd<36>(9, 4, false, true); test_rmsnorm_bwd<16>(6, 1, true, true);
        test_qk_norm_bwd<128>(9, 8, 2, 4); test_qk_norm_bwd<36>(5, 1, 3, 3);
        test_tpa_bwd<8, 2, 128, 4, 2>(3, false); test_tpa_bwd<6, 3, 20, 3, 1>(2, true); test_tpa_bwd<4, 2, 16, 3, 2>(130, false);
        test_grape_bwd<16>(40, 13, 4, 2, 3); test_grape_bwd<128>(5, 3, 8, 2, 2);
        test_vres_bwd(1000, 3);
        test_combine_bwd<64, 2>(20); test_combine_bwd<36, 3>(9); test_combine_bwd<1024, 4>(3);
        test_accum();
    }
    if (want("bwd-gemm")) {
        test_gemm_nn<72, 80, 0, 0, 0, 0>({70}, 80, 0, 72, false);
        test_gemm_nn<40, 36, 0, 0, 3, 0>({65}, 36, 0, 40, false);       // odd KD: scalar path, DRELU2
        test_gemm_nn<64, 48, 0, 1, 0, 1>({66}, 48, 0, 64, false);       // f32 A, hi+lo split, f32 out
        test_gemm_nn<64, 48, 0, 1, 0, 0>({66}, 48, 0, 64, false);       // f32 A, hi+lo split, bf16 out
        test_gemm_nn<72, 48, 0, 1, 2, 0>({66}, 48, 0, 72, false);       // f32 A, + bf16 running gradient (EPI_RESID)
        test_gemm_nn<35, 40, 0, 1, 2, 0>({30}, 40, 0, 35, false);       // EPI_RESID, odd N (scalar tail)
        test_gemm_nn<64, 48, 0, 1, 0, 1>({30}, 52, 2, 64, false);       // f32 A split, unaligned, f32 out
        test_gemm_nn<48, 4, 0, 0, 0, 1>({70}, 44, 36, 48, true);        // TPA-like slice (lda 44, off 36), acc chain
        test_gemm_nn<48, 40, 5, 0, 3, 0>({70, 0, 1, 64, 29}, 48, 0, 48, false);  // grouped (row stride lda=48 ≥ KD)
        test_gemm_nn<1024, 32, 0, 0, 0, 0>({3}, 32, 0, 1024, true);
        test_gemm_tn<72, 40, 0, 0, 0>({100}, 72, 0, 40, 1);
        test_gemm_tn<72, 40, 0, 0, 0>({100}, 72, 0, 40, 3);            // split over rows, last blocks add
        test_gemm_tn<40, 36, 0, 0, 1>({70}, 40, 0, 36, 2);             // ReLU² B operand, odd K
        test_gemm_tn<64, 48, 0, 1, 0>({90}, 64, 0, 48, 1);             // f32 A split
        test_gemm_tn<30, 64, 0, 1, 0>({33}, 31, 1, 64, 1);             // f32 A split, odd lda/unaligned
        test_gemm_tn<4, 40, 0, 0, 0>({80}, 44, 36, 40, 4);             // TPA-like 4-wide slice
        test_gemm_tn<48, 40, 5, 0, 1>({70, 0, 1, 64, 29}, 48, 0, 40, 1);  // grouped, empty expert
        test_gemm_tn<48, 40, 5, 0, 0>({70, 0, 1, 64, 29}, 48, 0, 40, 1, 50);  // grouped, B through bsrc
        test_gemm_tn<72, 40, 0, 0, 0, 1>({100}, 72, 0, 40, 1);         // + bias (two row tiles, one k tile)
        test_gemm_tn<72, 136, 0, 0, 0, 1>({100}, 80, 8, 136, 3);       // + bias, split, three k tiles
        test_gemm_tn<40, 36, 0, 0, 1, 1>({70}, 44, 0, 36, 2);          // + bias, ReLU² B, split 2
        test_gemm_tn<48, 40, 5, 0, 1, 1>({70, 0, 1, 64, 29}, 48, 0, 40, 1);  // + per-expert bias, empty expert
        test_tpa_gemms<4, 2, 16, 3, 2, 72>(70, 1); test_tpa_gemms<4, 2, 16, 3, 2, 72>(130, 3);   // vector path; split
        test_tpa_gemms<6, 3, 20, 3, 1, 36>(65, 2);                                                 // odd widths, hidden 36
        test_colsum<300, 0>(130, 4); test_colsum<8, 1>(77, 5); test_colsum<40, 0>(3, 5);  // more blocks than rows
    }
    if (want("bwd-attn")) {
        fd_attention();
        { std::vector<int> doc(10, 0); for (int t = 0; t < 10; ++t) doc[t] = t < 3 ? 0 : (t < 5 ? 1 : (t < 8 ? 2 : 3)); test_attn_bwd<16, 2, 1, 0, 1, 1>(10, 5, doc, 1.0, "tiny docs+sink"); }
        { std::vector<int> doc(160); for (int t = 0; t < 160; ++t) doc[t] = (t % 80) < 30 ? 0 : ((t % 80) < 33 ? 1 : 2); test_attn_bwd<16, 4, 2, 0, 0, 0>(160, 80, doc, 1.0, "docs"); }
        { std::vector<int> doc(150, 0); test_attn_bwd<32, 4, 1, 5, 0, 1>(150, 75, doc, 2.0, "win5 sinks"); }
        { std::vector<int> doc(200); for (int t = 0; t < 200; ++t) doc[t] = t / 37; test_attn_bwd<16, 6, 3, 0, 1, 1>(200, 100, doc, 3.0, "alibi6 docs"); }
        { std::vector<int> doc(130, 4); doc[100] = 5; test_attn_bwd<128, 8, 2, 100, 0, 1>(130, 130, doc, 1.0, "D128 win100"); }
        { std::vector<int> doc(70, 0); test_attn_bwd<16, 2, 1, 500, 0, 0>(70, 35, doc, 1.0, "win>S"); }
        { std::vector<int> doc(130, 0); doc[129] = 1; test_attn_bwd<128, 8, 2, 0, 1, 1>(130, 130, doc, 1.0, "D128 global alibi"); }
    }
    if (want("bwd-router")) {
        test_router_bwd<8, 2>(5, true, true); test_router_bwd<8, 2>(3, true, false); test_router_bwd<300, 4>(2, true, true); test_router_bwd<16, 4>(3, false, true);
        test_seq_aux_bwd<40, 3>(3, 17, 4); test_seq_aux_bwd<256, 4>(2, 9, 64); test_seq_aux_bwd<40, 3>(2, 100, 64); test_seq_aux_bwd<40, 3>(2, 30, 1);
    }
    if (want("bwd-loss")) {
        test_head_dl<1000, 64, 192>(7); test_head_dl<1001, 36, 1024>(70); test_head_dl<130, 72, 64>(65);
        test_embed_bwd<40>(300, 17); test_embed_bwd<1024>(9, 5); test_embed_bwd<16>(4500, 60);
    }
}
