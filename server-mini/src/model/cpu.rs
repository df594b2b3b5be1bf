//! The forward pass on CPU.
//!
//! A step flattens the new tokens of every sequence into one activation
//! matrix `h [rows, hidden]`; each linear is one multi-expert product over
//! all rows (row b uses its sequence's expert), and only attention looks at
//! sequences separately:
//!
//! ```text
//!   rows:  | seq 0: t0 t1 t2 (prefill) | seq 1: t (decode) | seq 2: t |
//!   h = embed(tokens)                     per-row expert embeddings
//!   per layer:
//!     q,k,v = linear(rms_norm(h))         one multi-expert call each
//!     rope(q, k) at each row's position;  append k, v to each row's cache
//!     h += o_proj(attention(q, cache))
//!     h += down(silu(gate(n)) · up(n)),   n = rms_norm(h)
//!   logits = lm_head(rms_norm(h[rows asked for]))
//! ```

use std::collections::BTreeMap;

use meswitch_reference::container::BaseIdentity;

use super::experts::{Expert, ExpertMatrix, ExpertParser};
use super::kv_window;
use super::linear::{multi_expert_linear, ExpertLinear};
use super::numerics::{
    attention_llama_cpp, ggml_ops, round_f16, to_gguf_head_order, Numerics, Q8Rows,
};
use super::ops::{attention, rms_norm, rope, rope_inv_freq, swiglu, AttnShape, Query};
use super::weights::{Matrix, Proj, WeightSource, Weights};
use super::{Backend, ExpertId, LogitsWanted, ModelConfig, ModelError, SeqStep};

/// `Backend::hidden_states` (the router's features), on the decoder above.
#[path = "cpu_hidden.rs"]
mod hidden;

/// Context limit when the config names none.
const DEFAULT_MAX_CONTEXT: usize = 4096;

/// A sequence's keys and values, per layer, post-RoPE keys. Under a
/// sliding window of `w` no later query looks below position `len − w + 1`,
/// so older positions are dropped once `2·w` are stored (amortised: one
/// shift per `w` tokens), which bounds the cache at `2·w` positions:
///
/// ```text
///   absolute positions:  0 ........ start ................ len
///   stored k[l], v[l]:              [start, len) · kv_dim floats
/// ```
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
    /// Absolute position of the first stored entry.
    start: usize,
    /// Floats per position per layer, set on first use.
    kv_dim: usize,
}

impl KvCache {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Positions held in memory (at most `2·window` under a sliding window).
    pub fn stored_positions(&self) -> usize {
        self.len - self.start
    }
    /// Forgets everything (the sequence restarts at position 0).
    pub fn clear(&mut self) {
        for c in self.k.iter_mut().chain(self.v.iter_mut()) {
            c.clear();
        }
        self.len = 0;
        self.start = 0;
    }
    /// Back to `len` tokens (a failed step's rollback; never below `start`,
    /// since positions are only dropped after a step succeeds).
    fn truncate(&mut self, len: usize) {
        let keep = len.saturating_sub(self.start);
        for c in self.k.iter_mut().chain(self.v.iter_mut()) {
            c.truncate(keep * self.kv_dim);
        }
        self.len = len;
    }
    /// Drops positions no later query can see under `window` (the rule is
    /// [`kv_window::cut_start`], shared with the CUDA cache).
    fn drop_outside(&mut self, window: usize) {
        let Some(new_start) = kv_window::cut_start(self.start, self.len, Some(window)) else {
            return;
        };
        let drop = (new_start - self.start) * self.kv_dim;
        for c in self.k.iter_mut().chain(self.v.iter_mut()) {
            c.drain(..drop);
        }
        self.start = new_start;
    }
}

pub struct CpuBackend {
    config: ModelConfig,
    weights: Weights,
    /// Indexed by [`ExpertId`]; `None` = removed (ids are never reused).
    experts: Vec<Option<Expert>>,
    identity: BaseIdentity,
    shapes: BTreeMap<String, Vec<usize>>,
    inv_freq: Vec<f64>,
    max_context: usize,
    numerics: Numerics,
}

impl CpuBackend {
    pub fn load(src: &dyn WeightSource) -> Result<CpuBackend, ModelError> {
        CpuBackend::load_with(src, Numerics::Exact)
    }

    /// Loads for the given [`Numerics`]: `LlamaCpp` keeps each weight's
    /// FP16 residual so products use the source's exact values (twice the
    /// weight memory).
    pub fn load_with(src: &dyn WeightSource, numerics: Numerics) -> Result<CpuBackend, ModelError> {
        let config = ModelConfig::from_hf(&src.hf_config())?;
        let weights = Weights::load_with(src, &config, numerics == Numerics::LlamaCpp)?;
        Ok(CpuBackend {
            inv_freq: rope_inv_freq(config.head_dim, config.rope_theta),
            max_context: config
                .max_position_embeddings
                .unwrap_or(DEFAULT_MAX_CONTEXT),
            identity: src.identity(),
            shapes: src.shapes(),
            config,
            weights,
            experts: Vec::new(),
            numerics,
        })
    }

    pub fn identity(&self) -> &BaseIdentity {
        &self.identity
    }

    pub fn base_shapes(&self) -> &BTreeMap<String, Vec<usize>> {
        &self.shapes
    }

    pub fn max_context(&self) -> usize {
        self.max_context
    }

    pub fn set_max_context(&mut self, n: usize) {
        self.max_context = n;
    }

    pub fn numerics(&self) -> Numerics {
        self.numerics
    }

    /// Chooses how activations are rounded (see [`Numerics`]). Caches made
    /// under one setting should not be continued under another. Switching
    /// to `LlamaCpp` after an `Exact` load rounds activations like llama.cpp
    /// but on FP16-rounded weights and without the Q4_1 block-sum term;
    /// [`Self::load_with`] keeps what those need.
    pub fn set_numerics(&mut self, numerics: Numerics) {
        self.numerics = numerics;
    }

    /// Reads an expert file, checks it against this base and adds it.
    pub fn load_expert(&mut self, path: &std::path::Path) -> Result<ExpertId, ModelError> {
        let e = Expert::open(path, &self.config, &self.identity, &self.shapes)?;
        Ok(self.add_expert(e))
    }

    pub fn expert_id(&self, name: &str) -> Option<ExpertId> {
        self.experts
            .iter()
            .position(|e| e.as_ref().is_some_and(|e| e.name == name))
    }

    /// A loaded expert; ids in a step are checked by [`Self::validate`].
    fn expert(&self, id: ExpertId) -> &Expert {
        self.experts[id]
            .as_ref()
            .expect("expert ids are validated before the step")
    }

    /// One multi-expert product over all rows. The experts that have their
    /// own version of this tensor are gathered into the op's expert list;
    /// rows of other experts use the base.
    fn linear<'a>(
        &'a self,
        base: &Matrix,
        pick: impl Fn(&'a Expert) -> Option<&'a ExpertMatrix>,
        x: &[f32],
        rows: &[Option<ExpertId>],
    ) -> Result<Vec<f32>, ModelError> {
        let mut list: Vec<ExpertLinear> = Vec::new();
        let mut slot: BTreeMap<ExpertId, Option<u32>> = BTreeMap::new();
        let row_expert: Vec<Option<u32>> = rows
            .iter()
            .map(|e| {
                e.and_then(|id| {
                    *slot.entry(id).or_insert_with(|| {
                        pick(self.expert(id)).map(|m| {
                            list.push(m.linear());
                            (list.len() - 1) as u32
                        })
                    })
                })
            })
            .collect();
        let mut y = vec![0f32; rows.len() * base.out_features];
        let ggml = match (self.numerics, &base.ggml) {
            (Numerics::LlamaCpp, Some(blocks)) => Some(blocks),
            _ => None,
        };
        // Under llama.cpp's numerics, rows on the base get ggml's product of
        // the stored blocks; rows on an expert keep the exact one (llama.cpp
        // has no experts).
        let on_base: Vec<usize> = match ggml {
            Some(_) => (0..rows.len())
                .filter(|&r| row_expert[r].is_none())
                .collect(),
            None => Vec::new(),
        };
        if on_base.len() < rows.len() {
            multi_expert_linear(&base.view(), &list, x, &row_expert, &mut y)?;
        }
        if let Some(blocks) = ggml {
            let (inp, out) = (base.in_features, base.out_features);
            let xb: Vec<f32> = on_base
                .iter()
                .flat_map(|&r| x[r * inp..(r + 1) * inp].iter().copied())
                .collect();
            let mut yb = vec![0f32; on_base.len() * out];
            blocks.matmul(&Q8Rows::quantize(&xb, inp), &mut yb);
            for (&r, src) in on_base.iter().zip(yb.chunks(out)) {
                y[r * out..(r + 1) * out].copy_from_slice(src);
            }
        }
        Ok(y)
    }

    fn norm_rows<'a>(
        &'a self,
        h: &[f32],
        base: &'a [f32],
        pick: impl Fn(&'a Expert) -> Option<&'a Vec<f32>>,
        rows: &[Option<ExpertId>],
    ) -> Vec<f32> {
        let d = self.config.hidden_size;
        let mut out = vec![0f32; h.len()];
        for ((x, y), e) in h.chunks(d).zip(out.chunks_mut(d)).zip(rows) {
            let w = e
                .and_then(|id| pick(self.expert(id)))
                .map_or(base, |v| v.as_slice());
            match self.numerics {
                Numerics::Exact => rms_norm(x, w, self.config.rms_norm_eps, y),
                Numerics::LlamaCpp => ggml_ops::rms_norm(x, w, self.config.rms_norm_eps, y),
            }
        }
        out
    }

    fn validate(&self, batch: &[SeqStep<'_, KvCache>]) -> Result<(), ModelError> {
        for s in batch {
            s.check(s.cache.len, self.config.vocab_size, self.max_context)?;
            if let Some(e) = s
                .expert
                .filter(|&e| self.experts.get(e).is_none_or(Option::is_none))
            {
                return Err(ModelError::UnknownExpert(e));
            }
        }
        Ok(())
    }

    /// Embeds the step's tokens and runs the first `n_layers` decoder
    /// layers (appending to the caches), showing `h` after each layer to
    /// `after_layer`; returns `h [rows, hidden]` and each row's expert.
    fn run_decoder(
        &self,
        batch: &mut [SeqStep<'_, KvCache>],
        n_layers: usize,
        after_layer: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<(Vec<f32>, Vec<Option<ExpertId>>), ModelError> {
        let c = &self.config;
        let (hd, kv_dim, q_dim) = (c.hidden_size, c.kv_dim(), c.q_dim());
        // Row bookkeeping: which sequence and position each row is.
        let mut row_seq = Vec::new();
        let mut row_pos = Vec::new();
        let mut rows: Vec<Option<ExpertId>> = Vec::new();
        for (s, step) in batch.iter().enumerate() {
            for i in 0..step.tokens.len() {
                row_seq.push(s);
                row_pos.push(step.cache.len + i);
                rows.push(step.expert);
            }
        }
        let n = rows.len();

        let mut h = vec![0f32; n * hd];
        let tokens = batch.iter().flat_map(|s| s.tokens.iter());
        for ((dst, &tok), e) in h.chunks_mut(hd).zip(tokens).zip(&rows) {
            let tok = tok as usize;
            match e.and_then(|id| self.expert(id).embed.as_ref()) {
                Some(m) => m.row(&self.weights.embed, tok, dst),
                None => match (&self.weights.embed.ggml, self.numerics) {
                    (Some(blocks), Numerics::LlamaCpp) => blocks.dequantize_row(tok, dst),
                    _ => {
                        let src = &self.weights.embed.weights[tok * hd..(tok + 1) * hd];
                        for (d, w) in dst.iter_mut().zip(src) {
                            *d = w.to_f32();
                        }
                    }
                },
            }
        }

        let attn_shape = AttnShape {
            n_heads: c.num_heads,
            n_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            sliding_window: c.sliding_window,
        };
        for (l, lw) in self.weights.layers.iter().enumerate().take(n_layers) {
            let proj = |p: Proj| expert_proj(l, p);
            let x = self.norm_rows(
                &h,
                &lw.input_norm,
                |e| e.layers[l].input_norm.as_ref(),
                &rows,
            );
            let mut q = self.linear(&lw.proj[Proj::Q.index()], proj(Proj::Q), &x, &rows)?;
            let mut k = self.linear(&lw.proj[Proj::K.index()], proj(Proj::K), &x, &rows)?;
            let mut v = self.linear(&lw.proj[Proj::V.index()], proj(Proj::V), &x, &rows)?;
            let llama_cpp = self.numerics == Numerics::LlamaCpp;
            for (t, &pos) in row_pos.iter().enumerate() {
                let qr = &mut q[t * q_dim..(t + 1) * q_dim];
                let kr = &mut k[t * kv_dim..(t + 1) * kv_dim];
                if llama_cpp {
                    let base = c.rope_theta as f32;
                    ggml_ops::rope(qr, c.head_dim, pos, base);
                    ggml_ops::rope(kr, c.head_dim, pos, base);
                } else {
                    rope(qr, c.head_dim, pos, &self.inv_freq);
                    rope(kr, c.head_dim, pos, &self.inv_freq);
                }
            }
            if llama_cpp {
                // llama.cpp's FP16 KV cache, and its element order for Q and K.
                round_f16(&mut k);
                round_f16(&mut v);
                to_gguf_head_order(&mut q, c.head_dim);
                to_gguf_head_order(&mut k, c.head_dim);
            }
            for (t, &s) in row_seq.iter().enumerate() {
                let cache = &mut *batch[s].cache;
                if cache.k.len() != c.num_layers {
                    cache.k.resize(c.num_layers, Vec::new());
                    cache.v.resize(c.num_layers, Vec::new());
                    cache.kv_dim = kv_dim;
                }
                cache.k[l].extend_from_slice(&k[t * kv_dim..(t + 1) * kv_dim]);
                cache.v[l].extend_from_slice(&v[t * kv_dim..(t + 1) * kv_dim]);
            }
            let queries: Vec<Query> = row_seq
                .iter()
                .zip(&row_pos)
                .map(|(&s, &pos)| {
                    // Positions relative to the first stored one: the window
                    // start moves with them, and nothing it needs was dropped.
                    let cache = &batch[s].cache;
                    Query {
                        pos: pos - cache.start,
                        keys: &cache.k[l],
                        values: &cache.v[l],
                    }
                })
                .collect();
            let mut attn = vec![0f32; n * q_dim];
            if llama_cpp {
                attention_llama_cpp(attn_shape, &q, &queries, &mut attn);
            } else {
                attention(attn_shape, &q, &queries, &mut attn);
            }
            drop(queries);
            let o = self.linear(&lw.proj[Proj::O.index()], proj(Proj::O), &attn, &rows)?;
            add_in_place(&mut h, &o);

            let x = self.norm_rows(&h, &lw.post_norm, |e| e.layers[l].post_norm.as_ref(), &rows);
            let mut gate =
                self.linear(&lw.proj[Proj::Gate.index()], proj(Proj::Gate), &x, &rows)?;
            let up = self.linear(&lw.proj[Proj::Up.index()], proj(Proj::Up), &x, &rows)?;
            if llama_cpp {
                ggml_ops::swiglu(&mut gate, &up, c.intermediate_size);
            } else {
                swiglu(&mut gate, &up);
            }
            let down = self.linear(&lw.proj[Proj::Down.index()], proj(Proj::Down), &gate, &rows)?;
            add_in_place(&mut h, &down);
            after_layer(l, &h);
        }
        Ok((h, rows))
    }

    fn forward_unchecked(
        &self,
        batch: &mut [SeqStep<'_, KvCache>],
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let c = &self.config;
        let hd = c.hidden_size;
        let (h, rows) = self.run_decoder(batch, c.num_layers, &mut |_, _| {})?;

        // Only the rows whose logits were asked for go through the head.
        let mut picked = Vec::new();
        let mut start = 0;
        for step in batch.iter() {
            let from = match step.logits {
                LogitsWanted::Last => step.tokens.len() - 1,
                LogitsWanted::From(f) => f,
            };
            picked.extend((start + from)..(start + step.tokens.len()));
            start += step.tokens.len();
        }
        let ph: Vec<f32> = picked
            .iter()
            .flat_map(|&t| h[t * hd..(t + 1) * hd].iter().copied())
            .collect();
        let prows: Vec<Option<ExpertId>> = picked.iter().map(|&t| rows[t]).collect();
        let x = self.norm_rows(
            &ph,
            &self.weights.final_norm,
            |e| e.final_norm.as_ref(),
            &prows,
        );
        let logits = self.linear(self.weights.lm_head(), |e| e.lm_head(), &x, &prows)?;

        let vocab = c.vocab_size;
        let mut out = Vec::with_capacity(batch.len());
        let mut offset = 0;
        for step in batch.iter_mut() {
            step.cache.len += step.tokens.len();
            let count = match step.logits {
                LogitsWanted::Last => 1,
                LogitsWanted::From(f) => step.tokens.len() - f,
            };
            out.push(logits[offset * vocab..(offset + count) * vocab].to_vec());
            offset += count;
        }
        Ok(out)
    }
}

/// The expert's version of projection `p` of layer `l`, if it has one.
fn expert_proj(l: usize, p: Proj) -> impl for<'e> Fn(&'e Expert) -> Option<&'e ExpertMatrix> {
    move |e| e.layers[l].proj[p.index()].as_ref()
}

fn add_in_place(h: &mut [f32], d: &[f32]) {
    for (a, b) in h.iter_mut().zip(d) {
        *a += b;
    }
}

impl Backend for CpuBackend {
    type Cache = KvCache;

    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn new_cache(&self) -> KvCache {
        KvCache::default()
    }

    fn add_expert(&mut self, expert: Expert) -> ExpertId {
        self.experts.push(Some(expert));
        self.experts.len() - 1
    }

    fn expert_names(&self) -> Vec<String> {
        self.experts
            .iter()
            .flatten()
            .map(|e| e.name.clone())
            .collect()
    }

    fn remove_expert(&mut self, id: ExpertId) -> Result<Expert, ModelError> {
        self.experts
            .get_mut(id)
            .and_then(Option::take)
            .ok_or(ModelError::UnknownExpert(id))
    }

    fn expert_parser(&self) -> ExpertParser {
        ExpertParser {
            config: self.config.clone(),
            identity: self.identity.clone(),
            shapes: self.shapes.clone(),
        }
    }

    fn hidden_states(&self, tokens: &[u32], layer: usize) -> Result<Vec<f32>, ModelError> {
        self.hidden_states_base(tokens, layer)
    }

    fn forward(&self, batch: &mut [SeqStep<'_, KvCache>]) -> Result<Vec<Vec<f32>>, ModelError> {
        self.validate(batch)?;
        let lens: Vec<usize> = batch.iter().map(|s| s.cache.len).collect();
        let result = self.forward_unchecked(batch);
        match (&result, self.config.sliding_window) {
            (Err(_), _) => {
                // Leave every cache as it was before the step.
                for (s, len) in batch.iter_mut().zip(lens) {
                    s.cache.truncate(len);
                }
            }
            (Ok(_), Some(window)) => {
                for s in batch.iter_mut() {
                    s.cache.drop_outside(window);
                }
            }
            (Ok(_), None) => {}
        }
        result
    }
}
