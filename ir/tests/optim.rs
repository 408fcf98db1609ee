//! The optimizer's reference math (MODEL.md §7): hand-computed single steps, Polar Express against
//! an exact SVD polar factor, the Normuon pieces pinned one by one, batching invariance, clipping
//! and the LR schedule.

use serde::de::{value::Error as DeError, Deserialize, IntoDeserializer};
use vpmoe_ir::optim::*;
use vpmoe_ir::reference::NaiveGemm;
use vpmoe_ir::rng::Rng;

fn rel_close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

/// Deterministic N(0,1) samples (SplitMix64 + Box–Muller).
fn normals(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

/// Thin SVD `a = u·diag(s)·vᵀ` of a row-major `r×c` matrix by one-sided (Hestenes) Jacobi in f64:
/// `u` is `r×k`, `v` is `c×k`, `k = min(r, c)`, singular values in no particular order.
fn svd(a: &[f64], r: usize, c: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    if r < c {
        let mut at = vec![0.0; r * c];
        for i in 0..r {
            for j in 0..c {
                at[j * r + i] = a[i * c + j];
            }
        }
        let (u, s, v) = svd(&at, c, r);
        return (v, s, u);
    }
    // r >= c: rotate column pairs of b until they are orthogonal; v accumulates the rotations.
    let mut b = a.to_vec();
    let mut v = vec![0.0; c * c];
    for i in 0..c {
        v[i * c + i] = 1.0;
    }
    for _sweep in 0..100 {
        let mut rotated = false;
        for p in 0..c {
            for q in p + 1..c {
                let (mut al, mut be, mut ga) = (0.0, 0.0, 0.0);
                for i in 0..r {
                    al += b[i * c + p] * b[i * c + p];
                    be += b[i * c + q] * b[i * c + q];
                    ga += b[i * c + p] * b[i * c + q];
                }
                if ga.abs() <= 1e-15 * (al * be).sqrt() || ga == 0.0 {
                    continue;
                }
                rotated = true;
                let zeta = (be - al) / (2.0 * ga);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let cs = 1.0 / (1.0 + t * t).sqrt();
                let sn = cs * t;
                for (m, n) in [(&mut b, r), (&mut v, c)] {
                    for i in 0..n {
                        let (xp, xq) = (m[i * c + p], m[i * c + q]);
                        m[i * c + p] = cs * xp - sn * xq;
                        m[i * c + q] = sn * xp + cs * xq;
                    }
                }
            }
        }
        if !rotated {
            break;
        }
    }
    let mut s = vec![0.0; c];
    for (j, sj) in s.iter_mut().enumerate() {
        *sj = (0..r).map(|i| b[i * c + j] * b[i * c + j]).sum::<f64>().sqrt();
        for i in 0..r {
            b[i * c + j] /= *sj;
        }
    }
    (b, s, v)
}

/// `u·diag(d)·vᵀ` (`u` r×k, `v` c×k).
fn usv(u: &[f64], d: &[f64], v: &[f64], r: usize, c: usize) -> Vec<f64> {
    let k = d.len();
    let mut out = vec![0.0; r * c];
    for i in 0..r {
        for j in 0..c {
            out[i * c + j] = (0..k).map(|t| u[i * k + t] * d[t] * v[j * k + t]).sum();
        }
    }
    out
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn frob(x: &[f64]) -> f64 {
    x.iter().map(|v| v * v).sum::<f64>().sqrt()
}

// ---------------------------------------------------------------------------------------------
// Polar Express
// ---------------------------------------------------------------------------------------------

/// The table's equioscillation band, evaluated on a grid: on `[1e-3, 1]` the composed polynomial
/// stays in `[0.858873, 1.141127]`, so `|p(s) − 1| ≤ 0.14113`. Below 1e-3 it falls off linearly
/// (`p(s) ≈ 989·s`, the product of the `a`s); the top of the range after the safety factor is
/// `1/1.02`, where `p = 0.9035`.
#[test]
fn polar_express_scalar_polynomial_band() {
    let pe = PolarExpress::default();
    let (mut lo, mut hi) = (f64::MAX, f64::MIN);
    let n = 200_000;
    for i in 0..=n {
        let s = 1e-3 + (1.0 - 1e-3) * i as f64 / n as f64;
        let p = pe.poly(s);
        lo = lo.min(p);
        hi = hi.max(p);
    }
    // Observed: lo = 0.8588726, hi = 1.1411274.
    assert!(lo > 0.85887 && lo < 0.85888, "lo {lo}");
    assert!(hi > 1.14112 && hi < 1.14113, "hi {hi}");
    assert!(rel_close(pe.poly(1.0 / 1.02), 0.903537420, 1e-8));
    assert!(rel_close(pe.poly(1e-4), 0.0988061932, 1e-8));
    assert_eq!(pe.poly(0.0), 0.0);
}

/// PE(X) against the exact SVD: PE acts on each singular value independently, so
/// `PE(X) = U·diag(p(sᵢ))·Vᵀ` with `sᵢ = σᵢ/(‖X‖_F·1.02 + 1e-6)` up to fp32 rounding, and the
/// distance to the polar factor `U·Vᵀ` is `max |p(sᵢ) − 1|` in spectral norm.
///
/// Observed (seed 7, fp32 with NaiveGemm), shape: smallest sᵢ, grid bound max|p−1| on
/// [s_min, 1/1.02], ‖PE − UVᵀ‖₂ (= max|p(sᵢ)−1| to 1e-7), max |PE − U·p(Σ)·Vᵀ|, max singular
/// value error:
///   8×8:   s_min 0.0252, bound 0.14113, ‖·‖₂ 0.1307, elementwise 3.6e-7, σ 6.5e-7
///   16×32: s_min 0.0884, bound 0.14113, ‖·‖₂ 0.1355, elementwise 3.2e-7, σ 8.4e-7
///   32×16: s_min 0.0965, bound 0.14113, ‖·‖₂ 0.1387, elementwise 3.4e-7, σ 6.0e-7
///   4×64:  s_min 0.4074, bound 0.14113, ‖·‖₂ 0.1411, elementwise 1.9e-7, σ 4.2e-7
///   1×16:  s_min 0.9804, bound 0.09646, ‖·‖₂ 0.0964, elementwise 1.3e-6, σ 2.6e-6
///   64×4:  s_min 0.4224, bound 0.14113, ‖·‖₂ 0.1091, elementwise 3.8e-7, σ 8.2e-7
/// (1×16 has the largest rounding error: its one singular value sits at s = 1/1.02 where
/// |dp/ds| ≈ 160 amplifies the fp32 rounding of the normalisation.)
/// Documented bound: for random matrices whose normalised singular values are all ≥ 1e-3 the
/// spectral distance to U·Vᵀ is ≤ 0.1412 (the band above), and each output singular value equals
/// p(sᵢ) to ≤ 1e-5 (asserted; observed ≤ 2.6e-6).
#[test]
fn polar_express_matches_svd_polar_factor() {
    let pe = PolarExpress::default();
    let mut rng = Rng::new(7);
    for (r, c) in [(8, 8), (16, 32), (32, 16), (4, 64), (1, 16), (64, 4)] {
        let x = normals(&mut rng, r * c);
        let (u, sig, v) = svd(&f64s(&x), r, c);
        let norm = frob(&f64s(&x));
        let s: Vec<f64> = sig.iter().map(|&x| x / (norm * 1.02 + 1e-6)).collect();
        let s_min = s.iter().cloned().fold(f64::MAX, f64::min);
        assert!(s_min >= 1e-3, "{r}×{c}: ill-conditioned test matrix, s_min {s_min}");

        let mut out = x.clone();
        polar_express_batched(&pe, &mut out, 1, r, c, &NaiveGemm);
        let out = f64s(&out);

        // Singular vectors kept, singular values mapped by p.
        let ps: Vec<f64> = s.iter().map(|&x| pe.poly(x)).collect();
        let pred = usv(&u, &ps, &v, r, c);
        let elem = out.iter().zip(&pred).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        let mut out_s = svd(&out, r, c).1;
        let mut ps_sorted = ps.clone();
        out_s.sort_by(f64::total_cmp);
        ps_sorted.sort_by(f64::total_cmp);
        let sv_err = out_s.iter().zip(&ps_sorted).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);

        // Grid bound of |p − 1| over the range the singular values occupy.
        let top = 1.0 / 1.02;
        let n = 20_000;
        let bound =
            (0..=n).map(|i| (pe.poly(s_min + (top - s_min) * i as f64 / n as f64) - 1.0).abs()).fold(0.0, f64::max);
        let polar = usv(&u, &vec![1.0; sig.len()], &v, r, c);
        let diff: Vec<f64> = out.iter().zip(&polar).map(|(a, b)| a - b).collect();
        let spec = svd(&diff, r, c).1.into_iter().fold(0.0, f64::max);
        let exact_spec = ps.iter().map(|p| (p - 1.0).abs()).fold(0.0, f64::max);
        println!(
            "{r}×{c}: s_min {s_min:.4} bound {bound:.5} spec {spec:.4} (pred {exact_spec:.4}) elem {elem:.2e} sv {sv_err:.2e}"
        );
        assert!(elem < 1e-5, "{r}×{c}: PE vs U·p(Σ)·Vᵀ elementwise {elem}");
        assert!(sv_err < 1e-5, "{r}×{c}: singular values vs p(s): {sv_err}");
        assert!((spec - exact_spec).abs() < 2e-5, "{r}×{c}: ‖PE − UVᵀ‖₂ {spec} vs max|p(s)−1| {exact_spec}");
        assert!(spec <= bound + 2e-5, "{r}×{c}: ‖PE − UVᵀ‖₂ {spec} > grid bound {bound}");
        assert!(spec <= 0.1412, "{r}×{c}: ‖PE − UVᵀ‖₂ {spec} beyond the table's band");
        assert!(frob(&diff) <= (sig.len() as f64).sqrt() * 0.1412);
    }
}

/// A batch of 3 is three batches of 1, bitwise (wide, square and tall shapes).
#[test]
fn polar_express_batched_equals_unbatched_bitwise() {
    let pe = PolarExpress::default();
    let mut rng = Rng::new(11);
    for (r, c) in [(3, 7), (5, 5), (7, 3)] {
        let x = normals(&mut rng, 3 * r * c);
        let mut batched = x.clone();
        polar_express_batched(&pe, &mut batched, 3, r, c, &NaiveGemm);
        for i in 0..3 {
            let mut one = x[i * r * c..(i + 1) * r * c].to_vec();
            polar_express_batched(&pe, &mut one, 1, r, c, &NaiveGemm);
            assert!(
                one.iter().zip(&batched[i * r * c..]).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{r}×{c} matrix {i}"
            );
        }
    }
}

/// Under the tensor-core model (bf16 X and A, B split hi + lo) Polar Express differs from the
/// fp32 path by bf16 rounding only: a few percent rms, never zero, batched = unbatched bitwise.
#[test]
fn polar_express_tensor_core_model_is_the_bf16_path() {
    use vpmoe_ir::reference::TensorCore;
    let pe = PolarExpress::default();
    let mut rng = Rng::new(5);
    for (r, c) in [(16, 48), (48, 16), (24, 24)] {
        let x = normals(&mut rng, 2 * r * c);
        let (mut exact, mut tc) = (x.clone(), x.clone());
        polar_express_batched(&pe, &mut exact, 2, r, c, &NaiveGemm);
        polar_express_batched(&pe, &mut tc, 2, r, c, &TensorCore(&NaiveGemm));
        let rms = (exact.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / exact.len() as f64).sqrt();
        let err = (exact.iter().zip(&tc).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum::<f64>()
            / exact.len() as f64)
            .sqrt()
            / rms;
        assert!(err > 1e-4 && err < 0.05, "{r}×{c}: tensor-core model vs fp32 path: {err:.2e} of rms");
        let mut one = x[r * c..].to_vec();
        polar_express_batched(&pe, &mut one, 1, r, c, &TensorCore(&NaiveGemm));
        assert!(one.iter().zip(&tc[r * c..]).all(|(a, b)| a.to_bits() == b.to_bits()), "{r}×{c}");
    }
}

/// Zero stays zero (eps in the denominator), and PE is (nearly) scale-invariant.
#[test]
fn polar_express_zero_and_scale() {
    let pe = PolarExpress::default();
    let mut z = vec![0f32; 12];
    polar_express_batched(&pe, &mut z, 1, 3, 4, &NaiveGemm);
    assert!(z.iter().all(|&x| x == 0.0));
    let mut rng = Rng::new(3);
    let x = normals(&mut rng, 12);
    let mut a = x.clone();
    let mut b: Vec<f32> = x.iter().map(|v| v * 1000.0).collect();
    polar_express_batched(&pe, &mut a, 1, 3, 4, &NaiveGemm);
    polar_express_batched(&pe, &mut b, 1, 3, 4, &NaiveGemm);
    assert!(a.iter().zip(&b).all(|(p, q)| (p - q).abs() < 1e-4));
}

#[test]
fn polar_express_check() {
    assert_eq!(PolarExpress::default().check(), Ok(()));
    let bad = PolarExpress { safety: 0.05, ..PolarExpress::default() };
    assert!(bad.check().unwrap_err().contains("polar_express_safety_factor"));
    let custom = PolarExpress { coeffs: vec![[1.5, -0.5, 0.0]], safety: 0.05, eps: 1e-6 };
    assert_eq!(custom.check(), Ok(()));
    let empty = PolarExpress { coeffs: vec![], ..PolarExpress::default() };
    assert!(empty.check().unwrap_err().contains("coeffs"));
    let nan = PolarExpress { coeffs: vec![[f64::NAN, 0.0, 0.0]], ..PolarExpress::default() };
    assert!(nan.check().unwrap_err().contains("coeffs"));
}

// ---------------------------------------------------------------------------------------------
// Normuon
// ---------------------------------------------------------------------------------------------

/// A 1×2 matrix from zero state, every quantity by hand (μ = 0.95, β₂ = 0.95, ε = 1e-10):
///   G = [3, 4];  M = 0.05·G = [0.15, 0.2];  U = 0.05·G + 0.95·M = 0.0975·G = [0.2925, 0.39]
///   ‖U‖ = 0.4875;  the one singular value normalises to s = 0.4875/(0.4875·1.02 + 1e-6) = 0.98039019
///   O = p(s)·U/‖U‖ = 0.90385559·[0.6, 0.8]  (p = the five-step scalar polynomial; p is steep here,
///       dp/ds ≈ −160, which is why the fp32 tolerance below is 1e-4)
///   a = mean O² = p²/2;  v = 0.05·p²/2;  one row ⇒ Ô = O/sqrt(v+ε) rescaled to ‖O‖ is O again
///   scale sqrt(max(1, 1/2)) = 1 ⇒ Δ = O
///   W = [1, −1], lr 0.1, wd 0.01: W ← W·0.999 − 0.1·Δ = [0.999 − 0.0542313, −0.999 − 0.0723084].
#[test]
fn normuon_hand_computed_row_vector() {
    let h = NormuonHyper::default();
    let pe = PolarExpress::default();
    let g = [3f32, 4.0];
    let (mut w, mut mom, mut v) = ([1f32, -1.0], [0f32; 2], [0f32; 1]);
    normuon_step_batched(&h, &pe, &mut w, &g, &mut mom, &mut v, 1, 1, 2, 0.1, 0.01, &NaiveGemm);
    assert!(rel_close(mom[0] as f64, 0.15, 1e-7) && rel_close(mom[1] as f64, 0.2, 1e-7));
    let s = 0.4875 / (0.4875 * 1.02 + 1e-6);
    let p = pe.poly(s);
    assert!(rel_close(p, 0.9038555910885107, 1e-12));
    assert!(rel_close(v[0] as f64, 0.05 * p * p / 2.0, 1e-4), "v {} vs {}", v[0], 0.05 * p * p / 2.0);
    let want = [0.999 - 0.1 * 0.6 * p, -0.999 - 0.1 * 0.8 * p];
    println!(
        "1×2: v rel err {:.1e}, w rel err {:.1e} {:.1e}",
        (v[0] as f64 / (0.025 * p * p) - 1.0).abs(),
        (w[0] as f64 / want[0] - 1.0).abs(),
        (w[1] as f64 / want[1] - 1.0).abs()
    );
    for i in 0..2 {
        assert!(rel_close(w[i] as f64, want[i], 1e-5), "w[{i}] {} vs {}", w[i], want[i]);
    }
}

/// A tall diagonal 4×2 matrix (transposition path, shape scale √2) from zero state:
///   G = [[3,0],[0,4],[0,0],[0,0]];  U = 0.0975·G;  ‖U‖ = 0.4875;  denominator 0.497251
///   s₁ = 0.2925/0.497251 = 0.58823411, s₂ = 0.39/0.497251 = 0.78431215
///   O = diag(p(s₁), p(s₂)) padded = diag(0.94673679, 0.87826659)
///   v = 0.05·O²/2 = [0.02240776, 0.01928381, 0, 0];  1/sqrt(v+ε) = [6.680373, 7.201179, 1e5, 1e5]
///   Ô = diag(6.32455, 6.32455) (both rows equalised to sqrt(40)); ‖Ô‖ = sqrt(80) = 8.944272
///   ‖O‖ = 1.29138018; Δ = Ô·‖O‖/‖Ô‖·√2 = diag(1.29138018, 1.29138018), zero rows stay 0.
#[test]
fn normuon_hand_computed_tall_diagonal() {
    let h = NormuonHyper::default();
    let pe = PolarExpress::default();
    let g = [3f32, 0.0, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0];
    let (mut mom, mut v) = ([0f32; 8], [0f32; 4]);
    let d = normuon_update_batched(&h, &pe, &g, &mut mom, &mut v, 1, 4, 2, &NaiveGemm);
    let den = 0.4875 * 1.02 + 1e-6;
    let (p1, p2) = (pe.poly(0.2925 / den), pe.poly(0.39 / den));
    assert!(rel_close(p1, 0.9467367941732963, 1e-12) && rel_close(p2, 0.8782665929999871, 1e-12));
    assert!(rel_close(v[0] as f64, 0.05 * p1 * p1 / 2.0, 1e-5));
    assert!(rel_close(v[1] as f64, 0.05 * p2 * p2 / 2.0, 1e-5));
    assert_eq!(&v[2..], &[0.0, 0.0]);
    let (f1, f2) = (1.0 / (v[0] as f64 + 1e-10).sqrt(), 1.0 / (v[1] as f64 + 1e-10).sqrt());
    let k = (p1 * p1 + p2 * p2).sqrt() / ((p1 * f1).powi(2) + (p2 * f2).powi(2)).sqrt() * 2f64.sqrt();
    assert!(rel_close(p1 * f1 * k, 1.29138018, 1e-6) && rel_close(p2 * f2 * k, 1.29138018, 1e-6));
    println!("4×2 diag: Δ {:?} vs {:.8}", [d[0], d[3]], p1 * f1 * k);
    assert!(rel_close(d[0] as f64, p1 * f1 * k, 1e-5), "Δ00 {}", d[0]);
    assert!(rel_close(d[3] as f64, p2 * f2 * k, 1e-5), "Δ11 {}", d[3]);
    for i in [1, 2, 4, 5, 6, 7] {
        assert!(d[i].abs() < 1e-6, "Δ[{i}] = {}", d[i]);
    }
}

/// Nesterov: U = (1−μ)·G + μ·M_new with the NEW momentum; without it U = M_new. The update then
/// orthogonalises exactly that U.
#[test]
fn normuon_nesterov_pinned() {
    let mut rng = Rng::new(5);
    let (r, c) = (3, 5);
    let g = normals(&mut rng, r * c);
    let m0 = normals(&mut rng, r * c);
    let pe = PolarExpress::default();
    for nesterov in [true, false] {
        let h = NormuonHyper { nesterov, ..NormuonHyper::default() };
        let mut mom = m0.clone();
        let mut u = vec![0f32; r * c];
        normuon_momentum(&h, &g, &mut mom, &mut u);
        for i in 0..r * c {
            let m_new = 0.95 * m0[i] as f64 + 0.05 * g[i] as f64;
            assert!(rel_close(mom[i] as f64, m_new, 1e-7));
            let want = if nesterov { 0.05 * g[i] as f64 + 0.95 * mom[i] as f64 } else { mom[i] as f64 };
            assert!(rel_close(u[i] as f64, want, 1e-7), "nesterov {nesterov} u[{i}]");
            if nesterov {
                // U − M_new = (1−μ)(G − M_new): the look-ahead.
                assert!(((u[i] - mom[i]) as f64 - 0.05 * (g[i] - mom[i]) as f64).abs() < 1e-6);
            }
        }
        // The full update is rownorm(PE(U)) of that U, bitwise.
        let mut o = u.clone();
        polar_express_batched(&pe, &mut o, 1, r, c, &NaiveGemm);
        let mut v_ref = vec![0f32; r];
        normuon_rownorm_batched(&h, &mut o, &mut v_ref, 1, r, c);
        let (mut mom2, mut v2) = (m0.clone(), vec![0f32; r]);
        let d = normuon_update_batched(&h, &pe, &g, &mut mom2, &mut v2, 1, r, c, &NaiveGemm);
        assert_eq!(d, o);
        assert_eq!(v2, v_ref);
    }
}

/// Row normalisation from zero state: v = (1−β₂)·a with a = mean_j O², ‖Δ‖_F = ‖O‖_F·sqrt(max(1,r/c)),
/// and Δᵢⱼ/Oᵢⱼ = K/sqrt(vᵢ+ε) with one K per matrix. A second step follows v ← β₂v + (1−β₂)a.
#[test]
fn normuon_row_normalisation_pinned() {
    let h = NormuonHyper::default();
    let pe = PolarExpress::default();
    let mut rng = Rng::new(9);
    for (r, c) in [(6, 4), (4, 6), (5, 5)] {
        let (mut mom, mut v) = (vec![0f32; r * c], vec![0f32; r]);
        let mut v_prev = v.clone();
        for step in 0..2 {
            let g = normals(&mut rng, r * c);
            // O computed independently from the same momentum state.
            let mut mom_o = mom.clone();
            let mut o = vec![0f32; r * c];
            normuon_momentum(&h, &g, &mut mom_o, &mut o);
            polar_express_batched(&pe, &mut o, 1, r, c, &NaiveGemm);
            let d = normuon_update_batched(&h, &pe, &g, &mut mom, &mut v, 1, r, c, &NaiveGemm);
            assert_eq!(mom, mom_o);
            for i in 0..r {
                let a = o[i * c..(i + 1) * c].iter().map(|&x| x as f64 * x as f64).sum::<f64>() / c as f64;
                let want = 0.95 * v_prev[i] as f64 + 0.05 * a;
                assert!(rel_close(v[i] as f64, want, 1e-6), "{r}×{c} step {step} v[{i}] {} vs {want}", v[i]);
            }
            let (no, nd) = (frob(&f64s(&o)), frob(&f64s(&d)));
            let scale = (r as f64 / c as f64).max(1.0).sqrt();
            assert!(rel_close(nd, no * scale, 1e-6), "{r}×{c}: ‖Δ‖ {nd} vs ‖O‖·{scale} = {}", no * scale);
            let mut ks = vec![];
            for i in 0..r {
                for j in 0..c {
                    if o[i * c + j].abs() > 1e-3 {
                        ks.push(d[i * c + j] as f64 / o[i * c + j] as f64 * (v[i] as f64 + 1e-10).sqrt());
                    }
                }
            }
            assert!(ks.iter().all(|k| rel_close(*k, ks[0], 1e-5)), "{r}×{c}: row factors not 1/sqrt(v+ε)");
            v_prev = v.clone();
        }
    }
}

/// Batched Normuon step equals per-matrix steps, bitwise (state included).
#[test]
fn normuon_batched_equals_unbatched_bitwise() {
    let h = NormuonHyper::default();
    let pe = PolarExpress::default();
    let mut rng = Rng::new(13);
    let (r, c, b) = (6, 3, 3);
    let (w0, g, m0) = (normals(&mut rng, b * r * c), normals(&mut rng, b * r * c), normals(&mut rng, b * r * c));
    let v0: Vec<f32> = normals(&mut rng, b * r).iter().map(|x| x.abs() * 0.01).collect();
    let (mut w, mut mom, mut v) = (w0.clone(), m0.clone(), v0.clone());
    normuon_step_batched(&h, &pe, &mut w, &g, &mut mom, &mut v, b, r, c, 0.02, 0.01, &NaiveGemm);
    for i in 0..b {
        let sl = i * r * c..(i + 1) * r * c;
        let (mut w1, mut m1, mut v1) =
            (w0[sl.clone()].to_vec(), m0[sl.clone()].to_vec(), v0[i * r..(i + 1) * r].to_vec());
        normuon_step_batched(&h, &pe, &mut w1, &g[sl.clone()], &mut m1, &mut v1, 1, r, c, 0.02, 0.01, &NaiveGemm);
        assert_eq!(
            w1.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            w[sl.clone()].iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(m1, mom[sl]);
        assert_eq!(v1, v[i * r..(i + 1) * r]);
    }
}

/// A zero gradient from zero state: no NaN, Δ = 0 and W only decays (by exactly 1 − lr·wd).
#[test]
fn normuon_zero_gradient_only_decays() {
    let h = NormuonHyper::default();
    let pe = PolarExpress::default();
    let mut w = vec![2f32; 6];
    let (mut mom, mut v) = (vec![0f32; 6], vec![0f32; 2]);
    normuon_step_batched(&h, &pe, &mut w, &[0.0; 6], &mut mom, &mut v, 1, 2, 3, 0.5, 0.1, &NaiveGemm);
    assert!(w.iter().all(|&x| x == 1.9), "{w:?}");
    assert_eq!(v, [0.0, 0.0]);
}

// ---------------------------------------------------------------------------------------------
// AdamW
// ---------------------------------------------------------------------------------------------

/// Step 1 from zero state: m̂ = g, ŝ = g², so u = g/(|g| + ε) elementwise.
#[test]
fn adamw_first_step_is_sign_like() {
    let h = AdamHyper::default();
    assert_eq!(h.bias_corrections(1), (1.0 - 0.9, 1.0 - 0.999));
    let g = [1f32, -2.0, 0.5, 1e-3, 0.0];
    let mut w = [0f32; 5];
    let (mut m, mut s) = ([0f32; 5], [0f32; 5]);
    adamw_step(&h, &mut w, &g, &mut m, &mut s, 1, 1.0, 0.0);
    for i in 0..5 {
        let gi = g[i] as f64;
        let u = gi / (gi.abs() + 1e-8);
        assert!(((-w[i]) as f64 - u).abs() <= 1e-6 * u.abs().max(1e-30), "w[{i}] = {} vs {}", w[i], -u);
    }
    assert_eq!(w[4], 0.0);
    // 1e-3/(1e-3 + 1e-8) = 0.99999: ε sits after the square root.
    assert!(rel_close(-w[3] as f64, 0.99999000009999, 1e-6));
}

/// Two steps on one scalar, lr 0.1, wd 0.01, w₀ = 1, g = 1 then −2:
///   step 1: m = 0.1, s = 0.001, bc = (0.1, 0.001), u = 1/(1 + 1e-8) = 0.99999999
///           w = 1·(1 − 0.001) − 0.1·u = 0.899000001
///   step 2: m = 0.9·0.1 + 0.1·(−2) = −0.11;  s = 0.999·0.001 + 0.001·4 = 0.004999
///           bc = (1 − 0.81, 1 − 0.998001) = (0.19, 0.001999)
///           m̂ = −0.57894737;  ŝ = 2.50075038, sqrt = 1.58137610;  u = −0.36610352
///           w = 0.899000001·0.999 + 0.036610352 = 0.93471135
#[test]
fn adamw_two_steps_by_hand() {
    let h = AdamHyper::default();
    let (mut w, mut m, mut s) = ([1f32], [0f32], [0f32]);
    adamw_step(&h, &mut w, &[1.0], &mut m, &mut s, 1, 0.1, 0.01);
    assert!(rel_close(w[0] as f64, 0.899000001, 1e-7), "{}", w[0]);
    let (bc1, bc2) = h.bias_corrections(2);
    assert!(rel_close(bc1, 0.19, 1e-12) && rel_close(bc2, 0.001999, 1e-12));
    adamw_step(&h, &mut w, &[-2.0], &mut m, &mut s, 2, 0.1, 0.01);
    assert!(rel_close(m[0] as f64, -0.11, 1e-7) && rel_close(s[0] as f64, 0.004999, 1e-7));
    assert!(rel_close(w[0] as f64, 0.9347113534710749, 1e-7), "{}", w[0]);
}

/// Decoupled decay is multiplied by the current LR; the explicit-bias-correction entry point is
/// the same computation.
#[test]
fn adamw_decay_and_runtime_bias_corrections() {
    let h = AdamHyper::default();
    let (mut w, mut m, mut s) = ([2f32], [0f32], [0f32]);
    adamw_step(&h, &mut w, &[0.0], &mut m, &mut s, 1, 0.5, 0.1);
    assert_eq!(w[0], (2.0f64 * (1.0 - 0.05)) as f32);
    let mut rng = Rng::new(17);
    let (w0, g, m0) = (normals(&mut rng, 8), normals(&mut rng, 8), normals(&mut rng, 8));
    let s0: Vec<f32> = normals(&mut rng, 8).iter().map(|x| x * x).collect();
    let (mut wa, mut ma, mut sa) = (w0.clone(), m0.clone(), s0.clone());
    adamw_step(&h, &mut wa, &g, &mut ma, &mut sa, 7, 1e-3, 0.01);
    let (mut wb, mut mb, mut sb) = (w0, m0, s0);
    adamw_step_bc(&h, &mut wb, &g, &mut mb, &mut sb, 1.0 - 0.9f64.powi(7), 1.0 - 0.999f64.powi(7), 1e-3, 0.01);
    assert_eq!((wa, ma, sa), (wb, mb, sb));
}

// ---------------------------------------------------------------------------------------------
// Clipping
// ---------------------------------------------------------------------------------------------

#[test]
fn clipping() {
    assert_eq!(sq_norm(&[3.0, 4.0]), 25.0);
    assert_eq!(sq_norm(&[]), 0.0);
    // G = 5 > 1: c = 1/(5 + 1e-6).
    assert_eq!(clip_coefficient(25.0, 1.0), (1.0 / (5.0 + 1e-6)) as f32);
    // G = 0.5: no clipping.
    assert_eq!(clip_coefficient(0.25, 1.0), 1.0);
    // G = 1 exactly: c = 1/(1 + 1e-6) < 1, so the reference does scale (by 0.999999).
    assert_eq!(clip_coefficient(1.0, 1.0), (1.0 / (1.0 + 1e-6)) as f32);
    // max_norm 0 disables.
    assert_eq!(clip_coefficient(1e12, 0.0), 1.0);
    // Other max_norm, and G = 0.
    assert_eq!(clip_coefficient(16.0, 2.0), (2.0 / (4.0 + 1e-6)) as f32);
    assert_eq!(clip_coefficient(0.0, 1.0), 1.0);
    // A NaN norm is not hidden.
    assert!(clip_coefficient(f64::NAN, 1.0).is_nan());
}

// ---------------------------------------------------------------------------------------------
// Schedule
// ---------------------------------------------------------------------------------------------

fn sched(decay: DecayStyle, lr: f64, min_lr: f64, warmup: u64, total: u64, wsd_decay: u64) -> Schedule {
    let s = Schedule { lr, min_lr, warmup, total, decay, wsd_decay };
    assert_eq!(s.check(), Ok(()));
    s
}

/// lr_at(step) = Megatron get_lr(num_steps = step + 1): warm-up lr·(step+1)/warmup.
#[test]
fn schedule_warmup_then_constant() {
    let s = sched(DecayStyle::Constant, 1.0, 0.0, 4, 10, 0);
    let got: Vec<f64> = (0..6).map(|k| s.lr_at(k)).collect();
    assert_eq!(got, [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]);
    assert_eq!(s.lr_at(1_000_000), 1.0);
    let c = Schedule::constant(1e-4, 100);
    assert_eq!(c.check(), Ok(()));
    assert_eq!(c.lr_at(0), 1e-4);
}

#[test]
fn schedule_cosine() {
    // No warm-up, 100 updates: n = step+1; midpoint n = 50 (step 49) gives (lr+min)/2.
    let s = sched(DecayStyle::Cosine, 1.0, 0.1, 0, 100, 0);
    assert!(rel_close(s.lr_at(49), 0.55, 1e-12));
    assert!(rel_close(s.lr_at(0), 0.1 + 0.9 * 0.5 * ((std::f64::consts::PI / 100.0).cos() + 1.0), 1e-12));
    assert_eq!(s.lr_at(99), 0.1);
    assert_eq!(s.lr_at(100), 0.1);
    assert_eq!(s.lr_at(u64::MAX), 0.1);
    // With warm-up 10 of 110: full lr on update 9, midpoint of the decay at n = 60 (step 59).
    let s = sched(DecayStyle::Cosine, 2.0, 0.0, 10, 110, 0);
    assert_eq!(s.lr_at(0), 0.2);
    assert_eq!(s.lr_at(9), 2.0);
    assert!(rel_close(s.lr_at(59), 1.0, 1e-12));
    assert_eq!(s.lr_at(109), 0.0);
    let lrs: Vec<f64> = (9..110).map(|k| s.lr_at(k)).collect();
    assert!(lrs.windows(2).all(|p| p[1] <= p[0]));
}

#[test]
fn schedule_linear() {
    let s = sched(DecayStyle::Linear, 1.0, 0.0, 0, 4, 0);
    let got: Vec<f64> = (0..5).map(|k| s.lr_at(k)).collect();
    assert_eq!(got, [0.75, 0.5, 0.25, 0.0, 0.0]);
    // warmup == total: the run is all warm-up, then min_lr.
    let s = sched(DecayStyle::Linear, 1.0, 0.5, 2, 2, 0);
    assert_eq!((s.lr_at(0), s.lr_at(1), s.lr_at(2)), (0.5, 1.0, 0.5));
}

/// WSD: warm-up 2, stable, linear to min over the last 4 of 10 updates.
#[test]
fn schedule_wsd() {
    let s = sched(DecayStyle::Wsd, 1.0, 0.1, 2, 10, 4);
    let got: Vec<f64> = (0..11).map(|k| s.lr_at(k)).collect();
    let want = [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.775, 0.55, 0.325, 0.1, 0.1];
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(rel_close(*g, w, 1e-12), "step {k}: {g} vs {w}");
    }
}

#[test]
fn schedule_validation_names_the_field() {
    let ok = Schedule { lr: 1.0, min_lr: 0.1, warmup: 2, total: 10, decay: DecayStyle::Cosine, wsd_decay: 0 };
    assert_eq!(ok.check(), Ok(()));
    let err = |s: Schedule| s.check().unwrap_err();
    assert!(err(Schedule { min_lr: 2.0, ..ok.clone() }).contains("min_lr"));
    assert!(err(Schedule { min_lr: 2.0, decay: DecayStyle::Constant, ..ok.clone() }).contains("min_lr"));
    assert!(err(Schedule { warmup: 11, ..ok.clone() }).starts_with("warmup"));
    assert!(err(Schedule { total: 0, warmup: 0, ..ok.clone() }).starts_with("total"));
    assert!(err(Schedule { lr: -1.0, min_lr: 0.0, ..ok.clone() }).starts_with("lr"));
    assert!(err(Schedule { lr: f64::NAN, ..ok.clone() }).starts_with("lr"));
    assert!(err(Schedule { min_lr: -0.1, ..ok.clone() }).starts_with("min_lr"));
    assert!(err(Schedule { wsd_decay: 3, ..ok.clone() }).starts_with("wsd_decay"));
    assert!(err(Schedule { decay: DecayStyle::Wsd, ..ok.clone() }).starts_with("wsd_decay"));
    assert!(err(Schedule { decay: DecayStyle::Wsd, wsd_decay: 9, ..ok.clone() }).starts_with("wsd_decay"));
    assert_eq!(Schedule { decay: DecayStyle::Wsd, wsd_decay: 8, ..ok }.check(), Ok(()));
}

/// Config spelling of the decay styles (snake_case).
#[test]
fn decay_style_names() {
    for (name, style) in [
        ("constant", DecayStyle::Constant),
        ("linear", DecayStyle::Linear),
        ("cosine", DecayStyle::Cosine),
        ("wsd", DecayStyle::Wsd),
    ] {
        let got = DecayStyle::deserialize(IntoDeserializer::<DeError>::into_deserializer(name)).unwrap();
        assert_eq!(got, style);
    }
    assert!(DecayStyle::deserialize(IntoDeserializer::<DeError>::into_deserializer("WSD")).is_err());
}
