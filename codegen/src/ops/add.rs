//! `add`: the sum of a value's gradient contributions that no kernel folded in.

use crate::launch::{families, one, tok, Arg, LaunchDim, Lowered};
use crate::ops::Ports;
use vpmoe_ir::{DType, TensorType};

families! {
    /// `y = x0 + x1 + x2 + x3 (+ acc)` elementwise (null inputs read as 0), f32 or bf16.
    Add = "add" in "add.cuh", 256 <IN_F32, OUT_F32, NI>
        (x0: Void, x1: Void, x2: Void, x3: Void, acc: F32, y: VoidMut, n: Int, accum: Int);
}

/// Element count of a tensor type as a launch argument and a 1-D grid of `per` elements a block.
fn numel_arg(ty: &TensorType, per: u64) -> (Arg, [LaunchDim; 3]) {
    let (pt, fixed) = ty.numel_split();
    if pt > 0 {
        (Arg::tokens(pt), [tok(pt, per), one(), one()])
    } else {
        (Arg::int(fixed), [LaunchDim::Const(fixed.div_ceil(per).max(1)), one(), one()])
    }
}

/// Up to four inputs in one launch; more are chained through an f32 scratch accumulator (fixed
/// summation order, one rounding at the end).
pub(super) fn forward(p: &Ports, n: u64, ty: &TensorType, l: &mut Lowered) {
    let f32in = ty.dtype == DType::F32;
    let (cnt, grid) = numel_arg(ty, Add::FAMILY.threads as u64);
    let ins: Vec<Arg> = (0..p.inputs()).map(|k| p.x(k)).collect();
    assert_eq!(ins.len() as u64, n, "add arity");
    // Always the 4-input instantiation (null pointers read as 0), so the kernel set does not
    // depend on how many contributions a value has (which grows with the layer count).
    let add = |chunk: &[Arg], acc: Arg, y: Arg, out_f32: bool| {
        let x = |k: usize| chunk.get(k).cloned().unwrap_or(Arg::Null);
        // Only an f32 value can be a gradient sum.
        let accum = if out_f32 { y.accum() } else { Arg::Int(0) };
        Add {
            IN_F32: f32in as u64,
            OUT_F32: out_f32 as u64,
            NI: 4,
            x0: x(0),
            x1: x(1),
            x2: x(2),
            x3: x(3),
            acc,
            y,
            n: cnt.clone(),
            accum,
        }
        .launch(grid)
    };
    let out = p.y(0);
    if ins.len() <= 4 {
        l.push(add(&ins, Arg::Null, out, f32in));
        return;
    }
    let (pt, fixed) = ty.numel_split();
    let acc = if pt > 0 { l.scratch_tok(DType::F32, pt) } else { l.scratch_fixed(DType::F32, fixed) };
    let chunks: Vec<&[Arg]> = ins.chunks(4).collect();
    for (c, chunk) in chunks.iter().enumerate() {
        let acc_in = if c == 0 { Arg::Null } else { acc.clone() };
        let (y, out_f32) = if c + 1 == chunks.len() { (out.clone(), f32in) } else { (acc.clone(), true) };
        l.push(add(chunk, acc_in, y, out_f32));
    }
}
