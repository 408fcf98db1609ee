//! The parameter store: one f32 tensor per IR parameter, initialised from the plan's table.
//! bf16 parameters are rounded to bf16 at initialisation, so every backend starts from the same
//! representable values.

use crate::rng::Rng;
use half::bf16;
use vpmoe_compiler::plan::ParamEntry;
use vpmoe_ir::reference::Tensor;
use vpmoe_ir::{DType, Init};

pub struct Params {
    pub tensors: Vec<Tensor>,
}

fn round_bf16(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

impl Params {
    pub fn init(table: &[ParamEntry], seed: u64) -> Params {
        let tensors = table
            .iter()
            .map(|p| {
                let shape = p.ty.shape(0);
                let n = p.numel as usize;
                let mut rng = Rng::for_name(seed, &p.name);
                let mut v: Vec<f32> = match p.init {
                    Init::Zeros => vec![0.0; n],
                    Init::Ones => vec![1.0; n],
                    Init::Const { value } => vec![value; n],
                    Init::Normal { std } => (0..n).map(|_| (rng.normal() * std as f64) as f32).collect(),
                    Init::LogFreq { scale, base, head_dim } => (0..n)
                        .map(|i| (scale as f64 * (base as f64).powf(-2.0 * i as f64 / head_dim as f64).ln()) as f32)
                        .collect(),
                };
                if p.ty.dtype == DType::Bf16 {
                    v.iter_mut().for_each(|x| *x = round_bf16(*x));
                }
                Tensor::f32(shape, v)
            })
            .collect();
        Params { tensors }
    }
}
