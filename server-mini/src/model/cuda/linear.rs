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
//!
//! A step prepares every tensor's part once, before its first launch
//! ([`prepare_linear`], called for all tensors by the decoder): the delta
//! list's device table (descriptors pointing into the experts' packed
//! deltas) and the row map, both kept by content in [`StepTables`] across
//! steps. So no table or map upload sits between the step's launches, and a
//! steady decode batch uploads none at all after its first step. A table
//! is reused only for the very experts (layouts and device addresses) it
//! was built from, and each step borrows those experts, so a reused table
//! never points at freed memory; experts are only added or removed between
//! steps (`&mut self`).

use std::collections::HashMap;

use half::f16;
use meswitch_ops::{
    blas, DeviceBase, DeviceDelta, DeviceExperts, DeviceRows, DeviceSlice, ExpertTableCache, Gpu,
};
use meswitch_reference::ShapeError;

use super::device_err;
use super::weights::DeviceMatrix;
use crate::model::ModelError;

/// Expert tables a [`StepTables`] keeps: a 7B model's 225 tensors for a
/// dozen or so expert sets before it starts over.
const EXPERT_TABLE_CAPACITY: usize = 4096;
/// Row maps a [`StepTables`] keeps (one per distinct batch composition).
const ROW_MAP_CAPACITY: usize = 256;

/// The device tables of the steps: expert descriptor tables
/// ([`ExpertTableCache`]) and row → expert maps, each uploaded once and
/// reused by every tensor and every later step that needs the same content.
/// Within a step most projections share a map (every active expert has a
/// delta for every projection), and a decode loop over a steady batch
/// repeats the same tables and maps step after step, so it uploads nothing
/// after its first step. Reuse is by content, so a stale entry is never
/// wrong, only unused; both parts start over when full, between steps.
pub(super) struct StepTables {
    experts: ExpertTableCache,
    index: HashMap<Vec<Option<u32>>, usize>,
    maps: Vec<DeviceRows>,
}

impl Default for StepTables {
    fn default() -> Self {
        StepTables {
            experts: ExpertTableCache::new(EXPERT_TABLE_CAPACITY),
            index: HashMap::new(),
            maps: Vec::new(),
        }
    }
}

impl StepTables {
    /// Called before a step prepares anything: the map indices a step holds
    /// stay valid until the next call.
    pub(super) fn start_step(&mut self) {
        if self.maps.len() >= ROW_MAP_CAPACITY {
            self.index.clear();
            self.maps.clear();
        }
    }

    /// The index of map `rows`, uploading it on first sight. `rows` names
    /// deltas below `n_experts`; the same content is valid for any table
    /// that long or longer (and every launch checks it against its table
    /// again), so the first upload serves every later user.
    fn intern(
        &mut self,
        gpu: &Gpu,
        rows: Vec<Option<u32>>,
        n_experts: usize,
    ) -> Result<usize, ModelError> {
        if let Some(&i) = self.index.get(&rows) {
            return Ok(i);
        }
        let d = DeviceRows::upload(gpu, &rows, n_experts)
            .map_err(|e| device_err("uploading a row map", e))?;
        self.maps.push(d);
        self.index.insert(rows, self.maps.len() - 1);
        Ok(self.maps.len() - 1)
    }

    fn get(&self, i: usize) -> Result<&DeviceRows, ModelError> {
        self.maps
            .get(i)
            .ok_or_else(|| ModelError::Device(format!("row map {i} was never prepared")))
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

/// One tensor's delta list and row map: the slots whose expert has a delta
/// for it (`has_delta[slot]`) become table entries 0, 1, … in slot order;
/// each row names its slot's entry, or none (no expert, base, or a dense
/// replacement: those rows take the base product, later overwritten).
///
/// ```text
///   has_delta: [T, F, T]      row_slot: [0, 0, -, 1, 2, 2, 0]
///   table:     [slot 0, slot 2]
///   rows:      [0, 0, -, -, 1, 1, 0]
/// ```
fn delta_rows(
    has_delta: &[bool],
    row_slot: &[Option<usize>],
) -> Result<(Vec<usize>, Vec<Option<u32>>), ModelError> {
    let mut table = Vec::new();
    let mut entry: Vec<Option<u32>> = vec![None; has_delta.len()];
    for (s, _) in has_delta.iter().enumerate().filter(|(_, &d)| d) {
        entry[s] = Some(table.len() as u32);
        table.push(s);
    }
    let rows = row_slot
        .iter()
        .map(|s| match s {
            Some(s) => entry.get(*s).copied().ok_or_else(|| {
                ModelError::Device(format!("row slot {s} outside {}", has_delta.len()))
            }),
            None => Ok(None),
        })
        .collect::<Result<_, _>>()?;
    Ok((table, rows))
}

/// A tensor's part of one step, made by [`prepare_linear`].
pub(super) struct PreparedLinear<'a> {
    base: &'a DeviceBase,
    table: DeviceExperts<'a>,
    /// This tensor's row map in the [`StepTables`].
    map: usize,
    /// (slot, its expert's dense replacement of this tensor).
    dense: Vec<(usize, &'a DeviceBase)>,
}

/// Uploads what [`multi_expert_linear`] needs for `base` over the step's
/// rows: `mats[s]` is slot `s`'s version of this tensor (`None` = base),
/// `row_slot` each row's slot.
pub(super) fn prepare_linear<'a>(
    gpu: &Gpu,
    base: &'a DeviceBase,
    mats: &[Option<&'a DeviceMatrix>],
    row_slot: &[Option<usize>],
    maps: &mut StepTables,
) -> Result<PreparedLinear<'a>, ModelError> {
    let (o, i) = (base.out_features, base.in_features);
    let mut dense = Vec::new();
    for (s, m) in mats.iter().enumerate() {
        if let Some(DeviceMatrix::Dense(w)) = m {
            ShapeError::check_expert_shape(s, (w.out_features, w.in_features), (o, i))?;
            dense.push((s, w));
        }
    }
    let has_delta: Vec<bool> = mats
        .iter()
        .map(|m| matches!(m, Some(DeviceMatrix::Delta(_))))
        .collect();
    let (slots, rows) = delta_rows(&has_delta, row_slot)?;
    let deltas: Vec<&DeviceDelta> = slots
        .iter()
        .filter_map(|&s| match mats[s] {
            Some(DeviceMatrix::Delta(d)) => Some(d),
            _ => None,
        })
        .collect();
    let table = DeviceExperts::new_cached(gpu, &deltas, &mut maps.experts)
        .map_err(|e| device_err("building the expert table", e))?;
    let map = maps.intern(gpu, rows, deltas.len())?;
    Ok(PreparedLinear {
        base,
        table,
        map,
        dense,
    })
}

/// `y[b] = x[b]·W_{slot(b)}ᵀ` for `x [rows, in]`, `y [rows, out]` FP16,
/// with the tensor's part prepared for this step's `row_slot`.
pub(super) fn multi_expert_linear(
    gpu: &Gpu,
    p: &PreparedLinear,
    maps: &StepTables,
    row_slot: &[Option<usize>],
    x: &DeviceSlice<f16>,
    y: &mut DeviceSlice<f16>,
) -> Result<(), ModelError> {
    let (o, i) = (p.base.out_features, p.base.in_features);
    let n = row_slot.len();
    ShapeError::check_len("linear x", n * i, x.len())?;
    ShapeError::check_len("linear y", n * o, y.len())?;
    let rows = maps.get(p.map)?;
    ShapeError::check_len("linear row map", n, rows.batch())?;
    meswitch_ops::multi_expert_gemv_device(gpu, p.base, &p.table, x, rows, y)
        .map_err(|e| device_err("multi-expert GEMV", e))?;

    for &(s, w) in &p.dense {
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
    use super::{delta_rows, runs};

    #[test]
    fn delta_rows_number_the_slots_with_a_delta_in_order() {
        let row_slot = [Some(0), Some(0), None, Some(1), Some(2), Some(2), Some(0)];
        let (table, rows) = delta_rows(&[true, false, true], &row_slot).unwrap();
        assert_eq!(table, vec![0, 2]);
        assert_eq!(
            rows,
            vec![Some(0), Some(0), None, None, Some(1), Some(1), Some(0)]
        );
        let (table, rows) = delta_rows(&[false, true, false], &row_slot).unwrap();
        assert_eq!(table, vec![1]);
        assert_eq!(rows, vec![None, None, None, Some(0), None, None, None]);
        let (table, rows) = delta_rows(&[false; 3], &row_slot).unwrap();
        assert!(table.is_empty() && rows.iter().all(Option::is_none));
        assert!(delta_rows(&[true], &[Some(1)]).is_err());
    }

    #[test]
    fn runs_cover_exactly_the_rows_of_a_slot() {
        let rows = [Some(0), Some(0), None, Some(1), Some(0), Some(1), Some(1)];
        assert_eq!(runs(&rows, 0), vec![(0, 2), (4, 5)]);
        assert_eq!(runs(&rows, 1), vec![(3, 4), (5, 7)]);
        assert!(runs(&rows, 2).is_empty());
        assert!(runs(&[], 0).is_empty());
    }
}
