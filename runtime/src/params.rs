//! The parameter store: one f32 tensor per IR parameter, initialised from the plan's table.
//! bf16 parameters are rounded to bf16 at initialisation, so every backend starts from the same
//! representable values.

use crate::rng::Rng;
use rayon::prelude::*;
use vpmoe_compiler::plan::ParamEntry;
use vpmoe_ir::reference::{round_bf16, Tensor};
use vpmoe_ir::{DType, Init};

pub struct Params {
    pub tensors: Vec<Tensor>,
}

impl Params {
    pub fn init(table: &[ParamEntry], seed: u64) -> Params {
        // Parameters in parallel, and large ones in chunks, each chunk jumping its parameter's
        // stream to its first element: the values do not depend on the thread count (the locked
        // config's 6.02 B normals take minutes on one core).
        const CHUNK: usize = 1 << 20;
        let tensors = table
            .par_iter()
            .map(|p| {
                let shape = p.ty.shape(0);
                let n = p.numel as usize;
                let rng = Rng::for_name(seed, &p.name);
                let mut v: Vec<f32> = match p.init {
                    Init::Zeros => vec![0.0; n],
                    Init::Ones => vec![1.0; n],
                    Init::Const { value } => vec![value; n],
                    Init::Normal { std } => {
                        let mut v = vec![0f32; n];
                        v.par_chunks_mut(CHUNK).enumerate().for_each(|(i, c)| {
                            let mut r = rng.skipped(2 * (i * CHUNK) as u64); // two draws per normal
                            c.iter_mut().for_each(|x| *x = (r.normal() * std as f64) as f32);
                        });
                        v
                    }
                    Init::LogFreq { scale, base, head_dim } => (0..n)
                        .map(|i| (scale as f64 * (base as f64).powf(-2.0 * i as f64 / head_dim as f64).ln()) as f32)
                        .collect(),
                };
                if p.ty.dtype == DType::Bf16 {
                    v.par_iter_mut().for_each(|x| *x = round_bf16(*x));
                }
                Tensor::f32(shape, v)
            })
            .collect();
        Params { tensors }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vpmoe_ir::{OptGroup, Role, TensorType};

    /// The parallel, chunked initialisation draws exactly the sequential stream of each parameter.
    #[test]
    fn chunked_init_is_the_sequential_stream() {
        let n = 3 * (1 << 20) + 5;
        let entry = |name: &str, dtype| ParamEntry {
            name: name.into(),
            ty: TensorType::fixed(dtype, &[n as u64]),
            numel: n as u64,
            init: Init::Normal { std: 0.02 },
            opt: OptGroup::AdamW,
            weight_decay: false,
            role: Role::Other,
        };
        let table = [entry("a", DType::F32), entry("b", DType::Bf16)];
        let p = Params::init(&table, 9);
        for (e, t) in table.iter().zip(&p.tensors) {
            let mut r = Rng::for_name(9, &e.name);
            let want: Vec<f32> = (0..n)
                .map(|_| {
                    let x = (r.normal() * 0.02f32 as f64) as f32;
                    if e.ty.dtype == DType::Bf16 {
                        round_bf16(x)
                    } else {
                        x
                    }
                })
                .collect();
            assert!(t.f().iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{}", e.name);
        }
    }
}
