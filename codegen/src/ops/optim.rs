//! The optimizer step's kernels (`cuda/optim.cuh`): which instantiations a plan's optimizer
//! program needs, their block sizes and grids, and how a Normuon family is cut into chunks. Their
//! arguments are the runtime's optimizer-state buffers and the step's scalars (not IR values), so
//! the runtime binds them; the compiler only puts the kernels into the plan so they are compiled
//! (and dumped) with the others.

use crate::consts::GEMM_TILE as TILE;
use crate::launch::{families, KernelSpec};

families! {
    /// The sum of squares of each optimizer unit of a gradient buffer (the clipping norm).
    OptSumsq = "opt_sumsq" in "optim.cuh", 256 <> (g: F32, starts: I64, out: F64Mut);
    /// AdamW on an f32 master with an f32 (`OUT` = 1) or bf16 model copy.
    OptAdamw = "opt_adamw" in "optim.cuh", 256 <OUT>
        (g: F32, m: F32Mut, s: F32Mut, w: F32Mut, model: VoidMut, n: LongLong, coef: Float, b1: Double,
         b2: Double, eps: Double, bc1: Double, bc2: Double, lr: Double, wd: Double);
    /// Normuon's momentum and the normalised start X of Polar Express.
    PeStart = "pe_start" in "optim.cuh", 256 <R, C>
        (g: F32, mom: F32Mut, u: F32Mut, x: BfMut, coef: Float, mu: Double, nesterov: Int, safety: Double,
         eps: Double);
    /// `A = X·Xᵀ`.
    PeGram = "pe_gram" in "optim.cuh", 128 <M, NW> (x: Bf, a: BfMut);
    /// `B = ca·I + cb·A + cc·A·A`.
    PePoly = "pe_poly" in "optim.cuh", 128 <M> (a: Bf, b: F32Mut, ca: Float, cb: Float, cc: Float);
    /// `Y = B·X`, into bf16 (the next iteration's X) or f32 (the last: Normuon's O).
    PeApply = "pe_apply" in "optim.cuh", 128 <M, NW, OUT> (b: F32, x: Bf, y: VoidMut);
    /// Normuon's row normalisation from the final X, the master's update and the model copy.
    PeFinish = "pe_finish" in "optim.cuh", 256 <R, C>
        (o: F32, v: F32Mut, w: F32Mut, model: BfMut, beta2: Double, eps: Double, lr: Double, wd: Double);
}

/// Block size of the element-wise and per-matrix kernels (`opt_cfg::THREADS`).
pub const THREADS: u32 = OptSumsq::FAMILY.threads;
/// Block size of the batched Polar Express GEMMs (`gemm_cfg::THREADS`).
pub const GEMM_THREADS: u32 = PeGram::FAMILY.threads;
/// Grid-stride kernels never use more blocks than this: enough to fill an H100/H200 several
/// times over.
pub const MAX_STRIDE_BLOCKS: u64 = 2048;
/// Largest batch one Polar Express launch covers (the grid's z dimension).
pub const MAX_CHUNK: u64 = 65_535;

pub fn sumsq() -> KernelSpec {
    KernelSpec::new(&OptSumsq::FAMILY, &[])
}
/// AdamW writing an f32 (`true`) or bf16 model copy.
pub fn adamw(f32_model: bool) -> KernelSpec {
    KernelSpec::new(&OptAdamw::FAMILY, &[f32_model as u64])
}

/// Blocks of a grid-stride launch over `n` elements (at least 1).
pub fn stride_blocks(n: u64) -> u32 {
    n.div_ceil(THREADS as u64).clamp(1, MAX_STRIDE_BLOCKS) as u32
}

/// The wide shape Polar Express iterates on: `(m, n) = (min, max)` of `rows × cols`.
pub fn wide(rows: u64, cols: u64) -> (u64, u64) {
    (rows.min(cols), rows.max(cols))
}

/// The kernels of one Normuon shape family.
#[derive(Clone, Debug, PartialEq)]
pub struct Polar {
    pub rows: u64,
    pub cols: u64,
    pub start: KernelSpec,
    pub gram: KernelSpec,
    pub poly: KernelSpec,
    /// `X ← B·X` into bf16 (every iteration but the last) and into f32 (the last: Normuon's O).
    pub apply: KernelSpec,
    pub apply_last: KernelSpec,
    pub finish: KernelSpec,
}

impl Polar {
    pub fn new(rows: u64, cols: u64) -> Polar {
        let (m, nw) = wide(rows, cols);
        Polar {
            rows,
            cols,
            start: KernelSpec::new(&PeStart::FAMILY, &[rows, cols]),
            gram: KernelSpec::new(&PeGram::FAMILY, &[m, nw]),
            poly: KernelSpec::new(&PePoly::FAMILY, &[m]),
            apply: KernelSpec::new(&PeApply::FAMILY, &[m, nw, 0]),
            apply_last: KernelSpec::new(&PeApply::FAMILY, &[m, nw, 1]),
            finish: KernelSpec::new(&PeFinish::FAMILY, &[rows, cols]),
        }
    }

    /// Grids for a chunk of `batch` matrices: (gram and poly, apply); start/finish use `[batch, 1, 1]`.
    pub fn grids(&self, batch: u64) -> ([u64; 3], [u64; 3]) {
        let (m, nw) = wide(self.rows, self.cols);
        ([m.div_ceil(TILE), m.div_ceil(TILE), batch], [nw.div_ceil(TILE), m.div_ceil(TILE), batch])
    }

    /// Chunk scratch per matrix, in bytes: U/O (f32), two X buffers (bf16), A (bf16), B (f32).
    pub fn scratch_per_matrix(&self) -> u64 {
        let (m, nw) = wide(self.rows, self.cols);
        m * nw * (4 + 2 * 2) + m * m * (2 + 4)
    }

    /// Matrices per chunk so that the chunk's scratch fits `budget` bytes (at least one matrix,
    /// at most [`MAX_CHUNK`] and `matrices`).
    pub fn chunk(&self, matrices: u64, budget: u64) -> u64 {
        (budget / self.scratch_per_matrix()).clamp(1, MAX_CHUNK).min(matrices.max(1))
    }

    fn all(&self) -> [(&KernelSpec, u32); 6] {
        [
            (&self.start, THREADS),
            (&self.gram, GEMM_THREADS),
            (&self.poly, GEMM_THREADS),
            (&self.apply, GEMM_THREADS),
            (&self.apply_last, GEMM_THREADS),
            (&self.finish, THREADS),
        ]
    }
}

/// Every kernel (with its block size) an optimizer with these Normuon family shapes and these
/// AdamW model-copy dtypes (`true` = f32) launches.
pub fn kernels(families: &[(u64, u64)], adamw_f32_models: &[bool]) -> Vec<(KernelSpec, u32)> {
    let mut out = vec![(sumsq(), THREADS)];
    for &f32_model in adamw_f32_models {
        out.push((adamw(f32_model), THREADS));
    }
    for &(r, c) in families {
        out.extend(Polar::new(r, c).all().into_iter().map(|(k, b)| (k.clone(), b)));
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tall_families_iterate_on_their_transpose() {
        let p = Polar::new(1024, 128);
        assert_eq!(p.gram.name(), "vp_pe_gram_M128_NW1024");
        assert_eq!(p.finish.name(), "vp_pe_finish_R1024_C128");
        assert_eq!(p.grids(3), ([2, 2, 3], [16, 2, 3]));
    }

    #[test]
    fn chunks_respect_the_budget_and_the_grid() {
        let p = Polar::new(128, 1024);
        assert_eq!(p.scratch_per_matrix(), 128 * 1024 * 8 + 128 * 128 * 6);
        let c = p.chunk(20_225, 1 << 30);
        assert!(c * p.scratch_per_matrix() <= 1 << 30 && c > 500);
        assert_eq!(p.chunk(7, 1 << 30), 7);
        assert_eq!(p.chunk(7, 1), 1);
        assert_eq!(Polar::new(4, 8).chunk(1 << 40, u64::MAX), MAX_CHUNK);
    }

    #[test]
    fn stride_grids_are_bounded() {
        assert_eq!(stride_blocks(0), 1);
        assert_eq!(stride_blocks(257), 2);
        assert_eq!(stride_blocks(1 << 40), MAX_STRIDE_BLOCKS as u32);
    }
}
