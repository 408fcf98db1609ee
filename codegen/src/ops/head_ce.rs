//! The LM head fused with the per-token cross-entropy: logits never leave the GEMM tile (per-tile
//! logsumexp partials in `head_lse`, one merge per token in `ce_lse`). The backward recomputes the
//! logits chunk by chunk into the bf16 logit gradient (`head_dl`), which the two gradient GEMMs
//! read. Also the objective over those token losses: the per-token weight (`token_weight`) and
//! the span-normalised sum (`span_weight`, then `sum`).

use crate::consts::{GEMM_TILE, HEAD_CHUNKS};
use crate::launch::{blocks, families, one, rows_grid, tok, Arg, LaunchDim, Lowered};
use crate::ops::gemm::{tile_grid, Dgrad, Wgrad};
use crate::ops::reduce::Sum;
use crate::ops::{Ports, VjpIo};
use vpmoe_ir::DType;

families! {
    HeadLse = "head_lse" in "head_lse.cuh", 128 <V, H>
        (z: Bf, w: Bf, labels: I32, part: F32Mut, label_logit: F32Mut, T: Int);
    CeLse = "ce_lse" in "ce_lse.cuh", 256 <V>
        (part: F32, label_logit: F32, mask: U8, token_loss: F32Mut, lse: F32Mut, T: Int);
    HeadDl = "head_dl" in "head_dl.cuh", 128 <V, H, C>
        (z: Bf, w: Bf, labels: I32, mask: U8, lse: F32, dtok: F32, dl: BfMut, T: Int, col0: Int);
    TokenWeight = "token_weight" in "token_weight.cuh", 256 <>
        (token_loss: F32, teacher_logp: F32, sampler_logp: F32, teacher: U8, kd: F32, weight: F32Mut, T: Int);
    SpanWeight = "span_weight" in "span_weight.cuh", 256 <>
        (x: F32, span: U8, scale: F32, weight: F32, g: F32, out: F32Mut, T: Int);
}

/// Columns per LM-head backward chunk: a whole number of 64-wide tiles, `HEAD_CHUNKS` chunks
/// (fewer when the vocabulary has fewer tiles).
pub fn head_chunk(vocab: u64) -> u64 {
    vocab.div_ceil(GEMM_TILE).div_ceil(HEAD_CHUNKS) * GEMM_TILE
}

pub(super) fn forward(p: &Ports, hidden: u64, vocab: u64, l: &mut Lowered) {
    let part = l.scratch_tok(DType::F32, 2 * vocab.div_ceil(GEMM_TILE));
    let label_logit = l.scratch_tok(DType::F32, 1);
    let lse = HeadLse {
        V: vocab,
        H: hidden,
        z: p.x(0),
        w: p.x(1),
        labels: p.x(2),
        part: part.clone(),
        label_logit: label_logit.clone(),
        T: Arg::tokens(1),
    };
    l.push(lse.launch(tile_grid(vocab, 1)));
    let ce = CeLse { V: vocab, part, label_logit, mask: p.x(3), token_loss: p.y(0), lse: p.y(1), T: Arg::tokens(1) };
    l.push(ce.launch(rows_grid(1)));
}

/// One vocabulary chunk at a time, so only `[T, chunk]` of the logit gradient is ever resident:
/// dz sums the chunks in f32; each chunk's rows of dW are final.
pub(super) fn vjp(io: &VjpIo, hidden: u64, vocab: u64, l: &mut Lowered) {
    let chunk = head_chunk(vocab);
    let dl = l.scratch_tok(DType::Bf16, chunk);
    let dz = if chunk < vocab { l.scratch_tok(DType::F32, hidden) } else { Arg::Null };
    let mut c0 = 0;
    while c0 < vocab {
        let width = chunk.min(vocab - c0);
        let last = c0 + width == vocab;
        let launch = HeadDl {
            V: vocab,
            H: hidden,
            C: chunk,
            z: io.x(0),
            w: io.x(1),
            labels: io.x(2),
            mask: io.x(3),
            lse: io.y(1),
            dtok: io.dy(0),
            dl: dl.clone(),
            T: Arg::tokens(1),
            col0: Arg::int(c0),
        };
        l.push(launch.launch(tile_grid(width, 1)));
        let acc = if c0 > 0 { dz.clone() } else { Arg::Null };
        let (y, out_f32) = if last { (io.dx(0), false) } else { (dz.clone(), true) };
        let w = io.x(1).at(c0 * hidden);
        Dgrad { n: hidden, kd: width, a: dl.clone(), lda: chunk, w, acc, y, out_f32 }.lower(l);
        let (b, dw) = (io.x(0), io.dx(1).at(c0 * hidden));
        Wgrad {
            n: width,
            k: hidden,
            a: dl.clone(),
            lda: chunk,
            b,
            ldb: hidden,
            dw,
            db: Arg::Null,
            amode: 0,
            brelu2: false,
        }
        .lower(l);
        c0 += width;
    }
}

/// The weight of each token's loss (`Op::TokenWeight`).
pub(super) fn token_weight(p: &Ports, l: &mut Lowered) {
    let launch = TokenWeight {
        token_loss: p.x(0),
        teacher_logp: p.x(1),
        sampler_logp: p.x(2),
        teacher: p.x(3),
        kd: p.x(4),
        weight: p.y(0),
        T: Arg::tokens(1),
    };
    l.push(launch.launch(elementwise(TokenWeight::FAMILY.threads)));
}

/// `loss = Σ_t token_loss_t·scale[span_t]·weight_t`: the products, then one deterministic sum.
pub(super) fn span_loss(p: &Ports, l: &mut Lowered) {
    let weighted = l.scratch_tok(DType::F32, 1);
    let launch = SpanWeight {
        x: p.x(0),
        span: p.x(1),
        scale: p.x(2),
        weight: p.x(3),
        g: Arg::Null,
        out: weighted.clone(),
        T: Arg::tokens(1),
    };
    l.push(launch.launch(elementwise(SpanWeight::FAMILY.threads)));
    let sum = Sum { x: weighted, out: p.y(0), n: Arg::tokens(1), scale: Arg::Float(1.0), accum: Arg::Int(0) };
    l.push(sum.launch(blocks(1)));
}

/// `dtoken_loss_t = dloss·scale[span_t]·weight_t`.
pub(super) fn span_loss_vjp(io: &VjpIo, l: &mut Lowered) {
    let launch = SpanWeight {
        x: Arg::Null,
        span: io.x(1),
        scale: io.x(2),
        weight: io.x(3),
        g: io.dy(0),
        out: io.dx(0),
        T: Arg::tokens(1),
    };
    l.push(launch.launch(elementwise(SpanWeight::FAMILY.threads)));
}

fn elementwise(threads: u32) -> [LaunchDim; 3] {
    [tok(1, threads as u64), one(), one()]
}
