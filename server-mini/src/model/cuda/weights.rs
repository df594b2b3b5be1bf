//! The base model and the experts on the device.
//!
//! Base: every matrix an [`ops::DeviceBase`] (FP16 `[out, in]` row-major,
//! the host [`Weights`] layout as is), norms f32, the embedding table FP16
//! `[vocab, hidden]` (also the lm_head when tied).
//!
//! Experts: each tensor the expert carries, as it carries it: a packed
//! delta stays packed ([`ops::DeviceDelta`], byte-for-byte the file's
//! layout), a dense replacement becomes a [`DeviceBase`]. Tensors the
//! expert leaves out are `None` and its rows use the base.

use meswitch_ops::{DeviceBase, DeviceDelta, Gpu};
use meswitch_reference::PackedDelta;

use super::device_err;
use crate::model::experts::{Expert, ExpertMatrix};
use crate::model::weights::{Matrix, Weights};
use crate::model::{ModelConfig, ModelError};

/// Uploads an f32 vector of the expected length.
pub(super) fn upload_vector(
    gpu: &Gpu,
    what: &str,
    v: &[f32],
    len: usize,
) -> Result<meswitch_ops::DeviceSlice<f32>, ModelError> {
    if v.len() != len || len == 0 {
        return Err(ModelError::TensorShape {
            name: what.to_string(),
            expected: vec![len],
            found: vec![v.len()],
        });
    }
    meswitch_ops::upload(gpu, v).map_err(|e| device_err("uploading a norm weight", e))
}

fn upload_matrix(gpu: &Gpu, m: &Matrix) -> Result<DeviceBase, ModelError> {
    DeviceBase::upload(gpu, &m.view()).map_err(|e| device_err("uploading a weight matrix", e))
}

pub(super) struct DeviceLayer {
    pub input_norm: meswitch_ops::DeviceSlice<f32>,
    pub post_norm: meswitch_ops::DeviceSlice<f32>,
    /// Indexed by [`crate::model::weights::Proj::index`].
    pub proj: Vec<DeviceBase>,
}

pub(super) struct DeviceWeights {
    /// `[vocab, hidden]`.
    pub embed: DeviceBase,
    pub layers: Vec<DeviceLayer>,
    pub final_norm: meswitch_ops::DeviceSlice<f32>,
    /// The final norm on the host too: `hidden_states` at `n_layers`
    /// applies it in f32 on the host, as the CPU backend does.
    pub final_norm_host: Vec<f32>,
    /// `None` when tied to `embed`.
    pub lm_head: Option<DeviceBase>,
}

impl DeviceWeights {
    /// Uploads the host weights, freeing each layer's host copy once it is
    /// on the device.
    pub fn upload(gpu: &Gpu, w: Weights, c: &ModelConfig) -> Result<DeviceWeights, ModelError> {
        let hd = c.hidden_size;
        let Weights {
            embed,
            layers,
            final_norm,
            lm_head,
        } = w;
        let mut out = Vec::with_capacity(layers.len());
        for (l, lw) in layers.into_iter().enumerate() {
            out.push(DeviceLayer {
                input_norm: upload_vector(
                    gpu,
                    &format!("layer {l} input norm"),
                    &lw.input_norm,
                    hd,
                )?,
                post_norm: upload_vector(gpu, &format!("layer {l} post norm"), &lw.post_norm, hd)?,
                proj: lw
                    .proj
                    .iter()
                    .map(|m| upload_matrix(gpu, m))
                    .collect::<Result<_, _>>()?,
            });
        }
        Ok(DeviceWeights {
            embed: upload_matrix(gpu, &embed)?,
            layers: out,
            final_norm: upload_vector(gpu, "final norm", &final_norm, hd)?,
            final_norm_host: final_norm,
            lm_head: lm_head
                .as_ref()
                .map(|m| upload_matrix(gpu, m))
                .transpose()?,
        })
    }

    pub fn lm_head(&self) -> &DeviceBase {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Device bytes of every weight (FP16 matrices, f32 norms).
    pub fn bytes(&self) -> usize {
        let norms = (2 * self.layers.len() + 1) * self.final_norm_host.len() * 4;
        let matrices: usize = self
            .layers
            .iter()
            .flat_map(|l| l.proj.iter())
            .chain(std::iter::once(&self.embed))
            .chain(self.lm_head.iter())
            .map(DeviceBase::bytes)
            .sum();
        norms + matrices
    }
}

/// An expert's version of one matrix, on the device. (A few hundred per
/// expert: the size difference of the variants costs nothing worth a box.)
#[allow(clippy::large_enum_variant)]
pub(super) enum DeviceMatrix {
    Delta(DeviceDelta),
    Dense(DeviceBase),
}

impl DeviceMatrix {
    fn upload(gpu: &Gpu, m: &ExpertMatrix) -> Result<DeviceMatrix, ModelError> {
        Ok(match m {
            ExpertMatrix::Delta(d) => DeviceMatrix::Delta(
                DeviceDelta::upload(gpu, &d.view())
                    .map_err(|e| device_err("uploading an expert delta", e))?,
            ),
            ExpertMatrix::Dense(m) => DeviceMatrix::Dense(upload_matrix(gpu, m)?),
        })
    }

    pub fn bytes(&self) -> usize {
        match self {
            DeviceMatrix::Delta(d) => d.device_bytes(),
            DeviceMatrix::Dense(m) => m.bytes(),
        }
    }
}

#[derive(Default)]
pub(super) struct DeviceExpertLayer {
    pub input_norm: Option<meswitch_ops::DeviceSlice<f32>>,
    pub post_norm: Option<meswitch_ops::DeviceSlice<f32>>,
    pub proj: [Option<DeviceMatrix>; 7],
}

pub(super) struct DeviceExpert {
    pub layers: Vec<DeviceExpertLayer>,
    pub final_norm: Option<meswitch_ops::DeviceSlice<f32>>,
    /// The expert's lm_head as [`Expert::lm_head`] resolves it (its
    /// embeddings when tied). Embedding rows come from the host copy of the
    /// expert (a few rows per step, see `decoder.rs`).
    pub lm_head: Option<DeviceMatrix>,
}

impl DeviceExpert {
    pub fn upload(gpu: &Gpu, e: &Expert, c: &ModelConfig) -> Result<DeviceExpert, ModelError> {
        let hd = c.hidden_size;
        let norm = |what: String, v: &Option<Vec<f32>>| {
            v.as_ref()
                .map(|v| upload_vector(gpu, &what, v, hd))
                .transpose()
        };
        if e.layers.len() != c.num_layers {
            return Err(ModelError::Expert(format!(
                "expert {} has {} layers, the model {}",
                e.name,
                e.layers.len(),
                c.num_layers
            )));
        }
        let mut layers = Vec::with_capacity(e.layers.len());
        for (l, el) in e.layers.iter().enumerate() {
            let mut proj: [Option<DeviceMatrix>; 7] = Default::default();
            for (dst, src) in proj.iter_mut().zip(&el.proj) {
                *dst = src
                    .as_ref()
                    .map(|m| DeviceMatrix::upload(gpu, m))
                    .transpose()?;
            }
            layers.push(DeviceExpertLayer {
                input_norm: norm(format!("{}: layer {l} input norm", e.name), &el.input_norm)?,
                post_norm: norm(format!("{}: layer {l} post norm", e.name), &el.post_norm)?,
                proj,
            });
        }
        Ok(DeviceExpert {
            layers,
            final_norm: norm(format!("{}: final norm", e.name), &e.final_norm)?,
            lm_head: e
                .lm_head()
                .map(|m| DeviceMatrix::upload(gpu, m))
                .transpose()?,
        })
    }

    /// Device bytes of everything this expert holds.
    pub fn bytes(&self) -> usize {
        let norm =
            |n: &Option<meswitch_ops::DeviceSlice<f32>>| n.as_ref().map_or(0, |v| v.len() * 4);
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                norm(&l.input_norm)
                    + norm(&l.post_norm)
                    + l.proj
                        .iter()
                        .flatten()
                        .map(DeviceMatrix::bytes)
                        .sum::<usize>()
            })
            .sum();
        layers + norm(&self.final_norm) + self.lm_head.as_ref().map_or(0, DeviceMatrix::bytes)
    }
}

/// Row `tok` of an expert's dense embedding table, in f32.
pub(super) fn dense_embed_row(m: &Matrix, tok: usize, out: &mut [f32]) -> Result<(), ModelError> {
    let n = out.len();
    let row = m
        .weights
        .get(tok * n..(tok + 1) * n)
        .filter(|_| m.in_features == n)
        .ok_or_else(|| embed_shape(tok, n, m.out_features, m.in_features))?;
    for (o, w) in out.iter_mut().zip(row) {
        *o = w.to_f32();
    }
    Ok(())
}

/// Row `tok` of an expert's embedding delta Δ̂, in f32 (the base row is
/// added on the device).
pub(super) fn delta_embed_row(
    d: &PackedDelta,
    tok: usize,
    out: &mut [f32],
) -> Result<(), ModelError> {
    let l = d.layout();
    if tok >= l.out_features || l.in_features != out.len() {
        return Err(embed_shape(tok, out.len(), l.out_features, l.in_features));
    }
    d.view().dequantize_row(tok, out);
    Ok(())
}

fn embed_shape(tok: usize, hidden: usize, out: usize, inp: usize) -> ModelError {
    ModelError::TensorShape {
        name: format!("expert embedding (row {tok} requested)"),
        expected: vec![tok + 1, hidden],
        found: vec![out, inp],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meswitch_reference::{compress_matrix, Bits, CompressSettings, SalientSpec};

    #[test]
    fn delta_embed_rows_are_the_dequantized_rows_and_bad_rows_are_errors() {
        let (vocab, hidden) = (5, 64);
        let d: Vec<f32> = (0..vocab * hidden)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 1e-3)
            .collect();
        let settings = CompressSettings::new(Bits::Two, 32, SalientSpec::Count(1));
        let packed = compress_matrix(&d, vocab, hidden, &settings, None).unwrap();
        let full = packed.dequantize();
        let mut row = vec![f32::NAN; hidden];
        for tok in 0..vocab {
            delta_embed_row(&packed, tok, &mut row).unwrap();
            assert_eq!(row, full[tok * hidden..(tok + 1) * hidden]);
        }
        assert!(delta_embed_row(&packed, vocab, &mut row).is_err());
        assert!(delta_embed_row(&packed, 0, &mut row[..hidden - 1]).is_err());
    }
}
