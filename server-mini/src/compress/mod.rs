//! The compression pipeline behind `meswitch compress`: base + fine-tuned
//! checkpoint → one compressed-expert file, streamed tensor by tensor.
//!
//! Per tensor (sorted by name), memory holds the expert tensor turned into Δ
//! in place, its packed form and one dequantized copy for the error figures:
//! a few tensors, never the model.

mod stats;

use std::path::{Path, PathBuf};

use meswitch_reference::container::{
    ExpertHeader, ExpertTensor, ExpertWriter, FormatError, IDENTITY_CONFIG_KEYS,
};
use meswitch_reference::measure::{activation_energy, output_relative_error, relative_error};
use meswitch_reference::{compress_matrix, Bits, CompressSettings, DeltaError, SalientSpec};
use serde_json::{json, Value};
use thiserror::Error;

use crate::checkpoint::{Checkpoint, CheckpointError};

pub use stats::{format_table, summarize, ProjectionStats, TensorStats, FP16_BITS};

#[derive(Debug, Error)]
pub enum CompressError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("tensor {name}: {source}")]
    Delta { name: String, source: DeltaError },
    #[error("base and expert configs differ in {key}: base {base}, expert {expert}")]
    ConfigMismatch {
        key: String,
        base: Value,
        expert: Value,
    },
    #[error("tensor {name} is in the {present} checkpoint but not in the {missing} one")]
    TensorSet {
        name: String,
        present: &'static str,
        missing: &'static str,
    },
    #[error("tensor {name}: base shape {base:?}, expert shape {expert:?}")]
    ShapeMismatch {
        name: String,
        base: Vec<usize>,
        expert: Vec<usize>,
    },
    #[error("calibration {name}: shape {shape:?}, expected [tokens, {in_features}]")]
    CalibShape {
        name: String,
        shape: Vec<usize>,
        in_features: usize,
    },
    #[error("--fit act needs calibration activations (--calib FILE)")]
    FitNeedsCalib,
}

/// How quantization parameters are fitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fit {
    /// Min/max round-to-nearest (the baseline).
    Rtn,
    /// Step size searched to minimise each group's squared error.
    Mse,
    /// As `Mse`, each entry weighted by its channel's activation energy.
    Act,
}

impl Fit {
    pub fn name(self) -> &'static str {
        match self {
            Fit::Rtn => "rtn",
            Fit::Mse => "mse",
            Fit::Act => "act",
        }
    }
}

#[derive(Clone, Debug)]
pub struct CompressOptions {
    pub bits: Bits,
    /// 32, 64, 128, or anything ≥ in for one group per row.
    pub group_size: usize,
    pub salient: SalientSpec,
    pub fit: Fit,
    /// Also compress the 2-D non-linear tensors (embed_tokens, lm_head) as deltas.
    pub compress_embeddings: bool,
    pub expert_name: String,
    pub max_shard_bytes: Option<u64>,
}

/// Projection type of a linear weight, e.g. `q_proj` for
/// `model.layers.3.self_attn.q_proj.weight`.
pub fn linear_kind(name: &str) -> Option<&'static str> {
    const PROJECTIONS: [(&str, &str); 7] = [
        ("self_attn", "q_proj"),
        ("self_attn", "k_proj"),
        ("self_attn", "v_proj"),
        ("self_attn", "o_proj"),
        ("mlp", "gate_proj"),
        ("mlp", "up_proj"),
        ("mlp", "down_proj"),
    ];
    let (_, block, proj) = parse_layer_weight(name)?;
    PROJECTIONS
        .iter()
        .find(|(b, p)| *b == block && *p == proj)
        .map(|(_, p)| *p)
}

/// `model.layers.{i}.{block}.{proj}.weight` → (i, block, proj).
fn parse_layer_weight(name: &str) -> Option<(usize, &str, &str)> {
    let rest = name.strip_prefix("model.layers.")?;
    let rest = rest.strip_suffix(".weight")?;
    let mut parts = rest.split('.');
    let layer = parts.next()?.parse().ok()?;
    let block = parts.next()?;
    let proj = parts.next()?;
    parts.next().is_none().then_some((layer, block, proj))
}

/// Name of a linear weight's calibration input: `layers.{i}.{block}.{proj}.input`.
pub fn calib_name(name: &str) -> Option<String> {
    linear_kind(name)?;
    let (layer, block, proj) = parse_layer_weight(name)?;
    Some(format!("layers.{layer}.{block}.{proj}.input"))
}

/// Projection type of a 2-D embedding-like tensor compressed only on request.
fn embedding_kind(name: &str) -> Option<&'static str> {
    match name {
        "model.embed_tokens.weight" => Some("embed_tokens"),
        "lm_head.weight" => Some("lm_head"),
        _ => None,
    }
}

/// What came out of a run.
#[derive(Clone, Debug)]
pub struct CompressReport {
    pub files: Vec<PathBuf>,
    pub tensors: Vec<TensorStats>,
    pub dense_tensors: usize,
}

/// Checks that `expert` is a fine-tune of `base`: same architecture keys,
/// same tensor names and shapes, dtypes meswitch reads.
pub fn check_pair(base: &Checkpoint, expert: &Checkpoint) -> Result<(), CompressError> {
    for key in IDENTITY_CONFIG_KEYS {
        let (b, e) = (base.config().get(*key), expert.config().get(*key));
        if b != e {
            return Err(CompressError::ConfigMismatch {
                key: key.to_string(),
                base: b.cloned().unwrap_or(Value::Null),
                expert: e.cloned().unwrap_or(Value::Null),
            });
        }
    }
    let (bs, es) = (base.shapes(), expert.shapes());
    for (name, shape) in &bs {
        match es.get(name) {
            None => {
                return Err(CompressError::TensorSet {
                    name: name.clone(),
                    present: "base",
                    missing: "expert",
                })
            }
            Some(e) if e != shape => {
                return Err(CompressError::ShapeMismatch {
                    name: name.clone(),
                    base: shape.clone(),
                    expert: e.clone(),
                })
            }
            Some(_) => {}
        }
    }
    if let Some(name) = es.keys().find(|n| !bs.contains_key(*n)) {
        return Err(CompressError::TensorSet {
            name: name.clone(),
            present: "expert",
            missing: "base",
        });
    }
    for name in bs.keys() {
        base.float_dtype(name)?;
        expert.float_dtype(name)?;
    }
    Ok(())
}

/// Compresses `expert` against `base` into `out`. `progress` is called once
/// per tensor, before it is processed.
pub fn compress_expert(
    base: &Checkpoint,
    expert: &Checkpoint,
    calib: Option<&Checkpoint>,
    options: &CompressOptions,
    out: &Path,
    mut progress: impl FnMut(&str),
) -> Result<CompressReport, CompressError> {
    check_pair(base, expert)?;
    if options.fit == Fit::Act && calib.is_none() {
        return Err(CompressError::FitNeedsCalib);
    }
    let settings = CompressSettings {
        bits: options.bits,
        group_size: options.group_size,
        salient: options.salient,
        round_to_nearest: options.fit == Fit::Rtn,
        activation_weighted_fit: options.fit == Fit::Act,
    };
    let header = ExpertHeader {
        base: base.identity(),
        expert_name: options.expert_name.clone(),
        settings: settings_json(options, calib.is_some()),
    };
    let mut writer = ExpertWriter::create(out, header, options.max_shard_bytes)?;
    let mut report = CompressReport {
        files: Vec::new(),
        tensors: Vec::new(),
        dense_tensors: 0,
    };
    for name in base.tensor_names() {
        progress(&name);
        let shape = base.shape(&name).unwrap_or_default();
        let kind = linear_kind(&name).or_else(|| {
            embedding_kind(&name).filter(|_| options.compress_embeddings && shape.len() == 2)
        });
        let Some(kind) = kind else {
            let values = expert.tensor_f16(&name)?;
            writer.add(&name, &ExpertTensor::Dense { shape, values })?;
            report.dense_tensors += 1;
            continue;
        };
        let (out_features, in_features) = (shape[0], shape[1]);
        // Δ = W_expert − W_base in f32, built in the expert's buffer.
        let mut delta = expert.tensor_f32(&name)?;
        for (d, b) in delta.iter_mut().zip(base.tensor_f32(&name)?) {
            *d -= b;
        }
        let activations = match (calib, calib_name(&name)) {
            (Some(c), Some(cname)) if c.shape(&cname).is_some() => {
                let cshape = c.shape(&cname).unwrap_or_default();
                if cshape.len() != 2 || cshape[1] != in_features {
                    return Err(CompressError::CalibShape {
                        name: cname,
                        shape: cshape,
                        in_features,
                    });
                }
                Some((c.tensor_f32(&cname)?, cshape[0]))
            }
            _ => None,
        };
        let energy = activations
            .as_ref()
            .map(|(x, tokens)| activation_energy(x, *tokens, in_features));
        let packed = compress_matrix(
            &delta,
            out_features,
            in_features,
            &settings,
            energy.as_deref(),
        )
        .map_err(|source| CompressError::Delta {
            name: name.clone(),
            source,
        })?;
        let approx = packed.dequantize();
        report.tensors.push(TensorStats {
            name: name.clone(),
            kind: kind.to_string(),
            layout: *packed.layout(),
            relative_error: relative_error(&delta, &approx),
            output_error: activations.as_ref().map(|(x, tokens)| {
                output_relative_error(x, *tokens, &delta, &approx, out_features, in_features)
            }),
        });
        writer.add(&name, &ExpertTensor::Delta(packed))?;
    }
    report.files = writer.finish()?;
    Ok(report)
}

fn settings_json(options: &CompressOptions, calibrated: bool) -> Value {
    let salient = match options.salient {
        SalientSpec::Count(n) => json!({"count": n}),
        SalientSpec::Fraction(f) => json!({"fraction": f}),
        SalientSpec::TargetBits(b) => json!({"target_bits": b}),
    };
    json!({
        "method": "me-switch",
        "bits": options.bits.count(),
        "group_size": options.group_size,
        "salient": salient,
        "fit": options.fit.name(),
        "calibrated": calibrated,
        "compress_embeddings": options.compress_embeddings,
        "tool": format!("meswitch {}", env!("CARGO_PKG_VERSION")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_names_are_recognised_and_others_not() {
        assert_eq!(
            linear_kind("model.layers.12.self_attn.q_proj.weight"),
            Some("q_proj")
        );
        assert_eq!(
            linear_kind("model.layers.0.mlp.down_proj.weight"),
            Some("down_proj")
        );
        assert_eq!(linear_kind("model.layers.0.mlp.q_proj.weight"), None);
        assert_eq!(linear_kind("model.layers.0.input_layernorm.weight"), None);
        assert_eq!(linear_kind("model.layers.x.self_attn.q_proj.weight"), None);
        assert_eq!(linear_kind("model.layers.0.self_attn.q_proj.bias"), None);
        assert_eq!(linear_kind("model.embed_tokens.weight"), None);
        assert_eq!(
            calib_name("model.layers.3.mlp.up_proj.weight").as_deref(),
            Some("layers.3.mlp.up_proj.input")
        );
    }
}
