//! The multi-expert linear op of the runtime: every projection of the model
//! goes through [`multi_expert_linear`], so one call serves a batch whose
//! rows use different experts (or none).
//!
//! Semantics are those of [`meswitch_reference::multi_expert_gemv_f32`]
//! (f32 activations in and out, FP16 base, f32 accumulation), extended by one
//! case the reference does not cover: an expert that carries a *dense*
//! replacement of the tensor (e.g. its own lm_head) instead of a delta.
//!
//! ```text
//!   row b, expert e(b):   none       ->  y_b = x_b·W_baseᵀ
//!                         Delta(Δ̂)   ->  y_b = x_b·W_baseᵀ + x_b·Δ̂ᵀ
//!                         Dense(W_e) ->  y_b = x_b·W_eᵀ
//! ```
//!
//! The CPU path reads each base row once per call for all rows that use the
//! base and dequantizes each active delta row once for all rows of that
//! expert, like the fused kernel; the inner dots are [`super::kernels`].

use half::f16;
use meswitch_reference::{BaseView, DeltaView, ShapeError};
use rayon::prelude::*;

use super::kernels::{dot_f32, dots_f16};

/// Output rows per parallel task: large enough that scheduling overhead is
/// negligible next to `ROW_CHUNK · in` multiply-adds, small enough that a
/// 576-row matrix still splits across both cores.
const ROW_CHUNK: usize = 32;

/// What one expert contributes to one linear tensor.
#[derive(Clone, Copy, Debug)]
pub enum ExpertLinear<'a> {
    /// Rows of this expert use `W_base + Δ̂`.
    Delta(DeltaView<'a>),
    /// Rows of this expert use this weight instead of the base.
    Dense(BaseView<'a>),
}

impl ExpertLinear<'_> {
    fn shape(&self) -> (usize, usize) {
        match self {
            ExpertLinear::Delta(d) => (d.layout.out_features, d.layout.in_features),
            ExpertLinear::Dense(w) => (w.out_features, w.in_features),
        }
    }
}

/// `Y[b] = X[b]·W_{e(b)}ᵀ` for the batch `X [batch, in]` (row-major), where
/// `row_expert[b]` indexes `experts`. See the module comment for the cases.
pub fn multi_expert_linear(
    base: &BaseView,
    experts: &[ExpertLinear],
    x: &[f32],
    row_expert: &[Option<u32>],
    y: &mut [f32],
) -> Result<(), ShapeError> {
    let (out, inp) = (base.out_features, base.in_features);
    let batch = row_expert.len();
    ShapeError::check_len("base", out * inp, base.weights.len())?;
    ShapeError::check_len("x", batch * inp, x.len())?;
    ShapeError::check_len("y", batch * out, y.len())?;
    for (i, e) in experts.iter().enumerate() {
        ShapeError::check_expert_shape(i, e.shape(), (out, inp))?;
        if let ExpertLinear::Dense(w) = e {
            ShapeError::check_len("expert dense weight", out * inp, w.weights.len())?;
        }
    }
    ShapeError::check_row_experts(row_expert, experts.len())?;

    let rows_of = |pred: &dyn Fn(Option<u32>) -> bool| -> Vec<usize> {
        (0..batch).filter(|&b| pred(row_expert[b])).collect()
    };
    let base_rows = rows_of(&|e| match e {
        None => true,
        Some(e) => matches!(experts[e as usize], ExpertLinear::Delta(_)),
    });
    if !base_rows.is_empty() {
        let part = dense_rows(base.weights, out, inp, x, &base_rows);
        scatter(&part, &base_rows, out, y, false);
    }
    for (e, expert) in experts.iter().enumerate() {
        let rows = rows_of(&|r| r == Some(e as u32));
        if rows.is_empty() {
            continue;
        }
        match expert {
            ExpertLinear::Dense(w) => {
                let part = dense_rows(w.weights, out, inp, x, &rows);
                scatter(&part, &rows, out, y, false);
            }
            ExpertLinear::Delta(d) => {
                let part = delta_rows(d, x, &rows);
                scatter(&part, &rows, out, y, true);
            }
        }
    }
    Ok(())
}

/// `part[r·rows + i] = W[r] · x[rows[i]]`: output-row-major so each task
/// writes one contiguous slice.
fn dense_rows(w: &[f16], out: usize, inp: usize, x: &[f32], rows: &[usize]) -> Vec<f32> {
    let xs: Vec<&[f32]> = rows.iter().map(|&b| &x[b * inp..(b + 1) * inp]).collect();
    let n = rows.len();
    let mut part = vec![0f32; out * n];
    part.par_chunks_mut(ROW_CHUNK * n)
        .enumerate()
        .for_each(|(chunk, dst)| {
            for (k, o) in dst.chunks_mut(n).enumerate() {
                let r = chunk * ROW_CHUNK + k;
                dots_f16(&w[r * inp..(r + 1) * inp], &xs, o);
            }
        });
    part
}

/// `part[r·rows + i] = Δ̂[r] · x[rows[i]]`, each Δ̂ row dequantized once.
fn delta_rows(d: &DeltaView, x: &[f32], rows: &[usize]) -> Vec<f32> {
    let (out, inp) = (d.layout.out_features, d.layout.in_features);
    let n = rows.len();
    let mut part = vec![0f32; out * n];
    part.par_chunks_mut(ROW_CHUNK * n)
        .enumerate()
        .for_each(|(chunk, dst)| {
            let mut row = vec![0f32; inp];
            for (k, o) in dst.chunks_mut(n).enumerate() {
                let r = chunk * ROW_CHUNK + k;
                d.dequantize_row(r, &mut row);
                for (v, &b) in o.iter_mut().zip(rows) {
                    *v = dot_f32(&row, &x[b * inp..(b + 1) * inp]);
                }
            }
        });
    part
}

fn scatter(part: &[f32], rows: &[usize], out: usize, y: &mut [f32], add: bool) {
    let n = rows.len();
    for (i, &b) in rows.iter().enumerate() {
        let dst = &mut y[b * out..(b + 1) * out];
        for (r, d) in dst.iter_mut().enumerate() {
            let v = part[r * n + i];
            *d = if add { *d + v } else { v };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meswitch_reference::{
        compress_matrix, multi_expert_gemv_f32, Bits, CompressSettings, PackedDelta, SalientSpec,
    };
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};

    fn random_delta(rng: &mut impl Rng, out: usize, inp: usize, bits: Bits) -> PackedDelta {
        let d: Vec<f32> = (0..out * inp)
            .map(|_| rng.random_range(-0.05..0.05))
            .collect();
        let s = CompressSettings::new(bits, 32, SalientSpec::Count(inp.min(3)));
        compress_matrix(&d, out, inp, &s, None).unwrap()
    }

    fn close(a: &[f32], b: &[f32]) -> bool {
        // Both sum ~in products of magnitude ≤ 1 in f32, in different orders.
        a.iter()
            .zip(b)
            .all(|(x, y)| (x - y).abs() <= 1e-4 * (1.0 + y.abs()))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Delta experts and base rows agree with the reference oracle; a
        /// dense-expert row agrees with the oracle run on that dense weight.
        #[test]
        fn matches_reference(out in 1usize..70, inp in 1usize..90, batch in 1usize..7, seed in any::<u64>()) {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let w: Vec<f16> = (0..out * inp).map(|_| f16::from_f32(rng.random_range(-1.0..1.0))).collect();
            let dense: Vec<f16> = (0..out * inp).map(|_| f16::from_f32(rng.random_range(-1.0..1.0))).collect();
            let base = BaseView { out_features: out, in_features: inp, weights: &w };
            let dense_view = BaseView { out_features: out, in_features: inp, weights: &dense };
            let deltas = [random_delta(&mut rng, out, inp, Bits::Two), random_delta(&mut rng, out, inp, Bits::Four)];
            let experts = [ExpertLinear::Delta(deltas[0].view()), ExpertLinear::Dense(dense_view), ExpertLinear::Delta(deltas[1].view())];
            let x: Vec<f32> = (0..batch * inp).map(|_| rng.random_range(-1.0..1.0)).collect();
            let row_expert: Vec<Option<u32>> = (0..batch).map(|_| match rng.random_range(0..4u32) { 3 => None, e => Some(e) }).collect();
            let mut y = vec![f32::NAN; batch * out];
            multi_expert_linear(&base, &experts, &x, &row_expert, &mut y).unwrap();

            let delta_views = [deltas[0].view(), deltas[1].view()];
            for b in 0..batch {
                let xb = &x[b * inp..(b + 1) * inp];
                let mut want = vec![0f32; out];
                match row_expert[b] {
                    Some(1) => multi_expert_gemv_f32(&dense_view, &[], xb, &[None], &mut want).unwrap(),
                    Some(0) => multi_expert_gemv_f32(&base, &delta_views, xb, &[Some(0)], &mut want).unwrap(),
                    Some(_) => multi_expert_gemv_f32(&base, &delta_views, xb, &[Some(1)], &mut want).unwrap(),
                    None => multi_expert_gemv_f32(&base, &delta_views, xb, &[None], &mut want).unwrap(),
                }
                prop_assert!(close(&y[b * out..(b + 1) * out], &want), "row {b} expert {:?}", row_expert[b]);
            }
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let w = vec![f16::ZERO; 6];
        let base = BaseView {
            out_features: 2,
            in_features: 3,
            weights: &w,
        };
        let mut y = vec![0f32; 2];
        assert!(multi_expert_linear(&base, &[], &[0.0; 3], &[Some(0)], &mut y).is_err());
        assert!(multi_expert_linear(&base, &[], &[0.0; 2], &[None], &mut y).is_err());
        let small = vec![f16::ZERO; 4];
        let other = BaseView {
            out_features: 2,
            in_features: 2,
            weights: &small,
        };
        assert!(multi_expert_linear(
            &base,
            &[ExpertLinear::Dense(other)],
            &[0.0; 3],
            &[Some(0)],
            &mut y
        )
        .is_err());
    }
}
