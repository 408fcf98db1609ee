//! Reference math of the optimizer (MODEL.md §7, Decisions D9 and D10): Normuon with Polar Express
//! for the matrices, AdamW for everything else, global gradient-norm clipping and the LR schedule.
//!
//! Pure functions on f32 slices (the storage of master weights, gradients and state, D9). Scalar
//! arithmetic is done in f64 and rounded once to f32 on store; reductions accumulate in f64. Every
//! matrix product goes through [`Gemm`], so a backend can reuse these definitions with a fast GEMM.
//! Hyper-parameters, the learning rate, the weight decay and the AdamW step are runtime values,
//! never constants, so that a compiled kernel can take them as arguments.

use serde::{Deserialize, Serialize};

use crate::reference::{kept, round_bf16, transpose_into, Gemm};

// ---------------------------------------------------------------------------------------------
// Polar Express (§7.2)
// ---------------------------------------------------------------------------------------------

/// The §7.2 coefficient table `(a, b, c)` per iteration: the modded-nanogpt "num_iters=5,
/// safety_factor=2e-2, cushion=2" set. It maps every normalised singular value in `[1e-3, 1]` into
/// `[0.8589, 1.1411]`, and it is tuned for safety 0.02 only.
pub const DEFAULT_POLAR_EXPRESS: [[f64; 3]; 5] = [
    [8.156554524902461, -22.48329292557795, 15.878769915207462],
    [4.042929935166739, -2.808917465908714, 0.5000178451051316],
    [3.8916678022926607, -2.772484153217685, 0.5060648178503393],
    [3.285753657755655, -2.3681294933425376, 0.46449024233003106],
    [2.3465413258596377, -1.7097828382687081, 0.42323551169305323],
];

/// The safety factor [`DEFAULT_POLAR_EXPRESS`] was designed for.
pub const DEFAULT_POLAR_EXPRESS_SAFETY: f64 = 0.02;

/// Polar Express configuration (D10: table, iteration count and safety factor are config values).
#[derive(Clone, Debug, PartialEq)]
pub struct PolarExpress {
    /// One `(a, b, c)` per iteration: `X ← a·X + (b·A + c·A²)·X` with `A = X·Xᵀ`.
    pub coeffs: Vec<[f64; 3]>,
    /// The normalisation divides by `‖X‖_F·(1 + safety)`, so the top singular value is at most
    /// `1/(1 + safety)`, away from the edge where the polynomials stop contracting.
    pub safety: f64,
    /// Added to the normalisation denominator so that a zero matrix stays zero (1e-6).
    pub eps: f64,
}

impl Default for PolarExpress {
    fn default() -> Self {
        PolarExpress { coeffs: DEFAULT_POLAR_EXPRESS.to_vec(), safety: DEFAULT_POLAR_EXPRESS_SAFETY, eps: 1e-6 }
    }
}

impl PolarExpress {
    /// Rejects an empty or non-finite table, a negative safety or eps, and the default table with
    /// another safety factor (the reference raises there too: the table is tuned for 0.02).
    pub fn check(&self) -> Result<(), String> {
        if self.coeffs.is_empty() {
            return Err("polar express coeffs: the table is empty".into());
        }
        if let Some(i) = self.coeffs.iter().position(|t| t.iter().any(|x| !x.is_finite())) {
            return Err(format!("polar express coeffs: triple {i} is not finite: {:?}", self.coeffs[i]));
        }
        if !(self.safety.is_finite() && self.safety >= 0.0) {
            return Err(format!("polar_express_safety_factor must be finite and >= 0, got {}", self.safety));
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(format!("polar express eps must be finite and > 0, got {}", self.eps));
        }
        if self.coeffs == DEFAULT_POLAR_EXPRESS && (self.safety - DEFAULT_POLAR_EXPRESS_SAFETY).abs() > 1e-12 {
            return Err(format!(
                "polar_express_safety_factor {} differs from {DEFAULT_POLAR_EXPRESS_SAFETY}, the value the default \
                 coefficient table is tuned for; give a matching table",
                self.safety
            ));
        }
        Ok(())
    }

    /// The scalar polynomial composition the iteration applies to each normalised singular value
    /// `s ∈ [0, 1/(1+safety)]`: `PE(X) = U·diag(p(sᵢ))·Vᵀ` for `X = U·diag(σᵢ)·Vᵀ`,
    /// `sᵢ = σᵢ/(‖X‖_F·(1+safety) + eps)`. The error of PE against the polar factor is `|p(s) − 1|`.
    pub fn poly(&self, mut s: f64) -> f64 {
        for &[a, b, c] in &self.coeffs {
            let s2 = s * s;
            s = a * s + b * s2 * s + c * s2 * s2 * s;
        }
        s
    }
}

/// Orthogonalises `batch` row-major `rows×cols` matrices stored back to back in `x`, in place.
///
/// Semantics are per matrix (§7.2): a tall matrix (`rows > cols`) is transposed so the iterated
/// `X` is wide and the Gram matrix `A = X·Xᵀ` is the small `min×min` one; normalise by
/// `‖X‖_F·(1+safety) + eps`; for each `(a, b, c)`: `A = X·Xᵀ`, `B = b·A + c·A·A`, `X = a·X + B·X`;
/// transpose back. Execution is batched (D10): every step is one loop over the batch, i.e. each
/// GEMM below is what one batched launch computes, and no matrix sees anything of the others, so
/// the result is bitwise independent of how matrices are grouped into batches.
///
/// fp32 storage between steps (the CPU path of the reference; its CUDA path runs in bf16), GEMMs as
/// `gemm` computes them, element-wise combinations in f64 rounded once.
pub fn polar_express_batched(
    pe: &PolarExpress,
    x: &mut [f32],
    batch: usize,
    rows: usize,
    cols: usize,
    gemm: &dyn Gemm,
) {
    let size = rows * cols;
    assert_eq!(x.len(), batch * size, "polar_express_batched: {batch}×{rows}×{cols} vs {} elements", x.len());
    if size == 0 || batch == 0 {
        return;
    }
    let tall = rows > cols;
    let (m, n) = if tall { (cols, rows) } else { (rows, cols) };
    let mm = m * m;

    // X (m×n, wide) for every matrix of the batch.
    let mut xs = vec![0f32; batch * size];
    if tall {
        for i in 0..batch {
            transpose_into(&x[i * size..(i + 1) * size], rows, cols, &mut xs[i * size..(i + 1) * size]);
        }
    } else {
        xs.copy_from_slice(x);
    }

    for xi in xs.chunks_exact_mut(size) {
        let norm = xi.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
        let denom = norm * (1.0 + pe.safety) + pe.eps;
        for v in xi.iter_mut() {
            *v = (*v as f64 / denom) as f32;
        }
    }

    // Under the tensor-core model (`TensorCore`), the iteration is the kernels' (optim.cuh): X and
    // A are kept in bf16, B = a·I + b·A + c·A·A in f32 enters B·X as bf16 hi + lo, and X ← B·X.
    let tc = gemm.bf16_intermediates();
    kept(gemm, &mut xs);
    let mut a_mat = vec![0f32; batch * mm];
    let mut aa = vec![0f32; batch * mm];
    let mut xt = vec![0f32; batch * size];
    let mut bx = vec![0f32; batch * size];
    let iters = pe.coeffs.len();
    for (it, &[a, b, c]) in pe.coeffs.iter().enumerate() {
        // A = X·Xᵀ (batched GEMM).
        for i in 0..batch {
            let xi = &xs[i * size..(i + 1) * size];
            gemm.xwt(m, n, m, xi, xi, &mut a_mat[i * mm..(i + 1) * mm], false);
        }
        kept(gemm, &mut a_mat);
        if tc {
            polar_iteration_tc(&mut xs, &a_mat, [a, b, c], batch, m, n, it + 1 == iters, gemm);
            continue;
        }
        // A·A = A·Aᵀ since A is symmetric (batched GEMM).
        for i in 0..batch {
            let ai = &a_mat[i * mm..(i + 1) * mm];
            gemm.xwt(m, m, m, ai, ai, &mut aa[i * mm..(i + 1) * mm], false);
        }
        // B = b·A + c·A·A (element-wise, kept in `aa`).
        for (bv, &av) in aa.iter_mut().zip(&a_mat) {
            *bv = (b * av as f64 + c * *bv as f64) as f32;
        }
        // B·X = B·(Xᵀ)ᵀ (batched GEMM; a GPU GEMM reads X transposed instead of copying it).
        for i in 0..batch {
            transpose_into(&xs[i * size..(i + 1) * size], m, n, &mut xt[i * size..(i + 1) * size]);
            gemm.xwt(
                m,
                m,
                n,
                &aa[i * mm..(i + 1) * mm],
                &xt[i * size..(i + 1) * size],
                &mut bx[i * size..(i + 1) * size],
                false,
            );
        }
        // X = a·X + B·X.
        for (xv, &bv) in xs.iter_mut().zip(&bx) {
            *xv = (a * *xv as f64 + bv as f64) as f32;
        }
    }

    if tall {
        for i in 0..batch {
            transpose_into(&xs[i * size..(i + 1) * size], m, n, &mut x[i * size..(i + 1) * size]);
        }
    } else {
        x.copy_from_slice(&xs);
    }
}

/// One Polar Express iteration as the kernels compute it (pe_poly, pe_apply), given the bf16
/// `A = X·Xᵀ`: `B = f32(c·A·A + b·A + a·I)`, split into `hi = bf16(B)` and `lo = bf16(B − hi)`,
/// then `X ← (hi + lo)·X` in f32, kept in bf16 except after the last iteration.
#[allow(clippy::too_many_arguments)]
fn polar_iteration_tc(
    xs: &mut [f32],
    a_mat: &[f32],
    [a, b, c]: [f64; 3],
    batch: usize,
    m: usize,
    n: usize,
    last: bool,
    gemm: &dyn Gemm,
) {
    let (size, mm) = (m * n, m * m);
    let (a, b, c) = (a as f32, b as f32, c as f32);
    let mut bm = vec![0f32; mm];
    let mut y = vec![0f32; size];
    for i in 0..batch {
        let ai = &a_mat[i * mm..(i + 1) * mm];
        gemm.xwt(m, m, m, ai, ai, &mut bm, false);
        for (k, bv) in bm.iter_mut().enumerate() {
            let v = c * *bv + b * ai[k] + if k / m == k % m { a } else { 0.0 };
            let hi = round_bf16(v);
            *bv = hi + round_bf16(v - hi);
        }
        let xi = &mut xs[i * size..(i + 1) * size];
        gemm.ab(m, m, n, &bm, xi, &mut y, false);
        xi.copy_from_slice(&y);
        if !last {
            kept(gemm, xi);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Normuon (§7.2)
// ---------------------------------------------------------------------------------------------

/// Normuon hyper-parameters (§7.2; locked values in `Default`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NormuonHyper {
    /// μ: momentum coefficient (0.95).
    pub momentum: f64,
    /// β₂ of the per-row second moment (0.95).
    pub beta2: f64,
    /// ε under the square root of the row normalisation and the floor of the restored norm (1e-10).
    pub eps: f64,
    /// Nesterov: orthogonalise `(1−μ)·G + μ·M_new` instead of `M_new` (true).
    pub nesterov: bool,
}

impl Default for NormuonHyper {
    fn default() -> Self {
        NormuonHyper { momentum: 0.95, beta2: 0.95, eps: 1e-10, nesterov: true }
    }
}

/// Steps 1–2: `M ← μ·M + (1−μ)·G`, then `U = (1−μ)·G + μ·M` with the new `M` (Nesterov) or `U = M`.
pub fn normuon_momentum(h: &NormuonHyper, g: &[f32], mom: &mut [f32], u: &mut [f32]) {
    assert!(g.len() == mom.len() && g.len() == u.len(), "normuon_momentum: length mismatch");
    let mu = h.momentum;
    for ((mv, &gv), uv) in mom.iter_mut().zip(g).zip(u.iter_mut()) {
        let m_new = (mu * *mv as f64 + (1.0 - mu) * gv as f64) as f32;
        *mv = m_new;
        *uv = if h.nesterov { ((1.0 - mu) * gv as f64 + mu * m_new as f64) as f32 } else { m_new };
    }
}

/// Steps 4–5 in place, turning the orthogonalised `O` into the update `Δ` for `batch` matrices:
/// `aᵢ = mean_j O²ᵢⱼ`, `v ← β₂·v + (1−β₂)·a` (no bias correction; `v` is `[batch, rows]`),
/// `Ô = O/sqrt(v+ε)` row-wise, `Ô ← Ô·‖O‖_F/max(‖Ô‖_F, ε)`, `Δ = Ô·sqrt(max(1, rows/cols))`.
///
/// The row scale, the norm restoration and the shape scale are folded into one f64 factor per
/// row (`‖Ô‖_F` is computed exactly from the row sums), so each element is rounded once.
pub fn normuon_rownorm_batched(h: &NormuonHyper, o: &mut [f32], v: &mut [f32], batch: usize, rows: usize, cols: usize) {
    assert_eq!(o.len(), batch * rows * cols, "normuon_rownorm_batched: o has {} elements", o.len());
    assert_eq!(v.len(), batch * rows, "normuon_rownorm_batched: v has {} elements, want batch·rows", v.len());
    if cols == 0 {
        return;
    }
    let shape_scale = (rows as f64 / cols as f64).max(1.0).sqrt();
    let mut row_scale = vec![0f64; rows];
    for (oi, vi) in o.chunks_exact_mut(rows * cols).zip(v.chunks_exact_mut(rows)) {
        let (mut norm_sq, mut scaled_sq) = (0f64, 0f64);
        for (r, (row, vr)) in oi.chunks_exact(cols).zip(vi.iter_mut()).enumerate() {
            let ss = row.iter().map(|&x| x as f64 * x as f64).sum::<f64>();
            let a = ss / cols as f64;
            *vr = (h.beta2 * *vr as f64 + (1.0 - h.beta2) * a) as f32;
            let s = 1.0 / (*vr as f64 + h.eps).sqrt();
            row_scale[r] = s;
            norm_sq += ss;
            scaled_sq += s * s * ss;
        }
        let restore = norm_sq.sqrt() / scaled_sq.sqrt().max(h.eps);
        for (row, &s) in oi.chunks_exact_mut(cols).zip(&row_scale) {
            let f = s * restore * shape_scale;
            for x in row {
                *x = (*x as f64 * f) as f32;
            }
        }
    }
}

/// Steps 1–5 for `batch` same-shaped matrices: updates `mom` and `v`, returns `Δ` (`[batch, rows,
/// cols]`), the update before the learning rate.
#[allow(clippy::too_many_arguments)]
pub fn normuon_update_batched(
    h: &NormuonHyper,
    pe: &PolarExpress,
    g: &[f32],
    mom: &mut [f32],
    v: &mut [f32],
    batch: usize,
    rows: usize,
    cols: usize,
    gemm: &dyn Gemm,
) -> Vec<f32> {
    assert_eq!(g.len(), batch * rows * cols, "normuon: g has {} elements, want {batch}×{rows}×{cols}", g.len());
    let mut u = vec![0f32; g.len()];
    normuon_momentum(h, g, mom, &mut u);
    polar_express_batched(pe, &mut u, batch, rows, cols, gemm);
    normuon_rownorm_batched(h, &mut u, v, batch, rows, cols);
    u
}

/// One Normuon step (§7.2 steps 1–6) on `batch` same-shaped `rows×cols` matrices (`[out, in]`
/// orientation) stored back to back: `w`, `g`, `mom` are `[batch, rows, cols]`, `v` is
/// `[batch, rows]`. `lr` is the current learning rate, `wd` the effective decoupled weight decay
/// (`weight_decay·wd_mult`, 0 for parameters without decay).
#[allow(clippy::too_many_arguments)]
pub fn normuon_step_batched(
    h: &NormuonHyper,
    pe: &PolarExpress,
    w: &mut [f32],
    g: &[f32],
    mom: &mut [f32],
    v: &mut [f32],
    batch: usize,
    rows: usize,
    cols: usize,
    lr: f64,
    wd: f64,
    gemm: &dyn Gemm,
) {
    let delta = normuon_update_batched(h, pe, g, mom, v, batch, rows, cols, gemm);
    apply_update(w, &delta, lr, wd);
}

/// Step 6 (and the last line of AdamW): `W ← W·(1 − lr·wd) − lr·Δ`, decoupled decay scaled by
/// the current LR, one rounding per element.
pub fn apply_update(w: &mut [f32], delta: &[f32], lr: f64, wd: f64) {
    assert_eq!(w.len(), delta.len(), "apply_update: length mismatch");
    let keep = 1.0 - lr * wd;
    for (wv, &d) in w.iter_mut().zip(delta) {
        *wv = (*wv as f64 * keep - lr * d as f64) as f32;
    }
}

// ---------------------------------------------------------------------------------------------
// AdamW (§7.3)
// ---------------------------------------------------------------------------------------------

/// AdamW hyper-parameters (§7.3; Megatron defaults in `Default`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamHyper {
    pub beta1: f64,
    pub beta2: f64,
    /// Added after the square root of the bias-corrected second moment.
    pub eps: f64,
}

impl Default for AdamHyper {
    fn default() -> Self {
        AdamHyper { beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }
}

impl AdamHyper {
    /// `(1 − β₁ᵏ, 1 − β₂ᵏ)` for the step count `k ≥ 1` after its increment: computed per step from
    /// runtime scalars, so a kernel takes them as arguments and nothing step-dependent is baked.
    pub fn bias_corrections(&self, step: u64) -> (f64, f64) {
        assert!(step >= 1, "adamw: the step count is incremented before use, so it is >= 1");
        let k = i32::try_from(step).map(|k| (self.beta1.powi(k), self.beta2.powi(k)));
        let (p1, p2) = k.unwrap_or_else(|_| (self.beta1.powf(step as f64), self.beta2.powf(step as f64)));
        (1.0 - p1, 1.0 - p2)
    }
}

/// One AdamW step with explicit bias-correction factors `bc1 = 1−β₁ᵏ`, `bc2 = 1−β₂ᵏ`:
/// `m ← β₁m + (1−β₁)g`, `s ← β₂s + (1−β₂)g²`, `u = (m/bc1)/(sqrt(s/bc2) + ε)`,
/// `W ← W·(1 − lr·wd) − lr·u` (with the stored f32 `m`, `s`).
#[allow(clippy::too_many_arguments)]
pub fn adamw_step_bc(
    h: &AdamHyper,
    w: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    s: &mut [f32],
    bc1: f64,
    bc2: f64,
    lr: f64,
    wd: f64,
) {
    let n = w.len();
    assert!(g.len() == n && m.len() == n && s.len() == n, "adamw: length mismatch");
    let keep = 1.0 - lr * wd;
    for i in 0..n {
        let gv = g[i] as f64;
        let mv = (h.beta1 * m[i] as f64 + (1.0 - h.beta1) * gv) as f32;
        let sv = (h.beta2 * s[i] as f64 + (1.0 - h.beta2) * gv * gv) as f32;
        m[i] = mv;
        s[i] = sv;
        let u = (mv as f64 / bc1) / ((sv as f64 / bc2).sqrt() + h.eps);
        w[i] = (w[i] as f64 * keep - lr * u) as f32;
    }
}

/// One AdamW step (§7.3); `step` is the count `k` after its increment (1 on the first update).
/// `wd` is the effective decay (`weight_decay·wd_mult`).
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(h: &AdamHyper, w: &mut [f32], g: &[f32], m: &mut [f32], s: &mut [f32], step: u64, lr: f64, wd: f64) {
    let (bc1, bc2) = h.bias_corrections(step);
    adamw_step_bc(h, w, g, m, s, bc1, bc2, lr, wd);
}

// ---------------------------------------------------------------------------------------------
// Global gradient-norm clipping (§7.1 step 4)
// ---------------------------------------------------------------------------------------------

/// `Σ x²` accumulated in f64: one parameter's share of the global squared gradient norm.
pub fn sq_norm(x: &[f32]) -> f64 {
    x.iter().map(|&v| v as f64 * v as f64).sum()
}

/// The factor every gradient is multiplied by: `c = max_norm/(G + 1e-6)` with `G = sqrt(Σ‖g‖²)`
/// over all parameters (Normuon and AdamW together), applied only when `c < 1`; 1 otherwise.
/// `max_norm = 0` disables clipping. A non-finite `G` gives a non-finite factor, so the step
/// visibly fails rather than silently skipping the clip.
pub fn clip_coefficient(total_sq_norm: f64, max_norm: f64) -> f32 {
    if max_norm <= 0.0 {
        return 1.0;
    }
    let c = max_norm / (total_sq_norm.sqrt() + 1e-6);
    if c < 1.0 || c.is_nan() {
        c as f32
    } else {
        1.0
    }
}

// ---------------------------------------------------------------------------------------------
// Learning-rate schedule (§7.4)
// ---------------------------------------------------------------------------------------------

/// Shape of the LR after warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecayStyle {
    /// `lr` forever (`min_lr` unused).
    Constant,
    /// Linear from `lr` to `min_lr` between the end of warm-up and `total`.
    Linear,
    /// Half cosine from `lr` to `min_lr` between the end of warm-up and `total`.
    Cosine,
    /// Warm-up, stable at `lr`, then linear to `min_lr` over the last `wsd_decay` steps.
    Wsd,
}

/// The LR schedule of one parameter group (Megatron's `OptimizerParamScheduler`, warm-up from 0).
///
/// Step convention: `lr_at(step)` is the LR of update number `step`, counted from 0, and equals
/// Megatron's `get_lr()` evaluated at `num_steps = step + 1` (the number of updates done once this
/// one is applied). Hence: warm-up `lr·(step+1)/warmup` for `step < warmup`, so the first update
/// already moves (Megatron itself evaluates at `num_steps = step` and spends its first update at
/// `init_lr = 0`) and update `warmup − 1` is the first at the full `lr`; decay reaches `min_lr`
/// exactly on update `total − 1`, the last of a `total`-update run, and stays there.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate of the decay styles.
    #[serde(default)]
    pub min_lr: f64,
    /// Warm-up length in updates (0: none).
    #[serde(default)]
    pub warmup: u64,
    /// Run length in updates: the decay ends here.
    pub total: u64,
    pub decay: DecayStyle,
    /// Length of the final linear decay of `wsd` (only valid with `decay = "wsd"`).
    #[serde(default)]
    pub wsd_decay: u64,
}

impl Schedule {
    /// A constant LR with no warm-up.
    pub fn constant(lr: f64, total: u64) -> Self {
        Schedule { lr, min_lr: lr, warmup: 0, total, decay: DecayStyle::Constant, wsd_decay: 0 }
    }

    /// Rejects inconsistent settings, naming the field.
    pub fn check(&self) -> Result<(), String> {
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return Err(format!("lr must be finite and >= 0, got {}", self.lr));
        }
        if !(self.min_lr.is_finite() && self.min_lr >= 0.0) {
            return Err(format!("min_lr must be finite and >= 0, got {}", self.min_lr));
        }
        if self.min_lr > self.lr {
            return Err(format!("min_lr ({}) exceeds lr ({})", self.min_lr, self.lr));
        }
        if self.total == 0 {
            return Err("total must be >= 1 (the run length in updates)".into());
        }
        if self.warmup > self.total {
            return Err(format!("warmup ({}) exceeds total ({})", self.warmup, self.total));
        }
        match self.decay {
            DecayStyle::Wsd => {
                if self.wsd_decay == 0 {
                    return Err("wsd_decay must be >= 1 with decay = \"wsd\"".into());
                }
                if self.warmup + self.wsd_decay > self.total {
                    return Err(format!(
                        "wsd_decay ({}) + warmup ({}) exceeds total ({})",
                        self.wsd_decay, self.warmup, self.total
                    ));
                }
            }
            _ if self.wsd_decay != 0 => {
                return Err(format!("wsd_decay ({}) is only valid with decay = \"wsd\"", self.wsd_decay));
            }
            _ => {}
        }
        Ok(())
    }

    /// The LR of update `step` (0 for the first update); see the type's doc for the convention.
    pub fn lr_at(&self, step: u64) -> f64 {
        let n = step.saturating_add(1);
        if self.warmup > 0 && n <= self.warmup {
            return self.lr * n as f64 / self.warmup as f64;
        }
        let coeff = match self.decay {
            DecayStyle::Constant => return self.lr,
            _ if n > self.total => return self.min_lr,
            DecayStyle::Linear | DecayStyle::Cosine => {
                let ratio = (n - self.warmup) as f64 / (self.total - self.warmup) as f64;
                if self.decay == DecayStyle::Linear {
                    1.0 - ratio
                } else {
                    0.5 * ((std::f64::consts::PI * ratio).cos() + 1.0)
                }
            }
            DecayStyle::Wsd => {
                let start = self.total.saturating_sub(self.wsd_decay);
                if n <= start {
                    1.0
                } else {
                    1.0 - (n - start) as f64 / self.wsd_decay as f64
                }
            }
        };
        self.min_lr + coeff * (self.lr - self.min_lr)
    }
}
