//! The checking harness: a function under test ([`Model`]), per-element central differences
//! ([`gradcheck`]) and the adjoint identity ([`adjoint`]), with the tolerances.

use vpmoe_ir::reference::{Dims, Tensor};
use vpmoe_ir::Op;

use crate::helpers::{bwd, fwd, rms, Rng};

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

/// Forward of a differentiable function: float outputs in the objective, discrete decisions.
pub(crate) type FwdFn<'a> = Box<dyn Fn(&[Tensor]) -> (Vec<Tensor>, Vec<i64>) + 'a>;
/// Backward: gradients of the differentiable inputs (in order) given the outputs' upstream.
pub(crate) type BwdFn<'a> = Box<dyn Fn(&[Tensor], &[Tensor]) -> Vec<Tensor> + 'a>;
/// Extra decisions computed from the inputs (ReLU patterns, aux-loss top-k, ...).
pub(crate) type DecFn<'a> = Box<dyn Fn(&[Tensor]) -> Vec<i64> + 'a>;

/// A function under test: inputs (differentiable or not), forward and backward.
pub(crate) struct Model<'a> {
    pub(crate) name: String,
    pub(crate) xs: Vec<Tensor>,
    pub(crate) names: Vec<String>,
    pub(crate) diff: Vec<bool>,
    /// FD step per input (absolute).
    pub(crate) step: Vec<f64>,
    /// Use Richardson extrapolation (for steps so large that truncation would dominate).
    pub(crate) richardson: bool,
    pub(crate) fwd: FwdFn<'a>,
    pub(crate) bwd: BwdFn<'a>,
}

impl<'a> Model<'a> {
    pub(crate) fn new(
        name: &str,
        xs: Vec<Tensor>,
        names: Vec<String>,
        diff: Vec<bool>,
        fwd: FwdFn<'a>,
        bwd: BwdFn<'a>,
    ) -> Self {
        let step = xs.iter().zip(&diff).map(|(x, &d)| if d { REL_STEP * rms(x.f()).max(1e-2) } else { 0.0 }).collect();
        Model { name: name.to_string(), xs, names, diff, step, richardson: false, fwd, bwd }
    }
    pub(crate) fn with_richardson(mut self) -> Self {
        self.richardson = true;
        self
    }
    /// Overrides the FD step of input `i` (e.g. log-frequencies, whose scale is not their rms).
    pub(crate) fn with_step(mut self, i: usize, h: f64) -> Self {
        self.step[i] = h;
        self
    }
}

/// One forward op as a [`Model`]: the objective covers the outputs with `grad_outs` and `seeds`;
/// the decisions are every integer output plus `extra(xs)`.
pub(crate) fn op_model<'a>(
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
pub(crate) type Report = Vec<(String, f64, f64, usize)>;

/// Central-difference check of every element of every differentiable input.
pub(crate) fn gradcheck(m: &Model, seed: u64) -> Report {
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
pub(crate) fn adjoint(m: &Model, seed: u64) -> f64 {
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

/// Gradient check of `m` with its name printed first.
pub(crate) fn run(m: &Model, seed: u64) -> Report {
    println!("{}", m.name);
    gradcheck(m, seed)
}
