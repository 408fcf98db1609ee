// Optimizer kernels (optim.cuh) against a transcription of ir/src/optim.rs: AdamW bitwise, the
// per-unit norm sums to f64 rounding, and a whole Normuon step (momentum, the five batched Polar
// Express iterations on tensor cores, row normalisation, update, model copy) on wide, tall,
// square and partial-tile shapes.
#include "optim.cuh"

// Units of 1000, 1 and 2000 elements (one with a NaN when asked), and the middle-sized unit
// again at another offset: its sum must not depend on where it lies (ZeRO-1 shards).
static void test_opt_sumsq(bool with_nan) {
    const long long n = 3001;
    auto g = rf(n, 3.0);
    if (with_nan) g[1500] = POISON_F;
    std::vector<long long> starts = {0, 1000, 1001, 3001};
    const int units = 3;
    std::vector<double> out(units + 1, -1.0);
    emu_launch(units, 1, 256, [&] { vp::opt_sumsq(g.data(), starts.data(), out.data()); });
    char nm[120]; snprintf(nm, 120, "opt_sumsq units nan%d", with_nan);
    Cmp c(nm, 0, 1e-13);
    for (int u = 0; u < units; ++u) {
        double ref = 0;
        for (long long i = starts[u]; i < starts[u + 1]; ++i) ref += (double)g[i] * g[i];
        if (with_nan && u == 2) expect(std::isnan(out[u]), std::string(nm) + ": a NaN gradient must give a NaN sum");
        else c.add(ref, out[u], u);
    }
    c.report();
    expect(out[units] == -1.0, "opt_sumsq wrote past its units");
    std::vector<float> moved(2000 + 37, POISON_F);
    std::copy(g.begin() + 1001, g.end(), moved.begin() + 37);
    std::vector<long long> at = {37, 37 + 2000};
    double again = -1.0;
    emu_launch(1, 1, 256, [&] { vp::opt_sumsq(moved.data(), at.data(), &again); });
    expect(with_nan ? std::isnan(again) : again == out[2], std::string(nm) + ": a unit's sum depends on its offset");
}

// ir::optim::adamw_step_bc with the clip coefficient applied first (optim::apply).
template <int OUT>
static void test_opt_adamw(long long n) {
    auto g = rf(n, 1e-2), m = rf(n, 1e-3), s = rf(n, 1e-5), w = rf(n, 0.1);
    for (auto& x : s) x = std::fabs(x);
    const float coef = 0.37f;
    const double b1 = 0.9, b2 = 0.999, eps = 1e-8, lr = 3e-4, wd = 0.1;
    const double bc1 = 1 - std::pow(b1, 7), bc2 = 1 - std::pow(b2, 7);
    auto m2 = m, s2 = s, w2 = w;
    std::vector<float> mf(n + 1, POISON_F);
    std::vector<bf> mb(n + 1, POISON_BF);
    void* model = OUT ? (void*)mf.data() : (void*)mb.data();
    emu_launch(2, 1, 128, [&] { vp::opt_adamw<OUT>(g.data(), m2.data(), s2.data(), w2.data(), model, n, coef, b1, b2, eps, bc1, bc2, lr, wd); });
    bool exact = true;
    const double keep = 1.0 - lr * wd;
    for (long long i = 0; i < n; ++i) {
        const double gv = (double)(g[i] * coef);
        const float mv = (float)(b1 * m[i] + (1.0 - b1) * gv);
        const float sv = (float)(b2 * s[i] + (1.0 - b2) * gv * gv);
        const double u = (mv / bc1) / (std::sqrt(sv / bc2) + eps);
        const float wn = (float)(w[i] * keep - lr * u);
        exact &= m2[i] == mv && s2[i] == sv && w2[i] == wn;
        exact &= OUT ? mf[i] == wn : mb[i].x == tobf(wn).x;
    }
    char nm[80]; snprintf(nm, 80, "opt_adamw<%d> n%lld (bitwise)", OUT, n);
    expect(exact, std::string(nm) + ": differs from the reference");
    expect(OUT ? std::isnan(mf[n]) : is_poison(mb[n]), std::string(nm) + ": wrote past n");
    printf("%-60s %s\n", nm, exact ? "ok" : "FAIL");
}

// One Normuon step on `batch` R×C matrices: the fp32 reference (ir::optim, FastGemm ≈ exact), or
// with `torch_bf16` Polar Express as the reference implementation's CUDA path computes it (MODEL.md
// §7.2: X bf16, every matmul and element-wise result rounded to bf16).
static float rb(double x) { return fl(tobf(x)); }
static void ref_normuon(int R, int C, int batch, const std::vector<float>& g, std::vector<float>& m, std::vector<float>& v,
                        std::vector<float>& w, float coef, double mu, double beta2, double eps, double safety,
                        const double (*co)[3], int iters, double lr, double wd, bool torch_bf16 = false) {
    auto q = [&](double x) { return torch_bf16 ? rb(x) : (float)x; };
    const bool tall = R > C;
    const int M = tall ? C : R, NW = tall ? R : C;
    const long long sz = (long long)R * C;
    for (int z = 0; z < batch; ++z) {
        std::vector<float> u(sz), x(sz);
        double ss = 0;
        for (long long i = 0; i < sz; ++i) {
            const double gv = (double)(g[z * sz + i] * coef);
            const float mn = (float)(mu * m[z * sz + i] + (1 - mu) * gv);
            m[z * sz + i] = mn;
            u[i] = (float)((1 - mu) * gv + mu * mn);
        }
        for (int i = 0; i < M; ++i)
            for (int j = 0; j < NW; ++j) x[i * NW + j] = tall ? u[j * C + i] : u[i * NW + j];
        for (auto xv : x) ss += (double)xv * xv;
        const double denom = std::sqrt(ss) * (1 + safety) + eps;
        if (torch_bf16)
            for (auto& xv : x) xv = rb(xv);
        for (auto& xv : x) xv = q(xv / denom);
        std::vector<float> A(M * M), B(M * M), X2(sz);
        for (int it = 0; it < iters; ++it) {
            for (int i = 0; i < M; ++i)
                for (int j = 0; j < M; ++j) {
                    double s = 0; for (int k = 0; k < NW; ++k) s += (double)x[i * NW + k] * x[j * NW + k];
                    A[i * M + j] = q(s);
                }
            for (int i = 0; i < M; ++i)
                for (int j = 0; j < M; ++j) {
                    double s = 0; for (int k = 0; k < M; ++k) s += (double)A[i * M + k] * A[j * M + k];
                    B[i * M + j] = torch_bf16 ? rb(rb(co[it][1] * A[i * M + j]) + rb(co[it][2] * rb(s)))
                                              : (float)(co[it][1] * A[i * M + j] + co[it][2] * (float)s);
                }
            for (int i = 0; i < M; ++i)
                for (int j = 0; j < NW; ++j) {
                    double s = 0; for (int k = 0; k < M; ++k) s += (double)B[i * M + k] * x[k * NW + j];
                    X2[i * NW + j] = torch_bf16 ? rb(rb(co[it][0] * x[i * NW + j]) + rb(s))
                                                : (float)(co[it][0] * x[i * NW + j] + (float)s);
                }
            x = X2;
        }
        // Back to R×C, then the row normalisation and the update.
        std::vector<float> o(sz);
        for (int i = 0; i < M; ++i)
            for (int j = 0; j < NW; ++j) (tall ? o[j * C + i] : o[i * NW + j]) = x[i * NW + j];
        std::vector<double> srow(R);
        double norm_sq = 0, scaled_sq = 0;
        for (int r = 0; r < R; ++r) {
            double s2 = 0; for (int c = 0; c < C; ++c) s2 += (double)o[r * C + c] * o[r * C + c];
            float& vr = v[z * R + r];
            vr = (float)(beta2 * vr + (1 - beta2) * (s2 / C));
            srow[r] = 1.0 / std::sqrt((double)vr + eps);
            norm_sq += s2; scaled_sq += srow[r] * srow[r] * s2;
        }
        const double restore = std::sqrt(norm_sq) / std::max(std::sqrt(scaled_sq), eps);
        const double shape = std::sqrt(std::max((double)R / C, 1.0)), keep = 1 - lr * wd;
        for (int r = 0; r < R; ++r)
            for (int c = 0; c < C; ++c) {
                const float d = (float)(o[r * C + c] * (srow[r] * restore * shape));
                float& wv = w[z * sz + r * C + c];
                wv = (float)(wv * keep - lr * d);
            }
    }
}

// The default Polar Express table, as vpmoe_ir::optim::DEFAULT_POLAR_EXPRESS writes it into
// vp_consts.cuh.
static const auto& PE_COEFFS = vp::POLAR_EXPRESS;

// One Normuon step through the device kernels, as the runtime launches them, vs ref_normuon.
template <int R, int C>
static void test_normuon(int batch) {
    constexpr bool TALL = R > C;
    constexpr int M = TALL ? C : R, NW = TALL ? R : C;
    const long long sz = (long long)R * C;
    auto g = rf(batch * sz, 1e-2), m = rf(batch * sz, 1e-2), v = rf(batch * R, 1e-5), w = rf(batch * sz, 0.05);
    for (auto& x : v) x = std::fabs(x);
    const float coef = 0.8f;
    const double mu = 0.95, beta2 = 0.95, eps = 1e-10, safety = 0.02, pe_eps = 1e-6, lr = 0.02, wd = 0.1;
    auto m2 = m, v2 = v, w2 = w;
    std::vector<float> u(batch * sz + 1, POISON_F), bm(batch * M * M + 1, POISON_F);
    std::vector<bf> x0(batch * sz + 1, POISON_BF), x1(batch * sz + 1, POISON_BF), a(batch * M * M + 1, POISON_BF);
    std::vector<bf> model(batch * sz + 1, POISON_BF);
    emu_launch(batch, 1, 256, [&] { vp::pe_start<R, C>(g.data(), m2.data(), u.data(), x0.data(), coef, mu, 1, safety, pe_eps); });
    bf* xs[2] = {x0.data(), x1.data()};
    for (int it = 0; it < 5; ++it) {
        bf* xi = xs[it % 2];
        emu_launch3((M + 63) / 64, (M + 63) / 64, batch, 128, [&] { vp::pe_gram<M, NW>(xi, a.data()); });
        emu_launch3((M + 63) / 64, (M + 63) / 64, batch, 128, [&] {
            vp::pe_poly<M>(a.data(), bm.data(), (float)PE_COEFFS[it][0], (float)PE_COEFFS[it][1], (float)PE_COEFFS[it][2]);
        });
        if (it < 4)
            emu_launch3((NW + 63) / 64, (M + 63) / 64, batch, 128, [&] { vp::pe_apply<M, NW, 0>(bm.data(), xi, xs[(it + 1) % 2]); });
        else
            emu_launch3((NW + 63) / 64, (M + 63) / 64, batch, 128, [&] { vp::pe_apply<M, NW, 1>(bm.data(), xi, u.data()); });
    }
    emu_launch(batch, 1, 256, [&] { vp::pe_finish<R, C>(u.data(), v2.data(), w2.data(), model.data(), beta2, eps, lr, wd); });

    auto m3 = m, v3 = v, w3 = w;
    ref_normuon(R, C, batch, g, m3, v3, w3, coef, mu, beta2, eps, safety, PE_COEFFS, 5, lr, wd);
    bool mexact = true;
    for (long long i = 0; i < batch * sz; ++i) mexact &= m2[i] == m3[i];
    char nm[120];
    snprintf(nm, 120, "normuon R%d C%d x%d: momentum (bitwise)", R, C, batch);
    expect(mexact, nm);
    printf("%-60s %s\n", nm, mexact ? "ok" : "FAIL");
    // The update Δ = (w_old·keep − w)/lr. Its error against fp32 comes from Polar Express on tensor
    // cores; the bar is the reference implementation's own CUDA path (bf16 throughout): the
    // device's rms and max errors must not exceed the bf16 reference's (10 % slack for the draw).
    auto m4 = m, v4 = v, w4 = w;
    ref_normuon(R, C, batch, g, m4, v4, w4, coef, mu, beta2, eps, safety, PE_COEFFS, 5, lr, wd, true);
    const double keep = 1 - lr * wd;
    double ref_sq = 0, dev_err = 0, torch_err = 0, dev_max = 0, torch_max = 0;
    for (long long i = 0; i < batch * sz; ++i) {
        const double d = (w[i] * keep - w3[i]) / lr, dd = (w[i] * keep - w2[i]) / lr, dt = (w[i] * keep - w4[i]) / lr;
        ref_sq += d * d;
        dev_err += (dd - d) * (dd - d);
        torch_err += (dt - d) * (dt - d);
        dev_max = std::max(dev_max, std::fabs(dd - d));
        torch_max = std::max(torch_max, std::fabs(dt - d));
    }
    const double rms = std::sqrt(ref_sq / (batch * sz));
    dev_err = std::sqrt(dev_err / (batch * sz)) / rms;
    torch_err = std::sqrt(torch_err / (batch * sz)) / rms;
    const bool upd_ok = dev_err <= 1.1 * torch_err && dev_max <= 1.1 * torch_max && std::isfinite(dev_err);
    snprintf(nm, 120, "normuon R%d C%d x%d: update vs fp32", R, C, batch);
    printf("%-60s %s  rel_rms_err=%.3g max=%.3g·rms (reference's bf16 path: %.3g, %.3g)\n", nm, upd_ok ? "ok  " : "FAIL",
           dev_err, dev_max / rms, torch_err, torch_max / rms);
    if (!upd_ok) g_fail++;
    // v = mean of the row's squared update: the same bar as the update itself (the bf16 path's
    // errors, 10 % slack), since a fixed relative tolerance trips on rows whose update is small.
    double v_sq = 0, dv = 0, tv = 0, dv_max = 0, tv_max = 0;
    for (int i = 0; i < batch * R; ++i) {
        v_sq += (double)v3[i] * v3[i];
        dv += ((double)v2[i] - v3[i]) * ((double)v2[i] - v3[i]);
        tv += ((double)v4[i] - v3[i]) * ((double)v4[i] - v3[i]);
        dv_max = std::max(dv_max, std::fabs((double)v2[i] - v3[i]));
        tv_max = std::max(tv_max, std::fabs((double)v4[i] - v3[i]));
    }
    const double v_rms = std::sqrt(v_sq / (batch * R));
    dv = std::sqrt(dv / (batch * R)) / v_rms;
    tv = std::sqrt(tv / (batch * R)) / v_rms;
    const bool v_ok = dv <= 1.1 * tv && dv_max <= 1.1 * tv_max && std::isfinite(dv);
    snprintf(nm, 120, "normuon R%d C%d x%d: second moment v", R, C, batch);
    printf("%-60s %s  rel_rms_err=%.3g max=%.3g·rms (reference's bf16 path: %.3g, %.3g)\n", nm, v_ok ? "ok  " : "FAIL", dv,
           dv_max / v_rms, tv, tv_max / v_rms);
    if (!v_ok) g_fail++;
    bool copy = true;
    for (long long i = 0; i < batch * sz; ++i) copy &= model[i].x == tobf(w2[i]).x;
    expect(copy, "normuon: the model copy is not bf16(master)");
    expect(is_poison(model[batch * sz]) && std::isnan(u[batch * sz]) && is_poison(x1[batch * sz]), "normuon wrote past its chunk");
}

static void run_optim_tests(const std::function<bool(const char*)>& want) {
    if (!want("optim")) return;
    test_opt_sumsq(false);
    test_opt_sumsq(true);
    test_opt_adamw<0>(1500);
    test_opt_adamw<1>(333);
    test_normuon<8, 40>(3);    // wide, one partial tile
    test_normuon<72, 24>(2);   // tall (transposed), X 24×72
    test_normuon<70, 70>(1);   // square, two tiles per side
    test_normuon<4, 130>(2);   // TPA-factor-like 4×N
}
