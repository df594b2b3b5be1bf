//! The architecture hyper-parameters of a Llama/Mistral decoder, read from a
//! Hugging Face `config.json` (the GGUF loader produces the same JSON keys).

use serde_json::Value;

use super::ModelError;

/// Architectures whose forward pass [`super::cpu::CpuBackend`] implements:
/// pre-norm decoder, RMSNorm, rotate-half RoPE, grouped-query attention,
/// SwiGLU MLP. Mistral only adds the sliding window.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["LlamaForCausalLM", "MistralForCausalLM"];

/// Defaults of `transformers`' LlamaConfig for keys a config may omit.
const DEFAULT_ROPE_THETA: f64 = 10_000.0;
const DEFAULT_RMS_NORM_EPS: f64 = 1e-6;

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f32,
    /// Mistral: position `i` attends to positions `j` with `i - j < window`.
    pub sliding_window: Option<usize>,
    pub tie_word_embeddings: bool,
    /// Longest context the model was trained for, when the config says.
    pub max_position_embeddings: Option<usize>,
}

fn get_usize(config: &Value, key: &str) -> Result<Option<usize>, ModelError> {
    match config.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| {
                ModelError::Config(format!("`{key}` must be a non-negative integer, found {v}"))
            }),
    }
}

fn require_usize(config: &Value, key: &str) -> Result<usize, ModelError> {
    match get_usize(config, key)? {
        Some(0) => Err(ModelError::Config(format!("`{key}` must be positive"))),
        Some(n) => Ok(n),
        None => Err(ModelError::Config(format!("missing `{key}`"))),
    }
}

fn get_f64(config: &Value, key: &str, default: f64) -> Result<f64, ModelError> {
    match config.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_f64()
            .filter(|x| x.is_finite() && *x > 0.0)
            .ok_or_else(|| {
                ModelError::Config(format!("`{key}` must be a positive number, found {v}"))
            }),
    }
}

/// Dimensions beyond this are surely a corrupt config, and would make the
/// loader attempt absurd allocations.
const MAX_DIM: usize = 1 << 20;

impl ModelConfig {
    pub fn from_hf(config: &Value) -> Result<ModelConfig, ModelError> {
        if let Some(archs) = config.get("architectures").and_then(Value::as_array) {
            let known = archs
                .iter()
                .filter_map(Value::as_str)
                .any(|a| SUPPORTED_ARCHITECTURES.contains(&a));
            if !known {
                return Err(ModelError::Config(format!(
                    "unsupported architecture {archs:?} (supported: {SUPPORTED_ARCHITECTURES:?})"
                )));
            }
        }
        if let Some(scaling) = config.get("rope_scaling").filter(|v| !v.is_null()) {
            return Err(ModelError::Config(format!(
                "rope_scaling {scaling} is not supported (only plain RoPE)"
            )));
        }
        let hidden_size = require_usize(config, "hidden_size")?;
        let num_heads = require_usize(config, "num_attention_heads")?;
        let num_kv_heads = get_usize(config, "num_key_value_heads")?.unwrap_or(num_heads);
        let head_dim = match get_usize(config, "head_dim")? {
            Some(d) => d,
            None => hidden_size / num_heads,
        };
        let cfg = ModelConfig {
            hidden_size,
            intermediate_size: require_usize(config, "intermediate_size")?,
            num_layers: require_usize(config, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: require_usize(config, "vocab_size")?,
            rope_theta: get_f64(config, "rope_theta", DEFAULT_ROPE_THETA)?,
            rms_norm_eps: get_f64(config, "rms_norm_eps", DEFAULT_RMS_NORM_EPS)? as f32,
            sliding_window: get_usize(config, "sliding_window")?.filter(|&w| w > 0),
            tie_word_embeddings: config
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            max_position_embeddings: get_usize(config, "max_position_embeddings")?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ModelError> {
        let dims = [
            self.hidden_size,
            self.intermediate_size,
            self.num_layers,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.vocab_size,
        ];
        if dims.iter().any(|&d| d == 0 || d > MAX_DIM) {
            return Err(ModelError::Config(format!(
                "dimension out of range in {self:?}"
            )));
        }
        if self.num_kv_heads > self.num_heads || self.num_heads % self.num_kv_heads != 0 {
            return Err(ModelError::Config(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            )));
        }
        if self.head_dim % 2 != 0 {
            return Err(ModelError::Config(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim
            )));
        }
        Ok(())
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// The HF config JSON of this configuration (for synthetic test models).
    pub fn to_hf(&self) -> Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "sliding_window": self.sliding_window,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Value {
        serde_json::json!({"architectures": ["MistralForCausalLM"], "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 100, "rope_theta": 1e6, "sliding_window": 16})
    }

    #[test]
    fn reads_mistral_config_and_derives_head_dim() {
        let c = ModelConfig::from_hf(&base()).unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.kv_dim(), 32);
        assert_eq!(c.sliding_window, Some(16));
        assert_eq!(c.rms_norm_eps, DEFAULT_RMS_NORM_EPS as f32);
        assert_eq!(ModelConfig::from_hf(&c.to_hf()).unwrap(), c);
    }

    #[test]
    fn rejects_bad_configs() {
        for (key, value) in [
            ("num_key_value_heads", serde_json::json!(3)),
            ("hidden_size", serde_json::json!(-1)),
            ("hidden_size", serde_json::json!("x")),
            ("architectures", serde_json::json!(["GPT2LMHeadModel"])),
            ("rope_scaling", serde_json::json!({"type": "llama3"})),
            ("rope_theta", serde_json::json!(0)),
        ] {
            let mut c = base();
            c[key] = value;
            assert!(ModelConfig::from_hf(&c).is_err(), "{key}");
        }
        let mut c = base();
        c.as_object_mut().unwrap().remove("vocab_size");
        assert!(ModelConfig::from_hf(&c).is_err());
    }
}
