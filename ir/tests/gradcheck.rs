//! Numerics ladder rung 1: the reference VJPs ([`vpmoe_ir::backward`]) against central finite
//! differences of the reference forward ([`vpmoe_ir::reference`]), for every forward op on tiny
//! shapes, plus adjoint identities `⟨J u, v⟩ = ⟨u, Jᵀ v⟩` on larger shapes for the fused ops and
//! hand-composed chains (dense block → LM loss; router → experts → combine + aux loss).
//!
//! Objective: `L = Σ_i r_i·y_i` over every float output that carries gradient (random `r`,
//! accumulated in f64), so the upstream gradients are `dys = r`. Every element of every
//! differentiable input is perturbed by `±h` (h = 1e-2 of the tensor's rms unless a case says
//! otherwise) and `(L(x+h) − L(x−h)) / (x₊ − x₋)` is computed in f64 from the f32 forward; the
//! denominator uses the perturbed values actually stored in f32.
//!
//! Tolerance: an element passes when `|analytic − fd| ≤ RTOL·|fd| + ATOL·scale`, `scale` being
//! the largest gradient magnitude of that tensor. At these steps the FD error is dominated by the
//! f32 rounding of the forward's outputs (≈ 2⁻²⁴·|y| on each output an element moves, divided
//! by 2h), measured at 1e-5–4e-4·scale; truncation (`h²·f'''/6`) is smaller. A wrong formula
//! (a missing factor, term, transpose or head/group mix-up) gives errors of order the gradient
//! itself, far above ATOL. `max rel` in the reports is `|analytic − fd| / max(|fd|, 1e-3·scale)`.
//!
//! ReLU² is only C¹ and routing/top-k are piecewise constant: each case names its discrete
//! decisions (selected experts, dispatch rows, aux top-k, ReLU sign patterns), the harness
//! asserts they are identical at x₊, x₋ and x, and shrinks h (then fails loudly) when ±h would
//! flip one, so a flip can never silently produce a wrong FD.
//!
//! Run `cargo test -p vpmoe-ir --release --test gradcheck -- --nocapture --test-threads 1` to see
//! the per-tensor errors.

use vpmoe_ir::backward::backward;
use vpmoe_ir::reference::{forward, gather_rows, topk, Dims, NaiveGemm, Tensor};
use vpmoe_ir::{Attn, AttnKind, GroupLimit, Op, Vjp};

/// Relative FD step (times the tensor's rms).
const REL_STEP: f64 = 1e-2;
/// Per-element relative tolerance.
const RTOL: f64 = 2e-3;
/// Absolute tolerance as a fraction of the tensor's gradient scale.
const ATOL: f64 = 1e-3;
/// Adjoint identity tolerance, relative to `Σ|u_i·(Jᵀv)_i|`. The directional difference moves
/// every input at once, so it uses Richardson extrapolation (h² term cancelled); what is left is
/// the f32 rounding of the outputs, measured at ≤ 3.5e-5 (scalar-loss objectives), ~1e-6 otherwise.
const ADJ_TOL: f64 = 1e-4;

// ---------------------------------------------------------------- RNG and tensor helpers

/// The project's SplitMix64 with the test's draws on top.
struct Rng(vpmoe_ir::rng::Rng);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(vpmoe_ir::rng::Rng::new(seed))
    }
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn unif(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in `[-s, s]`.
    fn sym(&mut self, s: f64) -> f32 {
        ((2.0 * self.unif() - 1.0) * s) as f32
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn vec(&mut self, n: usize, s: f64) -> Vec<f32> {
        (0..n).map(|_| self.sym(s)).collect()
    }
    /// A random f32 tensor with entries uniform in `[-s, s]`.
    fn t(&mut self, shape: &[usize], s: f64) -> Tensor {
        let n = shape.iter().product();
        Tensor::f32(shape.to_vec(), self.vec(n, s))
    }
    /// Uniform in `[lo, hi]`.
    fn range(&mut self, shape: &[usize], lo: f64, hi: f64) -> Tensor {
        let n = shape.iter().product();
        Tensor::f32(shape.to_vec(), (0..n).map(|_| (lo + (hi - lo) * self.unif()) as f32).collect())
    }
}

fn it(shape: &[usize], v: Vec<i32>) -> Tensor {
    Tensor::i32(shape.to_vec(), v)
}

fn rms(v: &[f32]) -> f64 {
    (v.iter().map(|&x| x as f64 * x as f64).sum::<f64>() / v.len().max(1) as f64).sqrt()
}

fn dims(tokens: usize, seq: usize) -> Dims {
    Dims { tokens, seq }
}

fn fwd(op: &Op, d: &Dims, ins: &[&Tensor]) -> Vec<Tensor> {
    forward(op, d, ins, &NaiveGemm)
}

fn bwd(op: &Op, d: &Dims, ins: &[&Tensor], ys: &[Tensor], dys: &[Option<&Tensor>]) -> Vec<Tensor> {
    let yr: Vec<&Tensor> = ys.iter().collect();
    let g = backward(op, d, ins, &yr, dys, &NaiveGemm);
    let want: Vec<&&Tensor> = ins.iter().zip(op.grad_ins()).filter(|(_, g)| *g).map(|(x, _)| x).collect();
    assert_eq!(g.len(), want.len(), "{}: number of gradients", op.name());
    for (gi, x) in g.iter().zip(want) {
        assert_eq!(gi.shape, x.shape, "{}: gradient shape", op.name());
        assert!(gi.f().iter().all(|v| v.is_finite()), "{}: non-finite gradient", op.name());
    }
    g
}

// ---------------------------------------------------------------- the harness

/// Forward of a differentiable function: float outputs in the objective, discrete decisions.
type FwdFn<'a> = Box<dyn Fn(&[Tensor]) -> (Vec<Tensor>, Vec<i64>) + 'a>;
/// Backward: gradients of the differentiable inputs (in order) given the outputs' upstream.
type BwdFn<'a> = Box<dyn Fn(&[Tensor], &[Tensor]) -> Vec<Tensor> + 'a>;
/// Extra decisions computed from the inputs (ReLU patterns, aux-loss top-k, ...).
type DecFn<'a> = Box<dyn Fn(&[Tensor]) -> Vec<i64> + 'a>;

/// A function under test: inputs (differentiable or not), forward and backward.
struct Model<'a> {
    name: String,
    xs: Vec<Tensor>,
    names: Vec<String>,
    diff: Vec<bool>,
    /// FD step per input (absolute).
    step: Vec<f64>,
    /// Use Richardson extrapolation (for steps so large that truncation would dominate).
    richardson: bool,
    fwd: FwdFn<'a>,
    bwd: BwdFn<'a>,
}

impl<'a> Model<'a> {
    fn new(name: &str, xs: Vec<Tensor>, names: Vec<String>, diff: Vec<bool>, fwd: FwdFn<'a>, bwd: BwdFn<'a>) -> Self {
        let step = xs.iter().zip(&diff).map(|(x, &d)| if d { REL_STEP * rms(x.f()).max(1e-2) } else { 0.0 }).collect();
        Model { name: name.to_string(), xs, names, diff, step, richardson: false, fwd, bwd }
    }
    fn with_richardson(mut self) -> Self {
        self.richardson = true;
        self
    }
    /// Overrides the FD step of input `i` (e.g. log-frequencies, whose scale is not their rms).
    fn with_step(mut self, i: usize, h: f64) -> Self {
        self.step[i] = h;
        self
    }
}

/// One forward op as a [`Model`]: the objective covers the outputs with `grad_outs` and `seeds`;
/// the decisions are every integer output plus `extra(xs)`.
fn op_model<'a>(
    name: &str,
    op: Op,
    d: Dims,
    xs: Vec<Tensor>,
    seeds: Option<Vec<bool>>,
    extra: Option<DecFn<'a>>,
) -> Model<'a> {
    let (ins, _) = op.signature();
    let sel: Vec<bool> = match seeds {
        Some(s) => op.grad_outs().iter().zip(s).map(|(&a, b)| a && b).collect(),
        None => op.grad_outs(),
    };
    let names = ins.iter().map(|p| p.0.to_string()).collect();
    let diff = op.grad_ins();
    let (op2, sel2) = (op.clone(), sel.clone());
    let f: FwdFn = Box::new(move |xs: &[Tensor]| {
        let refs: Vec<&Tensor> = xs.iter().collect();
        let ys = fwd(&op, &d, &refs);
        let mut dec: Vec<i64> = ys.iter().flat_map(int_vals).collect();
        if let Some(e) = &extra {
            dec.extend(e(xs));
        }
        let outs = ys.into_iter().zip(&sel).filter(|(_, s)| **s).map(|(y, _)| y).collect();
        (outs, dec)
    });
    let b: BwdFn = Box::new(move |xs: &[Tensor], r: &[Tensor]| {
        let refs: Vec<&Tensor> = xs.iter().collect();
        let ys = fwd(&op2, &d, &refs);
        let mut it = r.iter();
        let dys: Vec<Option<&Tensor>> = sel2.iter().map(|&s| if s { it.next() } else { None }).collect();
        bwd(&op2, &d, &refs, &ys, &dys)
    });
    Model::new(name, xs, names, diff, f, b)
}

fn is_int(t: &Tensor) -> bool {
    matches!(t.data, vpmoe_ir::reference::Data::I32(_))
}

fn int_vals(t: &Tensor) -> Vec<i64> {
    if is_int(t) {
        t.i().iter().map(|&v| v as i64).collect()
    } else {
        vec![]
    }
}

/// `Σ r·y` in f64.
fn objective(outs: &[Tensor], r: &[Tensor]) -> f64 {
    outs.iter().zip(r).map(|(y, r)| y.f().iter().zip(r.f()).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>()).sum()
}

/// Per differentiable input: (name, max abs error, max rel error, worst element).
type Report = Vec<(String, f64, f64, usize)>;

/// Central-difference check of every element of every differentiable input.
fn gradcheck(m: &Model, seed: u64) -> Report {
    let mut rng = Rng::new(seed);
    let (outs, dec0) = (m.fwd)(&m.xs);
    let r: Vec<Tensor> = outs.iter().map(|y| rng.t(&y.shape, 1.0)).collect();
    let grads = (m.bwd)(&m.xs, &r);
    assert_eq!(grads.len(), m.diff.iter().filter(|&&d| d).count(), "{}: gradient count", m.name);
    let mut report = vec![];
    let mut gi = grads.iter();
    let mut shrunk = 0;
    for (i, x) in m.xs.iter().enumerate() {
        if !m.diff[i] {
            continue;
        }
        let an = gi.next().unwrap();
        assert_eq!(an.shape, x.shape, "{}: gradient shape of {}", m.name, m.names[i]);
        // Central difference of element `e` with step `h`; `None` when a decision flips.
        let diff = |e: usize, h: f64| -> Option<f64> {
            let (mut xp, mut xm) = (m.xs.clone(), m.xs.clone());
            let v = x.f()[e];
            let (vp, vm) = (v + h as f32, v - h as f32);
            set(&mut xp[i], e, vp);
            set(&mut xm[i], e, vm);
            let (op, dp) = (m.fwd)(&xp);
            let (om, dm) = (m.fwd)(&xm);
            (dp == dec0 && dm == dec0).then(|| (objective(&op, &r) - objective(&om, &r)) / (vp as f64 - vm as f64))
        };
        let mut fd = vec![0f64; x.numel()];
        for (e, fde) in fd.iter_mut().enumerate() {
            let mut h = m.step[i];
            let mut tries = 0;
            // Plain central differences are rounding-limited at these steps (Richardson would
            // amplify the rounding ~3×); models whose step must be large use Richardson
            // extrapolation `(4·D(h/2) − D(h))/3`, which cancels the h² truncation term. Both
            // steps must leave every decision unchanged.
            *fde = loop {
                if let (Some(d1), Some(d2)) = (diff(e, h), diff(e, h / 2.0)) {
                    break if m.richardson { (4.0 * d2 - d1) / 3.0 } else { d1 };
                }
                tries += 1;
                shrunk += 1;
                assert!(
                    tries < 3,
                    "{}: a decision flips under ±{h:e} on {}[{e}]; separate the inputs",
                    m.name,
                    m.names[i]
                );
                h /= 8.0;
            };
        }
        report.push(compare(&m.name, &m.names[i], an.f(), &fd));
    }
    if shrunk > 0 {
        println!("  ({}: step shrunk {shrunk} times to keep decisions fixed)", m.name);
    }
    report
}

fn set(t: &mut Tensor, e: usize, v: f32) {
    match &mut t.data {
        vpmoe_ir::reference::Data::F32(d) => d[e] = v,
        _ => unreachable!(),
    }
}

/// Elementwise comparison of analytic and FD gradients; panics with the worst element.
fn compare(model: &str, input: &str, an: &[f32], fd: &[f64]) -> (String, f64, f64, usize) {
    let scale = an.iter().map(|&a| (a as f64).abs()).chain(fd.iter().map(|f| f.abs())).fold(0.0, f64::max);
    let (mut max_abs, mut max_rel, mut worst, mut worst_ratio) = (0f64, 0f64, 0usize, 0f64);
    for (e, (&a, &f)) in an.iter().zip(fd).enumerate() {
        let err = (a as f64 - f).abs();
        let ratio = if err == 0.0 { 0.0 } else { err / (RTOL * f.abs() + ATOL * scale) };
        max_abs = max_abs.max(err);
        max_rel = max_rel.max(if err == 0.0 { 0.0 } else { err / f.abs().max(1e-3 * scale) });
        if ratio > worst_ratio {
            (worst_ratio, worst) = (ratio, e);
        }
    }
    assert!(
        worst_ratio <= 1.0,
        "{model}: d{input} mismatch: max abs err {max_abs:.3e}, max rel err {max_rel:.3e}, worst element {worst}: \
         analytic {} vs fd {} (gradient scale {scale:.3e})",
        an[worst],
        fd[worst]
    );
    println!("  {model:<40} d{input:<10} max abs {max_abs:.2e}  max rel {max_rel:.2e}  (scale {scale:.2e})");
    (format!("{model}/{input}"), max_abs, max_rel, worst)
}

/// Adjoint identity `⟨J u, v⟩ = ⟨u, Jᵀ v⟩` with `J u` by a directional central difference;
/// `u` is scaled per input by its rms so the step is relative. Returns the relative error.
fn adjoint(m: &Model, seed: u64) -> f64 {
    let mut rng = Rng::new(seed);
    let (outs, dec0) = (m.fwd)(&m.xs);
    let v: Vec<Tensor> = outs.iter().map(|y| rng.t(&y.shape, 1.0)).collect();
    let grads = (m.bwd)(&m.xs, &v);
    let u: Vec<Option<Vec<f32>>> =
        m.xs.iter()
            .zip(&m.diff)
            .zip(&m.step)
            .map(|((x, &d), &h)| d.then(|| rng.vec(x.numel(), h / REL_STEP)))
            .collect();
    let mut gi = grads.iter();
    let (mut rhs, mut mag) = (0f64, 0f64);
    for ui in u.iter().flatten() {
        let g = gi.next().unwrap();
        for (&a, &b) in ui.iter().zip(g.f()) {
            rhs += a as f64 * b as f64;
            mag += (a as f64 * b as f64).abs();
        }
    }
    // Directional central difference `D(h)`; `None` when a decision flips within ±h.
    let diff = |h: f64| -> Option<f64> {
        let shifted = |sign: f64| -> Vec<Tensor> {
            m.xs.iter()
                .zip(&u)
                .map(|(x, ui)| match ui {
                    Some(ui) => Tensor::f32(
                        x.shape.clone(),
                        x.f().iter().zip(ui).map(|(&a, &b)| (a as f64 + sign * h * b as f64) as f32).collect(),
                    ),
                    None => x.clone(),
                })
                .collect()
        };
        let (op, dp) = (m.fwd)(&shifted(1.0));
        let (om, dm) = (m.fwd)(&shifted(-1.0));
        (dp == dec0 && dm == dec0).then(|| (objective(&op, &v) - objective(&om, &v)) / (2.0 * h))
    };
    // Every input moves at once, so curvature along `u` is larger than per element: Richardson
    // extrapolation `(4·D(h/2) − D(h))/3` cancels the h² term, leaving O(h⁴) and rounding.
    let mut h = REL_STEP;
    let lhs = loop {
        if let (Some(d1), Some(d2)) = (diff(h), diff(h / 2.0)) {
            break (4.0 * d2 - d1) / 3.0;
        }
        h /= 8.0;
        assert!(h > REL_STEP / 100.0, "{}: a decision flips along the adjoint direction", m.name);
    };
    let rel = (lhs - rhs).abs() / mag;
    assert!(rel <= ADJ_TOL, "{}: adjoint ⟨Ju,v⟩ = {lhs:.9e} vs ⟨u,Jᵀv⟩ = {rhs:.9e}, rel err {rel:.3e}", m.name);
    println!("  {:<40} adjoint rel err {rel:.2e} (⟨u,Jᵀv⟩ = {rhs:.4e})", m.name);
    rel
}

// ---------------------------------------------------------------- decision helpers

/// ReLU sign pattern of `x·W₁ᵀ + b₁` (`m` rows), computed as the forward does.
fn relu_pattern(x: &[f32], w1: &[f32], b1: Option<&[f32]>, m: usize, h: usize, f: usize) -> Vec<i64> {
    let mut out = Vec::with_capacity(m * f);
    for r in 0..m {
        for j in 0..f {
            let s: f64 = (0..h).map(|c| x[r * h + c] as f64 * w1[j * h + c] as f64).sum();
            let z = s as f32 + b1.map(|b| b[j]).unwrap_or(0.0);
            out.push((z > 0.0) as i64);
        }
    }
    out
}

/// Per-expert ReLU patterns of an `expert_ffn` (inputs in signature order).
fn expert_pattern(xs: &[Tensor], h: usize, f: usize, e: usize, bias: bool) -> Vec<i64> {
    let (x, src, off, w1) = (xs[0].f(), xs[1].i(), xs[3].i(), xs[4].f());
    let b1 = bias.then(|| xs[5].f());
    let mut out = vec![];
    for ex in 0..e {
        let (r0, r1) = (off[ex] as usize, off[ex + 1] as usize);
        let xe = gather_rows(x, &src[r0..r1], h);
        out.extend(relu_pattern(&xe, &w1[ex * f * h..][..f * h], b1.map(|b| &b[ex * f..][..f]), r1 - r0, h, f));
    }
    out
}

/// Aux-loss top-k of the normalised scores (the counts are constants of the backward).
fn aux_topk(scores: &[f32], e: usize, k: usize) -> Vec<i64> {
    scores
        .chunks(e)
        .flat_map(|row| {
            let u = row.iter().map(|&x| x as f64).sum::<f64>() + 1e-20;
            let norm: Vec<f32> = row.iter().map(|&x| (x as f64 / u) as f32).collect();
            topk(&norm, k).into_iter().map(|i| i as i64).collect::<Vec<_>>()
        })
        .collect()
}

fn run(m: &Model, seed: u64) -> Report {
    println!("{}", m.name);
    gradcheck(m, seed)
}

// ---------------------------------------------------------------- per-op gradchecks

#[test]
fn embedding() {
    let mut rng = Rng::new(1);
    let (v, h, t) = (7, 5, 8);
    let toks = it(&[t], vec![3, 0, 3, 6, 2, 3, 0, 5]); // repeats: scatter-add; 1 and 4 unused
    let xs = vec![toks, rng.t(&[v, h], 1.0)];
    run(&op_model("embedding", Op::Embedding { vocab: v as u64, hidden: h as u64 }, dims(t, 4), xs, None, None), 11);
}

#[test]
fn rms_norm() {
    let mut rng = Rng::new(2);
    let (d, t) = (6, 5);
    let xs = vec![rng.t(&[t, d], 1.5), rng.range(&[d], 0.5, 1.5)];
    run(&op_model("rms_norm", Op::RmsNorm { dim: d as u64, eps: 1e-5 }, dims(t, t), xs, None, None), 12);
}

#[test]
fn qkv_proj() {
    for bias in [false, true] {
        let mut rng = Rng::new(3);
        let (h, nh, ng, d, t) = (6, 4, 2, 3, 5);
        let n = (nh + 2 * ng) * d;
        let mut xs = vec![rng.t(&[t, h], 1.0), rng.t(&[n, h], 0.5)];
        if bias {
            xs.push(rng.t(&[n], 0.5));
        }
        let op = Op::QkvProj { hidden: h as u64, heads: nh as u64, groups: ng as u64, head_dim: d as u64, bias };
        run(&op_model(&format!("qkv_proj bias={bias}"), op, dims(t, t), xs, None, None), 13);
    }
}

fn tpa_case(rng: &mut Rng, t: usize, a: [usize; 6], bias: bool) -> (Op, Vec<Tensor>) {
    let [h, nh, ng, d, rq, r] = a;
    let mut xs = vec![
        rng.t(&[t, h], 1.0),
        rng.t(&[nh * rq, h], 0.6),
        rng.t(&[ng * r, h], 0.6),
        rng.t(&[ng * r, h], 0.6),
        rng.t(&[rq * d, h], 0.6),
        rng.t(&[r * d, h], 0.6),
        rng.t(&[r * d, h], 0.6),
    ];
    if bias {
        xs.push(rng.t(&[(nh + 2 * ng) * d], 0.5));
    }
    let op = Op::TpaQkv {
        hidden: h as u64,
        heads: nh as u64,
        groups: ng as u64,
        head_dim: d as u64,
        q_rank: rq as u64,
        kv_rank: r as u64,
        bias,
    };
    (op, xs)
}

#[test]
fn tpa_qkv() {
    // GQA with 2 groups (2 query heads each) and with one group; ranks differ for q and k/v.
    for (a, bias) in [([5, 4, 2, 3, 3, 2], true), ([5, 4, 2, 3, 3, 2], false), ([4, 2, 1, 4, 2, 1], true)] {
        let mut rng = Rng::new(4);
        let (op, xs) = tpa_case(&mut rng, 4, a, bias);
        run(&op_model(&format!("tpa_qkv {a:?} bias={bias}"), op, dims(4, 4), xs, None, None), 14);
    }
}

#[test]
fn qk_norm() {
    let mut rng = Rng::new(5);
    let (nh, ng, d, t) = (4, 2, 4, 3);
    let xs =
        vec![rng.t(&[t, nh, d], 1.0), rng.t(&[t, ng, d], 1.0), rng.range(&[d], 0.5, 1.5), rng.range(&[d], 0.5, 1.5)];
    let op = Op::QkNorm { heads: nh as u64, groups: ng as u64, head_dim: d as u64, eps: 1e-5 };
    run(&op_model("qk_norm", op, dims(t, t), xs, None, None), 15);
}

fn grape_case(rng: &mut Rng, t: usize, seq: usize, nh: usize, ng: usize, d: usize) -> Model<'static> {
    // Log-frequencies around the init f_i = 10000^(−2i/d) (ℓ = 16 ln f), jittered.
    let lf: Vec<f32> =
        (0..d / 2).map(|i| (16.0 * (-(2.0 * i as f64 / d as f64) * 10000f64.ln())) as f32 + rng.sym(2.0)).collect();
    let xs = vec![rng.t(&[t, nh, d], 1.0), rng.t(&[t, ng, d], 1.0), Tensor::f32(vec![d / 2], lf)];
    let op = Op::GrapeM { heads: nh as u64, groups: ng as u64, head_dim: d as u64, log_freq_scale: 16.0 };
    // ℓ's scale is its magnitude, not a perturbation size: step 2e-2 in ℓ is 1.25e-3 in ln f.
    op_model(&format!("grape_m t={t} seq={seq} d={d}"), op, dims(t, seq), xs, None, None).with_step(2, 2e-2)
}

#[test]
fn grape_m() {
    let mut rng = Rng::new(6);
    run(&grape_case(&mut rng, 10, 5, 4, 2, 6), 16);
}

#[test]
fn value_residual() {
    // λ well inside (0,1) and at the init logit ln 9999 (D2: λ < 1 in f32, live gradient ≈ 1e-4·dλ).
    for logit in [0.7f32, 9999f32.ln()] {
        let mut rng = Rng::new(7);
        let (ng, d, t) = (2, 3, 4);
        // At λ ≈ 0.9999 the outputs barely move with the logit; a small v with an O(1) v₁ keeps
        // the outputs small so their f32 rounding does not swamp the 1e-4-sized derivative.
        let vs = if logit > 5.0 { 1e-3 } else { 1.0 };
        let xs = vec![rng.t(&[t, ng, d], vs), rng.t(&[t, ng, d], 1.0), Tensor::scalar(logit)];
        let op = Op::ValueResidual { groups: ng as u64, head_dim: d as u64 };
        // The op is linear in v and v₁, so a unit step is exact there and keeps the f32 output
        // rounding (≈ 6e-8) small against dv₁ = (1−λ)·g ≈ 1e-4·g at the init logit.
        let m = op_model(&format!("value_residual logit={logit}"), op, dims(t, t), xs, None, None)
            .with_step(0, 1.0)
            .with_step(1, 1.0);
        // At the init logit λ itself is quantised to 2⁻²⁴ in f32, i.e. 6e-4 of λ(1−λ): a 1e-2 step
        // would see 3% noise. Step 0.5 with Richardson: truncation ≈ 1.3e-4 (λ' ∝ e^(−x) there)
        // and rounding ≤ 1.8e-3 worst case, inside RTOL + ATOL = 3e-3 for this scalar.
        let m = if logit > 5.0 { m.with_step(2, 0.5).with_richardson() } else { m.with_step(2, 1e-2) };
        run(&m, 17);
    }
}

/// Two rows of 8: row 0 holds two documents (the second starts at position 3, whose first query
/// attends only itself), row 1 three documents; position 0 of each row attends only itself.
fn attn_docs() -> Tensor {
    it(&[16], vec![0, 0, 0, 1, 1, 1, 1, 1, 5, 5, 6, 6, 6, 6, 7, 7])
}

fn attn_case(rng: &mut Rng, a: Attn, t: usize, doc: Tensor) -> Vec<Tensor> {
    let (nh, ng, d) = (a.heads as usize, a.groups as usize, a.head_dim as usize);
    let mut xs = vec![rng.t(&[t, nh, d], 1.5), rng.t(&[t, ng, d], 1.5), rng.t(&[t, ng, d], 1.0), doc];
    if a.sinks {
        xs.push(rng.t(&[nh], 1.0));
    }
    xs
}

fn attn_configs() -> Vec<Attn> {
    let mut v = vec![];
    for sinks in [false, true] {
        v.push(Attn { heads: 4, groups: 2, head_dim: 4, kind: AttnKind::Window(3), sinks });
        v.push(Attn { heads: 4, groups: 2, head_dim: 4, kind: AttnKind::Global { alibi: true }, sinks });
    }
    v.push(Attn { heads: 2, groups: 2, head_dim: 3, kind: AttnKind::Global { alibi: false }, sinks: true });
    v.push(Attn { heads: 4, groups: 1, head_dim: 2, kind: AttnKind::Window(1), sinks: true });
    v
}

#[test]
fn attention() {
    for a in attn_configs() {
        let mut rng = Rng::new(8);
        let xs = attn_case(&mut rng, a, 16, attn_docs());
        run(
            &op_model(
                &format!("attention {:?} sinks={}", a.kind, a.sinks),
                Op::Attention(a),
                dims(16, 8),
                xs,
                None,
                None,
            ),
            18,
        );
    }
}

#[test]
fn out_proj() {
    for bias in [false, true] {
        let mut rng = Rng::new(9);
        let (k, n, t) = (6, 5, 4);
        let mut xs = vec![rng.t(&[t, k], 1.0), rng.t(&[n, k], 0.5)];
        if bias {
            xs.push(rng.t(&[n], 0.5));
        }
        xs.push(rng.t(&[t, n], 1.0));
        let op = Op::OutProj { in_dim: k as u64, hidden: n as u64, bias };
        run(&op_model(&format!("out_proj bias={bias}"), op, dims(t, t), xs, None, None), 19);
    }
}

fn mlp_model(rng: &mut Rng, t: usize, h: usize, f: usize, bias: bool, residual: bool) -> Model<'static> {
    let mut xs = vec![rng.t(&[t, h], 1.0), rng.t(&[f, h], 0.6)];
    if bias {
        xs.push(rng.t(&[f], 0.3));
    }
    xs.push(rng.t(&[h, f], 0.6));
    if bias {
        xs.push(rng.t(&[h], 0.3));
    }
    if residual {
        xs.push(rng.t(&[t, h], 1.0));
    }
    let op = Op::Mlp { hidden: h as u64, ffn: f as u64, bias, residual };
    let dec: DecFn =
        Box::new(move |xs: &[Tensor]| relu_pattern(xs[0].f(), xs[1].f(), bias.then(|| xs[2].f()), t, h, f));
    op_model(&format!("mlp bias={bias} residual={residual}"), op, dims(t, t), xs, None, Some(dec))
}

#[test]
fn mlp() {
    for bias in [false, true] {
        for residual in [false, true] {
            let mut rng = Rng::new(10);
            run(&mlp_model(&mut rng, 4, 5, 7, bias, residual), 20);
        }
    }
}

fn router_op(h: usize, e: usize, k: usize, gl: Option<GroupLimit>, expert_bias: bool, bias: bool) -> Op {
    Op::Router { hidden: h as u64, experts: e as u64, topk: k as u64, group_limit: gl, scale: 2.5, expert_bias, bias }
}

fn router_inputs(rng: &mut Rng, t: usize, h: usize, e: usize, expert_bias: bool, bias: bool) -> Vec<Tensor> {
    let mut xs = vec![rng.t(&[t, h], 1.0), rng.t(&[e, h], 0.8)];
    if bias {
        xs.push(rng.t(&[e], 0.5));
    }
    if expert_bias {
        xs.push(rng.t(&[e], 0.3));
    }
    xs
}

#[test]
fn router() {
    let gl = |groups, group_topk| Some(GroupLimit { groups, group_topk });
    // (topk, group limit, expert_bias, bias, seeds over [idx, gate, scores])
    let cases = [
        (2, None, true, true, None),
        (2, None, false, false, None),
        (4, gl(4, 2), true, true, None),
        (2, gl(4, 1), true, false, None),
        (3, None, true, true, Some(vec![false, true, false])),
        (3, None, true, true, Some(vec![false, false, true])),
    ];
    for (k, g, eb, b, seeds) in cases {
        let mut rng = Rng::new(21);
        let (t, h, e) = (5, 4, 8);
        let xs = router_inputs(&mut rng, t, h, e, eb, b);
        let name = format!("router k={k} {g:?} eb={eb} b={b} seeds={seeds:?}");
        run(&op_model(&name, router_op(h, e, k, g, eb, b), dims(t, t), xs, seeds, None), 22);
    }
}

/// Token choices with an empty expert (3) and an expert (0) receiving every token.
fn moe_idx(t: usize) -> Vec<i32> {
    (0..t).flat_map(|ti| if ti % 3 == 2 { [2 - (ti % 2) as i32, 0] } else { [0, 1 + (ti % 2) as i32] }).collect()
}

/// Expert inputs `[x, src, row, offsets, fc1, (b1), fc2, (b2)]`; x's gradient sums each token's
/// K rows, so a token routed to two experts checks the gather-sum.
fn expert_inputs(rng: &mut Rng, t: usize, h: usize, f: usize, e: usize, k: usize, bias: bool) -> Vec<Tensor> {
    let d = fwd(&Op::Dispatch { experts: e as u64, topk: k as u64 }, &dims(t, t), &[&it(&[t, k], moe_idx(t))]);
    let off = d[2].i();
    assert!(off[4] == off[3] && off[1] - off[0] == t as i32, "expert 3 empty, expert 0 gets every token");
    let mut xs = vec![rng.t(&[t, h], 1.0), d[0].clone(), d[1].clone(), d[2].clone(), rng.t(&[e, f, h], 0.6)];
    if bias {
        xs.push(rng.t(&[e, f], 0.3));
    }
    xs.push(rng.t(&[e, h, f], 0.6));
    if bias {
        xs.push(rng.t(&[e, h], 0.3));
    }
    xs
}

#[test]
fn expert_ffn() {
    for bias in [false, true] {
        let mut rng = Rng::new(25);
        let (t, h, f, e, k) = (6, 3, 4, 4, 2);
        let xs = expert_inputs(&mut rng, t, h, f, e, k, bias);
        let op = Op::ExpertFfn { hidden: h as u64, ffn: f as u64, experts: e as u64, topk: k as u64, bias };
        let dec: DecFn = Box::new(move |xs: &[Tensor]| expert_pattern(xs, h, f, e, bias));
        let g = run(&op_model(&format!("expert_ffn bias={bias}"), op, dims(t, t), xs, None, Some(dec)), 26);
        assert!(!g.is_empty());
    }
}

#[test]
fn combine() {
    let (t, h, k) = (5, 3, 2);
    // From a dispatch (a permutation) and a hand-made row map where rows 1 and 7 are never
    // referenced and rows 0 and 4 are referenced twice (their gradients accumulate).
    let perm = fwd(&Op::Dispatch { experts: 4, topk: k as u64 }, &dims(t, t), &[&it(&[t, k], moe_idx(t))])[1].clone();
    let odd = it(&[t * k], vec![0, 2, 3, 4, 4, 5, 6, 0, 8, 9]);
    for (rows, shared) in [(&perm, false), (&perm, true), (&odd, true)] {
        let mut rng = Rng::new(27);
        let mut xs = vec![rng.t(&[t * k, h], 1.0), rows.clone(), rng.range(&[t, k], 0.1, 1.5), rng.t(&[t, h], 1.0)];
        if shared {
            xs.push(rng.t(&[t, h], 1.0));
        }
        let op = Op::Combine { hidden: h as u64, topk: k as u64, shared };
        let m = op_model(&format!("combine shared={shared} rows={:?}", rows.i()), op, dims(t, t), xs, None, None);
        run(&m, 28);
        if rows == &odd {
            // Unreferenced rows get exactly zero gradient.
            let mut r = Rng::new(1);
            let g = (m.bwd)(&m.xs, &[r.t(&[t, h], 1.0)]);
            assert!(g[0].f()[h..2 * h].iter().chain(&g[0].f()[7 * h..8 * h]).all(|&v| v == 0.0));
        }
    }
}

/// Sigmoid-like scores whose rows are shuffled, evenly spaced levels (gaps ≥ 0.11 before
/// normalisation), so no ±h step can reorder the aux-loss top-k.
fn separated_scores(rng: &mut Rng, t: usize, e: usize) -> Tensor {
    let mut v = Vec::with_capacity(t * e);
    for _ in 0..t {
        let mut row: Vec<f32> = (0..e).map(|j| 0.1 + 0.8 * j as f32 / (e - 1) as f32 + rng.sym(0.02)).collect();
        for i in (1..e).rev() {
            row.swap(i, rng.below(i + 1));
        }
        v.extend(row);
    }
    Tensor::f32(vec![t, e], v)
}

#[test]
fn seq_aux_loss() {
    let mut rng = Rng::new(29);
    let (e, k, s, b) = (6, 2, 4, 2);
    let xs = vec![separated_scores(&mut rng, s * b, e)];
    let op = Op::SeqAuxLoss { experts: e as u64, topk: k as u64 };
    let dec: DecFn = Box::new(move |xs: &[Tensor]| aux_topk(xs[0].f(), e, k));
    run(&op_model("seq_aux_loss", op, dims(s * b, s), xs, None, Some(dec)), 30);
}

/// Inputs of `head_ce`, with confidence weights drawn from the stage-2 clip range [0.25, 4].
#[allow(clippy::too_many_arguments)]
fn head_ce_inputs(
    rng: &mut Rng,
    t: usize,
    h: usize,
    v: usize,
    mask: Vec<i32>,
    span: Vec<i32>,
    scale: [f32; 3],
) -> Vec<Tensor> {
    let labels = (0..t).map(|_| rng.below(v) as i32).collect();
    vec![
        rng.t(&[t, h], 1.0),
        rng.t(&[v, h], 0.8),
        it(&[t], labels),
        it(&[t], mask),
        it(&[t], span),
        Tensor::f32(vec![3], scale.to_vec()),
        rng.range(&[t], 0.25, 4.0),
    ]
}

fn head_ce(h: usize, v: usize) -> Op {
    Op::HeadCe { hidden: h as u64, vocab: v as u64 }
}

#[test]
fn head_ce_gradients() {
    let mut rng = Rng::new(33);
    let (t, h, v) = (8, 5, 7);
    // Masked positions 2 and 5; span 2 is empty (no token has it); span 0 carries a weight too.
    let mask = vec![1, 1, 0, 1, 1, 0, 1, 1];
    let span = vec![1, 1, 1, 0, 1, 1, 0, 1];
    let xs = head_ce_inputs(&mut rng, t, h, v, mask, span, [0.3, 1.0 / 5.0, 0.5]);
    run(&op_model("head_ce", head_ce(h, v), dims(t, 4), xs, None, None), 34);
}

// ---------------------------------------------------------------- zero-gradient cases

#[test]
fn head_ce_all_masked_gives_exactly_zero() {
    let mut rng = Rng::new(35);
    let (t, h, v) = (6, 3, 5);
    let xs = head_ce_inputs(&mut rng, t, h, v, vec![0; t], vec![1; t], [1.0, 1.0, 1.0]);
    let op = head_ce(h, v);
    let refs: Vec<&Tensor> = xs.iter().collect();
    let ys = fwd(&op, &dims(t, t), &refs);
    assert_eq!(ys[0].f()[0], 0.0);
    assert!(ys[1].f().iter().chain(ys[2].f()).all(|&x| x == 0.0), "masked token loss and lse are 0");
    let g = bwd(&op, &dims(t, t), &refs, &ys, &[Some(&Tensor::scalar(1.7)), None, None]);
    assert!(g.iter().all(|g| g.f().iter().all(|&x| x == 0.0)), "all-masked head_ce must give exactly zero gradients");
}

/// With a window W ≥ 1 every query attends at least itself (j = i is causal, in its own
/// document and at distance 0 < W), so a row whose keys are all masked cannot occur in a real
/// configuration. The degenerate `Window(0)` masks every key of every row, which exercises the
/// D5 guarantee directly: zero output, exactly zero (finite) gradients, sinks included.
#[test]
fn attention_rows_with_every_key_masked_give_zero_gradients() {
    for sinks in [false, true] {
        let a = Attn { heads: 2, groups: 1, head_dim: 3, kind: AttnKind::Window(0), sinks };
        let mut rng = Rng::new(36);
        let xs = attn_case(&mut rng, a, 16, attn_docs());
        let refs: Vec<&Tensor> = xs.iter().collect();
        let op = Op::Attention(a);
        let ys = fwd(&op, &dims(16, 8), &refs);
        assert!(ys[0].f().iter().all(|&x| x == 0.0));
        let dy = rng.t(&ys[0].shape, 1.0);
        let g = bwd(&op, &dims(16, 8), &refs, &ys, &[Some(&dy)]);
        for gi in &g {
            assert!(gi.f().iter().all(|&x| x == 0.0), "all-masked rows must give zero gradients, got {gi:?}");
        }
    }
    // Partially masked: a sink with a very large logit takes (almost) all the mass; the
    // gradients stay finite (checked in `bwd`) and the sink's gradient is tiny, not NaN.
    let a = Attn { heads: 2, groups: 1, head_dim: 3, kind: AttnKind::Window(2), sinks: true };
    let mut rng = Rng::new(37);
    let mut xs = attn_case(&mut rng, a, 16, attn_docs());
    xs[4] = Tensor::f32(vec![2], vec![80.0, -80.0]);
    let refs: Vec<&Tensor> = xs.iter().collect();
    let op = Op::Attention(a);
    let ys = fwd(&op, &dims(16, 8), &refs);
    let dy = rng.t(&ys[0].shape, 1.0);
    let g = bwd(&op, &dims(16, 8), &refs, &ys, &[Some(&dy)]);
    assert!(g[3].f()[0].abs() < 1e-20);
}

/// An unseeded output contributes nothing: with every upstream gradient absent each op returns
/// exactly zero gradients.
#[test]
fn absent_upstream_gradients_are_zero() {
    let mut rng = Rng::new(38);
    let a = attn_configs()[3];
    let (top, tx) = tpa_case(&mut rng, 4, [5, 4, 2, 3, 3, 2], true);
    let cases: Vec<(Op, Dims, Vec<Tensor>)> = vec![
        (Op::Attention(a), dims(16, 8), attn_case(&mut rng, a, 16, attn_docs())),
        (top, dims(4, 4), tx),
        (router_op(4, 8, 2, None, true, true), dims(5, 5), router_inputs(&mut rng, 5, 4, 8, true, true)),
        (Op::SeqAuxLoss { experts: 6, topk: 2 }, dims(4, 4), vec![separated_scores(&mut rng, 4, 6)]),
    ];
    for (op, d, xs) in cases {
        let refs: Vec<&Tensor> = xs.iter().collect();
        let ys = fwd(&op, &d, &refs);
        let none = vec![None; ys.len()];
        for g in bwd(&op, &d, &refs, &ys, &none) {
            assert!(g.f().iter().all(|&x| x == 0.0), "{}: nonzero gradient without upstream", op.name());
        }
    }
}

#[test]
#[should_panic(expected = "backward of add")]
fn add_has_no_backward() {
    let x = Tensor::f32(vec![1], vec![1.0]);
    let op = Op::Add { n: 2, ty: vpmoe_ir::TensorType::tok(vpmoe_ir::DType::F32, &[]) };
    backward(&op, &dims(1, 1), &[&x, &x], &[&x], &[Some(&x)], &NaiveGemm);
}

#[test]
#[should_panic(expected = "backward of vjp")]
fn vjp_has_no_backward() {
    let op = Op::Vjp(Box::new(Vjp { of: head_ce(1, 1), seeds: vec![true, false, false], acc: false }));
    backward(&op, &dims(1, 1), &[], &[], &[], &NaiveGemm);
}

/// A `vjp` node executed through `reference::forward` is `backward` with its seeds.
#[test]
fn vjp_node_executes_backward() {
    let mut rng = Rng::new(39);
    let op = router_op(4, 8, 2, None, true, true);
    let xs = router_inputs(&mut rng, 5, 4, 8, true, true);
    let refs: Vec<&Tensor> = xs.iter().collect();
    let ys = fwd(&op, &dims(5, 5), &refs);
    let dgate = rng.t(&ys[1].shape, 1.0);
    let direct = bwd(&op, &dims(5, 5), &refs, &ys, &[None, Some(&dgate), None]);
    let node = Op::Vjp(Box::new(Vjp { of: op, seeds: vec![false, true, false], acc: false }));
    let mut ins = refs.clone();
    ins.extend(ys.iter());
    ins.push(&dgate);
    assert_eq!(fwd(&node, &dims(5, 5), &ins), direct);
}

/// With `acc`, the node's input-0 gradient is the running gradient plus the plain one; the
/// weight gradient is unchanged.
#[test]
fn vjp_acc_adds_the_running_gradient() {
    let mut rng = Rng::new(41);
    let op = Op::RmsNorm { dim: 16, eps: 1e-5 };
    let (x, w) = (rng.t(&[5, 16], 1.0), rng.t(&[16], 1.0));
    let ys = fwd(&op, &dims(5, 5), &[&x, &w]);
    let (dy, run) = (rng.t(&[5, 16], 1.0), rng.t(&[5, 16], 1.0));
    let plain = bwd(&op, &dims(5, 5), &[&x, &w], &ys, &[Some(&dy)]);
    let node = Op::Vjp(Box::new(Vjp { of: op, seeds: vec![true], acc: true }));
    assert_eq!(node.signature().0.len(), 5, "x, weight, y, dy, acc");
    let got = fwd(&node, &dims(5, 5), &[&x, &w, &ys[0], &dy, &run]);
    let want: Vec<f32> = plain[0].f().iter().zip(run.f()).map(|(g, a)| g + a).collect();
    assert_eq!(got[0].f(), &want[..]);
    assert_eq!(got[1], plain[1]);
}

// ---------------------------------------------------------------- adjoint identities

#[test]
fn adjoint_attention() {
    let (s, b) = (24, 2);
    let mut doc: Vec<i32> = (0..s).map(|i| (i >= 9) as i32).collect();
    doc.extend((0..s).map(|i| 2 + (i >= 4) as i32 + (i >= 17) as i32));
    for a in [
        Attn { heads: 4, groups: 2, head_dim: 8, kind: AttnKind::Window(5), sinks: true },
        Attn { heads: 4, groups: 2, head_dim: 8, kind: AttnKind::Global { alibi: true }, sinks: true },
        Attn { heads: 4, groups: 2, head_dim: 8, kind: AttnKind::Global { alibi: true }, sinks: false },
    ] {
        let mut rng = Rng::new(40);
        let xs = attn_case(&mut rng, a, s * b, it(&[s * b], doc.clone()));
        let m = op_model(
            &format!("attention {:?} sinks={}", a.kind, a.sinks),
            Op::Attention(a),
            dims(s * b, s),
            xs,
            None,
            None,
        );
        adjoint(&m, 41);
    }
}

#[test]
fn adjoint_tpa_qkv() {
    let mut rng = Rng::new(42);
    let (op, xs) = tpa_case(&mut rng, 12, [16, 4, 2, 8, 4, 2], true);
    adjoint(&op_model("tpa_qkv 16/4/2/8 r4/2", op, dims(12, 6), xs, None, None), 43);
}

#[test]
fn adjoint_router() {
    let mut rng = Rng::new(44);
    let (t, h, e) = (16, 12, 16);
    let xs = router_inputs(&mut rng, t, h, e, true, true);
    let op = router_op(h, e, 4, Some(GroupLimit { groups: 4, group_topk: 2 }), true, true);
    adjoint(&op_model("router 16 experts top-4 groups 4/2", op, dims(t, 8), xs, None, None), 45);
}

#[test]
fn adjoint_grape_m() {
    let mut rng = Rng::new(46);
    adjoint(&grape_case(&mut rng, 64, 32, 4, 2, 16), 47);
}

#[test]
fn adjoint_head_ce() {
    let mut rng = Rng::new(48);
    let (t, h, v) = (32, 6, 50);
    let mask = (0..t).map(|i| (i % 5 != 3) as i32).collect();
    let span = (0..t).map(|i| (i % 3) as i32).collect();
    let xs = head_ce_inputs(&mut rng, t, h, v, mask, span, [0.0, 0.1, 0.07]);
    adjoint(&op_model("head_ce v=50", head_ce(h, v), dims(t, 16), xs, None, None), 49);
}

/// A vocabulary large enough that the reference walks the tokens in several logit chunks
/// (32, 32 and 6 rows): the chunk seams must not show in the loss or its gradients.
#[test]
fn adjoint_head_ce_across_logit_chunks() {
    let mut rng = Rng::new(57);
    let (t, h, v) = (70, 2, 1 << 19);
    let mask = (0..t).map(|i| (i % 7 != 2) as i32).collect();
    let span = (0..t).map(|i| (i % 3) as i32).collect();
    let xs = head_ce_inputs(&mut rng, t, h, v, mask, span, [0.02, 0.01, 0.015]);
    adjoint(&op_model("head_ce 3 chunks", head_ce(h, v), dims(t, t), xs, None, None), 58);
}

/// Shapes above the 32-wide transpose tiles of the backward's GEMM operands (the other cases
/// are all below one tile); linear ops, so the FD is exact up to rounding.
#[test]
fn adjoint_linear_ops_across_transpose_tiles() {
    let mut rng = Rng::new(54);
    let (t, h, v) = (37, 40, 70);
    let xs = head_ce_inputs(&mut rng, t, h, v, vec![1; t], vec![1; t], [0.0, 0.03, 0.0]);
    adjoint(&op_model("head_ce 37x40x70", head_ce(h, v), dims(t, t), xs, None, None), 55);
    let (k, n) = (65, 33);
    let xs = vec![rng.t(&[t, k], 1.0), rng.t(&[n, k], 0.5), rng.t(&[n], 0.5), rng.t(&[t, n], 1.0)];
    let op = Op::OutProj { in_dim: k as u64, hidden: n as u64, bias: true };
    adjoint(&op_model("out_proj 37x65x33", op, dims(t, t), xs, None, None), 56);
}

// ---------------------------------------------------------------- composed chains

/// MoE layer by hand: router → (dispatch → expert_ffn → combine with the gates, a shared
/// expert and a residual) plus the sequence aux loss on the router scores. Inputs:
/// `[x, w_r, b_r, expert_bias, fc1, b1, fc2, b2, s_fc1, s_b1, s_fc2, s_b2, resid]`.
fn moe_chain(rng: &mut Rng, t: usize, seq: usize, h: usize, f: usize, e: usize, k: usize) -> Model<'static> {
    let xs = vec![
        rng.t(&[t, h], 1.0),
        rng.t(&[e, h], 1.0),
        rng.t(&[e], 0.5),
        rng.t(&[e], 0.2),
        rng.t(&[e, f, h], 0.6),
        rng.t(&[e, f], 0.3),
        rng.t(&[e, h, f], 0.6),
        rng.t(&[e, h], 0.3),
        rng.t(&[f, h], 0.6),
        rng.t(&[f], 0.3),
        rng.t(&[h, f], 0.6),
        rng.t(&[h], 0.3),
        rng.t(&[t, h], 1.0),
    ];
    let names = ["x", "w_r", "b_r", "expert_bias", "fc1", "b1", "fc2", "b2", "s_fc1", "s_b1", "s_fc2", "s_b2", "resid"];
    let mut diff = vec![true; xs.len()];
    diff[3] = false;
    let (hu, fu, eu, ku) = (h as u64, f as u64, e as u64, k as u64);
    let router = router_op(h, e, k, Some(GroupLimit { groups: 4, group_topk: 2 }), true, true);
    let disp = Op::Dispatch { experts: eu, topk: ku };
    let ffn = Op::ExpertFfn { hidden: hu, ffn: fu, experts: eu, topk: ku, bias: true };
    let shared = Op::Mlp { hidden: hu, ffn: fu, bias: true, residual: false };
    let comb = Op::Combine { hidden: hu, topk: ku, shared: true };
    let aux = Op::SeqAuxLoss { experts: eu, topk: ku };
    let d = dims(t, seq);
    let ops = (router, disp, ffn, shared, comb, aux);
    // Forward of every node, in order.
    let run_fwd = {
        let ops = ops.clone();
        move |x: &[Tensor]| -> Vec<Vec<Tensor>> {
            let (router, disp, ffn, shared, comb, aux) = &ops;
            let r = fwd(router, &d, &[&x[0], &x[1], &x[2], &x[3]]);
            let dp = fwd(disp, &d, &[&r[0]]);
            let y = fwd(ffn, &d, &[&x[0], &dp[0], &dp[1], &dp[2], &x[4], &x[5], &x[6], &x[7]]);
            let s = fwd(shared, &d, &[&x[0], &x[8], &x[9], &x[10], &x[11]]);
            let c = fwd(comb, &d, &[&y[0], &dp[1], &r[1], &x[12], &s[0]]);
            let a = fwd(aux, &d, &[&r[2]]);
            vec![r, dp, y, s, c, a]
        }
    };
    let f1 = run_fwd.clone();
    let fw: FwdFn = Box::new(move |x: &[Tensor]| {
        let n = f1(x);
        let mut dec: Vec<i64> = n[0][0].i().iter().map(|&v| v as i64).collect();
        dec.extend(aux_topk(n[0][2].f(), e, k));
        let ex = [x[0].clone(), n[1][0].clone(), n[1][1].clone(), n[1][2].clone(), x[4].clone(), x[5].clone()];
        dec.extend(expert_pattern(&ex, h, f, e, true));
        dec.extend(relu_pattern(x[0].f(), x[8].f(), Some(x[9].f()), t, h, f));
        (vec![n[4][0].clone(), n[5][0].clone()], dec)
    });
    let bw: BwdFn = Box::new(move |x: &[Tensor], r: &[Tensor]| {
        let (router, _, ffn, shared, comb, aux) = &ops;
        let n = run_fwd(x);
        let gc = bwd(comb, &d, &[&n[2][0], &n[1][1], &n[0][1], &x[12], &n[3][0]], &n[4], &[Some(&r[0])]);
        let [dyp, dgate, dresid, dshared] = <[Tensor; 4]>::try_from(gc).unwrap();
        let gs = bwd(shared, &d, &[&x[0], &x[8], &x[9], &x[10], &x[11]], &n[3], &[Some(&dshared)]);
        let gy = bwd(ffn, &d, &[&x[0], &n[1][0], &n[1][1], &n[1][2], &x[4], &x[5], &x[6], &x[7]], &n[2], &[Some(&dyp)]);
        let ga = bwd(aux, &d, &[&n[0][2]], &n[5], &[Some(&r[1])]);
        let gr = bwd(router, &d, &[&x[0], &x[1], &x[2], &x[3]], &n[0], &[None, Some(&dgate), Some(&ga[0])]);
        let dx = sum(&[&gr[0], &gy[0], &gs[0]]);
        vec![
            dx,
            gr[1].clone(),
            gr[2].clone(),
            gy[1].clone(),
            gy[2].clone(),
            gy[3].clone(),
            gy[4].clone(),
            gs[1].clone(),
            gs[2].clone(),
            gs[3].clone(),
            gs[4].clone(),
            dresid,
        ]
    });
    Model::new(
        &format!("moe chain t={t} h={h} f={f} e={e} k={k}"),
        xs,
        names.iter().map(|s| s.to_string()).collect(),
        diff,
        fw,
        bw,
    )
}

fn sum(ts: &[&Tensor]) -> Tensor {
    let mut acc = vec![0f64; ts[0].numel()];
    for t in ts {
        acc.iter_mut().zip(t.f()).for_each(|(a, &b)| *a += b as f64);
    }
    Tensor::f32(ts[0].shape.clone(), acc.into_iter().map(|x| x as f32).collect())
}

#[test]
fn moe_chain_gradcheck() {
    let mut rng = Rng::new(50);
    run(&moe_chain(&mut rng, 6, 3, 4, 3, 8, 2), 51);
}

#[test]
fn adjoint_moe_chain() {
    let mut rng = Rng::new(52);
    adjoint(&moe_chain(&mut rng, 24, 12, 12, 8, 16, 4), 53);
}

/// Dense block by hand: embedding → rms_norm → qkv_proj → qk_norm → grape_m → value_residual
/// (with v₁ = the raw k, so k fans out to qk_norm and the value residual) → attention (window, sinks, documents) → out_proj (residual = the
/// embedding) → rms_norm → head_ce. Inputs: `[tokens, table, w_in, w_qkv, b_qkv, w_q,
/// w_k, log_freq, vr_logit, sinks, doc, w_o, b_o, w_f, w_lm, labels, mask, span, span_scale, weight]`.
fn dense_chain(rng: &mut Rng, kind: AttnKind) -> Model<'static> {
    let (s, b, vocab, hid, nh, ng, hd) = (6, 2, 9, 8, 4, 2, 4);
    let t = s * b;
    let n = (nh + 2 * ng) * hd;
    let (hu, nhu, ngu, hdu) = (hid as u64, nh as u64, ng as u64, hd as u64);
    let lf: Vec<f32> = (0..hd / 2).map(|i| -(16.0 * i as f32 * 2.0) + rng.sym(1.0)).collect();
    let xs = vec![
        it(&[t], (0..t).map(|_| rng.below(vocab) as i32).collect()),
        rng.t(&[vocab, hid], 1.0),
        rng.range(&[hid], 0.5, 1.5),
        rng.t(&[n, hid], 0.5),
        rng.t(&[n], 0.3),
        rng.range(&[hd], 0.5, 1.5),
        rng.range(&[hd], 0.5, 1.5),
        Tensor::f32(vec![hd / 2], lf),
        Tensor::scalar(0.4),
        rng.t(&[nh], 1.0),
        it(&[t], vec![0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 3]),
        rng.t(&[hid, nh * hd], 0.5),
        rng.t(&[hid], 0.3),
        rng.range(&[hid], 0.5, 1.5),
        rng.t(&[vocab, hid], 0.7),
        it(&[t], (0..t).map(|_| rng.below(vocab) as i32).collect()),
        it(&[t], (0..t).map(|i| (i % 4 != 2) as i32).collect()),
        it(&[t], (0..t).map(|i| 1 + (i % 3 == 0) as i32).collect()),
        Tensor::f32(vec![3], vec![0.0, 0.2, 0.25]),
        rng.range(&[t], 0.25, 4.0),
    ];
    let names = [
        "tokens",
        "table",
        "w_in",
        "w_qkv",
        "b_qkv",
        "w_q",
        "w_k",
        "log_freq",
        "vr_logit",
        "sinks",
        "doc",
        "w_o",
        "b_o",
        "w_f",
        "w_lm",
        "labels",
        "mask",
        "span",
        "span_scale",
        "weight",
    ];
    let diff: Vec<bool> = names
        .iter()
        .map(|nm| !matches!(*nm, "tokens" | "doc" | "labels" | "mask" | "span" | "span_scale" | "weight"))
        .collect();
    let ops = vec![
        Op::Embedding { vocab: vocab as u64, hidden: hu },
        Op::RmsNorm { dim: hu, eps: 1e-5 },
        Op::QkvProj { hidden: hu, heads: nhu, groups: ngu, head_dim: hdu, bias: true },
        Op::QkNorm { heads: nhu, groups: ngu, head_dim: hdu, eps: 1e-5 },
        Op::GrapeM { heads: nhu, groups: ngu, head_dim: hdu, log_freq_scale: 16.0 },
        Op::ValueResidual { groups: ngu, head_dim: hdu },
        Op::Attention(Attn { heads: nhu, groups: ngu, head_dim: hdu, kind, sinks: true }),
        Op::OutProj { in_dim: nhu * hdu, hidden: hu, bias: true },
        Op::RmsNorm { dim: hu, eps: 1e-5 },
        Op::HeadCe { hidden: hu, vocab: vocab as u64 },
    ];
    let d = dims(t, s);
    let run_fwd = {
        let ops = ops.clone();
        move |x: &[Tensor]| -> Vec<Vec<Tensor>> {
            let o = &ops;
            let e = fwd(&o[0], &d, &[&x[0], &x[1]]);
            let a = fwd(&o[1], &d, &[&e[0], &x[2]]);
            let q = fwd(&o[2], &d, &[&a[0], &x[3], &x[4]]);
            let qn = fwd(&o[3], &d, &[&q[0], &q[1], &x[5], &x[6]]);
            let r = fwd(&o[4], &d, &[&qn[0], &qn[1], &x[7]]);
            let vr = fwd(&o[5], &d, &[&q[2], &q[1], &x[8]]);
            let at = fwd(&o[6], &d, &[&r[0], &r[1], &vr[0], &x[10], &x[9]]);
            let op = fwd(&o[7], &d, &[&at[0], &x[11], &x[12], &e[0]]);
            let z = fwd(&o[8], &d, &[&op[0], &x[13]]);
            let l = fwd(&o[9], &d, &[&z[0], &x[14], &x[15], &x[16], &x[17], &x[18], &x[19]]);
            vec![e, a, q, qn, r, vr, at, op, z, l]
        }
    };
    let f1 = run_fwd.clone();
    let fw: FwdFn = Box::new(move |x: &[Tensor]| (vec![f1(x)[9][0].clone()], vec![]));
    let bw: BwdFn = Box::new(move |x: &[Tensor], r: &[Tensor]| {
        let o = &ops;
        let n = run_fwd(x);
        let [e, a, q, qn, rot, vr, at, op, z, l] = <[Vec<Tensor>; 10]>::try_from(n).unwrap();
        let ins = [&z[0], &x[14], &x[15], &x[16], &x[17], &x[18], &x[19]];
        let g_l = bwd(&o[9], &d, &ins, &l, &[Some(&r[0]), None, None]);
        let g_z = bwd(&o[8], &d, &[&op[0], &x[13]], &z, &[Some(&g_l[0])]);
        let g_op = bwd(&o[7], &d, &[&at[0], &x[11], &x[12], &e[0]], &op, &[Some(&g_z[0])]);
        let g_at = bwd(&o[6], &d, &[&rot[0], &rot[1], &vr[0], &x[10], &x[9]], &at, &[Some(&g_op[0])]);
        let g_vr = bwd(&o[5], &d, &[&q[2], &q[1], &x[8]], &vr, &[Some(&g_at[2])]);
        let g_rot = bwd(&o[4], &d, &[&qn[0], &qn[1], &x[7]], &rot, &[Some(&g_at[0]), Some(&g_at[1])]);
        let g_qn = bwd(&o[3], &d, &[&q[0], &q[1], &x[5], &x[6]], &qn, &[Some(&g_rot[0]), Some(&g_rot[1])]);
        let dk = sum(&[&g_qn[1], &g_vr[1]]);
        let g_q = bwd(&o[2], &d, &[&a[0], &x[3], &x[4]], &q, &[Some(&g_qn[0]), Some(&dk), Some(&g_vr[0])]);
        let g_a = bwd(&o[1], &d, &[&e[0], &x[2]], &a, &[Some(&g_q[0])]);
        let de = sum(&[&g_a[0], &g_op[3]]);
        let g_e = bwd(&o[0], &d, &[&x[0], &x[1]], &e, &[Some(&de)]);
        vec![
            g_e[0].clone(),
            g_a[1].clone(),
            g_q[1].clone(),
            g_q[2].clone(),
            g_qn[2].clone(),
            g_qn[3].clone(),
            g_rot[2].clone(),
            g_vr[2].clone(),
            g_at[3].clone(),
            g_op[1].clone(),
            g_op[2].clone(),
            g_z[1].clone(),
            g_l[1].clone(),
        ]
    });
    let m =
        Model::new(&format!("dense chain {kind:?}"), xs, names.iter().map(|s| s.to_string()).collect(), diff, fw, bw);
    // The objective is one f32 scalar (rounding ≈ 1.2e-7 at |loss| ≈ 2), so FD noise is
    // ≈ 1.2e-7/h: tensors with small rms or small gradients get larger absolute steps (QKV weight
    // 5e-3 and bias 1e-2, log-frequencies 0.2 = 1.25% in f, value-residual logit and sinks 2e-2).
    m.with_step(3, 5e-3).with_step(4, 1e-2).with_step(7, 0.2).with_step(8, 2e-2).with_step(9, 2e-2)
}

#[test]
fn dense_chain_gradcheck() {
    for kind in [AttnKind::Window(3), AttnKind::Global { alibi: true }] {
        let mut rng = Rng::new(60);
        let m = dense_chain(&mut rng, kind);
        run(&m, 61);
        adjoint(&m, 62);
    }
}
