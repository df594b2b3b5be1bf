//! The base model's hidden states for the router: the decoder of
//! [`CpuBackend`] stopped after a chosen layer, on a throw-away cache.
//!
//! ```text
//!   layer:   0 .. n_layers-1      n_layers
//!   h after  decoder layer l      final RMSNorm (what lm_head reads)
//! ```

use super::{CpuBackend, KvCache};
use crate::model::{LogitsWanted, ModelError, SeqStep};

impl CpuBackend {
    /// `[tokens.len(), hidden]` after decoder layer `layer` (0-based), or after the
    /// final RMSNorm when `layer == n_layers`; the base model only.
    pub(super) fn hidden_states_base(
        &self,
        tokens: &[u32],
        layer: usize,
    ) -> Result<Vec<f32>, ModelError> {
        Ok(self.hidden_states_at(tokens, &[layer])?.remove(0))
    }

    /// [`Backend::hidden_states`](crate::model::Backend::hidden_states) at
    /// several layers from one pass (the router's layer sweep): one
    /// `[tokens.len(), hidden]` per entry of `layers`, in that order.
    pub fn hidden_states_at(
        &self,
        tokens: &[u32],
        layers: &[usize],
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let n_layers = self.config.num_layers;
        if let Some(&layer) = layers.iter().find(|&&l| l > n_layers) {
            return Err(ModelError::LayerRange { layer, n_layers });
        }
        let mut cache = KvCache::default();
        let mut batch = [SeqStep {
            tokens,
            cache: &mut cache,
            expert: None,
            logits: LogitsWanted::Last,
        }];
        self.validate(&batch)?;
        let deepest = layers
            .iter()
            .map(|&l| (l + 1).min(n_layers))
            .max()
            .unwrap_or(0);
        let mut out = vec![Vec::new(); layers.len()];
        let (h, rows) = self.run_decoder(&mut batch, deepest, &mut |l, h| {
            for (o, _) in out.iter_mut().zip(layers).filter(|(_, &want)| want == l) {
                *o = h.to_vec();
            }
        })?;
        if layers.contains(&n_layers) {
            let normed = self.norm_rows(&h, &self.weights.final_norm, |_| None, &rows);
            for (o, _) in out
                .iter_mut()
                .zip(layers)
                .filter(|(_, &want)| want == n_layers)
            {
                o.clone_from(&normed);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use half::f16;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    use super::*;
    use crate::model::weights::{names, Proj};
    use crate::model::{Backend, MemorySource, ModelConfig};

    /// Logits agree to this relative error: the head sees the same floats,
    /// only the batching of the products may differ.
    const REL_TOL: f32 = 1e-5;

    fn config(num_layers: usize) -> ModelConfig {
        ModelConfig {
            hidden_size: 32,
            intermediate_size: 48,
            num_layers,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 8,
            vocab_size: 40,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            sliding_window: None,
            tie_word_embeddings: true,
            max_position_embeddings: Some(64),
        }
    }

    /// A random Llama; layer `l`'s weights depend only on `(seed, l)`, so a
    /// model with fewer layers is a prefix of one with more.
    fn model(num_layers: usize, seed: u64) -> CpuBackend {
        let c = config(num_layers);
        let h = c.hidden_size;
        let random = |seed: u64, n: usize, scale: f32| -> Vec<f16> {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..n)
                .map(|_| f16::from_f32(rng.random_range(-scale..scale)))
                .collect()
        };
        let mut t = BTreeMap::new();
        t.insert(
            names::EMBED.to_string(),
            (vec![c.vocab_size, h], random(seed, c.vocab_size * h, 1.0)),
        );
        let final_norm = random(seed + 1, h, 0.2)
            .iter()
            .map(|v| f16::from_f32(1.0 + v.to_f32()))
            .collect();
        t.insert(names::FINAL_NORM.to_string(), (vec![h], final_norm));
        for l in 0..num_layers {
            let s = seed + 100 * (l as u64 + 1);
            t.insert(names::input_norm(l), (vec![h], vec![f16::ONE; h]));
            t.insert(names::post_norm(l), (vec![h], vec![f16::ONE; h]));
            for (i, p) in Proj::ALL.into_iter().enumerate() {
                let [o, n] = p.shape(&c);
                t.insert(
                    names::proj(l, p),
                    (vec![o, n], random(s + i as u64, o * n, 0.3)),
                );
            }
        }
        CpuBackend::load(&MemorySource {
            config: c.to_hf(),
            tensors: t,
        })
        .unwrap()
    }

    /// `lm_head(x)` for each row of `x` (already final-normed).
    fn head(m: &CpuBackend, x: &[f32]) -> Vec<f32> {
        let rows = vec![None; x.len() / m.config.hidden_size];
        m.linear(m.weights.lm_head(), |_| None, x, &rows).unwrap()
    }

    fn forward_last(m: &CpuBackend, tokens: &[u32]) -> Vec<f32> {
        let mut cache = m.new_cache();
        let mut batch = [SeqStep {
            tokens,
            cache: &mut cache,
            expert: None,
            logits: LogitsWanted::Last,
        }];
        m.forward(&mut batch).unwrap().remove(0)
    }

    fn assert_close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (x, y) in a.iter().zip(b) {
            assert!(
                (x - y).abs() <= REL_TOL * scale,
                "{x} vs {y} (scale {scale})"
            );
        }
    }

    const TOKENS: [u32; 7] = [3, 17, 5, 39, 0, 22, 8];

    #[test]
    fn last_layer_through_the_head_is_forward() {
        let m = model(3, 7);
        let d = m.config.hidden_size;
        let h = m.hidden_states(&TOKENS, 3).unwrap();
        assert_eq!(h.len(), TOKENS.len() * d);
        let last = &h[(TOKENS.len() - 1) * d..];
        assert_close(&head(&m, last), &forward_last(&m, &TOKENS));
    }

    /// Stopping after layer `l` of an n-layer model is the whole of an
    /// (l+1)-layer model with the same first layers: its final norm + head
    /// give that smaller model's logits from `forward`.
    #[test]
    fn stopping_early_is_a_shallower_model() {
        let deep = model(3, 11);
        let d = deep.config.hidden_size;
        for l in 0..3 {
            let shallow = model(l + 1, 11);
            let h = deep.hidden_states(&TOKENS, l).unwrap();
            let last = &h[(TOKENS.len() - 1) * d..];
            let mut normed = vec![0f32; d];
            crate::model::ops::rms_norm(
                last,
                &deep.weights.final_norm,
                deep.config.rms_norm_eps,
                &mut normed,
            );
            assert_close(&head(&deep, &normed), &forward_last(&shallow, &TOKENS));
        }
        assert_ne!(
            deep.hidden_states(&TOKENS, 0).unwrap(),
            deep.hidden_states(&TOKENS, 1).unwrap()
        );
    }

    /// Causal attention: a prefix's hidden states are the first rows of the
    /// whole sequence's (nothing leaks from a throw-away cache either).
    #[test]
    fn prefix_rows_are_causal() {
        let m = model(2, 3);
        let d = m.config.hidden_size;
        let whole = m.hidden_states(&TOKENS, 1).unwrap();
        let prefix = m.hidden_states(&TOKENS[..4], 1).unwrap();
        assert_close(&prefix, &whole[..4 * d]);
    }

    #[test]
    fn several_layers_in_one_pass_match_one_at_a_time() {
        let m = model(3, 13);
        let layers = [3, 0, 2, 0];
        let all = m.hidden_states_at(&TOKENS, &layers).unwrap();
        for (h, &l) in all.iter().zip(&layers) {
            assert_eq!(h, &m.hidden_states(&TOKENS, l).unwrap(), "layer {l}");
        }
    }

    #[test]
    fn bad_requests_are_errors() {
        let m = model(2, 5);
        assert!(matches!(
            m.hidden_states(&TOKENS, 3),
            Err(ModelError::LayerRange {
                layer: 3,
                n_layers: 2
            })
        ));
        assert!(matches!(
            m.hidden_states(&[], 0),
            Err(ModelError::EmptyStep)
        ));
        assert!(matches!(
            m.hidden_states(&[1, 40], 0),
            Err(ModelError::Token { token: 40, .. })
        ));
    }
}
