//! The multi-expert linear on the device: one call per projection per step
//! over all rows, the device twin of [`crate::model::linear`].
//!
//! ```text
//!   step slots (distinct experts of the step):   0:a  1:b  2:c
//!   this tensor per slot:                        a: Delta  b: none  c: Dense
//!   rows → slot:            [0, 0, -, 1, 2, 2, 0]
//!   delta list for ops:     [a]          row_expert: [0, 0, -, -, -, -, 0]
//!   1. ops::multi_expert_gemv_device(base, [a], x, row_expert) → y, every row
//!      (base for rows without a delta, base + Δ̂ for rows of a)
//!   2. rows of c (runs of consecutive rows: [4, 6)) overwritten by
//!      cuBLAS y[4..6] = x[4..6]·W_cᵀ
//! ```
//!
//! `multi_expert_gemv_device` itself picks the fused kernel (≤ 64 rows,
//! `in % 128 == 0`), cuBLAS + delta kernel (prefill) or cuBLAS + dequantize
//! (other widths, e.g. SmolLM2's 576); see `ops/src/launch.rs`.

use std::collections::HashMap;

use half::f16;
use meswitch_ops::{blas, DeviceBase, DeviceDelta, DeviceExperts, DeviceRows, DeviceSlice, Gpu};
use meswitch_reference::ShapeError;

use super::device_err;
use super::weights::DeviceMatrix;
use crate::model::ModelError;

/// Row → expert maps already on the device, by content. Within a step most
/// projections see the same map (every active expert has a delta for every
/// projection), so it is uploaded once instead of seven times per layer.
#[derive(Default)]
pub(super) struct RowMaps {
    maps: HashMap<Vec<Option<u32>>, DeviceRows>,
}

impl RowMaps {
    fn get(
        &mut self,
        gpu: &Gpu,
        rows: Vec<Option<u32>>,
        n_experts: usize,
    ) -> Result<&DeviceRows, ModelError> {
        if !self.maps.contains_key(&rows) {
            let d = DeviceRows::upload(gpu, &rows, n_experts)
                .map_err(|e| device_err("uploading a row map", e))?;
            self.maps.insert(rows.clone(), d);
        }
        self.maps
            .get(&rows)
            .ok_or_else(|| ModelError::Device("row map cache lost an entry".into()))
    }
}

/// Runs of consecutive rows whose slot is `slot`, as `[start, end)`.
pub(super) fn runs(row_slot: &[Option<usize>], slot: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut b = 0;
    while b < row_slot.len() {
        if row_slot[b] != Some(slot) {
            b += 1;
            continue;
        }
        let start = b;
        while b < row_slot.len() && row_slot[b] == Some(slot) {
            b += 1;
        }
        out.push((start, b));
    }
    out
}

/// `y[b] = x[b]·W_{slot(b)}ᵀ` for `x [rows, in]`, `y [rows, out]` FP16;
/// `mats[s]` is slot `s`'s version of this tensor (`None` = base).
pub(super) fn multi_expert_linear(
    gpu: &Gpu,
    base: &DeviceBase,
    mats: &[Option<&DeviceMatrix>],
    row_slot: &[Option<usize>],
    x: &DeviceSlice<f16>,
    y: &mut DeviceSlice<f16>,
    maps: &mut RowMaps,
) -> Result<(), ModelError> {
    let (o, i) = (base.out_features, base.in_features);
    let n = row_slot.len();
    ShapeError::check_len("linear x", n * i, x.len())?;
    ShapeError::check_len("linear y", n * o, y.len())?;
    let mut deltas: Vec<&DeviceDelta> = Vec::new();
    let mut local: Vec<Option<u32>> = vec![None; mats.len()];
    for (s, m) in mats.iter().enumerate() {
        match m {
            Some(DeviceMatrix::Delta(d)) => {
                local[s] = Some(deltas.len() as u32);
                deltas.push(d);
            }
            Some(DeviceMatrix::Dense(w)) => {
                ShapeError::check_expert_shape(s, (w.out_features, w.in_features), (o, i))?;
            }
            None => {}
        }
    }
    let row_expert = row_slot
        .iter()
        .map(|s| match s {
            Some(s) => local
                .get(*s)
                .copied()
                .ok_or_else(|| ModelError::Device(format!("row slot {s} outside {}", mats.len()))),
            None => Ok(None),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let table =
        DeviceExperts::new(gpu, &deltas).map_err(|e| device_err("building the expert table", e))?;
    let rows = maps.get(gpu, row_expert, deltas.len())?;
    meswitch_ops::multi_expert_gemv_device(gpu, base, &table, x, rows, y)
        .map_err(|e| device_err("multi-expert GEMV", e))?;

    for (s, m) in mats.iter().enumerate() {
        let Some(DeviceMatrix::Dense(w)) = m else {
            continue;
        };
        for (a, b) in runs(row_slot, s) {
            let xs = x
                .try_slice(a * i..b * i)
                .ok_or_else(|| ModelError::Device(format!("x rows {a}..{b} out of range")))?;
            let mut ys = y
                .try_slice_mut(a * o..b * o)
                .ok_or_else(|| ModelError::Device(format!("y rows {a}..{b} out of range")))?;
            blas::linear_f16(gpu, &w.weights, o, i, &xs, b - a, &mut ys, false)
                .map_err(|e| device_err("cuBLAS product of a dense expert tensor", e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::runs;

    #[test]
    fn runs_cover_exactly_the_rows_of_a_slot() {
        let rows = [Some(0), Some(0), None, Some(1), Some(0), Some(1), Some(1)];
        assert_eq!(runs(&rows, 0), vec![(0, 2), (4, 5)]);
        assert_eq!(runs(&rows, 1), vec![(3, 4), (5, 7)]);
        assert!(runs(&rows, 2).is_empty());
        assert!(runs(&[], 0).is_empty());
    }
}
