//! Base weights: where they come from ([`WeightSource`], by Hugging Face
//! tensor name) and how the runtime holds them ([`Weights`]: every matrix
//! FP16 row-major `[out, in]` so it is a [`BaseView`] as is; norms f32).

use std::collections::BTreeMap;

use half::f16;
use meswitch_reference::container::BaseIdentity;
use meswitch_reference::BaseView;
use rayon::prelude::*;
use serde_json::Value;

use super::numerics::{BlockKind, GgmlBlocks};
use super::{ModelConfig, ModelError};
use crate::checkpoint::Checkpoint;
use crate::gguf::{GgmlType, GgufFile};

/// Anything that yields tensors by HF name: an HF checkpoint, a GGUF file
/// (through its HF name map), or an in-memory model in tests.
pub trait WeightSource: Sync {
    /// The HF-style `config.json` content.
    fn hf_config(&self) -> Value;
    /// HF name → HF shape of every tensor.
    fn shapes(&self) -> BTreeMap<String, Vec<usize>>;
    fn tensor_f32(&self, name: &str) -> Result<Vec<f32>, ModelError>;
    fn tensor_f16(&self, name: &str) -> Result<Vec<f16>, ModelError> {
        Ok(self
            .tensor_f32(name)?
            .into_iter()
            .map(f16::from_f32)
            .collect())
    }
    /// A matrix stored as ggml `Q4_1`/`Q8_0` blocks, as stored (HF row
    /// order), for [`super::Numerics::LlamaCpp`]; `None` for any other storage.
    fn ggml_blocks(&self, _name: &str) -> Result<Option<(BlockKind, Vec<u8>)>, ModelError> {
        Ok(None)
    }
    /// The identity experts are checked against.
    fn identity(&self) -> BaseIdentity {
        let tensors: Vec<(String, Vec<usize>)> = self.shapes().into_iter().collect();
        BaseIdentity::compute(&self.hf_config(), &tensors)
    }
}

impl WeightSource for Checkpoint {
    fn hf_config(&self) -> Value {
        self.config().clone()
    }
    fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        Checkpoint::shapes(self)
    }
    fn tensor_f32(&self, name: &str) -> Result<Vec<f32>, ModelError> {
        Checkpoint::tensor_f32(self, name).map_err(|e| ModelError::Source(e.to_string()))
    }
    fn tensor_f16(&self, name: &str) -> Result<Vec<f16>, ModelError> {
        Checkpoint::tensor_f16(self, name).map_err(|e| ModelError::Source(e.to_string()))
    }
    fn identity(&self) -> BaseIdentity {
        Checkpoint::identity(self)
    }
}

/// A GGUF file seen through HF names. GGUF shapes are ggml order (`ne0`
/// contiguous), so the HF shape is the reverse; the file's own
/// `tensor_f32` already undoes llama.cpp's Q/K RoPE row permutation.
pub struct GgufSource {
    file: GgufFile,
    /// HF name -> (GGUF name, HF shape).
    by_hf: BTreeMap<String, (String, Vec<usize>)>,
}

impl GgufSource {
    pub fn new(file: GgufFile) -> GgufSource {
        let by_hf = file
            .tensor_infos()
            .iter()
            .filter_map(|t| {
                let hf = file.hf_name(&t.name)?;
                let shape: Vec<usize> = t.shape.iter().rev().copied().collect();
                Some((hf, (t.name.clone(), shape)))
            })
            .collect();
        GgufSource { file, by_hf }
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }
}

impl WeightSource for GgufSource {
    fn hf_config(&self) -> Value {
        self.file.hf_config()
    }
    fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.by_hf
            .iter()
            .map(|(k, (_, s))| (k.clone(), s.clone()))
            .collect()
    }
    fn tensor_f32(&self, name: &str) -> Result<Vec<f32>, ModelError> {
        let (gguf, _) = self
            .by_hf
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        self.file
            .tensor_f32(gguf)
            .map_err(|e| ModelError::Source(e.to_string()))
    }
    fn ggml_blocks(&self, name: &str) -> Result<Option<(BlockKind, Vec<u8>)>, ModelError> {
        let (gguf, _) = self
            .by_hf
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        let blocks = self
            .file
            .tensor_blocks(gguf)
            .map_err(|e| ModelError::Source(e.to_string()))?;
        Ok(blocks.and_then(|(t, bytes)| {
            let kind = match t {
                GgmlType::Q4_1 => BlockKind::Q4_1,
                GgmlType::Q8_0 => BlockKind::Q8_0,
                _ => return None,
            };
            Some((kind, bytes))
        }))
    }
}

/// An in-memory source (synthetic models in tests and benches).
pub struct MemorySource {
    pub config: Value,
    pub tensors: BTreeMap<String, (Vec<usize>, Vec<f16>)>,
}

impl WeightSource for MemorySource {
    fn hf_config(&self) -> Value {
        self.config.clone()
    }
    fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.tensors
            .iter()
            .map(|(k, (s, _))| (k.clone(), s.clone()))
            .collect()
    }
    fn tensor_f32(&self, name: &str) -> Result<Vec<f32>, ModelError> {
        Ok(self.tensor_f16(name)?.iter().map(|v| v.to_f32()).collect())
    }
    fn tensor_f16(&self, name: &str) -> Result<Vec<f16>, ModelError> {
        self.tensors
            .get(name)
            .map(|(_, v)| v.clone())
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))
    }
}

/// The seven linear projections of a decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    fn hf_suffix(self) -> &'static str {
        match self {
            Proj::Q => "self_attn.q_proj",
            Proj::K => "self_attn.k_proj",
            Proj::V => "self_attn.v_proj",
            Proj::O => "self_attn.o_proj",
            Proj::Gate => "mlp.gate_proj",
            Proj::Up => "mlp.up_proj",
            Proj::Down => "mlp.down_proj",
        }
    }

    /// `[out, in]` of this projection under `c`.
    pub fn shape(self, c: &ModelConfig) -> [usize; 2] {
        let h = c.hidden_size;
        match self {
            Proj::Q => [c.q_dim(), h],
            Proj::K | Proj::V => [c.kv_dim(), h],
            Proj::O => [h, c.q_dim()],
            Proj::Gate | Proj::Up => [c.intermediate_size, h],
            Proj::Down => [h, c.intermediate_size],
        }
    }
}

/// HF tensor names of the decoder.
pub mod names {
    use super::Proj;
    pub const EMBED: &str = "model.embed_tokens.weight";
    pub const FINAL_NORM: &str = "model.norm.weight";
    pub const LM_HEAD: &str = "lm_head.weight";
    pub fn proj(layer: usize, p: Proj) -> String {
        format!("model.layers.{layer}.{}.weight", p.hf_suffix())
    }
    pub fn input_norm(layer: usize) -> String {
        format!("model.layers.{layer}.input_layernorm.weight")
    }
    pub fn post_norm(layer: usize) -> String {
        format!("model.layers.{layer}.post_attention_layernorm.weight")
    }
}

/// A dense FP16 matrix `[out, in]`, row-major.
#[derive(Clone, Debug)]
pub struct Matrix {
    pub out_features: usize,
    pub in_features: usize,
    pub weights: Vec<f16>,
    /// The matrix as stored in a GGUF file's `Q4_1`/`Q8_0` blocks, when
    /// loaded for [`super::Numerics::LlamaCpp`] (which multiplies those, not
    /// the FP16 copy); `None` otherwise.
    pub ggml: Option<GgmlBlocks>,
}

impl Matrix {
    pub fn view(&self) -> BaseView<'_> {
        BaseView {
            out_features: self.out_features,
            in_features: self.in_features,
            weights: &self.weights,
        }
    }
}

pub struct LayerWeights {
    pub input_norm: Vec<f32>,
    pub post_norm: Vec<f32>,
    /// Indexed by [`Proj::index`].
    pub proj: Vec<Matrix>,
}

pub struct Weights {
    pub embed: Matrix,
    pub layers: Vec<LayerWeights>,
    pub final_norm: Vec<f32>,
    /// `None` when tied to `embed`.
    pub lm_head: Option<Matrix>,
}

fn check_shape(
    shapes: &BTreeMap<String, Vec<usize>>,
    name: &str,
    want: &[usize],
) -> Result<(), ModelError> {
    match shapes.get(name) {
        None => Err(ModelError::MissingTensor(name.to_string())),
        Some(s) if s.as_slice() != want => Err(ModelError::TensorShape {
            name: name.to_string(),
            expected: want.to_vec(),
            found: s.clone(),
        }),
        Some(_) => Ok(()),
    }
}

fn load_matrix(
    src: &dyn WeightSource,
    shapes: &BTreeMap<String, Vec<usize>>,
    name: &str,
    shape: [usize; 2],
    for_llama_cpp: bool,
) -> Result<Matrix, ModelError> {
    check_shape(shapes, name, &shape)?;
    let weights = src.tensor_f16(name)?;
    if weights.len() != shape[0] * shape[1] {
        return Err(ModelError::TensorShape {
            name: name.to_string(),
            expected: shape.to_vec(),
            found: vec![weights.len()],
        });
    }
    // Only llama.cpp's numerics read the stored blocks.
    let ggml = match for_llama_cpp.then(|| src.ggml_blocks(name)).transpose()? {
        Some(Some((kind, bytes))) => Some(
            GgmlBlocks::new(kind, shape[0], shape[1], bytes)
                .map_err(|e| ModelError::Source(format!("{name}: {e}")))?,
        ),
        _ => None,
    };
    Ok(Matrix {
        out_features: shape[0],
        in_features: shape[1],
        weights,
        ggml,
    })
}

fn load_vector(
    src: &dyn WeightSource,
    shapes: &BTreeMap<String, Vec<usize>>,
    name: &str,
    len: usize,
) -> Result<Vec<f32>, ModelError> {
    check_shape(shapes, name, &[len])?;
    let v = src.tensor_f32(name)?;
    if v.len() != len {
        return Err(ModelError::TensorShape {
            name: name.to_string(),
            expected: vec![len],
            found: vec![v.len()],
        });
    }
    Ok(v)
}

impl Weights {
    /// Loads and shape-checks every tensor the forward pass needs. Layers
    /// load in parallel (GGUF sources dequantize on the way).
    pub fn load(src: &dyn WeightSource, c: &ModelConfig) -> Result<Weights, ModelError> {
        Weights::load_with(src, c, false)
    }

    /// [`Self::load`], keeping each matrix's stored ggml blocks
    /// ([`Matrix::ggml`]) when `for_llama_cpp`.
    pub fn load_with(
        src: &dyn WeightSource,
        c: &ModelConfig,
        for_llama_cpp: bool,
    ) -> Result<Weights, ModelError> {
        let shapes = src.shapes();
        let embed = load_matrix(
            src,
            &shapes,
            names::EMBED,
            [c.vocab_size, c.hidden_size],
            for_llama_cpp,
        )?;
        let layers = (0..c.num_layers)
            .into_par_iter()
            .map(|l| {
                Ok(LayerWeights {
                    input_norm: load_vector(src, &shapes, &names::input_norm(l), c.hidden_size)?,
                    post_norm: load_vector(src, &shapes, &names::post_norm(l), c.hidden_size)?,
                    proj: Proj::ALL
                        .iter()
                        .map(|&p| {
                            let name = names::proj(l, p);
                            load_matrix(src, &shapes, &name, p.shape(c), for_llama_cpp)
                        })
                        .collect::<Result<_, ModelError>>()?,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let final_norm = load_vector(src, &shapes, names::FINAL_NORM, c.hidden_size)?;
        // HF omits lm_head.weight when tied; some untied exports keep it
        // even with the flag set, and then the stored tensor wins.
        let lm_head = if shapes.contains_key(names::LM_HEAD) {
            Some(load_matrix(
                src,
                &shapes,
                names::LM_HEAD,
                [c.vocab_size, c.hidden_size],
                for_llama_cpp,
            )?)
        } else if c.tie_word_embeddings {
            None
        } else {
            return Err(ModelError::MissingTensor(format!(
                "{} (and tie_word_embeddings is false)",
                names::LM_HEAD
            )));
        };
        Ok(Weights {
            embed,
            layers,
            final_norm,
            lm_head,
        })
    }

    pub fn lm_head(&self) -> &Matrix {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}
