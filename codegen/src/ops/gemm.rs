//! The GEMM families every linear layer lowers to (gemm.cuh's mainloop and its three variants),
//! their grids, and the dense input- and weight-gradient launches the backward lowerings share.

use crate::consts::{GEMM_TILE, TICKETS};
use crate::launch::{families, one, tok, Arg, LaunchDim, Lowered};

families! {
    /// `y = epi(x·Wᵀ + bias)` over `M` rows, `W` `[N, KD]`.
    Gemm = "gemm" in "gemm.cuh", 128 <N, KD, EPI, OUT>
        (x: Bf, w: Bf, bias: Bf, resid: Bf, y: VoidMut, M: Int, ldy: Int);
    /// Per-expert `y = epi(x[src]·W_eᵀ + b_e)` over each expert's rows (`offsets`).
    GroupedGemm = "grouped_gemm" in "grouped_gemm.cuh", 128 <N, KD, EPI, E>
        (x: Bf, src: I32, offsets: I32, w: Bf, bias: Bf, y: BfMut, rows: Int);
    /// `y = epi(a·W (+ acc))`, `W` `[KD, N]` as stored by the forward (an input gradient).
    GemmNn = "gemm_nn" in "gemm_nn.cuh", 128 <N, KD, E, AMODE, EPI, OUT>
        (a: Void, offsets: I32, w: Bf, acc: F32, aux: Bf, y: VoidMut, M: Int, lda: Int, ldy: Int);
    /// `dW = aᵀ·b` (a weight gradient), optionally with the bias gradient `db = Σ_m a`.
    GemmTn = "gemm_tn" in "gemm_tn.cuh", 128 <N, K, E, AMODE, BRELU2, BIAS>
        (a: Void, b: Bf, bsrc: I32, offsets: I32, y: F32Mut, M: Int, lda: Int, ldb: Int, accum: Int,
         out: F32Mut, db: F32Mut, tickets: I32Mut);
}

/// Grid of gemm.cuh's tile (and of the kernels built on its mainloop): `m_mul·T` rows by `n`
/// columns in 64×64 tiles.
pub(crate) fn tile_grid(n: u64, m_mul: u64) -> [LaunchDim; 3] {
    [tok(m_mul, GEMM_TILE), LaunchDim::Const(n.div_ceil(GEMM_TILE)), one()]
}

/// Grid of grouped_gemm over `m_mul·T` rows and `n` columns (row tiles, plus one per expert, on x).
pub(crate) fn rows_cols_grid(n: u64, m_mul: u64, experts: u64) -> [LaunchDim; 3] {
    [LaunchDim::Tok { mul: m_mul, div: GEMM_TILE, add: experts }, LaunchDim::Const(n.div_ceil(GEMM_TILE)), one()]
}

/// Grid of gemm_nn over `m_mul·T` rows and `n` columns: column tiles on x (the fastest axis, so
/// the blocks reading one slab of A run together), row tiles (+ one per expert) on y.
pub(crate) fn nn_grid(n: u64, m_mul: u64, experts: u64) -> [LaunchDim; 3] {
    [LaunchDim::Const(n.div_ceil(GEMM_TILE)), LaunchDim::Tok { mul: m_mul, div: GEMM_TILE, add: experts }, one()]
}

/// Grid of gemm_tn for a `[n, k]` output: k tiles on x, n tiles on y, row slices (or experts) on z.
pub(crate) fn tn_grid(n: u64, k: u64, z: u64) -> [LaunchDim; 3] {
    [LaunchDim::Const(k.div_ceil(GEMM_TILE)), LaunchDim::Const(n.div_ceil(GEMM_TILE)), LaunchDim::Const(z)]
}

/// Row-range split of a dense gemm_tn: enough slices that the grid has about 256 blocks (at
/// most 32 slices, 1 when the output alone has 256 tiles).
pub fn wgrad_split(n: u64, k: u64) -> u64 {
    let tiles = n.div_ceil(GEMM_TILE) * k.div_ceil(GEMM_TILE);
    256u64.div_ceil(tiles).clamp(1, 32)
}

/// A dense layer's forward `y = epi(x·Wᵀ + bias (+ resid))` over `T` rows of `kd`, `n` columns,
/// into `y` with row stride `n`.
pub(crate) struct Dense {
    pub n: u64,
    pub kd: u64,
    pub epi: u64,
    pub out_f32: bool,
    pub x: Arg,
    pub w: Arg,
    pub bias: Arg,
    pub resid: Arg,
    pub y: Arg,
}

impl Dense {
    pub(crate) fn lower(self, l: &mut Lowered) {
        l.push(
            Gemm {
                N: self.n,
                KD: self.kd,
                EPI: self.epi,
                OUT: self.out_f32 as u64,
                x: self.x,
                w: self.w,
                bias: self.bias,
                resid: self.resid,
                y: self.y,
                M: Arg::tokens(1),
                ldy: Arg::int(self.n),
            }
            .launch(tile_grid(self.n, 1)),
        );
    }
}

/// A dense layer's input gradient `y = a·W (+ acc)` over `T` rows: `W` the `[kd, n]` forward
/// weight, `a` with row stride `lda`, `acc` an f32 accumulator with the row stride of `y` (or
/// Null), `y` f32 where `out_f32`.
pub(crate) struct Dgrad {
    pub n: u64,
    pub kd: u64,
    pub a: Arg,
    pub lda: u64,
    pub w: Arg,
    pub acc: Arg,
    pub y: Arg,
    pub out_f32: bool,
}

impl Dgrad {
    pub(crate) fn lower(self, l: &mut Lowered) {
        l.push(
            GemmNn {
                N: self.n,
                KD: self.kd,
                E: 0,
                AMODE: 0,
                EPI: crate::consts::EPI_NONE,
                OUT: self.out_f32 as u64,
                a: self.a,
                offsets: Arg::Null,
                w: self.w,
                acc: self.acc,
                aux: Arg::Null,
                y: self.y,
                M: Arg::tokens(1),
                lda: Arg::int(self.lda),
                ldy: Arg::int(self.n),
            }
            .launch(nn_grid(self.n, 1, 0)),
        );
    }
}

/// A dense layer's weight gradient `dW[n, k] = aᵀ·b` over `T` rows (f32), split over row ranges
/// into partials (added by each tile's last block) when the output alone has too few tiles. With
/// `db` (bf16 `a` only) the same launch writes the bias gradient `db[n] = Σ_m a[m, n]`. `amode`:
/// 0 for a bf16 `a`, [`AMODE_SPLIT`](crate::consts::AMODE_SPLIT) for an f32 one; `brelu2`: `b`
/// is a pre-activation read through ReLU².
pub(crate) struct Wgrad {
    pub n: u64,
    pub k: u64,
    pub a: Arg,
    pub lda: u64,
    pub b: Arg,
    pub ldb: u64,
    pub dw: Arg,
    pub db: Arg,
    pub amode: u64,
    pub brelu2: bool,
}

impl Wgrad {
    pub(crate) fn lower(self, l: &mut Lowered) {
        let Wgrad { n, k, a, lda, b, ldb, dw, db, amode, brelu2 } = self;
        let bias = db != Arg::Null;
        assert!(!bias || amode == 0, "wgrad {n}x{k}: a fused bias gradient needs a bf16 A");
        let split = wgrad_split(n, k);
        let (y, out, tickets) = if split > 1 {
            assert!(n.div_ceil(GEMM_TILE) * k.div_ceil(GEMM_TILE) <= TICKETS, "wgrad {n}x{k}: tiles past TICKETS");
            // The bias partial rows [split, n] follow the weight partials.
            (l.partials(split * n * k + bias as u64 * split * n), dw.clone(), Arg::Tickets)
        } else {
            (dw.clone(), Arg::Null, Arg::Null)
        };
        l.push(
            GemmTn {
                N: n,
                K: k,
                E: 0,
                AMODE: amode,
                BRELU2: brelu2 as u64,
                BIAS: bias as u64,
                a,
                b,
                bsrc: Arg::Null,
                offsets: Arg::Null,
                y,
                M: Arg::tokens(1),
                lda: Arg::int(lda),
                ldb: Arg::int(ldb),
                accum: dw.accum(),
                out,
                db,
                tickets,
            }
            .launch(tn_grid(n, k, split)),
        );
    }
}
