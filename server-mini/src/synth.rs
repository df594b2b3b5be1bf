//! A deterministic synthetic model family for tests and the demo: a small
//! Mistral-architecture base and N "fine-tunes" whose deltas look like real
//! ones (small relative norm, low-rank structure plus noise, a few outlier
//! input channels).
//!
//! ```text
//!   DIR/base/{config.json, model.safetensors, tokenizer.json, tokenizer_config.json}
//!   DIR/experts/expert-00/{same files}
//!   DIR/experts/expert-01/...
//! ```
//!
//! Every tensor draws from its own RNG seeded by (seed, model, tensor name),
//! so files are byte-identical for the same seed and tensors can be produced
//! one at a time: the base tensor is generated once and each expert's copy
//! written as base + Δ, keeping about two tensors in memory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal, StandardNormal};
use serde_json::{json, Value};

use crate::checkpoint::{
    write_config, CheckpointError, FloatDtype, TensorFileWriter, TensorPlan, SINGLE_FILE,
};

mod tokenizer;

/// Size presets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynthShape {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
}

impl SynthShape {
    pub const NAMES: [&'static str; 3] = ["tiny", "small", "mistral-7b-layer"];

    pub fn named(name: &str) -> Option<SynthShape> {
        let shape = match name {
            "tiny" => SynthShape {
                hidden: 128,
                intermediate: 320,
                layers: 2,
                heads: 4,
                kv_heads: 2,
                vocab: 512,
            },
            "small" => SynthShape {
                hidden: 512,
                intermediate: 1408,
                layers: 4,
                heads: 8,
                kv_heads: 2,
                vocab: 512,
            },
            // One decoder layer with Mistral-7B's real matrix shapes.
            "mistral-7b-layer" => SynthShape {
                hidden: 4096,
                intermediate: 14336,
                layers: 1,
                heads: 32,
                kv_heads: 8,
                vocab: 512,
            },
            _ => return None,
        };
        Some(shape)
    }

    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
}

/// How the family is generated.
#[derive(Clone, Debug)]
pub struct SynthSettings {
    pub shape: SynthShape,
    pub experts: usize,
    pub seed: u64,
    pub dtype: FloatDtype,
}

/// Standard deviation of embeddings and linear weights at init (GPT-2 / Llama
/// style); output projections are further scaled by 1/√(2·layers) so the
/// residual stream does not grow with depth.
const INIT_STD: f32 = 0.02;
/// ‖Δ‖/‖W‖ of a synthetic fine-tune: real full fine-tunes measure 0.3–0.5 %
/// (see shared/data/deltas/README.md); each matrix varies ±20 % around it.
const DELTA_RELATIVE_NORM: f32 = 0.005;
/// Rank of the structured part of Δ (fine-tuning updates are dominated by a
/// few directions) and the share of ‖Δ‖² it carries; the rest is noise.
const DELTA_RANK: usize = 8;
const DELTA_LOW_RANK_ENERGY: f32 = 0.5;
/// Input channels of Δ (per matrix) that are outliers, and how much larger
/// their column norm is than a typical column.
const OUTLIER_CHANNELS: usize = 3;
const OUTLIER_GAIN: f32 = 10.0;
/// RMSNorm weights sit near 1; fine-tuning moves them slightly.
const NORM_SPREAD: f32 = 0.05;
const NORM_DELTA_STD: f32 = 0.002;

pub fn mistral_config(shape: &SynthShape) -> Value {
    json!({
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim(),
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "vocab_size": shape.vocab,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "sliding_window": 4096,
        "tie_word_embeddings": false,
        "bos_token_id": tokenizer::BOS_ID,
        "eos_token_id": tokenizer::EOS_ID,
        "torch_dtype": "float16",
    })
}

/// What kind of tensor a name is, which decides how it is initialised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Embedding,
    Linear { residual_output: bool },
    Norm,
}

/// Every tensor of the architecture, sorted by name.
pub fn tensor_shapes(shape: &SynthShape) -> BTreeMap<String, Vec<usize>> {
    tensor_roles(shape)
        .into_iter()
        .map(|(name, (dims, _))| (name, dims))
        .collect()
}

fn tensor_roles(s: &SynthShape) -> BTreeMap<String, (Vec<usize>, Role)> {
    let (h, hd) = (s.hidden, s.head_dim());
    let (q, kv) = (s.heads * hd, s.kv_heads * hd);
    let lin = |residual_output| Role::Linear { residual_output };
    let mut t = BTreeMap::new();
    t.insert(
        "model.embed_tokens.weight".into(),
        (vec![s.vocab, h], Role::Embedding),
    );
    t.insert("lm_head.weight".into(), (vec![s.vocab, h], Role::Embedding));
    t.insert("model.norm.weight".into(), (vec![h], Role::Norm));
    for i in 0..s.layers {
        let p = format!("model.layers.{i}");
        let mut add = |name: &str, dims: Vec<usize>, role| {
            t.insert(format!("{p}.{name}.weight"), (dims, role));
        };
        add("self_attn.q_proj", vec![q, h], lin(false));
        add("self_attn.k_proj", vec![kv, h], lin(false));
        add("self_attn.v_proj", vec![kv, h], lin(false));
        add("self_attn.o_proj", vec![h, q], lin(true));
        add("mlp.gate_proj", vec![s.intermediate, h], lin(false));
        add("mlp.up_proj", vec![s.intermediate, h], lin(false));
        add("mlp.down_proj", vec![h, s.intermediate], lin(true));
        add("input_layernorm", vec![h], Role::Norm);
        add("post_attention_layernorm", vec![h], Role::Norm);
    }
    t
}

/// Unit tests' model: the "tiny" base alone (no experts) under `dir`;
/// returns its directory.
#[cfg(test)]
pub(crate) fn write_tiny_base(dir: &Path) -> PathBuf {
    let settings = SynthSettings {
        shape: SynthShape::named("tiny").expect("the tiny shape exists"),
        experts: 0,
        seed: 0,
        dtype: FloatDtype::F16,
    };
    write_family(dir, &settings, |_| {})
        .expect("writing the tiny base")
        .0
}

/// Writes the family under `dir`; returns the base and expert directories.
pub fn write_family(
    dir: &Path,
    settings: &SynthSettings,
    mut progress: impl FnMut(&str),
) -> Result<(PathBuf, Vec<PathBuf>), CheckpointError> {
    let base_dir = dir.join("base");
    let expert_dirs: Vec<PathBuf> = (0..settings.experts)
        .map(|e| dir.join("experts").join(format!("expert-{e:02}")))
        .collect();
    let config = mistral_config(&settings.shape);
    let roles = tensor_roles(&settings.shape);
    let plan: Vec<TensorPlan> = roles
        .iter()
        .map(|(name, (dims, _))| TensorPlan {
            name: name.clone(),
            dtype: settings.dtype,
            shape: dims.clone(),
        })
        .collect();
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let mut writers = Vec::with_capacity(settings.experts + 1);
    for d in std::iter::once(&base_dir).chain(&expert_dirs) {
        std::fs::create_dir_all(d).map_err(|error| CheckpointError::Io {
            path: d.clone(),
            error,
        })?;
        write_config(d, &config)?;
        tokenizer::write_files(d)?;
        writers.push(TensorFileWriter::create(
            &d.join(SINGLE_FILE),
            plan.clone(),
            &metadata,
        )?);
    }
    let layers = settings.shape.layers;
    for (name, (dims, role)) in &roles {
        progress(name);
        let base = base_tensor(settings.seed, name, dims, *role, layers);
        writers[0].write_f32(name, &base)?;
        for (e, writer) in writers[1..].iter_mut().enumerate() {
            let mut rng = tensor_rng(settings.seed, Some(e), name);
            let delta = expert_delta(&mut rng, &base, dims, *role);
            let expert: Vec<f32> = base.iter().zip(&delta).map(|(w, d)| w + d).collect();
            writer.write_f32(name, &expert)?;
        }
    }
    for w in writers {
        w.finish()?;
    }
    Ok((base_dir, expert_dirs))
}

/// FNV-1a, spelled out: the seed derivation must not change with the
/// standard library's hasher.
fn fnv1a(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET, |h, &b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}

fn tensor_rng(seed: u64, expert: Option<usize>, name: &str) -> StdRng {
    let model = expert.map_or(u64::MAX, |e| e as u64);
    let mut key = Vec::with_capacity(name.len() + 16);
    key.extend_from_slice(&seed.to_le_bytes());
    key.extend_from_slice(&model.to_le_bytes());
    key.extend_from_slice(name.as_bytes());
    StdRng::seed_from_u64(fnv1a(&key))
}

fn normal_vec(rng: &mut StdRng, n: usize, std: f32) -> Vec<f32> {
    (0..n)
        .map(|_| std * Distribution::<f32>::sample(&StandardNormal, rng))
        .collect::<Vec<f32>>()
}

fn base_tensor(seed: u64, name: &str, dims: &[usize], role: Role, layers: usize) -> Vec<f32> {
    let mut rng = tensor_rng(seed, None, name);
    let n = dims.iter().product();
    match role {
        Role::Embedding => normal_vec(&mut rng, n, INIT_STD),
        Role::Linear { residual_output } => {
            let std = if residual_output {
                INIT_STD / ((2 * layers) as f32).sqrt()
            } else {
                INIT_STD
            };
            normal_vec(&mut rng, n, std)
        }
        Role::Norm => {
            let spread = Normal::new(1.0f32, NORM_SPREAD).expect("finite std");
            (0..n).map(|_| spread.sample(&mut rng)).collect()
        }
    }
}

fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt() as f32
}

/// Δ of one tensor of one expert.
fn expert_delta(rng: &mut StdRng, base: &[f32], dims: &[usize], role: Role) -> Vec<f32> {
    match role {
        Role::Norm => normal_vec(rng, base.len(), NORM_DELTA_STD),
        Role::Embedding => {
            let target = DELTA_RELATIVE_NORM * norm(base);
            let mut d = normal_vec(rng, base.len(), 1.0);
            scale_to(&mut d, target);
            d
        }
        Role::Linear { .. } => {
            let (out, inp) = (dims[0], dims[1]);
            let variation = 1.0 + 0.2 * (2.0 * rng.random::<f32>() - 1.0);
            let target = DELTA_RELATIVE_NORM * variation * norm(base);
            // Structured part U·Vᵀ plus unstructured noise, each scaled to its
            // share of the energy before the outlier columns are boosted.
            let rank = DELTA_RANK.min(out).min(inp);
            let u = normal_vec(rng, out * rank, 1.0);
            let v = normal_vec(rng, inp * rank, 1.0);
            let mut low = vec![0f32; out * inp];
            for r in 0..out {
                let ur = &u[r * rank..(r + 1) * rank];
                for (c, x) in low[r * inp..(r + 1) * inp].iter_mut().enumerate() {
                    *x = ur
                        .iter()
                        .zip(&v[c * rank..(c + 1) * rank])
                        .map(|(a, b)| a * b)
                        .sum();
                }
            }
            let mut noise = normal_vec(rng, out * inp, 1.0);
            scale_to(&mut low, DELTA_LOW_RANK_ENERGY.sqrt());
            scale_to(&mut noise, (1.0 - DELTA_LOW_RANK_ENERGY).sqrt());
            let mut d: Vec<f32> = low.iter().zip(&noise).map(|(a, b)| a + b).collect();
            for _ in 0..OUTLIER_CHANNELS.min(inp) {
                let c = rng.random_range(0..inp);
                for r in 0..out {
                    d[r * inp + c] *= OUTLIER_GAIN;
                }
            }
            scale_to(&mut d, target);
            d
        }
    }
}

fn scale_to(v: &mut [f32], target: f32) {
    let n = norm(v);
    if n > 0.0 {
        let k = target / n;
        v.iter_mut().for_each(|x| *x *= k);
    }
}
