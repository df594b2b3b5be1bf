//! Identity of a base model: which base a delta was computed against.
//!
//! The digest is SHA-256 over a canonical JSON text
//!
//! ```text
//!   {"config":{<IDENTITY_CONFIG_KEYS present in config.json, keys sorted>},
//!    "tensors":[["model.embed_tokens.weight",[32000,4096]], ... sorted by name]}
//! ```
//!
//! Canonical means: no whitespace, object keys sorted at every depth, and
//! numbers normalised so that the same model described by a Hugging Face
//! `config.json` (f64 JSON numbers, `10000` or `10000.0`) and by GGUF
//! metadata (f32 values) gets the same digest: an integral number is
//! written as an integer, any other number is rounded to f32 and written in
//! its shortest round-trip form.

use sha2::{Digest, Sha256};

/// Config keys that define the architecture; anything else in config.json
/// (dtype, transformers version, generation defaults) may differ between two
/// copies of the same base and is left out.
pub const IDENTITY_CONFIG_KEYS: &[&str] = &[
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "rope_theta",
    "rms_norm_eps",
    "tie_word_embeddings",
    "head_dim",
];

/// Integral f64 values up to 2^53 are exact, so they print as integers
/// without loss.
const MAX_EXACT_INTEGER: f64 = 9_007_199_254_740_992.0;

/// Hex SHA-256 digest identifying a base model.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BaseIdentity {
    pub digest: String,
}

impl BaseIdentity {
    /// `config`: the parsed config.json; `tensors`: (HF name, shape) of
    /// every base tensor, in any order.
    pub fn compute(config: &serde_json::Value, tensors: &[(String, Vec<usize>)]) -> BaseIdentity {
        let mut text = String::from("{\"config\":{");
        let mut first = true;
        let mut keys: Vec<&str> = IDENTITY_CONFIG_KEYS.to_vec();
        keys.sort_unstable();
        for key in keys {
            if let Some(value) = config.get(key) {
                if !first {
                    text.push(',');
                }
                first = false;
                write_string(&mut text, key);
                text.push(':');
                write_canonical(&mut text, value);
            }
        }
        text.push_str("},\"tensors\":[");
        let mut sorted: Vec<&(String, Vec<usize>)> = tensors.iter().collect();
        sorted.sort();
        for (i, (name, shape)) in sorted.into_iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            text.push('[');
            write_string(&mut text, name);
            text.push_str(",[");
            let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
            text.push_str(&dims.join(","));
            text.push_str("]]");
        }
        text.push_str("]}");
        let digest = Sha256::digest(text.as_bytes());
        BaseIdentity {
            digest: digest.iter().map(|b| format!("{b:02x}")).collect(),
        }
    }

    /// True for a well-formed digest: 64 lowercase hex digits.
    pub fn is_well_formed(digest: &str) -> bool {
        digest.len() == 64
            && digest
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    }
}

impl std::fmt::Display for BaseIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.digest)
    }
}

fn write_string(text: &mut String, s: &str) {
    // serde_json's string escaping is deterministic; reuse it.
    text.push_str(&serde_json::Value::String(s.to_owned()).to_string());
}

fn write_canonical(text: &mut String, value: &serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Null | Value::Bool(_) | Value::String(_) => text.push_str(&value.to_string()),
        Value::Number(n) => write_number(text, n),
        Value::Array(items) => {
            text.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    text.push(',');
                }
                write_canonical(text, item);
            }
            text.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            text.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    text.push(',');
                }
                write_string(text, k);
                text.push(':');
                write_canonical(text, v);
            }
            text.push('}');
        }
    }
}

fn write_number(text: &mut String, n: &serde_json::Number) {
    if n.is_u64() || n.is_i64() {
        text.push_str(&n.to_string());
        return;
    }
    let x = n.as_f64().unwrap_or(f64::NAN);
    if x.fract() == 0.0 && x.abs() <= MAX_EXACT_INTEGER {
        text.push_str(&format!("{}", x as i64));
    } else {
        // Rust's float Display prints the shortest text that reads back
        // to the same f32.
        text.push_str(&format!("{}", x as f32));
    }
}
