//! The router file: safetensors with JSON metadata.
//!
//! ```text
//!   __metadata__["meswitch.router"] = JSON {
//!       "format": "meswitch-hidden-router", "version": 2,
//!       "layer", "pooling" ("mean" | "last" | "mean+last" | "normed-mean"), "max_tokens",
//!       "hidden_size", "n_layers", "classes": [domain...], "shared_prefix": [token...],
//!       "prompt_format": "chat" | "raw" }
//!   tensors (F32), dim = hidden_size (mean, last) or 2·hidden_size (mean+last):
//!       classifier.weight [classes, dim]   classifier.bias [classes]
//!       features.mean     [dim]            features.inv_std [dim]
//! ```
//!
//! Version 2 added the pooling "normed-mean"; a version-1 file (same fields,
//! one of the first three poolings) still loads and routes as before.
//!
//! Loading checks every field and shape and that all values are finite, so
//! a damaged or foreign file is an error, never a panic or NaN routing.

use std::collections::HashMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use super::hidden::{FeatureSpec, HiddenRouter, Pooling, RouterError};
use super::softmax::SoftmaxClassifier;

pub const METADATA_KEY: &str = "meswitch.router";
pub const FORMAT_NAME: &str = "meswitch-hidden-router";
/// Bumped on any change a reader of the previous version would misread.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest version this build reads (1: no "normed-mean" pooling).
pub const OLDEST_READ_VERSION: u32 = 1;

const WEIGHT: &str = "classifier.weight";
const BIAS: &str = "classifier.bias";
const MEAN: &str = "features.mean";
const INV_STD: &str = "features.inv_std";

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    format: String,
    version: u32,
    layer: usize,
    pooling: String,
    max_tokens: usize,
    hidden_size: usize,
    n_layers: usize,
    classes: Vec<String>,
    shared_prefix: Vec<u32>,
    prompt_format: String,
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl HiddenRouter {
    pub fn save(&self, path: &Path) -> Result<(), RouterError> {
        let s = &self.spec;
        let header = Header {
            format: FORMAT_NAME.into(),
            version: FORMAT_VERSION,
            layer: s.layer,
            pooling: s.pooling.name().into(),
            max_tokens: s.max_tokens,
            hidden_size: s.hidden_size,
            n_layers: s.n_layers,
            classes: self.classifier.classes.clone(),
            shared_prefix: s.shared_prefix.clone(),
            prompt_format: s.prompt_format.clone(),
        };
        let json = serde_json::to_string(&header).expect("plain struct serializes");
        let (c, dim) = (self.classifier.classes.len(), s.dim());
        let tensors = [
            (WEIGHT, vec![c, dim], f32_bytes(&self.classifier.weights)),
            (BIAS, vec![c], f32_bytes(&self.classifier.bias)),
            (MEAN, vec![dim], f32_bytes(&self.mean)),
            (INV_STD, vec![dim], f32_bytes(&self.inv_std)),
        ];
        let format_error = |message: String| RouterError::Format {
            path: path.display().to_string(),
            message,
        };
        let views = tensors
            .iter()
            .map(|(name, shape, bytes)| {
                safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytes)
                    .map(|v| (*name, v))
                    .map_err(|e| format_error(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let meta = HashMap::from([(METADATA_KEY.to_string(), json)]);
        let bytes =
            safetensors::serialize(views, Some(meta)).map_err(|e| format_error(e.to_string()))?;
        std::fs::write(path, bytes).map_err(|source| RouterError::Io {
            path: path.display().to_string(),
            source,
        })
    }

    pub fn load(path: &Path) -> Result<HiddenRouter, RouterError> {
        let bytes = std::fs::read(path).map_err(|source| RouterError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_bytes(&bytes).map_err(|message| RouterError::Format {
            path: path.display().to_string(),
            message,
        })
    }

    /// Parses and validates a router file's bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<HiddenRouter, String> {
        let st =
            SafeTensors::deserialize(bytes).map_err(|e| format!("not a safetensors file: {e}"))?;
        let (_, meta) = SafeTensors::read_metadata(bytes)
            .map_err(|e| format!("not a safetensors file: {e}"))?;
        let json = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(METADATA_KEY))
            .ok_or_else(|| format!("no \"{METADATA_KEY}\" metadata: not a meswitch router"))?;
        let h: Header = serde_json::from_str(json).map_err(|e| format!("metadata: {e}"))?;
        if h.format != FORMAT_NAME {
            return Err(format!("format {:?}, expected {FORMAT_NAME:?}", h.format));
        }
        if !(OLDEST_READ_VERSION..=FORMAT_VERSION).contains(&h.version) {
            return Err(format!(
                "format version {}, this build reads versions {OLDEST_READ_VERSION} to {FORMAT_VERSION}",
                h.version
            ));
        }
        let pooling = Pooling::parse(&h.pooling)
            .filter(|&p| h.version >= 2 || p != Pooling::NormedMean)
            .ok_or_else(|| {
                format!(
                    "unknown pooling {:?} for format version {}",
                    h.pooling, h.version
                )
            })?;
        if h.hidden_size == 0 || h.max_tokens == 0 || h.layer > h.n_layers {
            return Err(format!(
                "hidden size {}, max tokens {}, layer {} of {}: out of range",
                h.hidden_size, h.max_tokens, h.layer, h.n_layers
            ));
        }
        if h.classes.len() < 2 {
            return Err(format!("{} classes, need at least two", h.classes.len()));
        }
        let spec = FeatureSpec {
            layer: h.layer,
            pooling,
            max_tokens: h.max_tokens,
            hidden_size: h.hidden_size,
            n_layers: h.n_layers,
            shared_prefix: h.shared_prefix,
            prompt_format: h.prompt_format,
        };
        let (c, dim) = (h.classes.len(), spec.dim());
        let tensor = |name: &str, shape: &[usize]| -> Result<Vec<f32>, String> {
            let t = st.tensor(name).map_err(|e| format!("tensor {name}: {e}"))?;
            if t.dtype() != Dtype::F32 {
                return Err(format!("tensor {name} is {:?}, expected F32", t.dtype()));
            }
            if t.shape() != shape {
                return Err(format!(
                    "tensor {name} has shape {:?}, expected {shape:?} (hidden size {}, {} pooling, {c} classes)",
                    t.shape(),
                    h.hidden_size,
                    pooling.name()
                ));
            }
            let v: Vec<f32> = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            if v.iter().any(|x| !x.is_finite()) {
                return Err(format!("tensor {name} holds non-finite values"));
            }
            Ok(v)
        };
        let weights = tensor(WEIGHT, &[c, dim])?;
        let bias = tensor(BIAS, &[c])?;
        let mean = tensor(MEAN, &[dim])?;
        let inv_std = tensor(INV_STD, &[dim])?;
        Ok(HiddenRouter {
            spec,
            mean,
            inv_std,
            classifier: SoftmaxClassifier {
                classes: h.classes,
                dim,
                weights,
                bias,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    use serde_json::Value;

    use super::*;
    use crate::router::softmax::TrainConfig;

    const HIDDEN: usize = 8;

    /// A router fitted on three noisy blobs of pooled "hidden states".
    fn router(pooling: Pooling) -> (HiddenRouter, Vec<Vec<f32>>) {
        let dim = pooling.dim(HIDDEN);
        let mut rng = StdRng::seed_from_u64(1);
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for i in 0..90 {
            let c = i % 3;
            x.push(
                (0..dim)
                    .map(|j| 5.0 * (j % 3 == c) as u8 as f32 + 100.0 + rng.random::<f32>())
                    .collect::<Vec<f32>>(),
            );
            y.push(c);
        }
        let spec = FeatureSpec {
            layer: 2,
            pooling,
            max_tokens: 16,
            hidden_size: HIDDEN,
            n_layers: 4,
            shared_prefix: vec![1, 2, 3],
            prompt_format: "chat".into(),
        };
        let classes = ["code", "law", "math"].map(String::from).to_vec();
        let r = HiddenRouter::fit(spec, classes, &x, &y, &TrainConfig::default()).unwrap();
        let right = x
            .iter()
            .zip(&y)
            .filter(|(v, &c)| r.classify_features(v).domain == c)
            .count();
        assert_eq!(
            right,
            x.len(),
            "blobs 5 apart with unit noise are separable"
        );
        (r, x)
    }

    fn temp() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn save_load_roundtrip() {
        for pooling in Pooling::ALL {
            let (r, x) = router(pooling);
            let dir = temp();
            let path = dir.path().join("router.safetensors");
            r.save(&path).unwrap();
            let back = HiddenRouter::load(&path).unwrap();
            assert_eq!(back, r);
            assert_eq!(back.classify_features(&x[4]), r.classify_features(&x[4]));
        }
    }

    /// The valid file's metadata JSON and tensors, for tampering.
    /// (name, shape, values) of each tensor.
    type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

    fn parts(r: &HiddenRouter) -> (Value, Tensors) {
        let dir = temp();
        let path = dir.path().join("r.safetensors");
        r.save(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        let json = serde_json::from_str(&meta.metadata().as_ref().unwrap()[METADATA_KEY]).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors: Vec<_> = st
            .tensors()
            .into_iter()
            .map(|(name, t)| {
                let v = t
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect();
                (name, t.shape().to_vec(), v)
            })
            .collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        (json, tensors)
    }

    fn build(json: &Value, tensors: &Tensors) -> Vec<u8> {
        let bytes: Vec<Vec<u8>> = tensors.iter().map(|t| f32_bytes(&t.2)).collect();
        let views = tensors.iter().zip(&bytes).map(|(t, b)| {
            (
                t.0.clone(),
                safetensors::tensor::TensorView::new(Dtype::F32, t.1.clone(), b).unwrap(),
            )
        });
        let meta = HashMap::from([(METADATA_KEY.to_string(), json.to_string())]);
        safetensors::serialize(views, Some(meta)).unwrap()
    }

    fn load_err(bytes: &[u8]) -> String {
        let dir = temp();
        let path = dir.path().join("bad.safetensors");
        std::fs::write(&path, bytes).unwrap();
        match HiddenRouter::load(&path) {
            Err(e @ RouterError::Format { .. }) => e.to_string(),
            other => panic!("expected a format error, got {other:?}"),
        }
    }

    #[test]
    fn rebuilt_untouched_file_loads() {
        let (r, _) = router(Pooling::Mean);
        let (json, tensors) = parts(&r);
        let dir = temp();
        let path = dir.path().join("same.safetensors");
        std::fs::write(&path, build(&json, &tensors)).unwrap();
        assert_eq!(HiddenRouter::load(&path).unwrap(), r);
    }

    /// A version-1 file (written before "normed-mean" existed) still loads;
    /// a version-1 header naming the new pooling is refused.
    #[test]
    fn version_1_files_still_load() {
        let (r, x) = router(Pooling::Mean);
        let (mut json, tensors) = parts(&r);
        json["version"] = 1.into();
        let dir = temp();
        let path = dir.path().join("v1.safetensors");
        std::fs::write(&path, build(&json, &tensors)).unwrap();
        let back = HiddenRouter::load(&path).unwrap();
        assert_eq!(back.classify_features(&x[7]), r.classify_features(&x[7]));
        json["pooling"] = "normed-mean".into();
        assert!(load_err(&build(&json, &tensors)).contains("unknown pooling"));
    }

    #[test]
    fn corrupt_files_are_clear_errors() {
        let (r, _) = router(Pooling::Mean);
        let (json, tensors) = parts(&r);
        let good = build(&json, &tensors);

        assert!(load_err(b"definitely not safetensors").contains("not a safetensors file"));
        assert!(load_err(&good[..good.len() - 7]).contains("not a safetensors file"));

        let with = |key: &str, v: Value| {
            let mut j = json.clone();
            j[key] = v;
            load_err(&build(&j, &tensors))
        };
        assert!(with("version", 3.into()).contains("format version 3"));
        assert!(with("version", 0.into()).contains("format version 0"));
        assert!(with("format", "something-else".into()).contains("format"));
        assert!(with("pooling", "max".into()).contains("unknown pooling"));
        assert!(with("layer", 9.into()).contains("out of range"));
        // A router for another model size: every tensor's shape is off.
        assert!(with("hidden_size", 16.into()).contains("expected [3, 16]"));
        assert!(with("classes", serde_json::json!(["a", "b"])).contains("shape"));

        let mut nan = tensors.clone();
        nan[0].2[1] = f32::NAN;
        assert!(load_err(&build(&json, &nan)).contains("non-finite"));
        let missing: Vec<_> = tensors.iter().filter(|t| t.0 != BIAS).cloned().collect();
        assert!(load_err(&build(&json, &missing)).contains(BIAS));

        let plain = safetensors::serialize(
            [(
                "x",
                safetensors::tensor::TensorView::new(Dtype::F32, vec![1], &[0u8; 4]).unwrap(),
            )],
            None,
        )
        .unwrap();
        assert!(load_err(&plain).contains("not a meswitch router"));

        let gone = temp().path().join("nope.safetensors");
        assert!(matches!(
            HiddenRouter::load(&gone),
            Err(RouterError::Io { .. })
        ));
    }
}
