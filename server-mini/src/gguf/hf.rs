//! HF-style view of a llama-architecture GGUF: config keys, tensor names, and undoing the
//! converter's RoPE row permutation of the Q/K projections.
//!
//! Why the permutation exists: HF Llama applies RoPE in the `rotate_half` convention (dimension i
//! of a head pairs with i + head_dim/2), while ggml's `rope` (normal mode, used for llama) pairs
//! adjacent dimensions (2i, 2i+1). llama.cpp's `convert_hf_to_gguf.py` (`LlamaModel.permute`)
//! therefore reorders the rows of `q_proj` (with n_head) and `k_proj` (with n_head_kv):
//! ```text
//!   w.reshape(n_head, 2, head_dim/2, in).swapaxes(1, 2).reshape(out, in)
//!   HF row   h*head_dim + s*(head_dim/2) + i     (s in {0,1}, i < head_dim/2)
//!   GGUF row h*head_dim + 2*i + s
//! ```
//! We invert that, so the weights are exactly HF's and downstream code uses HF RoPE.

use super::{GgufError, GgufFile};
use serde_json::{json, Map, Value};

/// Per-layer tensor names: (GGUF suffix after `blk.N.`, HF suffix after `model.layers.N.`).
const LAYER_NAMES: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// Whole-model tensor names (GGUF base name, HF base name).
const GLOBAL_NAMES: &[(&str, &str)] = &[
    ("token_embd", "model.embed_tokens"),
    ("output_norm", "model.norm"),
    ("output", "lm_head"),
];

/// llama.cpp's default RoPE base when `<arch>.rope.freq_base` is absent.
const DEFAULT_ROPE_THETA: f64 = 10_000.0;
/// llama.cpp's default RMSNorm epsilon for llama when the key is absent.
const DEFAULT_RMS_EPS: f64 = 1e-5;

/// Row permutation inverse (see module docs). `w` is `[rows, row_len]` row-major.
pub(super) fn unpermute_rope_rows<T: Copy>(
    w: &mut [T],
    row_len: usize,
    n_head: usize,
) -> Result<(), String> {
    if row_len == 0 || n_head == 0 {
        return Ok(());
    }
    let rows = w.len() / row_len;
    if rows % n_head != 0 || (rows / n_head) % 2 != 0 {
        return Err(format!(
            "{rows} rows do not split into {n_head} heads of even head_dim"
        ));
    }
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    let src = w.to_vec();
    for h in 0..n_head {
        for s in 0..2 {
            for i in 0..half {
                let hf_row = h * head_dim + s * half + i;
                let gguf_row = h * head_dim + 2 * i + s;
                w[hf_row * row_len..(hf_row + 1) * row_len]
                    .copy_from_slice(&src[gguf_row * row_len..(gguf_row + 1) * row_len]);
            }
        }
    }
    Ok(())
}

/// Splits `blk.N.rest` into (N, rest).
fn split_block(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("blk.")?;
    let (n, rest) = rest.split_once('.')?;
    Some((n.parse().ok()?, rest))
}

impl GgufFile {
    /// `general.architecture` (e.g. "llama").
    pub fn architecture(&self) -> Option<&str> {
        self.meta_str("general.architecture")
    }

    fn arch_u64(&self, key: &str) -> Option<u64> {
        self.meta_u64(&format!("{}.{key}", self.architecture()?))
    }

    fn arch_f64(&self, key: &str) -> Option<f64> {
        self.meta_f64(&format!("{}.{key}", self.architecture()?))
    }

    /// For `blk.N.attn_q.weight` / `attn_k.weight` of a llama file: the head count the converter
    /// permuted with (n_head for Q, n_head_kv for K). None for every other tensor.
    pub(super) fn rope_permuted_heads(&self, name: &str) -> Result<Option<usize>, GgufError> {
        if self.architecture() != Some("llama") {
            return Ok(None);
        }
        let Some((_, rest)) = split_block(name) else {
            return Ok(None);
        };
        let key = match rest {
            "attn_q.weight" | "attn_q.bias" => "attention.head_count",
            "attn_k.weight" | "attn_k.bias" => "attention.head_count_kv",
            _ => return Ok(None),
        };
        let n = self
            .arch_u64(key)
            .or_else(|| self.arch_u64("attention.head_count")) // head_count_kv defaults to head_count
            .ok_or_else(|| GgufError::BadMetadata {
                key: format!("llama.{key}"),
                problem: "missing; needed to undo the Q/K RoPE permutation".into(),
            })?;
        Ok(Some(n as usize))
    }

    /// HF name of a GGUF tensor (`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`),
    /// or None for tensors HF does not have (e.g. `rope_freqs.weight`).
    pub fn hf_name(&self, gguf_name: &str) -> Option<String> {
        let (base, kind) = gguf_name.rsplit_once('.')?;
        if kind != "weight" && kind != "bias" {
            return None;
        }
        if let Some((n, part)) = split_block(base) {
            let hf = LAYER_NAMES.iter().find(|(g, _)| *g == part)?.1;
            return Some(format!("model.layers.{n}.{hf}.{kind}"));
        }
        let hf = GLOBAL_NAMES.iter().find(|(g, _)| *g == base)?.1;
        Some(format!("{hf}.{kind}"))
    }

    /// HF `config.json` equivalent from the `<arch>.*` metadata. Keys whose metadata is missing
    /// are left out (the caller decides whether that is fatal).
    pub fn hf_config(&self) -> Value {
        let mut c = Map::new();
        let arch = self.architecture().unwrap_or("");
        if arch == "llama" {
            c.insert("architectures".into(), json!(["LlamaForCausalLM"]));
            c.insert("model_type".into(), json!("llama"));
        }
        let mut put_u = |hf: &str, key: &str| {
            if let Some(v) = self.arch_u64(key) {
                c.insert(hf.into(), json!(v));
            }
        };
        put_u("hidden_size", "embedding_length");
        put_u("intermediate_size", "feed_forward_length");
        put_u("num_hidden_layers", "block_count");
        put_u("num_attention_heads", "attention.head_count");
        put_u("max_position_embeddings", "context_length");
        let heads = self.arch_u64("attention.head_count");
        if let Some(kv) = self.arch_u64("attention.head_count_kv").or(heads) {
            c.insert("num_key_value_heads".into(), json!(kv));
        }
        let head_dim = self.arch_u64("attention.key_length").or_else(|| {
            let d = self.arch_u64("embedding_length")?;
            heads.filter(|&h| h > 0).map(|h| d / h)
        });
        if let Some(hd) = head_dim {
            c.insert("head_dim".into(), json!(hd));
        }
        let vocab = self.arch_u64("vocab_size").or_else(|| {
            let toks = self.metadata().get("tokenizer.ggml.tokens")?.as_array()?;
            Some(toks.len() as u64)
        });
        let vocab = vocab.or_else(|| {
            self.tensor_info("token_embd.weight")
                .map(|t| t.shape[1] as u64)
        });
        if let Some(v) = vocab {
            c.insert("vocab_size".into(), json!(v));
        }
        let theta = self
            .arch_f64("rope.freq_base")
            .unwrap_or(DEFAULT_ROPE_THETA);
        c.insert("rope_theta".into(), json!(f32_clean(theta)));
        let eps = self
            .arch_f64("attention.layer_norm_rms_epsilon")
            .unwrap_or(DEFAULT_RMS_EPS);
        c.insert("rms_norm_eps".into(), json!(f32_clean(eps)));
        let tied = self.tensor_info("output.weight").is_none();
        c.insert("tie_word_embeddings".into(), json!(tied));
        for (hf, key) in [
            ("bos_token_id", "tokenizer.ggml.bos_token_id"),
            ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ] {
            if let Some(v) = self.meta_u64(key) {
                c.insert(hf.into(), json!(v));
            }
        }
        Value::Object(c)
    }
}

/// GGUF stores these as f32; print the decimal the f32 came from (1e-5, not 9.99999974e-6).
fn f32_clean(x: f64) -> f64 {
    let s = format!("{}", x as f32);
    s.parse().unwrap_or(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Apply the converter's permutation (as documented above) to HF rows.
    fn permute(w: &[f32], row_len: usize, n_head: usize) -> Vec<f32> {
        let rows = w.len() / row_len;
        let (hd, half) = (rows / n_head, rows / n_head / 2);
        let mut out = vec![0.0; w.len()];
        for h in 0..n_head {
            for s in 0..2 {
                for i in 0..half {
                    let (hf, gg) = (h * hd + s * half + i, h * hd + 2 * i + s);
                    out[gg * row_len..(gg + 1) * row_len]
                        .copy_from_slice(&w[hf * row_len..(hf + 1) * row_len]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_the_converter() {
        let (n_head, head_dim, row_len) = (3, 8, 5);
        let hf: Vec<f32> = (0..n_head * head_dim * row_len).map(|x| x as f32).collect();
        let mut g = permute(&hf, row_len, n_head);
        assert_ne!(g, hf);
        // GGUF row 1 of head 0 is HF row head_dim/2 (the partner of row 0).
        assert_eq!(g[row_len], hf[(head_dim / 2) * row_len]);
        unpermute_rope_rows(&mut g, row_len, n_head).unwrap();
        assert_eq!(g, hf);
    }

    #[test]
    fn unpermute_rejects_odd_heads() {
        let mut w = vec![0.0; 3 * 4];
        assert!(unpermute_rope_rows(&mut w, 4, 2).is_err());
    }
}
