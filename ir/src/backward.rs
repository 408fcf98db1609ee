//! Reference vector–Jacobian products of every forward op (MODEL.md §5): plain loops, f32
//! tensors with f64 accumulation, recomputing whatever forward intermediates they need. This is
//! the living definition that the autodiff pass's `vjp` nodes execute on the cpu backend and
//! that backward kernels are tested against.
//!
//! Each VJP is the exact derivative of the forward in [`crate::reference`] (not of a bf16
//! emulation): in particular the value-residual λ is the f32 sigmoid with a live gradient (D2),
//! and masked attention scores contribute exactly zero (D5). Discrete decisions (router
//! selection, aux-loss top-k counts, dispatch rows) are constants of the backward. Large matrix
//! products go through [`Gemm`] (`x·Wᵀ`, `dy·W`, `dyᵀ·x`), so the cpu trainer's strided GEMM
//! carries the LM head, MLP and expert products without transposed copies.

use std::borrow::Cow;

use crate::op::{Attn, AttnKind, Op, Vjp};
use crate::reference::{
    alibi_slopes, attends, gather_rows, grape_freqs, head_logits, kept, kept_f64, row_lse, sigmoid, topk, tpa_factors,
    tpa_widths, Dims, Gemm, Tensor,
};

/// Executes a `vjp` node: `ins` are the forward inputs, the forward outputs, the supplied
/// upstream gradients and, with [`Vjp::acc`], the running gradient of input 0 (in
/// [`Op::signature`] order of the `vjp` op). The outputs are [`backward`]'s gradients less the
/// [`Op::passthrough`] inputs'.
pub fn vjp(v: &Vjp, dims: &Dims, ins: &[&Tensor], gemm: &dyn Gemm) -> Vec<Tensor> {
    let (fi, fo) = v.of.signature();
    let (xs, rest) = ins.split_at(fi.len());
    let (ys, gs) = rest.split_at(fo.len());
    let mut gs = gs.iter();
    let dys: Vec<Option<&Tensor>> = v.seeds.iter().map(|&s| if s { Some(*gs.next().unwrap()) } else { None }).collect();
    let mut grads = backward(&v.of, dims, xs, ys, &dys, gemm);
    let mask = v.of.grad_ins();
    assert_eq!(grads.len(), mask.iter().filter(|&&m| m).count(), "{}: gradient count", v.of.name());
    // Not outputs of the node: autodiff passes the upstream gradient on itself (last port first,
    // so the earlier positions stay put).
    for &p in v.of.passthrough().iter().rev() {
        grads.remove(mask[..p].iter().filter(|&&m| m).count());
    }
    if v.acc {
        assert!(mask[0], "{}: acc needs a gradient of input 0", v.of.name());
        let acc = gs.next().expect("acc input after the seeds").f();
        let d = grads[0].f().iter().zip(acc).map(|(g, a)| g + a).collect();
        grads[0] = Tensor::f32(grads[0].shape.clone(), d);
    }
    grads
}

/// Gradients of the forward op's differentiable inputs ([`Op::grad_ins`]), in input order.
/// `xs`: forward inputs; `ys`: forward outputs; `dys[i]`: upstream gradient of output `i`
/// (`None` = zero).
///
/// Parameter gradients (fixed-shape inputs) are sums over all tokens; every returned tensor has
/// the shape of its forward input. Panics for `add` and `vjp`, which autodiff never
/// differentiates (`add` is linear and handled by the pass itself).
pub fn backward(
    op: &Op,
    dims: &Dims,
    xs: &[&Tensor],
    ys: &[&Tensor],
    dys: &[Option<&Tensor>],
    gemm: &dyn Gemm,
) -> Vec<Tensor> {
    let t = dims.tokens;
    // Upstream gradient of output `i` as a flat slice (zeros when absent).
    let up = |i: usize| upstream(dys, i, ys[i].numel());
    let like = |x: &Tensor, v: Vec<f32>| Tensor::f32(x.shape.clone(), v);
    match *op {
        Op::Embedding { hidden, .. } => {
            let h = hidden as usize;
            let dh = up(0);
            let mut dt = vec![0f64; xs[1].numel()];
            for (ti, &tok) in xs[0].i().iter().enumerate() {
                for (d, &g) in dt[tok as usize * h..][..h].iter_mut().zip(&dh[ti * h..][..h]) {
                    *d += g as f64;
                }
            }
            vec![like(xs[1], to_f32(dt))]
        }
        Op::RmsNorm { dim, eps } => {
            let d = dim as usize;
            let (dx, dw) = rms_bwd(xs[0].f(), xs[1].f(), &up(0), d, eps);
            vec![like(xs[0], dx), like(xs[1], dw)]
        }
        Op::QkvProj { hidden, heads, groups, head_dim, bias } => {
            let (h, nh, ng, d) = (hidden as usize, heads as usize, groups as usize, head_dim as usize);
            let n = (nh + 2 * ng) * d;
            let dm = pack_qkv(&up(0), &up(1), &up(2), t, nh, ng, d);
            let (x, w) = (xs[0].f(), xs[1].f());
            let mut dx = vec![0f32; t * h];
            dx_acc(gemm, &dm, w, t, n, h, &mut dx, false);
            let mut g = vec![like(xs[0], dx), like(xs[1], dweight(gemm, &dm, x, t, n, h))];
            if bias {
                g.push(like(xs[2], colsum(&dm, n)));
            }
            g
        }
        Op::TpaQkv { hidden, heads, groups, head_dim, q_rank, kv_rank, bias } => {
            tpa_bwd(gemm, t, xs, [&up(0), &up(1), &up(2)], [hidden, heads, groups, head_dim, q_rank, kv_rank], bias)
        }
        Op::QkNorm { head_dim, eps, .. } => {
            let d = head_dim as usize;
            let (dq, dqw) = rms_bwd(xs[0].f(), xs[2].f(), &up(0), d, eps);
            let (dk, dkw) = rms_bwd(xs[1].f(), xs[3].f(), &up(1), d, eps);
            vec![like(xs[0], dq), like(xs[1], dk), like(xs[2], dqw), like(xs[3], dkw)]
        }
        Op::GrapeM { head_dim, log_freq_scale, .. } => {
            let d = head_dim as usize;
            let half = d / 2;
            let freqs = grape_freqs(xs[2].f(), log_freq_scale);
            // ∂L/∂l_i = Σ_{t, heads, q&k} ∂L/∂θ_{t,i} · pos_t · f_i / scale.
            let mut dtheta_pos = vec![0f64; half];
            let mut grads: Vec<Tensor> = [(xs[0], up(0)), (xs[1], up(1))]
                .iter()
                .map(|(x, g)| {
                    let u = x.f();
                    let mut du = vec![0f32; u.len()];
                    let per_tok = u.len() / t;
                    for ti in 0..t {
                        let pos = ti % dims.seq;
                        for hd in 0..per_tok / d {
                            let o = ti * per_tok + hd * d;
                            for i in 0..half {
                                // Angles exactly as the forward (f32), derivative in f64.
                                let (s, c) = (pos as f32 * freqs[i]).sin_cos();
                                let (s, c) = (s as f64, c as f64);
                                let (a, b) = (u[o + i] as f64, u[o + i + half] as f64);
                                let (g1, g2) = (g[o + i] as f64, g[o + i + half] as f64);
                                du[o + i] = (g1 * c + g2 * s) as f32;
                                du[o + i + half] = (g2 * c - g1 * s) as f32;
                                // u'¹ = a c − b s, u'² = b c + a s; ∂L/∂θ = g²·u'¹ − g¹·u'².
                                let dth = g2 * (a * c - b * s) - g1 * (b * c + a * s);
                                dtheta_pos[i] += dth * pos as f64;
                            }
                        }
                    }
                    like(x, du)
                })
                .collect();
            let dl = dtheta_pos.iter().zip(&freqs).map(|(&s, &f)| (s * f as f64 / log_freq_scale as f64) as f32);
            grads.push(like(xs[2], dl.collect()));
            grads
        }
        Op::ValueResidual { .. } => {
            let lam = sigmoid(xs[2].f()[0]) as f64;
            let g = up(0);
            let (v, v1) = (xs[0].f(), xs[1].f());
            let dv = g.iter().map(|&g| (lam * g as f64) as f32).collect();
            let dv1 = g.iter().map(|&g| ((1.0 - lam) * g as f64) as f32).collect();
            let dlam: f64 = g.iter().zip(v).zip(v1).map(|((&g, &a), &b)| g as f64 * (a as f64 - b as f64)).sum();
            vec![like(xs[0], dv), like(xs[1], dv1), like(xs[2], vec![(lam * (1.0 - lam) * dlam) as f32])]
        }
        Op::Attention(ref a) => {
            // The kernels take ρ = dO·O from the stored (bf16) output.
            let out = gemm.bf16_intermediates().then(|| ys[0].f());
            attention_bwd(a, dims, xs, &up(0), out)
        }
        Op::OutProj { in_dim, hidden, bias } => {
            let (k, n) = (in_dim as usize, hidden as usize);
            let dh = up(0);
            let mut dctx = vec![0f32; t * k];
            dx_acc(gemm, &dh, xs[1].f(), t, n, k, &mut dctx, false);
            let mut g = vec![like(xs[0], dctx), like(xs[1], dweight(gemm, &dh, xs[0].f(), t, n, k))];
            if bias {
                g.push(like(xs[2], colsum(&dh, n)));
            }
            g.push(like(xs[xs.len() - 1], dh.into_owned()));
            g
        }
        Op::Mlp { hidden, ffn, bias, residual } => {
            let (h, f) = (hidden as usize, ffn as usize);
            let mut it = xs[1..].iter();
            let w1 = it.next().unwrap();
            let b1 = if bias { Some(*it.next().unwrap()) } else { None };
            let w2 = it.next().unwrap();
            let b2 = if bias { Some(*it.next().unwrap()) } else { None };
            let dy = up(0);
            let p = mlp_bwd(gemm, xs[0].f(), &dy, w1.f(), b1.map(|b| b.f()), w2.f(), t, h, f);
            let mut g = vec![like(xs[0], p.dx), like(w1, p.dw1)];
            if let Some(b1) = b1 {
                g.push(like(b1, p.db1));
            }
            g.push(like(w2, p.dw2));
            if let Some(b2) = b2 {
                g.push(like(b2, p.db2));
            }
            if residual {
                g.push(like(it.next().unwrap(), dy.into_owned()));
            }
            g
        }
        Op::Router { hidden, experts, topk: k, scale, bias, .. } => {
            let (h, e, k) = (hidden as usize, experts as usize, k as usize);
            let (idx, sig) = (ys[0].i(), ys[2].f());
            let (dgate, dscores) = (up(1), up(2));
            let mut dl = vec![0f32; t * e];
            for ti in 0..t {
                let s = &sig[ti * e..(ti + 1) * e];
                let sel = &idx[ti * k..(ti + 1) * k];
                let dp = &dgate[ti * k..(ti + 1) * k];
                // gate_c = scale·σ_c/Z, Z = Σ_sel σ + 1e-20 (selection is a constant):
                // ∂L/∂σ_j = scale·(dp_j − Σ_c dp_c·σ_c/Z)/Z for selected j.
                let z: f64 = sel.iter().map(|&c| s[c as usize] as f64).sum::<f64>() + 1e-20;
                let mean: f64 = sel.iter().zip(dp).map(|(&c, &g)| g as f64 * s[c as usize] as f64).sum::<f64>() / z;
                let mut ds: Vec<f64> = dscores[ti * e..(ti + 1) * e].iter().map(|&g| g as f64).collect();
                for (&c, &g) in sel.iter().zip(dp) {
                    ds[c as usize] += scale as f64 * (g as f64 - mean) / z;
                }
                for ((o, &d), &sv) in dl[ti * e..(ti + 1) * e].iter_mut().zip(&ds).zip(s) {
                    let sv = sv as f64;
                    *o = (d * sv * (1.0 - sv)) as f32;
                }
            }
            let mut dx = vec![0f32; t * h];
            dx_acc(gemm, &dl, xs[1].f(), t, e, h, &mut dx, false);
            let mut g = vec![like(xs[0], dx), like(xs[1], dweight(gemm, &dl, xs[0].f(), t, e, h))];
            if bias {
                g.push(like(xs[2], colsum(&dl, e)));
            }
            g
        }
        Op::ExpertFfn { hidden, ffn, experts, topk: k, bias } => {
            let (h, f, e, k) = (hidden as usize, ffn as usize, experts as usize, k as usize);
            let (x, src, row, off) = (xs[0].f(), xs[1].i(), xs[2].i(), xs[3].i());
            let (w1, b1) = (xs[4].f(), bias.then(|| xs[5].f()));
            let w2 = xs[5 + bias as usize].f();
            let dy = up(0);
            let mut dxp = vec![0f32; src.len() * h];
            let (mut dw1, mut db1) = (vec![0f32; e * f * h], vec![0f32; e * f]);
            let (mut dw2, mut db2) = (vec![0f32; e * h * f], vec![0f32; e * h]);
            for ex in 0..e {
                let (r0, r1) = (off[ex] as usize, off[ex + 1] as usize);
                if r0 == r1 {
                    continue; // an expert without tokens gets exactly zero gradient
                }
                let p = mlp_bwd(
                    gemm,
                    &gather_rows(x, &src[r0..r1], h),
                    &dy[r0 * h..r1 * h],
                    &w1[ex * f * h..][..f * h],
                    b1.map(|b| &b[ex * f..][..f]),
                    &w2[ex * h * f..][..h * f],
                    r1 - r0,
                    h,
                    f,
                );
                dxp[r0 * h..r1 * h].copy_from_slice(&p.dx);
                dw1[ex * f * h..][..f * h].copy_from_slice(&p.dw1);
                db1[ex * f..][..f].copy_from_slice(&p.db1);
                dw2[ex * h * f..][..h * f].copy_from_slice(&p.dw2);
                db2[ex * h..][..h].copy_from_slice(&p.db2);
            }
            // Each token's gradient sums its K permuted rows (the kernels keep them in bf16).
            kept(gemm, &mut dxp);
            let mut dx = vec![0f32; t * h];
            for ti in 0..t {
                for (c, o) in dx[ti * h..(ti + 1) * h].iter_mut().enumerate() {
                    let s: f64 = (0..k).map(|kk| dxp[row[ti * k + kk] as usize * h + c] as f64).sum();
                    *o = s as f32;
                }
            }
            let mut g = vec![like(xs[0], dx), like(xs[4], dw1)];
            if bias {
                g.push(like(xs[5], db1));
            }
            g.push(like(xs[5 + bias as usize], dw2));
            if bias {
                g.push(like(xs[7], db2));
            }
            g
        }
        Op::Combine { hidden, topk: k, shared } => {
            let (h, k) = (hidden as usize, k as usize);
            let (yp, row, gate) = (xs[0].f(), xs[1].i(), xs[2].f());
            let dh = up(0);
            let mut dyp = vec![0f32; yp.len()];
            let mut dgate = vec![0f32; t * k];
            for ti in 0..t {
                let g = &dh[ti * h..(ti + 1) * h];
                for kk in 0..k {
                    let r = row[ti * k + kk] as usize;
                    let gt = gate[ti * k + kk];
                    for (d, &gg) in dyp[r * h..(r + 1) * h].iter_mut().zip(g) {
                        *d += gt * gg;
                    }
                    dgate[ti * k + kk] = dot(g, &yp[r * h..(r + 1) * h]) as f32;
                }
            }
            let mut out = vec![like(xs[0], dyp), like(xs[2], dgate), like(xs[3], dh.to_vec())];
            if shared {
                out.push(like(xs[4], dh.into_owned()));
            }
            out
        }
        Op::SeqAuxLoss { experts, topk: k } => {
            let (e, k, s) = (experts as usize, k as usize, dims.seq);
            let b = t / s;
            let daux = up(0)[0] as f64;
            let scores = xs[0].f();
            let mut ds = vec![0f32; t * e];
            for bi in 0..b {
                let rows = bi * s..(bi + 1) * s;
                // Counts from the top-k of the normalised scores, exactly as the forward (constants).
                let mut c = vec![0f64; e];
                for row in scores[rows.start * e..rows.end * e].chunks(e) {
                    let u = row.iter().map(|&x| x as f64).sum::<f64>() + 1e-20;
                    let norm: Vec<f32> = row.iter().map(|&x| (x as f64 / u) as f32).collect();
                    for ex in topk(&norm, k) {
                        c[ex] += 1.0;
                    }
                }
                // a_e = ∂aux/∂s̃_{t,e}; s̃ = σ/U ⇒ ∂/∂σ_j = (a_j − Σ_e a_e s̃_e)/U.
                let coef = daux * e as f64 / (k as f64 * (s * s) as f64 * b as f64);
                let a: Vec<f64> = c.iter().map(|&c| coef * c).collect();
                for ti in rows {
                    let row = &scores[ti * e..(ti + 1) * e];
                    let u = row.iter().map(|&x| x as f64).sum::<f64>() + 1e-20;
                    let mean: f64 = a.iter().zip(row).map(|(&a, &x)| a * x as f64 / u).sum();
                    for (o, &aj) in ds[ti * e..(ti + 1) * e].iter_mut().zip(&a) {
                        *o = ((aj - mean) / u) as f32;
                    }
                }
            }
            vec![like(xs[0], ds)]
        }
        Op::HeadCe { hidden, vocab } => {
            // Recomputes each chunk's logits: the forward keeps only their log-sum-exp.
            let (h, v) = (hidden as usize, vocab as usize);
            let (z, head, labels, mask) = (xs[0].f(), xs[1].f(), xs[2].i(), xs[3].i());
            let dtok = up(0);
            let (mut dz, mut dw) = (vec![0f32; t * h], vec![0f32; v * h]);
            for (t0, t1, mut dl) in head_logits(gemm, z, head, (t, h, v)) {
                for (i, row) in dl.chunks_mut(v).enumerate() {
                    let ti = t0 + i;
                    let w = dtok[ti] as f64;
                    if mask[ti] == 0 || w == 0.0 {
                        row.fill(0.0); // masked tokens (and zero-weight ones) get exactly zero gradient
                        continue;
                    }
                    let (lse, label) = (row_lse(row), labels[ti] as usize);
                    for (j, x) in row.iter_mut().enumerate() {
                        *x = (w * ((*x as f64 - lse).exp() - (j == label) as u8 as f64)) as f32;
                    }
                }
                kept(gemm, &mut dl);
                let c = t1 - t0;
                gemm.ab(c, v, h, &dl, head, &mut dz[t0 * h..t1 * h], false);
                gemm.atb(v, c, h, &dl, &z[t0 * h..t1 * h], &mut dw, t0 > 0);
            }
            vec![like(xs[0], dz), like(xs[1], dw)]
        }
        Op::SpanLoss => {
            let (span, scale, w) = (xs[1].i(), xs[2].f(), xs[3].f());
            let g = up(0)[0] as f64;
            let d = (0..t).map(|i| (g * scale[span[i] as usize] as f64 * w[i] as f64) as f32).collect();
            vec![like(xs[0], d)]
        }
        // No differentiable input.
        Op::TokenWeight
        | Op::Dispatch { .. }
        | Op::GrapeMAt { .. }
        | Op::CachedAttention { .. }
        | Op::Logits { .. } => {
            vec![]
        }
        Op::Add { .. } => panic!("backward of add: it is linear and autodiff differentiates it itself"),
        Op::Vjp(_) => panic!("backward of vjp: second-order differentiation is not supported"),
    }
}

/// Upstream gradient of output `i` with `n` elements; zeros when the output is not seeded.
fn upstream<'a>(dys: &[Option<&'a Tensor>], i: usize, n: usize) -> Cow<'a, [f32]> {
    match dys.get(i).copied().flatten() {
        Some(g) => {
            assert_eq!(g.numel(), n, "upstream gradient {i}: {:?} vs {n} elements", g.shape);
            Cow::Borrowed(g.f())
        }
        None => Cow::Owned(vec![0.0; n]),
    }
}

fn to_f32(v: Vec<f64>) -> Vec<f32> {
    v.into_iter().map(|x| x as f32).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// Input gradient of `y = x·Wᵀ`: `dx (+)= dy·W` with `dy` `[m×n]`, `W` `[n×k]`.
#[allow(clippy::too_many_arguments)]
fn dx_acc(g: &dyn Gemm, dy: &[f32], w: &[f32], m: usize, n: usize, k: usize, dx: &mut [f32], acc: bool) {
    if m == 0 {
        return;
    }
    g.ab(m, n, k, dy, w, dx, acc);
}

/// Weight gradient of `y = x·Wᵀ`: `dW = dyᵀ·x` (`[n×k]`, summed over the `m` rows).
fn dweight(g: &dyn Gemm, dy: &[f32], x: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut dw = vec![0f32; n * k];
    if m > 0 {
        g.atb(n, m, k, dy, x, &mut dw, false);
    }
    dw
}

/// Bias gradient: column sums of `dy` (`[·×n]`) in f64.
fn colsum(dy: &[f32], n: usize) -> Vec<f32> {
    let mut s = vec![0f64; n];
    for row in dy.chunks(n) {
        s.iter_mut().zip(row).for_each(|(a, &b)| *a += b as f64);
    }
    to_f32(s)
}

/// RMSNorm backward per row of `d` (MODEL.md §5): with `x̂ = x/r`,
/// `dx = (1/r)·(g⊙w − x̂·mean(g⊙w⊙x̂))`, `dw = Σ_rows g⊙x̂`.
fn rms_bwd(x: &[f32], w: &[f32], g: &[f32], d: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    let mut dx = vec![0f32; x.len()];
    let mut dw = vec![0f64; d];
    for ((xr, gr), dxr) in x.chunks(d).zip(g.chunks(d)).zip(dx.chunks_mut(d)) {
        let ms = xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        let mut m = 0f64;
        for j in 0..d {
            let xh = xr[j] as f64 * inv;
            let gw = gr[j] as f64 * w[j] as f64;
            m += gw * xh;
            dw[j] += gr[j] as f64 * xh;
        }
        m /= d as f64;
        for j in 0..d {
            let xh = xr[j] as f64 * inv;
            dxr[j] = (inv * (gr[j] as f64 * w[j] as f64 - xh * m)) as f32;
        }
    }
    (dx, to_f32(dw))
}

/// Inverse of the forward's `split_qkv`: packs per-head q/k/v gradients into the
/// group-interleaved `[T, (heads+2·groups)·d]` layout.
fn pack_qkv(q: &[f32], k: &[f32], v: &[f32], t: usize, heads: usize, groups: usize, d: usize) -> Vec<f32> {
    let gsz = heads / groups;
    let n = (heads + 2 * groups) * d;
    let mut mixed = vec![0f32; t * n];
    for ti in 0..t {
        let row = &mut mixed[ti * n..(ti + 1) * n];
        for g in 0..groups {
            let base = g * (gsz + 2) * d;
            for j in 0..gsz {
                let h = g * gsz + j;
                row[base + j * d..][..d].copy_from_slice(&q[(ti * heads + h) * d..][..d]);
            }
            row[base + gsz * d..][..d].copy_from_slice(&k[(ti * groups + g) * d..][..d]);
            row[base + (gsz + 1) * d..][..d].copy_from_slice(&v[(ti * groups + g) * d..][..d]);
        }
    }
    mixed
}

/// TPA QKV backward (MODEL.md §5): per token, with `G` the gradient of a head's (or group's)
/// output `(1/R)·Σ_r A[h,r]·B[r,:]`: `∂A[h,r] = (1/R)·G_h·B[r,:]`, `∂B[r,:] = (1/R)·Σ_h A[h,r]·G_h`
/// (B is shared by all heads), then back through the six bias-free linears; the packed bias
/// gets the token sum of the packed gradient.
fn tpa_bwd(gemm: &dyn Gemm, t: usize, xs: &[&Tensor], g: [&[f32]; 3], a: [u64; 6], bias: bool) -> Vec<Tensor> {
    let [h, nh, ng, d, rq, r] = a.map(|v| v as usize);
    let x = xs[0].f();
    let widths = tpa_widths(nh, ng, d, rq, r);
    let [aq, ak, av, bq, bk, bv] = tpa_factors(gemm, x, t, h, xs, widths);
    let mut daq = vec![0f32; aq.len()];
    let (mut dak, mut dav) = (vec![0f32; ak.len()], vec![0f32; av.len()]);
    let mut dbq = vec![0f32; bq.len()];
    let (mut dbk, mut dbv) = (vec![0f32; bk.len()], vec![0f32; bv.len()]);
    // One factor pair of one token: `heads` outputs of `d`, rank `rank`.
    #[allow(clippy::too_many_arguments)]
    fn factor(gr: &[f32], a: &[f32], b: &[f32], da: &mut [f32], db: &mut [f32], heads: usize, rank: usize, d: usize) {
        let inv = 1.0 / rank as f64;
        for hd in 0..heads {
            for ri in 0..rank {
                da[hd * rank + ri] = (inv * dot(&gr[hd * d..][..d], &b[ri * d..][..d])) as f32;
            }
        }
        for ri in 0..rank {
            for c in 0..d {
                let s: f64 = (0..heads).map(|hd| a[hd * rank + ri] as f64 * gr[hd * d + c] as f64).sum();
                db[ri * d + c] = (inv * s) as f32;
            }
        }
    }
    for ti in 0..t {
        let (qa, qb) = (ti * nh * rq..(ti + 1) * nh * rq, ti * rq * d..(ti + 1) * rq * d);
        let (ka, kb) = (ti * ng * r..(ti + 1) * ng * r, ti * r * d..(ti + 1) * r * d);
        let gq = &g[0][ti * nh * d..(ti + 1) * nh * d];
        let gk = &g[1][ti * ng * d..(ti + 1) * ng * d];
        let gv = &g[2][ti * ng * d..(ti + 1) * ng * d];
        factor(gq, &aq[qa.clone()], &bq[qb.clone()], &mut daq[qa], &mut dbq[qb], nh, rq, d);
        factor(gk, &ak[ka.clone()], &bk[kb.clone()], &mut dak[ka.clone()], &mut dbk[kb.clone()], ng, r, d);
        factor(gv, &av[ka.clone()], &bv[kb.clone()], &mut dav[ka], &mut dbv[kb], ng, r, d);
    }
    for df in [&mut daq, &mut dak, &mut dav, &mut dbq, &mut dbk, &mut dbv] {
        kept(gemm, df);
    }
    let mut dx = vec![0f32; t * h];
    let mut out = vec![];
    for (n, (dy, width)) in [daq, dak, dav, dbq, dbk, dbv].iter().zip(widths).enumerate() {
        let w = xs[n + 1];
        dx_acc(gemm, dy, w.f(), t, width, h, &mut dx, n > 0);
        out.push(Tensor::f32(w.shape.clone(), dweight(gemm, dy, x, t, width, h)));
    }
    out.insert(0, Tensor::f32(xs[0].shape.clone(), dx));
    if bias {
        let dm = pack_qkv(g[0], g[1], g[2], t, nh, ng, d);
        out.push(Tensor::f32(xs[7].shape.clone(), colsum(&dm, (nh + 2 * ng) * d)));
    }
    out
}

/// Gradients of one dense ReLU² MLP `ReLU²(x·W₁ᵀ + b₁)·W₂ᵀ + b₂` on `m` rows.
struct MlpGrads {
    dx: Vec<f32>,
    dw1: Vec<f32>,
    db1: Vec<f32>,
    dw2: Vec<f32>,
    db2: Vec<f32>,
}

/// Recomputes the pre-activation, then `da = dy·W₂`, `dz = da·2·max(z,0)`, and the linear
/// gradients of both layers through [`Gemm`].
#[allow(clippy::too_many_arguments)]
fn mlp_bwd(
    gemm: &dyn Gemm,
    x: &[f32],
    dy: &[f32],
    w1: &[f32],
    b1: Option<&[f32]>,
    w2: &[f32],
    m: usize,
    h: usize,
    f: usize,
) -> MlpGrads {
    let mut z = vec![0f32; m * f];
    gemm.xwt(m, h, f, x, w1, &mut z, false);
    if let Some(b1) = b1 {
        for row in z.chunks_mut(f) {
            row.iter_mut().zip(b1).for_each(|(v, b)| *v += b);
        }
    }
    kept(gemm, &mut z);
    let mut act: Vec<f32> = z.iter().map(|&v| v.max(0.0) * v.max(0.0)).collect();
    kept(gemm, &mut act);
    let mut dz = vec![0f32; m * f];
    dx_acc(gemm, dy, w2, m, h, f, &mut dz, false);
    for (d, &zv) in dz.iter_mut().zip(&z) {
        *d *= 2.0 * zv.max(0.0);
    }
    kept(gemm, &mut dz);
    let mut dx = vec![0f32; m * h];
    dx_acc(gemm, &dz, w1, m, f, h, &mut dx, false);
    MlpGrads {
        dx,
        dw1: dweight(gemm, &dz, x, m, f, h),
        db1: colsum(&dz, f),
        dw2: dweight(gemm, dy, &act, m, h, f),
        db2: colsum(dy, h),
    }
}

/// Attention backward (MODEL.md §5). Per query row: `dP_j = g·v_j`, `ρ = Σ_j P_j dP_j`,
/// `ds_j = P_j(dP_j − ρ)`, `dq = (1/√d)Σ_j ds_j k_j`, `dk_j += (1/√d) ds_j q`, `dv_j += P_j g`,
/// `∂sink = −P_sink·ρ`. Masked keys have `P = 0` and so no gradient; a row whose keys are all
/// masked has `P ≡ 0`, `ρ = 0` and contributes exactly zero (no NaN). With `kernel_out` (the
/// [`crate::reference::TensorCore`] model) ρ is the equal `g·O` of the stored output, and P and
/// `P(dP − ρ)` are rounded to bf16, as the kernels do.
fn attention_bwd(a: &Attn, dims: &Dims, xs: &[&Tensor], g: &[f32], kernel_out: Option<&[f32]>) -> Vec<Tensor> {
    let bf16 = kernel_out.is_some();
    let (nh, ng, d) = (a.heads as usize, a.groups as usize, a.head_dim as usize);
    let gsz = nh / ng;
    let (q, k, v, doc) = (xs[0].f(), xs[1].f(), xs[2].f(), xs[3].i());
    let sinks = a.sinks.then(|| xs[4].f());
    let scale = 1.0 / (d as f32).sqrt();
    let slopes = match a.kind {
        AttnKind::Global { alibi: true } => Some(alibi_slopes(nh)),
        _ => None,
    };
    let mut dq = vec![0f64; q.len()];
    let (mut dk, mut dv) = (vec![0f64; k.len()], vec![0f64; v.len()]);
    let mut dsink = vec![0f64; nh];
    for t in 0..dims.tokens {
        let i = t % dims.seq;
        let row0 = t - i;
        // Only keys inside the window can be attended; the rest are masked anyway.
        let lo = match a.kind {
            AttnKind::Window(w) => (i + 1).saturating_sub(w as usize),
            AttnKind::Global { .. } => 0,
        };
        let keys: Vec<usize> = (lo..=i).filter(|&j| attends(a.kind, i, j, doc[t], doc[row0 + j])).collect();
        for h in 0..nh {
            let gr = h / gsz;
            let qv = &q[(t * nh + h) * d..][..d];
            let gv = &g[(t * nh + h) * d..][..d];
            // Scores exactly as the forward (f32), softmax in f64.
            let s: Vec<f64> = keys
                .iter()
                .map(|&j| {
                    let kv = &k[((row0 + j) * ng + gr) * d..][..d];
                    let bias = slopes.as_ref().map(|sl| -sl[h] * (i - j) as f32).unwrap_or(0.0);
                    (dot(qv, kv) as f32 * scale + bias) as f64
                })
                .collect();
            let sink = sinks.map(|sk| sk[h] as f64);
            let m = s.iter().copied().chain(sink).fold(f64::NEG_INFINITY, f64::max);
            if m == f64::NEG_INFINITY {
                continue; // no keys and no sink: the output is constant zero
            }
            let e: Vec<f64> = s.iter().map(|&x| (x - m).exp()).collect();
            let es = sink.map(|o| (o - m).exp()).unwrap_or(0.0);
            let denom = e.iter().sum::<f64>() + es;
            let p: Vec<f64> = e.iter().map(|&x| x / denom).collect();
            let dp: Vec<f64> = keys.iter().map(|&j| dot(gv, &v[((row0 + j) * ng + gr) * d..][..d])).collect();
            let rho: f64 = match kernel_out {
                Some(o) => dot(gv, &o[(t * nh + h) * d..][..d]),
                None => p.iter().zip(&dp).map(|(a, b)| a * b).sum(),
            };
            if sink.is_some() {
                dsink[h] -= es / denom * rho;
            }
            let dqr = &mut dq[(t * nh + h) * d..][..d];
            // The kernels keep P and P·(dP − ρ) in bf16 (tensor-core operands), before the scale.
            for (n, &j) in keys.iter().enumerate() {
                let ds = kept_f64(bf16, p[n] * (dp[n] - rho)) * scale as f64;
                let pn = kept_f64(bf16, p[n]);
                let o = ((row0 + j) * ng + gr) * d;
                for c in 0..d {
                    dqr[c] += ds * k[o + c] as f64;
                    dk[o + c] += ds * qv[c] as f64;
                    dv[o + c] += pn * gv[c] as f64;
                }
            }
        }
    }
    let mut out = vec![
        Tensor::f32(xs[0].shape.clone(), to_f32(dq)),
        Tensor::f32(xs[1].shape.clone(), to_f32(dk)),
        Tensor::f32(xs[2].shape.clone(), to_f32(dv)),
    ];
    if a.sinks {
        out.push(Tensor::f32(xs[4].shape.clone(), to_f32(dsink)));
    }
    out
}
