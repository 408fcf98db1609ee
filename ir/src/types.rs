//! Tensor types. Every activation's leading dimension scales with `T`, the number of tokens in
//! a micro-batch (`T = B·S`, rows laid out batch-major: token `t` is row `t / S`, position
//! `t % S`). `T` is bound at run time, so one plan serves every micro-batch shape; all other
//! dimensions are architecture constants baked at compile time.

use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    Bf16,
    I32,
    U8,
}

impl DType {
    pub fn bytes(self) -> u64 {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::Bf16 => 2,
            DType::U8 => 1,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
            DType::I32 => "i32",
            DType::U8 => "u8",
        }
    }
}

/// One dimension: a constant, or `k·T` for the token dimension.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Dim {
    Const(u64),
    Tok(u64),
}

impl Dim {
    pub fn eval(self, tokens: u64) -> u64 {
        match self {
            Dim::Const(n) => n,
            Dim::Tok(k) => k * tokens,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Const(n) => write!(f, "{n}"),
            Dim::Tok(1) => write!(f, "T"),
            Dim::Tok(k) => write!(f, "{k}T"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorType {
    pub dtype: DType,
    pub dims: Vec<Dim>,
}

impl TensorType {
    pub fn new(dtype: DType, dims: Vec<Dim>) -> Self {
        TensorType { dtype, dims }
    }
    /// A tensor whose leading dimension is `T` followed by constant dims.
    pub fn tok(dtype: DType, rest: &[u64]) -> Self {
        Self::tok_k(dtype, 1, rest)
    }
    /// A tensor whose leading dimension is `k·T` followed by constant dims.
    pub fn tok_k(dtype: DType, k: u64, rest: &[u64]) -> Self {
        let mut dims = vec![Dim::Tok(k)];
        dims.extend(rest.iter().map(|&n| Dim::Const(n)));
        TensorType { dtype, dims }
    }
    pub fn fixed(dtype: DType, dims: &[u64]) -> Self {
        TensorType { dtype, dims: dims.iter().map(|&n| Dim::Const(n)).collect() }
    }
    pub fn scalar(dtype: DType) -> Self {
        TensorType { dtype, dims: vec![] }
    }
    /// Number of elements for a given token count.
    pub fn numel(&self, tokens: u64) -> u64 {
        self.dims.iter().map(|d| d.eval(tokens)).product()
    }
    /// `(elements per token, constant elements)`: a tensor scales with `T` or is constant.
    pub fn numel_split(&self) -> (u64, u64) {
        let tok: u64 = self.dims.iter().map(|d| if let Dim::Tok(k) = d { *k } else { 1 }).product();
        let konst: u64 = self.dims.iter().map(|d| if let Dim::Const(n) = d { *n } else { 1 }).product();
        if self.scales_with_tokens() {
            (tok * konst, 0)
        } else {
            (0, konst)
        }
    }
    pub fn scales_with_tokens(&self) -> bool {
        self.dims.iter().any(|d| matches!(d, Dim::Tok(_)))
    }
    /// Concrete shape for a given token count.
    pub fn shape(&self, tokens: u64) -> Vec<usize> {
        self.dims.iter().map(|d| d.eval(tokens) as usize).collect()
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[", self.dtype.name())?;
        for (i, d) in self.dims.iter().enumerate() {
            if i > 0 {
                write!(f, ",")?;
            }
            write!(f, "{d}")?;
        }
        write!(f, "]")
    }
}
