//! Reference semantics of every op: plain loops written from MODEL.md §4, the living definition
//! that every backend and kernel is tested against. Floating-point tensors are f32 (bf16 values
//! are represented exactly); reductions accumulate in f64. Matrix products go through [`Gemm`] so
//! a backend can swap in a fast implementation without restating the semantics.

use crate::op::{Attn, AttnKind, GroupLimit, Op};

#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    /// Integer tensors (`i32` and `u8` in the IR).
    I32(Vec<i32>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Data,
}

impl Tensor {
    pub fn f32(shape: Vec<usize>, v: Vec<f32>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), v.len(), "shape {shape:?} vs {} elements", v.len());
        Tensor { shape, data: Data::F32(v) }
    }
    pub fn i32(shape: Vec<usize>, v: Vec<i32>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), v.len(), "shape {shape:?} vs {} elements", v.len());
        Tensor { shape, data: Data::I32(v) }
    }
    pub fn scalar(x: f32) -> Self {
        Tensor { shape: vec![], data: Data::F32(vec![x]) }
    }
    pub fn f(&self) -> &[f32] {
        match &self.data {
            Data::F32(v) => v,
            Data::I32(_) => panic!("expected an f32 tensor, got i32 {:?}", self.shape),
        }
    }
    pub fn i(&self) -> &[i32] {
        match &self.data {
            Data::I32(v) => v,
            Data::F32(_) => panic!("expected an i32 tensor, got f32 {:?}", self.shape),
        }
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Run-time dimensions: `tokens = B·S` rows of `seq` tokens each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub tokens: usize,
    pub seq: usize,
}

/// `c[m×n] = a[m×k] · b[n×k]ᵀ` (+ `c` when `acc`), row-major: the `x·Wᵀ` of a linear layer.
/// The backward's two other products have defaults through transposed copies; a strided GEMM
/// overrides them to skip the copies.
pub trait Gemm: Sync {
    #[allow(clippy::too_many_arguments)]
    fn xwt(&self, m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32], acc: bool);

    /// `c[m×n] (+)= a[m×k] · b[k×n]`: an input gradient `dy·W`.
    #[allow(clippy::too_many_arguments)]
    fn ab(&self, m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32], acc: bool) {
        self.xwt(m, k, n, a, &transpose(b, k, n), c, acc);
    }

    /// `c[m×n] (+)= a[k×m]ᵀ · b[k×n]`: a weight gradient `dyᵀ·x`.
    #[allow(clippy::too_many_arguments)]
    fn atb(&self, m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32], acc: bool) {
        self.xwt(m, k, n, &transpose(a, k, m), &transpose(b, k, n), c, acc);
    }

    /// Whether the intermediates that the kernels keep in bf16 as tensor-core operands (marked
    /// with [`kept`]) are rounded here too. False: the exact semantics; [`TensorCore`]: the
    /// kernels' rounding, which the parity tests compare against.
    fn bf16_intermediates(&self) -> bool {
        false
    }
}

/// A [`Gemm`] plus the kernels' rounding: every intermediate marked with [`kept`] is rounded to
/// bf16 where a kernel stores or packs it for a tensor-core product (an MLP's hidden activation
/// and recomputed pre-activation, TPA factors, attention P and dS, logit gradients). Holding a
/// kernel to this model rather than to the exact semantics lets parity use the strict
/// per-dtype tolerances: otherwise one product's 2⁻⁹ relative rounding, summed over many
/// tokens, is indistinguishable from a small bug.
pub struct TensorCore<'a>(pub &'a dyn Gemm);

impl Gemm for TensorCore<'_> {
    fn xwt(&self, m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32], acc: bool) {
        self.0.xwt(m, k, n, a, b, c, acc)
    }
    fn ab(&self, m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32], acc: bool) {
        self.0.ab(m, k, n, a, b, c, acc)
    }
    fn atb(&self, m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32], acc: bool) {
        self.0.atb(m, k, n, a, b, c, acc)
    }
    fn bf16_intermediates(&self) -> bool {
        true
    }
}

/// Marks an intermediate that kernels keep in bf16: rounded under [`TensorCore`], untouched
/// otherwise.
pub fn kept(g: &dyn Gemm, x: &mut [f32]) {
    if g.bf16_intermediates() {
        x.iter_mut().for_each(|v| *v = round_bf16(*v));
    }
}

/// One value of a [`kept`] intermediate computed in f64: rounded to bf16 when `bf16` (the
/// [`TensorCore`] model).
pub(crate) fn kept_f64(bf16: bool, x: f64) -> f64 {
    if bf16 {
        round_bf16(x as f32) as f64
    } else {
        x
    }
}

/// Round to nearest bf16, ties to even (the kernels' `f2bf`); non-finite values pass through.
pub fn round_bf16(x: f32) -> f32 {
    if !x.is_finite() {
        return x;
    }
    let b = x.to_bits();
    f32::from_bits((b + 0x7fff + ((b >> 16) & 1)) & 0xffff_0000)
}

/// Row-major `[rows×cols]` → `[cols×rows]`, in 32×32 tiles so large operands transpose at
/// memory speed.
fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; a.len()];
    transpose_into(a, rows, cols, &mut out);
    out
}

/// [`transpose`] into `out` (`rows·cols` elements).
pub(crate) fn transpose_into(a: &[f32], rows: usize, cols: usize, out: &mut [f32]) {
    const B: usize = 32;
    for r0 in (0..rows).step_by(B) {
        for c0 in (0..cols).step_by(B) {
            for r in r0..(r0 + B).min(rows) {
                for c in c0..(c0 + B).min(cols) {
                    out[c * rows + r] = a[r * cols + c];
                }
            }
        }
    }
}

/// The trivially correct GEMM: f64 accumulation, no blocking.
pub struct NaiveGemm;

impl Gemm for NaiveGemm {
    fn xwt(&self, m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32], acc: bool) {
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    s += a[i * k + p] as f64 * b[j * k + p] as f64;
                }
                let base = if acc { c[i * n + j] as f64 } else { 0.0 };
                c[i * n + j] = (base + s) as f32;
            }
        }
    }
}

pub fn sigmoid(x: f32) -> f32 {
    (1.0 / (1.0 + (-(x as f64)).exp())) as f32
}

/// ALiBi slopes for `n` heads (the standard construction; `2^-(h+1)` for 8 heads).
/// DISTILL.md 2B: `clip(exp((teacher_logp − m)/T), w_min, w_max)` with `kd = [m, T, w_min,
/// w_max]`, in f64; a teacher log-probability of −inf gives `w_min`.
/// `TokenWeight` of one token (its doc gives the three modes).
pub fn token_weight(mode: i32, token_loss: f32, teacher_logp: f32, sampler_logp: f32, kd: &[f32]) -> f32 {
    let kd: Vec<f64> = kd.iter().map(|&x| x as f64).collect();
    match mode {
        0 => 1.0,
        1 => ((teacher_logp as f64 - kd[0]) / kd[1]).exp().max(kd[2]).min(kd[3]) as f32,
        _ => {
            let lp = -(token_loss as f64);
            let ratio = (lp - sampler_logp as f64).exp().min(kd[4]);
            (ratio * (teacher_logp as f64 - lp)) as f32
        }
    }
}

pub fn alibi_slopes(n: usize) -> Vec<f32> {
    fn pow2(n: usize) -> Vec<f64> {
        let start = 2f64.powf(-(2f64.powf(-((n as f64).log2() - 3.0))));
        (0..n).map(|i| start * start.powi(i as i32)).collect()
    }
    if n.is_power_of_two() {
        return pow2(n).into_iter().map(|x| x as f32).collect();
    }
    let c = 1usize << (usize::BITS - 1 - n.leading_zeros());
    let mut s = pow2(c);
    s.extend(pow2(2 * c).into_iter().step_by(2).take(n - c));
    s.into_iter().map(|x| x as f32).collect()
}

/// Whether query `i` may attend key `j` (`j ≤ i`, same document, inside the window).
pub fn attends(kind: AttnKind, i: usize, j: usize, doc_i: i32, doc_j: i32) -> bool {
    j <= i
        && doc_i == doc_j
        && match kind {
            AttnKind::Window(w) => ((i - j) as u64) < w,
            AttnKind::Global { .. } => true,
        }
}

/// Softmax over `scores` plus an optional sink logit in the denominator. Masked entries are
/// `−∞` and get probability 0; with a sink a row whose keys are all masked gives all zeros
/// (never NaN). Without a sink such a row also gives zeros.
pub fn softmax_with_sink(scores: &[f32], sink: Option<f32>) -> Vec<f32> {
    softmax_kept(scores, sink, None)
}

/// [`softmax_with_sink`] as the attention kernel computes it when `tiles` is given: keys are
/// visited in key tiles (`tiles[j]` is key `j`'s, non-decreasing), each numerator is rounded to
/// bf16 relative to the running max after its tile (`P̃` packed for the P·V product) and later
/// rescaled exactly by `exp(m_run − m)`; the denominator is not rounded.
fn softmax_kept(scores: &[f32], sink: Option<f32>, tiles: Option<&[usize]>) -> Vec<f32> {
    let sink = sink.map(|s| s as f64);
    let m = scores.iter().fold(sink.unwrap_or(f64::NEG_INFINITY), |m, &s| m.max(s as f64));
    if m == f64::NEG_INFINITY {
        return vec![0.0; scores.len()];
    }
    let denom: f64 =
        scores.iter().map(|&s| (s as f64 - m).exp()).sum::<f64>() + sink.map(|s| (s - m).exp()).unwrap_or(0.0);
    let Some(tiles) = tiles else {
        return scores.iter().map(|&s| ((s as f64 - m).exp() / denom) as f32).collect();
    };
    let mut p = vec![0f32; scores.len()];
    let mut run = sink.unwrap_or(f64::NEG_INFINITY);
    let mut j0 = 0;
    while j0 < scores.len() {
        let j1 = j0 + tiles[j0..].iter().take_while(|&&t| t == tiles[j0]).count();
        run = scores[j0..j1].iter().fold(run, |r, &s| r.max(s as f64));
        if run > f64::NEG_INFINITY {
            let rescale = (run - m).exp() / denom;
            for j in j0..j1 {
                p[j] = (kept_f64(true, (scores[j] as f64 - run).exp()) * rescale) as f32;
            }
        }
        j0 = j1;
    }
    p
}

/// Indices of the `k` largest values, largest first; ties go to the lower index.
pub fn topk(vals: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..vals.len()).collect();
    idx.sort_by(|&a, &b| vals[b].total_cmp(&vals[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Expert selection of one token (MODEL.md §4.9c): top-k of `sel` restricted to the best groups.
pub fn select_experts(sel: &[f32], k: usize, limit: Option<GroupLimit>) -> Vec<usize> {
    let Some(gl) = limit else { return topk(sel, k) };
    let (ng, gk) = (gl.groups as usize, gl.group_topk as usize);
    let per = sel.len() / ng;
    let take = k / gk;
    let group_scores: Vec<f32> = (0..ng)
        .map(|g| {
            let grp = &sel[g * per..(g + 1) * per];
            topk(grp, take).iter().map(|&i| grp[i] as f64).sum::<f64>() as f32
        })
        .collect();
    let keep = topk(&group_scores, gk);
    let masked: Vec<f32> =
        (0..sel.len()).map(|e| if keep.contains(&(e / per)) { sel[e] } else { f32::NEG_INFINITY }).collect();
    topk(&masked, k)
}

fn rms_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (ms + eps as f64).sqrt();
    for ((o, &v), &wt) in out.iter_mut().zip(x).zip(w) {
        *o = (v as f64 * inv) as f32 * wt;
    }
}

/// The LM head's logits `z·headᵀ` (`z` `[t, h]`, `head` `[v, h]`) in chunks of tokens of about
/// 16M f32 values (never `[t, v]` at once): `(t0, t1, logits[t0..t1])`.
pub(crate) fn head_logits<'a>(
    g: &'a dyn Gemm,
    z: &'a [f32],
    head: &'a [f32],
    (t, h, v): (usize, usize, usize),
) -> impl Iterator<Item = (usize, usize, Vec<f32>)> + 'a {
    let rows = (1usize << 24).div_ceil(v).clamp(1, 1024);
    (0..t).step_by(rows).map(move |t0| {
        let t1 = t.min(t0 + rows);
        (t0, t1, linear(g, &z[t0 * h..t1 * h], t1 - t0, h, head, v, None))
    })
}

/// `log Σ exp(row)` in f64: the CE's normaliser, and the sampler's.
pub fn row_lse(row: &[f32]) -> f64 {
    let m = row.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x as f64));
    m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
}

/// `y[m×n] = x·Wᵀ (+ b)`.
fn linear(g: &dyn Gemm, x: &[f32], m: usize, k: usize, w: &[f32], n: usize, b: Option<&[f32]>) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    g.xwt(m, k, n, x, w, &mut y, false);
    if let Some(b) = b {
        for row in y.chunks_mut(n) {
            for (v, bb) in row.iter_mut().zip(b) {
                *v += bb;
            }
        }
    }
    y
}

/// Widths of the six TPA factors A_q, A_k, A_v, B_q, B_k, B_v (per token).
pub(crate) fn tpa_widths(nh: usize, ng: usize, d: usize, rq: usize, r: usize) -> [usize; 6] {
    [nh * rq, ng * r, ng * r, rq * d, r * d, r * d]
}

/// The six bias-free TPA factors `x·Wᵢᵀ` (weights `ins[1..=6]`), kept in bf16 as the kernels
/// keep them ([`kept`]).
pub(crate) fn tpa_factors(
    gemm: &dyn Gemm,
    x: &[f32],
    t: usize,
    h: usize,
    ins: &[&Tensor],
    widths: [usize; 6],
) -> [Vec<f32>; 6] {
    std::array::from_fn(|k| {
        let mut y = linear(gemm, x, t, h, ins[k + 1].f(), widths[k], None);
        kept(gemm, &mut y);
        y
    })
}

fn relu2(v: &mut [f32]) {
    for x in v {
        let r = x.max(0.0);
        *x = r * r;
    }
}

/// Splits the group-interleaved packed QKV `[T, (heads+2·groups)·d]` into q, k, v.
fn split_qkv(mixed: &[f32], t: usize, heads: usize, groups: usize, d: usize) -> Vec<Tensor> {
    let gsz = heads / groups;
    let n = (heads + 2 * groups) * d;
    let (mut q, mut k, mut v) = (vec![0f32; t * heads * d], vec![0f32; t * groups * d], vec![0f32; t * groups * d]);
    for ti in 0..t {
        let row = &mixed[ti * n..(ti + 1) * n];
        for g in 0..groups {
            let base = g * (gsz + 2) * d;
            for j in 0..gsz {
                let h = g * gsz + j;
                q[(ti * heads + h) * d..][..d].copy_from_slice(&row[base + j * d..][..d]);
            }
            k[(ti * groups + g) * d..][..d].copy_from_slice(&row[base + gsz * d..][..d]);
            v[(ti * groups + g) * d..][..d].copy_from_slice(&row[base + (gsz + 1) * d..][..d]);
        }
    }
    vec![Tensor::f32(vec![t, heads, d], q), Tensor::f32(vec![t, groups, d], k), Tensor::f32(vec![t, groups, d], v)]
}

/// Rotation angles' frequencies `f_i = exp(l_i/scale)`.
pub fn grape_freqs(log_freq: &[f32], scale: f32) -> Vec<f32> {
    log_freq.iter().map(|&l| (l / scale).exp()).collect()
}

/// Rotate-half rotation of one head vector at position `pos` (angles in f32 as the reference).
/// GRAPE-M on a tensor of `tokens` rows of `head_dim`-wide vectors: token `ti`'s vectors rotated by
/// position `pos(ti)` (its place in the row in training, in its sequence when decoding).
pub fn grape_tokens(x: &Tensor, tokens: usize, freqs: &[f32], head_dim: usize, pos: impl Fn(usize) -> usize) -> Tensor {
    let mut y = x.f().to_vec();
    let per_tok = y.len() / tokens;
    for (ti, row) in y.chunks_mut(per_tok).enumerate() {
        for u in row.chunks_mut(head_dim) {
            grape_rotate(u, freqs, pos(ti));
        }
    }
    Tensor::f32(x.shape.clone(), y)
}

pub fn grape_rotate(u: &mut [f32], freqs: &[f32], pos: usize) {
    let h = u.len() / 2;
    for i in 0..h {
        let th = pos as f32 * freqs[i];
        let (s, c) = th.sin_cos();
        let (a, b) = (u[i], u[i + h]);
        u[i] = a * c - b * s;
        u[i + h] = b * c + a * s;
    }
}

/// Rows `src[i]` of the row-major `[·, h]` matrix `x`, in order (an expert's tokens).
pub fn gather_rows(x: &[f32], src: &[i32], h: usize) -> Vec<f32> {
    src.iter().flat_map(|&t| &x[t as usize * h..][..h]).copied().collect()
}

/// One query's attention logits: for each key, `None` where it is masked (−∞), else its
/// distance `i − j` and its vector; the dot product in f64 rounded to f32, times `scale`, plus
/// the ALiBi bias `−slope·(i − j)`. Training attention and the decode caches both score here.
pub fn attention_scores<'a>(
    q: &[f32],
    keys: impl Iterator<Item = Option<(usize, &'a [f32])>>,
    scale: f32,
    slope: Option<f32>,
) -> Vec<f32> {
    keys.map(|key| match key {
        None => f32::NEG_INFINITY,
        Some((dist, kv)) => {
            let dot = q.iter().zip(kv).map(|(&x, &y)| x as f64 * y as f64).sum::<f64>() as f32;
            dot * scale + slope.map(|s| -s * dist as f32).unwrap_or(0.0)
        }
    })
    .collect()
}

/// `out += Σ_j p[j]·value(j)` in f32, in key order, skipping zero weights.
pub fn attention_mix<'a>(p: &[f32], value: impl Fn(usize) -> &'a [f32], out: &mut [f32]) {
    for (j, &pj) in p.iter().enumerate() {
        if pj != 0.0 {
            for (o, &x) in out.iter_mut().zip(value(j)) {
                *o += pj * x;
            }
        }
    }
}

/// The key/value caches of a decode program's attention layers ([`Op::CachedAttention`]),
/// addressed by (layer, slot, position): K after QK-norm and GRAPE, V after the value residual,
/// `groups·head_dim` values each.
pub trait KvStore: Sync {
    fn write(&mut self, layer: usize, slot: usize, pos: usize, k: &[f32], v: &[f32]);
    /// K and V of a position the slot holds (for a window layer, one of its last `W`).
    fn read(&self, layer: usize, slot: usize, pos: usize) -> (&[f32], &[f32]);
}

/// [`Op::CachedAttention`] (inputs `q, k, v, pos, slot[, sinks]`): every token attends, then
/// the call's K/V are written to the cache in token order.
pub fn cached_attention<S: KvStore + ?Sized>(a: &Attn, layer: usize, ins: &[&Tensor], cache: &mut S) -> Tensor {
    let t = ins[3].i().len();
    let mut out = vec![0f32; t * (a.heads * a.head_dim) as usize];
    cached_attention_part(a, layer, ins, &*cache, 0, &mut out);
    cache_write(a, layer, ins, cache);
    Tensor::f32(vec![t, (a.heads * a.head_dim) as usize], out)
}

/// Cached attention's context vectors of the (token, head) pairs `first..` that `out` holds
/// (`head_dim` values each, pair `t·heads + h`), read-only, so a call can be split across
/// threads. Token t attends over its slot's keys `lo..=pos_t` in ascending position with
/// training's arithmetic ([`attention_scores`], [`softmax_with_sink`], [`attention_mix`]): those
/// before the slot's first position in this call from the cache, the rest from the call's own k
/// and v (a slot's tokens in a call are contiguous and ascending). So a window layer's ring of
/// `W` positions serves a call of any length, and a token's context is bitwise training's.
pub fn cached_attention_part<S: KvStore + ?Sized>(
    a: &Attn,
    layer: usize,
    ins: &[&Tensor],
    cache: &S,
    first: usize,
    out: &mut [f32],
) {
    let (nh, ng, d) = (a.heads as usize, a.groups as usize, a.head_dim as usize);
    let (q, k, v, pos, slot) = (ins[0].f(), ins[1].f(), ins[2].f(), ins[3].i(), ins[4].i());
    let sinks = a.sinks.then(|| ins[5].f());
    let (gsz, w) = (nh / ng, ng * d);
    let scale = 1.0 / (d as f32).sqrt();
    let slopes = matches!(a.kind, AttnKind::Global { alibi: true }).then(|| alibi_slopes(nh));
    // Each token's slot's first token in this call.
    let mut start = vec![0usize; pos.len()];
    for ti in 1..pos.len() {
        start[ti] = if slot[ti] == slot[ti - 1] { start[ti - 1] } else { ti };
    }
    for (u, o) in (first..).zip(out.chunks_mut(d)) {
        let (ti, h) = (u / nh, u % nh);
        let (p, s, g) = (pos[ti] as usize, slot[ti] as usize, h / gsz);
        let (t0, p0) = (start[ti], pos[start[ti]] as usize);
        let lo = match a.kind {
            AttnKind::Window(win) => (p + 1).saturating_sub(win as usize),
            AttnKind::Global { .. } => 0,
        };
        let key = |j: usize| {
            if j < p0 {
                let (kc, vc) = cache.read(layer, s, j);
                (&kc[g * d..][..d], &vc[g * d..][..d])
            } else {
                let r = (t0 + j - p0) * w + g * d;
                (&k[r..][..d], &v[r..][..d])
            }
        };
        let keys = (lo..=p).map(|j| Some((p - j, key(j).0)));
        let scores = attention_scores(&q[(ti * nh + h) * d..][..d], keys, scale, slopes.as_ref().map(|x| x[h]));
        let pr = softmax_with_sink(&scores, sinks.map(|x| x[h]));
        attention_mix(&pr, |j| key(lo + j).1, o);
    }
}

/// Writes a cached-attention call's K/V at each token's (slot, position), in token order.
pub fn cache_write<S: KvStore + ?Sized>(a: &Attn, layer: usize, ins: &[&Tensor], cache: &mut S) {
    let w = (a.groups * a.head_dim) as usize;
    let (k, v, pos, slot) = (ins[1].f(), ins[2].f(), ins[3].i(), ins[4].i());
    for ti in 0..pos.len() {
        cache.write(layer, slot[ti] as usize, pos[ti] as usize, &k[ti * w..][..w], &v[ti * w..][..w]);
    }
}

/// Query and key tile of the attention kernel (`BQ`, `BKV` in attention.cuh).
const ATTN_TILE: usize = 64;

#[allow(clippy::too_many_arguments)]
fn attention(
    a: &Attn,
    dims: &Dims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    doc: &[i32],
    sinks: Option<&[f32]>,
    bf16: bool,
) -> Vec<f32> {
    let (nh, ng, d) = (a.heads as usize, a.groups as usize, a.head_dim as usize);
    let gsz = nh / ng;
    let scale = 1.0 / (d as f32).sqrt();
    let slopes = match a.kind {
        AttnKind::Global { alibi: true } => Some(alibi_slopes(nh)),
        _ => None,
    };
    let mut out = vec![0f32; dims.tokens * nh * d];
    for t in 0..dims.tokens {
        let i = t % dims.seq;
        let row0 = t - i;
        // Under the kernel model, the kernel's key tiles: 64 keys from the first key its
        // 64-query block may see.
        let tiles: Option<Vec<usize>> = bf16.then(|| {
            let t0 = t / ATTN_TILE * ATTN_TILE;
            let mut kv_lo = t0 / dims.seq * dims.seq;
            if let AttnKind::Window(w) = a.kind {
                kv_lo = kv_lo.max((t0 + 1).saturating_sub(w as usize));
            }
            (row0..=t).map(|u| u.saturating_sub(kv_lo) / ATTN_TILE).collect()
        });
        for h in 0..nh {
            let g = h / gsz;
            let qv = &q[(t * nh + h) * d..][..d];
            let keys = (0..=i).map(|j| {
                attends(a.kind, i, j, doc[t], doc[row0 + j]).then(|| (i - j, &k[((row0 + j) * ng + g) * d..][..d]))
            });
            let scores = attention_scores(qv, keys, scale, slopes.as_ref().map(|s| s[h]));
            let p = softmax_kept(&scores, sinks.map(|s| s[h]), tiles.as_deref());
            attention_mix(&p, |j| &v[((row0 + j) * ng + g) * d..][..d], &mut out[(t * nh + h) * d..][..d]);
        }
    }
    out
}

/// Executes one op. Inputs are in signature order; integer inputs (`i32`, `u8`) are [`Data::I32`].
/// Token ids and labels must already be validated against the vocabulary.
pub fn forward(op: &Op, dims: &Dims, ins: &[&Tensor], gemm: &dyn Gemm) -> Vec<Tensor> {
    let t = dims.tokens;
    match *op {
        Op::Embedding { hidden, .. } => {
            let h = hidden as usize;
            let table = ins[1].f();
            let mut out = Vec::with_capacity(t * h);
            for &tok in ins[0].i() {
                out.extend_from_slice(&table[tok as usize * h..][..h]);
            }
            vec![Tensor::f32(vec![t, h], out)]
        }
        Op::RmsNorm { dim, eps } => {
            let d = dim as usize;
            let mut y = vec![0f32; t * d];
            for (xr, yr) in ins[0].f().chunks(d).zip(y.chunks_mut(d)) {
                rms_row(xr, ins[1].f(), eps, yr);
            }
            vec![Tensor::f32(vec![t, d], y)]
        }
        Op::QkvProj { hidden, heads, groups, head_dim, bias } => {
            let n = ((heads + 2 * groups) * head_dim) as usize;
            let mixed = linear(gemm, ins[0].f(), t, hidden as usize, ins[1].f(), n, bias.then(|| ins[2].f()));
            split_qkv(&mixed, t, heads as usize, groups as usize, head_dim as usize)
        }
        Op::TpaQkv { hidden, heads, groups, head_dim, q_rank, kv_rank, bias } => {
            let (h, nh, ng, d, rq, r) = (
                hidden as usize,
                heads as usize,
                groups as usize,
                head_dim as usize,
                q_rank as usize,
                kv_rank as usize,
            );
            let x = ins[0].f();
            let [aq, ak, av, bq, bk, bv] = tpa_factors(gemm, x, t, h, ins, tpa_widths(nh, ng, d, rq, r));
            let gsz = nh / ng;
            let n = (nh + 2 * ng) * d;
            let mut mixed = vec![0f32; t * n];
            // q_h = (1/R_q) Σ_r A_q[h,r]·B_q[r,:], packed group-interleaved.
            let product = |a: &[f32], b: &[f32], rank: usize, head: usize, out: &mut [f32]| {
                for (c, o) in out.iter_mut().enumerate() {
                    let s: f64 = (0..rank).map(|ri| a[head * rank + ri] as f64 * b[ri * d + c] as f64).sum();
                    *o = (s / rank as f64) as f32;
                }
            };
            for ti in 0..t {
                let row = &mut mixed[ti * n..(ti + 1) * n];
                let (aqt, akt, avt) = (&aq[ti * nh * rq..], &ak[ti * ng * r..], &av[ti * ng * r..]);
                let (bqt, bkt, bvt) = (&bq[ti * rq * d..], &bk[ti * r * d..], &bv[ti * r * d..]);
                for g in 0..ng {
                    let base = g * (gsz + 2) * d;
                    for j in 0..gsz {
                        product(aqt, bqt, rq, g * gsz + j, &mut row[base + j * d..][..d]);
                    }
                    product(akt, bkt, r, g, &mut row[base + gsz * d..][..d]);
                    product(avt, bvt, r, g, &mut row[base + (gsz + 1) * d..][..d]);
                }
                if bias {
                    for (m, b) in row.iter_mut().zip(ins[7].f()) {
                        *m += b;
                    }
                }
            }
            split_qkv(&mixed, t, nh, ng, d)
        }
        Op::QkNorm { head_dim, eps, .. } => {
            let d = head_dim as usize;
            [(ins[0], ins[2]), (ins[1], ins[3])]
                .iter()
                .map(|(x, w)| {
                    let mut y = vec![0f32; x.numel()];
                    for (xr, yr) in x.f().chunks(d).zip(y.chunks_mut(d)) {
                        rms_row(xr, w.f(), eps, yr);
                    }
                    Tensor::f32(x.shape.clone(), y)
                })
                .collect()
        }
        Op::GrapeM { head_dim, log_freq_scale, .. } => {
            let freqs = grape_freqs(ins[2].f(), log_freq_scale);
            let pos = |ti: usize| ti % dims.seq;
            let d = head_dim as usize;
            vec![grape_tokens(ins[0], t, &freqs, d, pos), grape_tokens(ins[1], t, &freqs, d, pos)]
        }
        Op::GrapeMAt { head_dim, log_freq_scale, .. } => {
            let freqs = grape_freqs(ins[2].f(), log_freq_scale);
            let at = ins[3].i();
            let pos = |ti: usize| at[ti] as usize;
            let d = head_dim as usize;
            vec![grape_tokens(ins[0], t, &freqs, d, pos), grape_tokens(ins[1], t, &freqs, d, pos)]
        }
        Op::CachedAttention { .. } => {
            panic!("cached attention reads and writes its cache: reference::cached_attention")
        }
        Op::Logits { hidden, vocab } => {
            let (h, v) = (hidden as usize, vocab as usize);
            vec![Tensor::f32(vec![t, v], linear(gemm, ins[0].f(), t, h, ins[1].f(), v, None))]
        }
        Op::ValueResidual { .. } => {
            let lam = sigmoid(ins[2].f()[0]);
            let v: Vec<f32> = ins[0].f().iter().zip(ins[1].f()).map(|(&a, &b)| lam * a + (1.0 - lam) * b).collect();
            vec![Tensor::f32(ins[0].shape.clone(), v)]
        }
        Op::Attention(ref a) => {
            let sinks = a.sinks.then(|| ins[4].f());
            let out =
                attention(a, dims, ins[0].f(), ins[1].f(), ins[2].f(), ins[3].i(), sinks, gemm.bf16_intermediates());
            vec![Tensor::f32(vec![t, (a.heads * a.head_dim) as usize], out)]
        }
        Op::OutProj { in_dim, hidden, bias } => {
            let n = hidden as usize;
            let mut y = linear(gemm, ins[0].f(), t, in_dim as usize, ins[1].f(), n, bias.then(|| ins[2].f()));
            for (o, r) in y.iter_mut().zip(ins[ins.len() - 1].f()) {
                *o += r;
            }
            vec![Tensor::f32(vec![t, n], y)]
        }
        Op::Mlp { hidden, ffn, bias, residual } => {
            let (h, f) = (hidden as usize, ffn as usize);
            let mut it = ins[1..].iter();
            let w1 = it.next().unwrap().f();
            let b1 = if bias { Some(it.next().unwrap().f()) } else { None };
            let w2 = it.next().unwrap().f();
            let b2 = if bias { Some(it.next().unwrap().f()) } else { None };
            let mut z = linear(gemm, ins[0].f(), t, h, w1, f, b1);
            relu2(&mut z);
            kept(gemm, &mut z);
            let mut y = linear(gemm, &z, t, f, w2, h, b2);
            if residual {
                for (o, r) in y.iter_mut().zip(it.next().unwrap().f()) {
                    *o += r;
                }
            }
            vec![Tensor::f32(vec![t, h], y)]
        }
        Op::Router { hidden, experts, topk: k, group_limit, scale, expert_bias, bias } => {
            let (h, e, k) = (hidden as usize, experts as usize, k as usize);
            let b = bias.then(|| ins[2].f());
            let ebias = expert_bias.then(|| ins[2 + bias as usize].f());
            let logits = linear(gemm, ins[0].f(), t, h, ins[1].f(), e, b);
            let scores: Vec<f32> = logits.iter().map(|&l| sigmoid(l)).collect();
            let (mut idx, mut gate) = (Vec::with_capacity(t * k), Vec::with_capacity(t * k));
            for row in scores.chunks(e) {
                let sel: Vec<f32> = match ebias {
                    Some(eb) => row.iter().zip(eb).map(|(s, b)| s + b).collect(),
                    None => row.to_vec(),
                };
                let chosen = select_experts(&sel, k, group_limit);
                let z: f64 = chosen.iter().map(|&c| row[c] as f64).sum::<f64>() + 1e-20;
                for &c in &chosen {
                    idx.push(c as i32);
                    gate.push((scale as f64 * row[c] as f64 / z) as f32);
                }
            }
            vec![Tensor::i32(vec![t, k], idx), Tensor::f32(vec![t, k], gate), Tensor::f32(vec![t, e], scores)]
        }
        Op::Dispatch { experts, topk: k } => {
            let (e, k) = (experts as usize, k as usize);
            let idx = ins[0].i();
            let mut buckets: Vec<Vec<usize>> = vec![Vec::new(); e];
            for (s, &ex) in idx.iter().enumerate() {
                buckets[ex as usize].push(s);
            }
            let (mut src, mut row, mut offsets) = (Vec::with_capacity(t * k), vec![0i32; t * k], vec![0i32]);
            for b in &buckets {
                for &s in b {
                    row[s] = src.len() as i32;
                    src.push((s / k) as i32);
                }
                offsets.push(src.len() as i32);
            }
            vec![Tensor::i32(vec![t * k], src), Tensor::i32(vec![t * k], row), Tensor::i32(vec![e + 1], offsets)]
        }
        Op::ExpertFfn { hidden, ffn, experts, bias, .. } => {
            let (h, f, e) = (hidden as usize, ffn as usize, experts as usize);
            let (x, src, off) = (ins[0].f(), ins[1].i(), ins[3].i());
            let (w1, b1) = (ins[4].f(), bias.then(|| ins[5].f()));
            let (w2, b2) = (ins[5 + bias as usize].f(), bias.then(|| ins[7].f()));
            let mut yp = vec![0f32; src.len() * h];
            for ex in 0..e {
                let (r0, r1) = (off[ex] as usize, off[ex + 1] as usize);
                if r0 == r1 {
                    continue;
                }
                let n = r1 - r0;
                let xe = gather_rows(x, &src[r0..r1], h);
                let mut z = linear(gemm, &xe, n, h, &w1[ex * f * h..][..f * h], f, b1.map(|b| &b[ex * f..][..f]));
                relu2(&mut z);
                kept(gemm, &mut z);
                let y = linear(gemm, &z, n, f, &w2[ex * h * f..][..h * f], h, b2.map(|b| &b[ex * h..][..h]));
                yp[r0 * h..r1 * h].copy_from_slice(&y);
            }
            vec![Tensor::f32(vec![src.len(), h], yp)]
        }
        Op::Combine { hidden, topk: k, shared } => {
            let (h, k) = (hidden as usize, k as usize);
            let (yp, row, gate) = (ins[0].f(), ins[1].i(), ins[2].f());
            let mut out = ins[3].f().to_vec();
            for ti in 0..t {
                let o = &mut out[ti * h..(ti + 1) * h];
                if shared {
                    for (x, s) in o.iter_mut().zip(&ins[4].f()[ti * h..]) {
                        *x += s;
                    }
                }
                for kk in 0..k {
                    let g = gate[ti * k + kk];
                    let y = &yp[row[ti * k + kk] as usize * h..][..h];
                    for (x, yy) in o.iter_mut().zip(y) {
                        *x += g * yy;
                    }
                }
            }
            vec![Tensor::f32(vec![t, h], out)]
        }
        Op::SeqAuxLoss { experts, topk: k } => {
            let (e, k, s) = (experts as usize, k as usize, dims.seq);
            let b = t / s;
            let scores = ins[0].f();
            let mut total = 0f64;
            for bi in 0..b {
                let (mut c, mut p) = (vec![0f64; e], vec![0f64; e]);
                for row in scores[bi * s * e..(bi + 1) * s * e].chunks(e) {
                    let u = row.iter().map(|&x| x as f64).sum::<f64>() + 1e-20;
                    let norm: Vec<f32> = row.iter().map(|&x| (x as f64 / u) as f32).collect();
                    for ex in topk(&norm, k) {
                        c[ex] += 1.0;
                    }
                    for (pe, &n) in p.iter_mut().zip(&norm) {
                        *pe += n as f64;
                    }
                }
                let dot: f64 = c.iter().zip(&p).map(|(a, b)| a * b).sum();
                total += e as f64 / (k as f64 * (s * s) as f64) * dot;
            }
            vec![Tensor::scalar((total / b as f64) as f32)]
        }
        Op::HeadCe { hidden, vocab } => {
            let (h, v) = (hidden as usize, vocab as usize);
            let (z, head, labels, mask) = (ins[0].f(), ins[1].f(), ins[2].i(), ins[3].i());
            let (mut tok, mut lse) = (vec![0f32; t], vec![0f32; t]);
            for (t0, _, logits) in head_logits(gemm, z, head, (t, h, v)) {
                for (i, row) in logits.chunks(v).enumerate() {
                    let ti = t0 + i;
                    if mask[ti] != 0 {
                        let l = row_lse(row);
                        (tok[ti], lse[ti]) = ((l - row[labels[ti] as usize] as f64) as f32, l as f32);
                    }
                }
            }
            vec![Tensor::f32(vec![t], tok), Tensor::f32(vec![t], lse)]
        }
        Op::TokenWeight => {
            let (tok, tlp, slp, teacher, kd) = (ins[0].f(), ins[1].f(), ins[2].f(), ins[3].i(), ins[4].f());
            let w = (0..t).map(|i| token_weight(teacher[i], tok[i], tlp[i], slp[i], kd)).collect();
            vec![Tensor::f32(vec![t], w)]
        }
        Op::SpanLoss => {
            let (tok, span, scale, w) = (ins[0].f(), ins[1].i(), ins[2].f(), ins[3].f());
            let loss: f64 = (0..t).map(|i| tok[i] as f64 * scale[span[i] as usize] as f64 * w[i] as f64).sum();
            vec![Tensor::scalar(loss as f32)]
        }
        Op::Add { .. } => {
            let mut acc: Vec<f64> = ins[0].f().iter().map(|&x| x as f64).collect();
            for x in &ins[1..] {
                acc.iter_mut().zip(x.f()).for_each(|(a, &b)| *a += b as f64);
            }
            vec![Tensor::f32(ins[0].shape.clone(), acc.into_iter().map(|x| x as f32).collect())]
        }
        Op::Vjp(ref v) => crate::backward::vjp(v, dims, ins, gemm),
    }
}
