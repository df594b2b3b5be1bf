//! Batched multi-expert GEMV, the oracle of the fused CUDA kernels.
//!
//! For a decode batch X `[batch, in]` where row `b` uses expert `e(b)` (or
//! none, base only):
//!
//! ```text
//!   Y[b, :] = X[b, :]·W_baseᵀ + X[b, :]·Δ̂_{e(b)}ᵀ        f32 accumulation
//! ```
//!
//! Each output row of the base and of every active expert is expanded once per
//! call and used for every batch row that needs it, mirroring how the kernel
//! reads each weight once per batch.

use half::f16;
use rayon::prelude::*;

use crate::delta::DeltaView;
use crate::error::ShapeError;

/// Dense FP16 base weight `[out, in]` row-major.
#[derive(Clone, Copy, Debug)]
pub struct BaseView<'a> {
    pub out_features: usize,
    pub in_features: usize,
    pub weights: &'a [f16],
}

fn check_inputs(
    out_features: usize,
    in_features: usize,
    experts: &[DeltaView],
    x_len: usize,
    row_expert: &[Option<u32>],
    y_len: usize,
) -> Result<(), ShapeError> {
    let batch = row_expert.len();
    ShapeError::check_len("x", batch * in_features, x_len)?;
    ShapeError::check_len("y", batch * out_features, y_len)?;
    for (i, e) in experts.iter().enumerate() {
        let shape = (e.layout.out_features, e.layout.in_features);
        ShapeError::check_expert_shape(i, shape, (out_features, in_features))?;
    }
    ShapeError::check_row_experts(row_expert, experts.len())
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Core: `y[b, r]` for all rows, f32 in and out. `base = None` computes the
/// delta part only (`Y = X·Δ̂ᵀ`).
fn gemv_f32(
    base: Option<&BaseView>,
    out_features: usize,
    in_features: usize,
    experts: &[DeltaView],
    x: &[f32],
    row_expert: &[Option<u32>],
) -> Vec<f32> {
    let batch = row_expert.len();
    let mut active: Vec<u32> = row_expert.iter().flatten().copied().collect();
    active.sort_unstable();
    active.dedup();
    // Column r of the result, for every output row r.
    let columns: Vec<Vec<f32>> = (0..out_features)
        .into_par_iter()
        .map(|r| {
            let mut acc = vec![0f32; batch];
            let mut row = vec![0f32; in_features];
            if let Some(base) = base {
                for (w, o) in base.weights[r * in_features..(r + 1) * in_features]
                    .iter()
                    .zip(row.iter_mut())
                {
                    *o = w.to_f32();
                }
                for (b, a) in acc.iter_mut().enumerate() {
                    *a = dot(&row, &x[b * in_features..(b + 1) * in_features]);
                }
            }
            for &e in &active {
                experts[e as usize].dequantize_row(r, &mut row);
                for (b, a) in acc.iter_mut().enumerate() {
                    if row_expert[b] == Some(e) {
                        *a += dot(&row, &x[b * in_features..(b + 1) * in_features]);
                    }
                }
            }
            acc
        })
        .collect();
    let mut y = vec![0f32; batch * out_features];
    for (r, col) in columns.iter().enumerate() {
        for (b, v) in col.iter().enumerate() {
            y[b * out_features + r] = *v;
        }
    }
    y
}

/// `Y = X·W_baseᵀ + X·Δ̂_{e(b)}ᵀ` with f32 input and output (the runtime's CPU
/// path and the precise oracle for tests).
pub fn multi_expert_gemv_f32(
    base: &BaseView,
    experts: &[DeltaView],
    x: &[f32],
    row_expert: &[Option<u32>],
    y: &mut [f32],
) -> Result<(), ShapeError> {
    let (o, i) = (base.out_features, base.in_features);
    ShapeError::check_len("base", o * i, base.weights.len())?;
    check_inputs(o, i, experts, x.len(), row_expert, y.len())?;
    y.copy_from_slice(&gemv_f32(Some(base), o, i, experts, x, row_expert));
    Ok(())
}

/// The fused kernel's signature: FP16 activations and base, packed deltas,
/// f32 accumulation, FP16 output.
pub fn multi_expert_gemv(
    base: &BaseView,
    experts: &[DeltaView],
    x: &[f16],
    row_expert: &[Option<u32>],
    y: &mut [f16],
) -> Result<(), ShapeError> {
    let (o, i) = (base.out_features, base.in_features);
    ShapeError::check_len("base", o * i, base.weights.len())?;
    check_inputs(o, i, experts, x.len(), row_expert, y.len())?;
    let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    let yf = gemv_f32(Some(base), o, i, experts, &xf, row_expert);
    for (d, s) in y.iter_mut().zip(yf) {
        *d = f16::from_f32(s);
    }
    Ok(())
}

/// The delta-only kernel: `Y += X·Δ̂_{e(b)}ᵀ` into an existing FP16 output
/// (whose base part came from elsewhere, e.g. cuBLAS). Rows with no expert
/// are left untouched. The sum is formed in f32 and rounded once.
pub fn delta_gemv_accumulate(
    out_features: usize,
    in_features: usize,
    experts: &[DeltaView],
    x: &[f16],
    row_expert: &[Option<u32>],
    y: &mut [f16],
) -> Result<(), ShapeError> {
    check_inputs(
        out_features,
        in_features,
        experts,
        x.len(),
        row_expert,
        y.len(),
    )?;
    let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    let delta = gemv_f32(None, out_features, in_features, experts, &xf, row_expert);
    for (b, e) in row_expert.iter().enumerate() {
        if e.is_none() {
            continue;
        }
        let span = b * out_features..(b + 1) * out_features;
        for (d, s) in y[span.clone()].iter_mut().zip(&delta[span]) {
            *d = f16::from_f32(d.to_f32() + s);
        }
    }
    Ok(())
}

/// The dequantize kernel: Δ̂ as dense FP16, or `W_base + Δ̂` when a base is
/// given (the expert's full weight, e.g. for prefill through cuBLAS).
pub fn dequantize_f16(
    delta: &DeltaView,
    base: Option<&BaseView>,
    out: &mut [f16],
) -> Result<(), ShapeError> {
    let (o, i) = (delta.layout.out_features, delta.layout.in_features);
    ShapeError::check_len("out", o * i, out.len())?;
    if let Some(b) = base {
        ShapeError::check_len("base", o * i, b.weights.len())?;
        ShapeError::check_expert_shape(0, (o, i), (b.out_features, b.in_features))?;
    }
    out.par_chunks_mut(i).enumerate().for_each(|(r, dst)| {
        let mut row = vec![0f32; i];
        delta.dequantize_row(r, &mut row);
        for (c, d) in dst.iter_mut().enumerate() {
            let w = base.map_or(0.0, |b| b.weights[r * i + c].to_f32());
            *d = f16::from_f32(w + row[c]);
        }
    });
    Ok(())
}
