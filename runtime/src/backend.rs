//! The backend interface shared by the cpu reference interpreter and the cuda executor,
//! the micro-batch it consumes, and what a training step reports back.

use anyhow::{bail, Result};
use std::collections::BTreeMap;
use vpmoe_ir::reference::Tensor;
use vpmoe_ir::{InputName, OutputName, ParamId};

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
    /// Seed of the loss gradient (1) and of every sequence aux loss (`α/M`, MODEL.md §4.10).
    pub loss_grad: f32,
    pub aux_grad: f32,
    /// Teacher `log p(label)` per position (stages 2 and 3; empty: nowhere).
    pub teacher_logp: Vec<f32>,
    /// Per position, how its loss is weighted (`Op::TokenWeight`): 0 plain CE, 1 stage 2's
    /// confidence, 2 stage 3's OPD advantage (empty: 0 everywhere).
    pub teacher: Vec<u8>,
    /// Stage 3: the sampler's `log p(label)` per position (empty: no mode-2 position).
    pub sampler_logp: Vec<f32>,
    /// The weights' scalars: confidence `[m, T, w_min, w_max]` (DISTILL.md 2B), then the OPD
    /// importance-ratio clip `c`.
    pub kd: [f32; 5],
}

/// `kd` when no position carries a teacher value (every weight is 1 then anyway).
pub const KD_NONE: [f32; 5] = [0.0, 1.0, 1.0, 1.0, 1.0];

/// Token-weight modes (`Batch::teacher`).
pub const WEIGHT_CE: u8 = 0;
pub const WEIGHT_CONFIDENCE: u8 = 1;
pub const WEIGHT_OPD: u8 = 2;

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
        if !self.teacher.is_empty() || !self.teacher_logp.is_empty() || !self.sampler_logp.is_empty() {
            self.validate_weights(t)?;
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

    /// The per-token weight inputs of `Op::TokenWeight`, mode by mode.
    fn validate_weights(&self, t: usize) -> Result<()> {
        if self.teacher.len() != t || self.teacher_logp.len() != t {
            bail!(
                "batch fields teacher/teacher_logp have {}/{} entries for {t} tokens",
                self.teacher.len(),
                self.teacher_logp.len()
            );
        }
        if let Some(i) = (0..t).find(|&i| self.teacher[i] > WEIGHT_OPD) {
            bail!("token-weight mode {} at position {i} (expected 0, 1 or 2)", self.teacher[i]);
        }
        let any = |mode: u8| self.teacher.contains(&mode);
        if any(WEIGHT_CONFIDENCE) {
            if let Some(i) = (0..t).find(|&i| {
                self.teacher[i] == WEIGHT_CONFIDENCE && (self.teacher_logp[i].is_nan() || self.teacher_logp[i] > 0.0)
            }) {
                bail!("teacher log-probability {} at position {i} is not ≤ 0", self.teacher_logp[i]);
            }
            let [m, temp, lo, hi, _] = self.kd;
            if !(m.is_finite()
                && temp.is_finite()
                && temp > 0.0
                && lo.is_finite()
                && hi.is_finite()
                && 0.0 <= lo
                && lo <= hi)
            {
                bail!(
                    "confidence-weight scalars [m, T, w_min, w_max] = {:?} need T > 0 and 0 ≤ w_min ≤ w_max",
                    &self.kd[..4]
                );
            }
        }
        if any(WEIGHT_OPD) {
            if self.sampler_logp.len() != t {
                bail!("batch field sampler_logp has {} entries for {t} tokens", self.sampler_logp.len());
            }
            let bad = |x: f32| !x.is_finite() || x > 0.0;
            for i in (0..t).filter(|&i| self.teacher[i] == WEIGHT_OPD) {
                if bad(self.teacher_logp[i]) {
                    bail!("teacher log-probability {} at OPD position {i} is not finite and ≤ 0", self.teacher_logp[i]);
                }
                if bad(self.sampler_logp[i]) {
                    bail!("sampler log-probability {} at OPD position {i} is not finite and ≤ 0", self.sampler_logp[i]);
                }
            }
            let c = self.kd[4];
            if !(c.is_finite() && c >= 1.0) {
                bail!("the OPD importance-ratio clip c = {c} must be finite and ≥ 1");
            }
        }
        Ok(())
    }

    /// A micro-batch from the dataset reader (scales and seeds still to be set by the step).
    pub fn from_reader(b: vpmoe_data::reader::Batch) -> Batch {
        Batch {
            seq: b.seq_len,
            tokens: b.tokens,
            doc: b.doc,
            labels: b.labels,
            loss_mask: b.loss_mask,
            span: b.span,
            span_scale: [0.0; 3],
            loss_grad: 1.0,
            aux_grad: 0.0,
            teacher_logp: b.teacher_logp,
            teacher: b.teacher,
            sampler_logp: vec![],
            kd: KD_NONE,
        }
    }

    /// Supervised tokens of span 1 (reasoning) and 2 (final).
    pub fn span_counts(&self) -> [u64; 3] {
        let mut n = [0u64; 3];
        for (m, s) in self.loss_mask.iter().zip(&self.span) {
            if *m != 0 {
                n[*s as usize] += 1;
            }
        }
        n
    }

    /// Per-micro-batch span scale for a step of one micro-batch: `w/N` per span (0 if empty).
    pub fn single_step_scale(&mut self, w_r: f32, w_f: f32) {
        let n = self.span_counts();
        self.span_scale = span_scale(&[n[0], n[1], n[2]], w_r, w_f);
    }

    pub fn input(&self, name: &InputName) -> Result<Tensor> {
        let t = self.tokens.len();
        let u8s = |v: &[u8]| v.iter().map(|&x| x as i32).collect::<Vec<_>>();
        Ok(match name {
            InputName::Tokens => Tensor::i32(vec![t], self.tokens.clone()),
            InputName::Doc => Tensor::i32(vec![t], self.doc.clone()),
            // Unsupervised positions may hold the pad id; they are never read.
            InputName::Labels => Tensor::i32(
                vec![t],
                self.labels.iter().zip(&self.loss_mask).map(|(&l, &m)| if m != 0 { l } else { 0 }).collect(),
            ),
            InputName::LossMask => Tensor::i32(vec![t], u8s(&self.loss_mask)),
            InputName::Span => Tensor::i32(vec![t], u8s(&self.span)),
            InputName::SpanScale => Tensor::f32(vec![3], self.span_scale.to_vec()),
            InputName::TeacherLogp if self.teacher_logp.is_empty() => Tensor::f32(vec![t], vec![0.0; t]),
            InputName::TeacherLogp => Tensor::f32(vec![t], self.teacher_logp.clone()),
            InputName::Teacher if self.teacher.is_empty() => Tensor::i32(vec![t], vec![0; t]),
            InputName::Teacher => Tensor::i32(vec![t], u8s(&self.teacher)),
            InputName::SamplerLogp if self.sampler_logp.is_empty() => Tensor::f32(vec![t], vec![0.0; t]),
            InputName::SamplerLogp => Tensor::f32(vec![t], self.sampler_logp.clone()),
            InputName::Kd => Tensor::f32(vec![5], self.kd.to_vec()),
            InputName::LossGrad => Tensor::scalar(self.loss_grad),
            InputName::AuxGrad => Tensor::scalar(self.aux_grad),
            InputName::Pos | InputName::Slot => bail!("${name} is an input of the decode program, not of training"),
            InputName::Other(other) => bail!("the plan asks for an unknown input {other:?}"),
        })
    }
}

/// D6: `[0, w_r/N_r, w_f/N_f]` from the step's global span token counts (0 for an empty span).
pub fn span_scale(n: &[u64; 3], w_r: f32, w_f: f32) -> [f32; 3] {
    let w = |w: f32, n: u64| if n > 0 { (w as f64 / n as f64) as f32 } else { 0.0 };
    [0.0, w(w_r, n[1]), w(w_f, n[2])]
}

/// The step scalars of the `M` micro-batches of one optimizer step (D6, MODEL.md §4.10): every
/// micro-batch gets the span scales over the step's global span token counts, the loss seed 1 and
/// the aux-loss seed `α/M` (α: the architecture's sequence aux-loss coefficient, 0 without one).
/// Returns the step's supervised token counts per span.
pub fn seed_step(batches: &mut [Batch], arch: &vpmoe_compiler::Arch, w: [f32; 2]) -> [u64; 3] {
    let counts = span_counts(batches);
    let m = batches.len();
    seed(batches, arch, w, &counts, m);
    counts
}

/// Supervised tokens per span over `batches`.
pub fn span_counts(batches: &[Batch]) -> [u64; 3] {
    let mut counts = [0u64; 3];
    for b in batches {
        let n = b.span_counts();
        (0..3).for_each(|i| counts[i] += n[i]);
    }
    counts
}

/// [`seed_step`] for some of a step's micro-batches (a data-parallel rank's): `counts` are the
/// whole step's span token counts and `micro_batches` its number of micro-batches.
pub fn seed(
    batches: &mut [Batch],
    arch: &vpmoe_compiler::Arch,
    [w_r, w_f]: [f32; 2],
    counts: &[u64; 3],
    micro_batches: usize,
) {
    let alpha = arch.moe.as_ref().and_then(|m| m.seq_aux_coeff).unwrap_or(0.0);
    let (scale, aux_grad) = (span_scale(counts, w_r, w_f), (alpha / micro_batches as f64) as f32);
    for b in batches {
        (b.span_scale, b.loss_grad, b.aux_grad) = (scale, 1.0, aux_grad);
    }
}

#[derive(Debug, Default)]
pub struct ForwardOut {
    pub values: BTreeMap<OutputName, Tensor>,
}

impl ForwardOut {
    /// The outputs a forward returns from all its graph's outputs: those asked for, the loss,
    /// the per-token loss and the aux losses.
    pub(crate) fn keep(all: BTreeMap<OutputName, Tensor>, keep: &[OutputName]) -> Self {
        let always =
            |k: &OutputName| matches!(k, OutputName::Loss | OutputName::TokenLoss | OutputName::AuxLoss { .. });
        ForwardOut { values: all.into_iter().filter(|(k, _)| keep.contains(k) || always(k)).collect() }
    }

    pub fn loss(&self) -> f32 {
        self.values[&OutputName::Loss].f()[0]
    }

    /// The per-token cross-entropy.
    pub fn token_loss(&self) -> &[f32] {
        self.values[&OutputName::TokenLoss].f()
    }

    /// The sequence aux loss of every MoE layer, in layer order.
    pub fn aux(&self) -> Vec<(u32, f32)> {
        self.values
            .iter()
            .filter_map(|(k, v)| match k {
                OutputName::AuxLoss { layer } => Some((*layer, v.f()[0])),
                _ => None,
            })
            .collect()
    }
}

/// What one micro-batch's forward + backward reports (its gradients stay in the backend).
#[derive(Debug, Clone, Default)]
pub struct MicroOut {
    /// This micro-batch's share of the step objective `Σ ℓ·scale[span]` (D6).
    pub loss: f64,
    /// `Σ ℓ` over supervised tokens of span 1 and 2 (for per-span means).
    pub span_loss: [f64; 3],
    /// Sequence aux loss (without α) per MoE layer (1-based layer number).
    pub aux: Vec<(u32, f32)>,
    /// Each token's cross-entropy at the weights of the step (0 where unsupervised).
    pub token_loss: Vec<f32>,
}

/// Runtime scalars of one optimizer step (never baked into a plan).
#[derive(Debug, Clone, Copy)]
pub struct StepScalars {
    /// LR of the Normuon group and of the AdamW group.
    pub lr: f64,
    pub aux_lr: f64,
    pub weight_decay: f64,
    /// Global grad-norm clipping threshold (0 disables).
    pub clip: f64,
    /// Expert-bias update rate (§4.11; 0 when the architecture has none).
    pub bias_rate: f64,
}

#[derive(Debug, Clone, Default)]
pub struct StepStats {
    /// Global gradient norm before clipping, and the applied clip coefficient (1 = none).
    pub grad_norm: f64,
    pub clip_coef: f32,
    /// Per MoE layer (1-based layer number): the step's expert loads (token-slots per expert).
    pub loads: Vec<(u32, Vec<u64>)>,
    /// Per MoE layer: the expert biases after the step's update.
    pub expert_bias: Vec<(u32, Vec<f32>)>,
    pub optimizer_seconds: f64,
}

pub trait Backend {
    fn name(&self) -> &'static str;
    /// Runs the forward graph only; returns the loss, the per-token loss, every aux loss and the
    /// outputs in `keep`.
    fn forward(&mut self, batch: &Batch, keep: &[OutputName]) -> Result<ForwardOut>;
    /// Forward and backward of one micro-batch; gradients accumulate (fp32) in the backend.
    fn accumulate(&mut self, batch: &Batch) -> Result<MicroOut>;
    /// Ends the step (MODEL.md §7.1): expert-bias update, global clipping, Normuon and AdamW,
    /// new model copies; gradients and loads are reset. Fails, naming the first offending
    /// tensor, when a gradient is not finite — before anything is updated.
    fn step(&mut self, s: &StepScalars) -> Result<StepStats>;
    /// The backend-independent training state (for checkpoints; the cuda backend downloads it).
    fn state(&self) -> Result<crate::state::TrainState>;
    /// What a decoder reads (evaluation, rollouts), moments left empty: the masters, or the
    /// model copies, which decode the same (a decoder rounds bf16 parameters to bf16 either way).
    fn weights(&self) -> Result<crate::state::TrainState> {
        self.state()
    }
    /// ZeRO-1: this rank's part of the optimizer and the state of the rest (frozen masters, step
    /// count), which a checkpoint writes without gathering the whole state.
    #[allow(clippy::type_complexity)]
    fn shard(&self) -> Result<Option<(std::borrow::Cow<'_, crate::dist::zero::Shard>, &crate::state::TrainState)>> {
        Ok(None)
    }
    /// Optimizer steps applied so far (without fetching the state).
    fn step_count(&self) -> u64;
    fn set_state(&mut self, st: crate::state::TrainState) -> Result<()>;
    /// ZeRO-1: whether this rank keeps only its share of the optimizer (a resume then reads only
    /// that share, [`crate::checkpoint::load_share`]).
    fn shares_optimizer(&self) -> bool {
        false
    }
    /// ZeRO-1: replaces the state from every parameter's masters (moments empty) and this rank's
    /// share of the optimizer.
    fn set_share(&mut self, st: crate::state::TrainState, shard: crate::dist::zero::Shard) -> Result<()> {
        let _ = (st, shard);
        bail!("the {} backend keeps the whole optimizer", self.name())
    }
    /// Trains as one rank of `dist`'s job: gradients and router loads are summed over its ranks
    /// before each update; with `shard_optimizer` each rank keeps only its part of the optimizer
    /// (ZeRO-1). [`Backend::state`] and [`Backend::step`] are then collectives: every rank calls
    /// them together.
    fn distribute(&mut self, dist: crate::dist::Dist, shard_optimizer: bool) -> Result<()> {
        let _ = shard_optimizer;
        if dist.world() > 1 {
            bail!("the {} backend trains on one device; data parallel training needs --backend cpu", self.name());
        }
        Ok(())
    }
    /// The device this backend runs on, in words.
    /// Where this backend's decoders run (generation during training: evaluation, rollouts).
    fn decode_on(&self) -> crate::decode::DecodeOn {
        crate::decode::DecodeOn::Cpu
    }
    fn device_name(&self) -> String {
        self.name().to_string()
    }
    /// Device memory `(in use, total)` in bytes, for backends with a device.
    fn device_memory(&self) -> Option<(u64, u64)> {
        None
    }
    /// Brackets profiled steps: `true` starts a capture range for nsys/ncu and per-kernel timing,
    /// `false` stops them and returns the per-kernel timing table.
    fn profile(&mut self, on: bool) -> Result<Option<String>> {
        let _ = on;
        bail!("the {} backend has no kernels to profile; profiling needs --backend cuda", self.name())
    }
}

/// Folds one micro-batch's graph outputs into the per-layer router loads (both backends keep them
/// on the host) and, when given, into host-side fp32 gradient sums (the cpu backend; the cuda
/// backend sums on the device), and returns what the step reports.
pub(crate) fn fold_micro(
    plan: &vpmoe_compiler::Plan,
    mut out: BTreeMap<OutputName, Tensor>,
    batch: &Batch,
    grads: Option<&mut [Vec<f32>]>,
    loads: &mut BTreeMap<u32, Vec<u64>>,
) -> MicroOut {
    if let Some(grads) = grads {
        for (i, p) in plan.params.iter().enumerate() {
            if !p.trainable() {
                continue;
            }
            let g = out.remove(&OutputName::Grad(ParamId(i as u32))).expect("every trainable parameter has a gradient");
            grads[i].iter_mut().zip(g.f()).for_each(|(a, b)| *a += b);
        }
    }
    let mut m = MicroOut { loss: out[&OutputName::Loss].f()[0] as f64, ..Default::default() };
    m.token_loss = out[&OutputName::TokenLoss].f().to_vec();
    for ((l, mask), s) in m.token_loss.iter().zip(&batch.loss_mask).zip(&batch.span) {
        if *mask != 0 {
            m.span_loss[*s as usize] += *l as f64;
        }
    }
    for (name, t) in &out {
        match *name {
            OutputName::RouterLoad { layer } => {
                // Per-expert counts from the dispatch's row offsets.
                let n = t.i().windows(2).map(|w| (w[1] - w[0]) as u64);
                let acc = loads.entry(layer).or_insert_with(|| vec![0; t.i().len().saturating_sub(1)]);
                acc.iter_mut().zip(n).for_each(|(a, b)| *a += b);
            }
            OutputName::AuxLoss { layer } => m.aux.push((layer, t.f()[0])),
            _ => {}
        }
    }
    m
}

/// Refuses a training state whose tensor sizes do not fit the plan (before anything is replaced).
pub(crate) fn check_state(plan: &vpmoe_compiler::Plan, st: &crate::state::TrainState) -> Result<()> {
    check_weights(plan, st)?;
    for ((p, w), (m, v)) in plan.params.iter().zip(&st.master).zip(st.m.iter().zip(&st.v)) {
        let want = crate::state::TrainState::sizes(p);
        if (w.len(), m.len(), v.len()) != want {
            bail!(
                "state of {} has sizes {:?} (weights, first, second moment), the plan needs {want:?}",
                p.name,
                (w.len(), m.len(), v.len())
            );
        }
    }
    Ok(())
}

/// Refuses masters that are not the plan's (a decoder reads no moments).
pub(crate) fn check_weights(plan: &vpmoe_compiler::Plan, st: &crate::state::TrainState) -> Result<()> {
    let n = plan.params.len();
    if (st.master.len(), st.m.len(), st.v.len()) != (n, n, n) {
        bail!("a state of {} parameters; the plan has {n}", st.master.len());
    }
    for (p, w) in plan.params.iter().zip(&st.master) {
        if w.len() != p.numel as usize {
            bail!("weights of {} have {} elements, the plan needs {}", p.name, w.len(), p.numel);
        }
    }
    Ok(())
}
