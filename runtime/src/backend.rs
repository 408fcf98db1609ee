//! The backend interface shared by the cpu reference interpreter and (later) the cuda executor,
//! and the micro-batch it consumes.

use anyhow::{bail, Result};
use std::collections::BTreeMap;
use vpmoe_ir::reference::Tensor;

/// One micro-batch, batch-major: `B` rows of `seq` tokens (`t = b·seq + s`).
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub seq: usize,
    pub tokens: Vec<i32>,
    /// Document index of each token within its row (attention never crosses documents, D5).
    pub doc: Vec<i32>,
    pub labels: Vec<i32>,
    pub loss_mask: Vec<u8>,
    pub span: Vec<u8>,
    /// `[0, w_r/N_r, w_f/N_f]`: span weights over the step's global span token counts (D6).
    pub span_scale: [f32; 3],
}

impl Batch {
    /// Validates shapes and ids against the vocabulary.
    pub fn validate(&self, vocab: u64) -> Result<()> {
        let t = self.tokens.len();
        if self.seq == 0 || t == 0 || !t.is_multiple_of(self.seq) {
            bail!("batch of {t} tokens is not a whole number of rows of {}", self.seq);
        }
        for (name, n) in [
            ("doc", self.doc.len()),
            ("labels", self.labels.len()),
            ("loss_mask", self.loss_mask.len()),
            ("span", self.span.len()),
        ] {
            if n != t {
                bail!("batch field {name} has {n} entries for {t} tokens");
            }
        }
        if let Some((i, x)) = self.tokens.iter().enumerate().find(|(_, &x)| x < 0 || x as u64 >= vocab) {
            bail!("token {x} at position {i} is outside the vocabulary of {vocab}");
        }
        for i in 0..t {
            if self.loss_mask[i] != 0 && (self.labels[i] < 0 || self.labels[i] as u64 >= vocab) {
                bail!("label {} at supervised position {i} is outside the vocabulary of {vocab}", self.labels[i]);
            }
            if self.span[i] > 2 {
                bail!("span id {} at position {i} (expected 0, 1 or 2)", self.span[i]);
            }
        }
        Ok(())
    }

    /// Per-micro-batch span scale for a step of one micro-batch: `w/N` per span (0 if empty).
    pub fn single_step_scale(&mut self, w_r: f32, w_f: f32) {
        let count = |s: u8| self.loss_mask.iter().zip(&self.span).filter(|(m, sp)| **m != 0 && **sp == s).count();
        let (nr, nf) = (count(1), count(2));
        self.span_scale = [0.0, if nr > 0 { w_r / nr as f32 } else { 0.0 }, if nf > 0 { w_f / nf as f32 } else { 0.0 }];
    }

    pub fn input(&self, name: &str) -> Result<Tensor> {
        let t = self.tokens.len();
        let u8s = |v: &[u8]| v.iter().map(|&x| x as i32).collect::<Vec<_>>();
        Ok(match name {
            "tokens" => Tensor::i32(vec![t], self.tokens.clone()),
            "doc" => Tensor::i32(vec![t], self.doc.clone()),
            // Unsupervised positions may hold the pad id; they are never read.
            "labels" => Tensor::i32(
                vec![t],
                self.labels.iter().zip(&self.loss_mask).map(|(&l, &m)| if m != 0 { l } else { 0 }).collect(),
            ),
            "loss_mask" => Tensor::i32(vec![t], u8s(&self.loss_mask)),
            "span" => Tensor::i32(vec![t], u8s(&self.span)),
            "span_scale" => Tensor::f32(vec![3], self.span_scale.to_vec()),
            other => bail!("the plan asks for an unknown input {other:?}"),
        })
    }
}

#[derive(Debug, Default)]
pub struct ForwardOut {
    pub values: BTreeMap<String, Tensor>,
}

impl ForwardOut {
    pub fn loss(&self) -> f32 {
        self.values["loss"].f()[0]
    }
}

pub trait Backend {
    fn name(&self) -> &'static str;
    /// Runs the forward graph; returns `loss`, every `aux.*` and the outputs named in `keep`.
    fn forward(&mut self, batch: &Batch, keep: &[&str]) -> Result<ForwardOut>;
}
