//! Experts as the runtime holds them: each tensor of an expert file placed
//! in the decoder structure, so the forward pass finds "expert e's q_proj of
//! layer 3" without name lookups.

use std::collections::BTreeMap;
use std::path::Path;

use half::f16;
use meswitch_reference::container::{
    read_expert, read_expert_bytes, BaseIdentity, ExpertFile, ExpertTensor,
};
use meswitch_reference::PackedDelta;

use super::linear::ExpertLinear;
use super::weights::{names, Matrix, Proj};
use super::{ModelConfig, ModelError};

/// An expert's version of one matrix.
pub enum ExpertMatrix {
    Delta(PackedDelta),
    Dense(Matrix),
}

impl ExpertMatrix {
    pub fn linear(&self) -> ExpertLinear<'_> {
        match self {
            ExpertMatrix::Delta(d) => ExpertLinear::Delta(d.view()),
            ExpertMatrix::Dense(m) => ExpertLinear::Dense(m.view()),
        }
    }

    /// Row `r` of the expert's full matrix (base + Δ̂, or its dense row),
    /// for embedding lookups.
    pub fn row(&self, base: &Matrix, r: usize, out: &mut [f32]) {
        let n = base.in_features;
        match self {
            ExpertMatrix::Dense(m) => {
                for (o, w) in out.iter_mut().zip(&m.weights[r * n..(r + 1) * n]) {
                    *o = w.to_f32();
                }
            }
            ExpertMatrix::Delta(d) => {
                d.view().dequantize_row(r, out);
                for (o, w) in out.iter_mut().zip(&base.weights[r * n..(r + 1) * n]) {
                    *o += w.to_f32();
                }
            }
        }
    }
}

#[derive(Default)]
pub struct ExpertLayer {
    pub input_norm: Option<Vec<f32>>,
    pub post_norm: Option<Vec<f32>>,
    /// Indexed by [`Proj::index`]; `None` = this expert uses the base.
    pub proj: [Option<ExpertMatrix>; 7],
}

pub struct Expert {
    pub name: String,
    pub embed: Option<ExpertMatrix>,
    pub layers: Vec<ExpertLayer>,
    pub final_norm: Option<Vec<f32>>,
    /// The expert's lm_head. When the base ties lm_head to the embeddings
    /// and the expert changes the embeddings, this is `None` and
    /// [`Expert::lm_head`] answers with the embeddings.
    pub lm_head: Option<ExpertMatrix>,
    tied: bool,
}

impl Expert {
    pub fn lm_head(&self) -> Option<&ExpertMatrix> {
        match &self.lm_head {
            Some(m) => Some(m),
            None if self.tied => self.embed.as_ref(),
            None => None,
        }
    }

    /// Reads an expert file and checks it against the base's identity and
    /// tensor shapes; a file made for another base is an error.
    pub fn open(
        path: &Path,
        config: &ModelConfig,
        base: &BaseIdentity,
        base_shapes: &BTreeMap<String, Vec<usize>>,
    ) -> Result<Expert, ModelError> {
        let file = read_expert(path).map_err(|e| ModelError::Expert(e.to_string()))?;
        Expert::from_file(file, config, base, base_shapes)
    }

    pub fn from_file(
        file: ExpertFile,
        config: &ModelConfig,
        base: &BaseIdentity,
        base_shapes: &BTreeMap<String, Vec<usize>>,
    ) -> Result<Expert, ModelError> {
        file.check_base(base, base_shapes)
            .map_err(|e| ModelError::Expert(e.to_string()))?;
        let name = file.header.expert_name.clone();
        let mut expert = Expert {
            name: name.clone(),
            embed: None,
            layers: (0..config.num_layers)
                .map(|_| ExpertLayer::default())
                .collect(),
            final_norm: None,
            lm_head: None,
            tied: config.tie_word_embeddings && !base_shapes.contains_key(names::LM_HEAD),
        };
        for (tensor_name, tensor) in file.tensors {
            expert.place(&name, &tensor_name, tensor, config)?;
        }
        Ok(expert)
    }

    fn place(
        &mut self,
        expert: &str,
        name: &str,
        tensor: ExpertTensor,
        c: &ModelConfig,
    ) -> Result<(), ModelError> {
        let bad = |why: &str| ModelError::Expert(format!("expert {expert}: tensor {name}: {why}"));
        let matrix = |t: ExpertTensor| -> Result<ExpertMatrix, ModelError> {
            Ok(match t {
                ExpertTensor::Delta(d) => ExpertMatrix::Delta(d),
                ExpertTensor::Dense { shape, values } => {
                    let [o, i] = shape[..] else {
                        return Err(bad("a dense matrix must be 2-D"));
                    };
                    ExpertMatrix::Dense(Matrix {
                        out_features: o,
                        in_features: i,
                        weights: values,
                        ggml: None,
                    })
                }
            })
        };
        let vector = |t: ExpertTensor| -> Result<Vec<f32>, ModelError> {
            match t {
                ExpertTensor::Dense { values, .. } => {
                    Ok(values.iter().map(|v: &f16| v.to_f32()).collect())
                }
                ExpertTensor::Delta(_) => Err(bad("a norm cannot be a compressed delta")),
            }
        };
        match name {
            names::EMBED => self.embed = Some(matrix(tensor)?),
            names::LM_HEAD => self.lm_head = Some(matrix(tensor)?),
            names::FINAL_NORM => self.final_norm = Some(vector(tensor)?),
            _ => {
                let (layer, slot) = parse_layer_name(name, c.num_layers)
                    .ok_or_else(|| bad("not a tensor of this model's forward pass"))?;
                let l = &mut self.layers[layer];
                match slot {
                    LayerSlot::InputNorm => l.input_norm = Some(vector(tensor)?),
                    LayerSlot::PostNorm => l.post_norm = Some(vector(tensor)?),
                    LayerSlot::Proj(p) => l.proj[p.index()] = Some(matrix(tensor)?),
                }
            }
        }
        Ok(())
    }
}

/// What checking an expert file against a base needs, detached from the
/// backend, so a loader thread can read and check expert files while the
/// backend computes.
#[derive(Clone, Debug)]
pub struct ExpertParser {
    pub config: ModelConfig,
    pub identity: BaseIdentity,
    pub shapes: BTreeMap<String, Vec<usize>>,
}

impl ExpertParser {
    pub fn open(&self, path: &Path) -> Result<Expert, ModelError> {
        Expert::open(path, &self.config, &self.identity, &self.shapes)
    }

    /// An expert file already read into memory.
    pub fn from_bytes(&self, bytes: &[u8]) -> Result<Expert, ModelError> {
        let file = read_expert_bytes(bytes).map_err(|e| ModelError::Expert(e.to_string()))?;
        Expert::from_file(file, &self.config, &self.identity, &self.shapes)
    }
}

enum LayerSlot {
    InputNorm,
    PostNorm,
    Proj(Proj),
}

fn parse_layer_name(name: &str, num_layers: usize) -> Option<(usize, LayerSlot)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, _) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    if layer >= num_layers {
        return None;
    }
    if name == names::input_norm(layer) {
        return Some((layer, LayerSlot::InputNorm));
    }
    if name == names::post_norm(layer) {
        return Some((layer, LayerSlot::PostNorm));
    }
    Proj::ALL
        .iter()
        .find(|&&p| name == names::proj(layer, p))
        .map(|&p| (layer, LayerSlot::Proj(p)))
}
