//! Numerics ladder rung 1: the reference VJPs ([`vpmoe_ir::backward`]) against central finite
//! differences of the reference forward ([`vpmoe_ir::reference`]), for every forward op on tiny
//! shapes, plus adjoint identities `⟨J u, v⟩ = ⟨u, Jᵀ v⟩` on larger shapes for the fused ops and
//! hand-composed chains (dense block → LM loss; router → experts → combine + aux loss).
//!
//! Objective: `L = Σ_i r_i·y_i` over every float output that carries gradient (random `r`,
//! accumulated in f64), so the upstream gradients are `dys = r`. Every element of every
//! differentiable input is perturbed by `±h` (h = 1e-2 of the tensor's rms unless a case says
//! otherwise) and `(L(x+h) − L(x−h)) / (x₊ − x₋)` is computed in f64 from the f32 forward; the
//! denominator uses the perturbed values actually stored in f32.
//!
//! Tolerance: an element passes when `|analytic − fd| ≤ RTOL·|fd| + ATOL·scale`, `scale` being
//! the largest gradient magnitude of that tensor. At these steps the FD error is dominated by the
//! f32 rounding of the forward's outputs (≈ 2⁻²⁴·|y| on each output an element moves, divided
//! by 2h), measured at 1e-5–4e-4·scale; truncation (`h²·f'''/6`) is smaller. A wrong formula
//! (a missing factor, term, transpose or head/group mix-up) gives errors of order the gradient
//! itself, far above ATOL. `max rel` in the reports is `|analytic − fd| / max(|fd|, 1e-3·scale)`.
//!
//! ReLU² is only C¹ and routing/top-k are piecewise constant: each case names its discrete
//! decisions (selected experts, dispatch rows, aux top-k, ReLU sign patterns), the harness
//! asserts they are identical at x₊, x₋ and x, and shrinks h (then fails loudly) when ±h would
//! flip one, so a flip can never silently produce a wrong FD.
//!
//! Run `cargo test -p vpmoe-ir --release --test gradcheck -- --nocapture --test-threads 1` to see
//! the per-tensor errors.

mod adjoint_identities;
mod attention;
mod chains;
mod decisions;
mod dense;
mod harness;
mod head;
mod helpers;
mod moe;
mod vjp;
mod zero_gradients;
