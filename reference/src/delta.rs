//! A compressed delta matrix (codes + group parameters + salient FP16
//! columns), how it is made from a dense Δ, and how it is dequantized.
//! The memory layout is defined in [`crate::layout`].

use half::f16;
use rayon::prelude::*;

use crate::error::DeltaError;
use crate::layout::{pack_row, unpack_code, Bits, DeltaLayout};
use crate::quant::{fit_group, fit_min_max, GroupData, GroupParams};
use crate::salient::{top_k_channels, SalientSpec};

/// One packed delta matrix. The arrays' lengths always agree with `layout`
/// (checked by [`PackedDelta::new`]).
#[derive(Clone, Debug, PartialEq)]
pub struct PackedDelta {
    layout: DeltaLayout,
    codes: Vec<u32>,
    scales: Vec<f16>,
    offsets: Vec<f16>,
    salient_index: Vec<u32>,
    salient_values: Vec<f16>,
}

/// Borrowed view of a packed delta: what kernels and GEMV take.
#[derive(Clone, Copy, Debug)]
pub struct DeltaView<'a> {
    pub layout: DeltaLayout,
    pub codes: &'a [u32],
    pub scales: &'a [f16],
    pub offsets: &'a [f16],
    pub salient_index: &'a [u32],
    pub salient_values: &'a [f16],
}

impl PackedDelta {
    /// Builds a delta from its arrays, checking every invariant of the format:
    /// lengths, zero padding bits, finite non-negative scales, finite offsets,
    /// salient indices strictly increasing and in range.
    pub fn new(
        layout: DeltaLayout,
        codes: Vec<u32>,
        scales: Vec<f16>,
        offsets: Vec<f16>,
        salient_index: Vec<u32>,
        salient_values: Vec<f16>,
    ) -> Result<PackedDelta, DeltaError> {
        let delta = PackedDelta {
            layout,
            codes,
            scales,
            offsets,
            salient_index,
            salient_values,
        };
        delta.view().validate()?;
        Ok(delta)
    }

    pub fn layout(&self) -> &DeltaLayout {
        &self.layout
    }

    pub fn view(&self) -> DeltaView<'_> {
        DeltaView {
            layout: self.layout,
            codes: &self.codes,
            scales: &self.scales,
            offsets: &self.offsets,
            salient_index: &self.salient_index,
            salient_values: &self.salient_values,
        }
    }

    pub fn codes(&self) -> &[u32] {
        &self.codes
    }
    pub fn scales(&self) -> &[f16] {
        &self.scales
    }
    pub fn offsets(&self) -> &[f16] {
        &self.offsets
    }
    pub fn salient_index(&self) -> &[u32] {
        &self.salient_index
    }
    pub fn salient_values(&self) -> &[f16] {
        &self.salient_values
    }

    /// Dense Δ̂ as f32, `[out, in]` row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        self.view().dequantize()
    }
}

impl<'a> DeltaView<'a> {
    pub fn validate(&self) -> Result<(), DeltaError> {
        let l = &self.layout;
        // Re-validate the layout itself: a view may be built by hand.
        DeltaLayout::new(
            l.out_features,
            l.in_features,
            l.bits,
            l.group_size,
            l.salient,
        )?;
        let check = |array: &'static str, expected: usize, found: usize| {
            if expected == found {
                Ok(())
            } else {
                Err(DeltaError::Length {
                    array,
                    expected,
                    found,
                })
            }
        };
        check("codes", l.code_words(), self.codes.len())?;
        check("scales", l.group_params(), self.scales.len())?;
        check("offsets", l.group_params(), self.offsets.len())?;
        check("salient_index", l.salient, self.salient_index.len())?;
        check(
            "salient_values",
            l.salient_values(),
            self.salient_values.len(),
        )?;
        let mut previous: Option<u32> = None;
        for (position, &index) in self.salient_index.iter().enumerate() {
            if index as usize >= l.in_features || previous.is_some_and(|p| index <= p) {
                return Err(DeltaError::SalientIndex { position, index });
            }
            previous = Some(index);
        }
        let wpr = l.words_per_row();
        for row in 0..l.out_features {
            let words = &self.codes[row * wpr..(row + 1) * wpr];
            if !crate::layout::row_padding_is_zero(words, l.in_features, l.bits) {
                return Err(DeltaError::Padding { row });
            }
        }
        let ng = l.n_groups();
        for (i, (s, o)) in self.scales.iter().zip(self.offsets).enumerate() {
            if !s.is_finite() || s.to_f32() < 0.0 || !o.is_finite() {
                return Err(DeltaError::GroupParam {
                    row: i / ng,
                    group: i % ng,
                });
            }
        }
        Ok(())
    }

    /// Row `r`'s packed words.
    #[inline]
    pub fn row_codes(&self, r: usize) -> &'a [u32] {
        let wpr = self.layout.words_per_row();
        &self.codes[r * wpr..(r + 1) * wpr]
    }

    /// Group parameters of row `r`, group `g`.
    #[inline]
    pub fn group(&self, r: usize, g: usize) -> GroupParams {
        let i = r * self.layout.n_groups() + g;
        GroupParams {
            scale: self.scales[i],
            offset: self.offsets[i],
        }
    }

    /// Row `r` of Δ̂ as f32.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let l = &self.layout;
        let words = self.row_codes(r);
        for g in 0..l.n_groups() {
            let p = self.group(r, g).decoded(l.bits);
            let span = g * l.group_size..((g + 1) * l.group_size).min(l.in_features);
            for c in span {
                out[c] = p.dequantize(unpack_code(words, c, l.bits) as u8);
            }
        }
        for (i, &j) in self.salient_index.iter().enumerate() {
            out[j as usize] += self.salient_values[r * l.salient + i].to_f32();
        }
    }

    /// Dense Δ̂ as f32, `[out, in]` row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let n = self.layout.in_features;
        let mut dense = vec![0f32; self.layout.out_features * n];
        dense
            .par_chunks_mut(n)
            .enumerate()
            .for_each(|(r, row)| self.dequantize_row(r, row));
        dense
    }
}

/// How a matrix is compressed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CompressSettings {
    pub bits: Bits,
    /// Requested group size; `usize::MAX` (or anything ≥ in) means one group per row.
    pub group_size: usize,
    pub salient: SalientSpec,
    /// Fit group parameters by min/max round-to-nearest instead of the
    /// error-minimising search (the baseline the method is measured against).
    pub round_to_nearest: bool,
    /// Weight each entry's squared error by its channel's activation energy
    /// when fitting step sizes (needs calibration activations).
    pub activation_weighted_fit: bool,
}

impl CompressSettings {
    /// The method's default fit: error-minimising step search, unweighted.
    pub fn new(bits: Bits, group_size: usize, salient: SalientSpec) -> CompressSettings {
        CompressSettings {
            bits,
            group_size,
            salient,
            round_to_nearest: false,
            activation_weighted_fit: false,
        }
    }
}

/// Compresses a dense delta `Δ` (`[out, in]` row-major, f32).
///
/// `activation_energy[j] = ‖X[:, j]‖²` from calibration activations makes the
/// salient choice (and, if asked, the fit) activation-aware; without it the
/// method is data-free.
pub fn compress_matrix(
    delta: &[f32],
    out_features: usize,
    in_features: usize,
    settings: &CompressSettings,
    activation_energy: Option<&[f32]>,
) -> Result<PackedDelta, DeltaError> {
    let bits = settings.bits;
    let group = crate::salient::group_size_for(settings.group_size, in_features);
    let k = settings
        .salient
        .resolve(out_features, in_features, bits, group);
    let layout = DeltaLayout::new(out_features, in_features, bits, group, k)?;
    if delta.len() != out_features * in_features {
        return Err(DeltaError::Length {
            array: "delta",
            expected: out_features * in_features,
            found: delta.len(),
        });
    }
    if let Some(a) = activation_energy {
        if a.len() != in_features {
            return Err(DeltaError::Length {
                array: "activation_energy",
                expected: in_features,
                found: a.len(),
            });
        }
    }
    let fit_weights = activation_energy.filter(|_| settings.activation_weighted_fit);

    // Pass 1 (only when channels are to be chosen): quantize everything and
    // score each input channel by its (weighted) reconstruction error.
    let salient_index = if k == 0 {
        Vec::new()
    } else if k == in_features {
        (0..in_features as u32).collect()
    } else {
        let first = quantize_rows(delta, &layout, settings, fit_weights, None);
        let mut col_err = vec![0f64; in_features];
        for r in 0..out_features {
            for (c, e) in col_err.iter_mut().enumerate() {
                let d = f64::from(delta[r * in_features + c] - first.values[r * in_features + c]);
                *e += d * d;
            }
        }
        if let Some(a) = activation_energy {
            for (e, &a) in col_err.iter_mut().zip(a) {
                *e *= f64::from(a);
            }
        }
        top_k_channels(&col_err, k)
    };

    // Pass 2: refit every group without the salient channels.
    let mut include = vec![true; in_features];
    for &j in &salient_index {
        include[j as usize] = false;
    }
    let fitted = quantize_rows(delta, &layout, settings, fit_weights, Some(&include));
    let mut salient_values = vec![f16::ZERO; out_features * k];
    for r in 0..out_features {
        for (i, &j) in salient_index.iter().enumerate() {
            let at = r * in_features + j as usize;
            salient_values[r * k + i] = f16::from_f32(delta[at] - fitted.values[at]);
        }
    }
    PackedDelta::new(
        layout,
        fitted.codes,
        fitted.scales,
        fitted.offsets,
        salient_index,
        salient_values,
    )
}

struct Quantized {
    codes: Vec<u32>,
    scales: Vec<f16>,
    offsets: Vec<f16>,
    /// Dequantized Q(Δ), f32 `[out, in]`.
    values: Vec<f32>,
}

fn quantize_rows(
    delta: &[f32],
    layout: &DeltaLayout,
    settings: &CompressSettings,
    weights: Option<&[f32]>,
    include: Option<&[bool]>,
) -> Quantized {
    let (n, g, ng, wpr) = (
        layout.in_features,
        layout.group_size,
        layout.n_groups(),
        layout.words_per_row(),
    );
    let bits = layout.bits;
    let rows: Vec<(Vec<u32>, Vec<GroupParams>, Vec<f32>)> = delta
        .par_chunks(n)
        .map(|row| {
            let mut codes = vec![0u8; n];
            let mut params = Vec::with_capacity(ng);
            let mut values = vec![0f32; n];
            for gi in 0..ng {
                let span = gi * g..((gi + 1) * g).min(n);
                let data = GroupData {
                    values: &row[span.clone()],
                    weights: weights.map(|w| &w[span.clone()]),
                    include: include.map(|inc| &inc[span.clone()]),
                };
                let p = if settings.round_to_nearest {
                    fit_min_max(&data, bits)
                } else {
                    fit_group(&data, bits)
                };
                let d = p.decoded(bits);
                for c in span {
                    codes[c] = d.code_of(row[c]);
                    values[c] = d.dequantize(codes[c]);
                }
                params.push(p);
            }
            let mut words = vec![0u32; wpr];
            pack_row(&codes, bits, &mut words);
            (words, params, values)
        })
        .collect();
    let mut q = Quantized {
        codes: Vec::with_capacity(layout.code_words()),
        scales: Vec::with_capacity(layout.group_params()),
        offsets: Vec::with_capacity(layout.group_params()),
        values: Vec::with_capacity(delta.len()),
    };
    for (words, params, values) in rows {
        q.codes.extend_from_slice(&words);
        q.scales.extend(params.iter().map(|p| p.scale));
        q.offsets.extend(params.iter().map(|p| p.offset));
        q.values.extend_from_slice(&values);
    }
    q
}
