//! The step itself: rows on the host, the decoder layers on the device
//! (the drawing is in the module docs of [`super`]), the head, and the
//! router's hidden states.

use half::f16;
use meswitch_ops::layers::{
    add_residual_device, attention_device, embed_device, kv_append_device, rms_norm_device,
    rope_device, swiglu_device, AttnRows, DeviceKv,
};
use meswitch_ops::DeviceSlice;

/// A device array (cudarc's `CudaSlice`, as meswitch-ops names it).
type CudaSlice<T> = DeviceSlice<T>;
use meswitch_reference::layers::{rms_norm, AttnShape};

use super::linear::{multi_expert_linear, prepare_linear, runs, PreparedLinear, StepTables};
use super::weights::{delta_embed_row, dense_embed_row, DeviceExpert, DeviceMatrix};
use super::{device_err, CudaBackend, CudaCache};
use crate::model::experts::{Expert, ExpertMatrix};
use crate::model::weights::Proj;
use crate::model::{ExpertId, LogitsWanted, ModelError, SeqStep};

/// The order a step runs its sequences in: by expert (rows with no expert
/// first), the caller's order within one expert. The GEMV gives each expert
/// only the 8-row n-tiles that hold one of its rows
/// (`ptx/kernels/gemv_core.cuh`); arrival order interleaves experts, so at 32
/// rows over 16 experts each expert's two rows would mostly sit in two tiles
/// and its dequantized codes would go through twice the mma, x loads and
/// re-pairing that one tile needs. Which row a sequence gets changes nothing
/// else: each row carries its own cache and position.
pub(super) fn expert_order(experts: impl Iterator<Item = Option<ExpertId>>) -> Vec<usize> {
    let experts: Vec<Option<ExpertId>> = experts.collect();
    let mut order: Vec<usize> = (0..experts.len()).collect();
    // Stable: the caller's order within an expert (None < Some).
    order.sort_by_key(|&i| experts[i]);
    order
}

/// The step's rows, on the host:
///
/// ```text
///   rows:     | seq 0: t0 t1 t2 (prefill) | seq 1: t (decode) | seq 2: t |
///   seq_pos:    (0,5) (0,6) (0,7)          (1,12)              (2,3)
///   slot:       0     0     0              None                1        (index into `active`)
/// ```
pub(super) struct StepRows {
    pub tokens: Vec<u32>,
    /// (index of the row's sequence in the step = index of its cache, position)
    pub seq_pos: Vec<(usize, usize)>,
    pub slot: Vec<Option<usize>>,
    /// Distinct experts of the step, in order of first use.
    pub active: Vec<ExpertId>,
}

impl StepRows {
    /// From each sequence's (new tokens, cache length, expert).
    pub fn new<'t>(seqs: impl Iterator<Item = (&'t [u32], usize, Option<ExpertId>)>) -> StepRows {
        let mut rows = StepRows {
            tokens: Vec::new(),
            seq_pos: Vec::new(),
            slot: Vec::new(),
            active: Vec::new(),
        };
        for (s, (tokens, len, expert)) in seqs.enumerate() {
            let slot = expert.map(|id| match rows.active.iter().position(|&a| a == id) {
                Some(k) => k,
                None => {
                    rows.active.push(id);
                    rows.active.len() - 1
                }
            });
            for (i, &t) in tokens.iter().enumerate() {
                rows.tokens.push(t);
                rows.seq_pos.push((s, len + i));
                rows.slot.push(slot);
            }
        }
        rows
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }
}

fn alloc_failed(what: &str, len: usize, e: impl std::fmt::Display) -> ModelError {
    ModelError::Device(format!("allocating {what} ({len} elements): {e}"))
}

fn zeros_f32(b: &CudaBackend, len: usize, what: &str) -> Result<CudaSlice<f32>, ModelError> {
    b.gpu
        .stream()
        .alloc_zeros::<f32>(len)
        .map_err(|e| alloc_failed(what, len, e))
}

fn zeros_f16(b: &CudaBackend, len: usize, what: &str) -> Result<CudaSlice<f16>, ModelError> {
    b.gpu
        .stream()
        .alloc_zeros::<f16>(len)
        .map_err(|e| alloc_failed(what, len, e))
}

/// Copies rows `[a, b)` of `src` to rows starting at `dst_row` of `dst`
/// (both `[_, width]`), on the stream.
fn copy_rows<T>(
    b: &CudaBackend,
    src: &CudaSlice<T>,
    (a, e): (usize, usize),
    dst: &mut CudaSlice<T>,
    dst_row: usize,
    width: usize,
) -> Result<(), ModelError> {
    let n = e - a;
    let s = src
        .try_slice(a * width..e * width)
        .ok_or_else(|| ModelError::Device(format!("source rows {a}..{e} out of range")))?;
    let mut d = dst
        .try_slice_mut(dst_row * width..(dst_row + n) * width)
        .ok_or_else(|| ModelError::Device(format!("target rows {dst_row}+{n} out of range")))?;
    b.gpu
        .stream()
        .memcpy_dtod(&s, &mut d)
        .map_err(|e| ModelError::Device(format!("device row copy: {e}")))
}

/// Waits for the stream after a device-to-host copy. A copy into pageable
/// memory (a `Vec`) already completes before `clone_dtoh` returns; the wait
/// keeps the host read safe whatever memory the allocator hands out.
fn wait(b: &CudaBackend, during: &str) -> Result<(), ModelError> {
    b.gpu.synchronize().map_err(|e| device_err(during, e))
}

/// Per-step activation buffers, reused by every layer.
struct Buffers {
    x: CudaSlice<f16>,
    q: CudaSlice<f16>,
    k: CudaSlice<f16>,
    v: CudaSlice<f16>,
    attn: CudaSlice<f16>,
    /// Output of o_proj and of down_proj, `[rows, hidden]`.
    o: CudaSlice<f16>,
    gate: CudaSlice<f16>,
    up: CudaSlice<f16>,
    act: CudaSlice<f16>,
    /// Norm output under an expert's own norm weight (allocated on demand).
    norm_tmp: Option<CudaSlice<f16>>,
}

/// A step's experts, host and device copies, indexed by slot.
type Experts<'a> = Vec<(&'a Expert, &'a DeviceExpert)>;

impl CudaBackend {
    fn step_experts(&self, rows: &StepRows) -> Result<Experts<'_>, ModelError> {
        rows.active.iter().map(|&id| self.slot(id)).collect()
    }

    /// `x = rms_norm(h)` per row, with the base weight or, for rows of an
    /// expert that has its own, that expert's: all rows under the base
    /// weight, then each such expert's rows from one more launch.
    #[allow(clippy::too_many_arguments)]
    fn norm(
        &self,
        h: &CudaSlice<f32>,
        base_w: &DeviceSlice<f32>,
        per_slot: &[Option<&DeviceSlice<f32>>],
        slot: &[Option<usize>],
        x: &mut CudaSlice<f16>,
        tmp: &mut Option<CudaSlice<f16>>,
    ) -> Result<(), ModelError> {
        let (gpu, n, hd) = (&self.gpu, slot.len(), self.config.hidden_size);
        let eps = self.config.rms_norm_eps;
        rms_norm_device(gpu, h, base_w, eps, n, x).map_err(|e| device_err("RMSNorm", e))?;
        for (s, w) in per_slot.iter().enumerate() {
            let Some(w) = w else { continue };
            let t = match tmp {
                Some(t) => t,
                None => tmp.insert(zeros_f16(self, x.len(), "norm scratch")?),
            };
            rms_norm_device(gpu, h, w, eps, n, t).map_err(|e| device_err("RMSNorm", e))?;
            for run in runs(slot, s) {
                copy_rows(self, t, run, x, run.0, hd)?;
            }
        }
        Ok(())
    }

    /// Every projection's part of the step for the first `n_layers`
    /// layers, `[layer][Proj::index]`, uploaded before the step's first
    /// launch (see `linear.rs`).
    fn prepare_layers<'a>(
        &'a self,
        experts: &Experts<'a>,
        slot: &[Option<usize>],
        n_layers: usize,
        maps: &mut StepTables,
    ) -> Result<Vec<Vec<PreparedLinear<'a>>>, ModelError> {
        let mut out = Vec::with_capacity(n_layers);
        for (l, lw) in self.weights.layers.iter().enumerate().take(n_layers) {
            let mut layer = Vec::with_capacity(Proj::ALL.len());
            for p in Proj::ALL {
                let mats: Vec<Option<&DeviceMatrix>> = experts
                    .iter()
                    .map(|e| e.1.layers.get(l).and_then(|x| x.proj[p.index()].as_ref()))
                    .collect();
                layer.push(prepare_linear(
                    &self.gpu,
                    &lw.proj[p.index()],
                    &mats,
                    slot,
                    maps,
                )?);
            }
            out.push(layer);
        }
        Ok(out)
    }

    /// `h [rows, hidden]` f32 = the step's embeddings, with no host-device
    /// round trip: the base table gathered on the device; rows of experts
    /// with a dense table of their own overwritten from the host copy; rows
    /// of experts with an embedding delta get their Δ̂ rows (dequantized on
    /// the host, a few rows per step) added in one upload and one residual
    /// add. Δ̂ enters as FP16 there: a relative 2⁻¹¹ of a delta, far below
    /// the activation roundings the CUDA path already makes.
    fn embed(&self, rows: &StepRows, experts: &Experts) -> Result<CudaSlice<f32>, ModelError> {
        let c = &self.config;
        let (hd, gpu, n) = (c.hidden_size, &self.gpu, rows.len());
        let mut h = zeros_f32(self, n * hd, "residual stream")?;
        embed_device(
            gpu,
            &self.weights.embed.weights,
            c.vocab_size,
            hd,
            &rows.tokens,
            &mut h,
        )
        .map_err(|e| device_err("embedding lookup", e))?;
        let mut row = vec![0f32; hd];
        // Δ̂ rows `[rows, hidden]`, zero for rows without an embedding delta.
        let mut deltas: Option<Vec<f16>> = None;
        for (r, (&tok, slot)) in rows.tokens.iter().zip(&rows.slot).enumerate() {
            let Some(m) = slot.and_then(|s| experts[s].0.embed.as_ref()) else {
                continue;
            };
            let tok = tok as usize;
            match m {
                ExpertMatrix::Dense(d) => {
                    dense_embed_row(d, tok, &mut row)?;
                    let mut dst = h
                        .try_slice_mut(r * hd..(r + 1) * hd)
                        .ok_or_else(|| ModelError::Device(format!("row {r} outside the step")))?;
                    gpu.stream().memcpy_htod(&row, &mut dst).map_err(|e| {
                        ModelError::Device(format!("writing an embedding row: {e}"))
                    })?;
                }
                ExpertMatrix::Delta(d) => {
                    delta_embed_row(d, tok, &mut row)?;
                    let all = deltas.get_or_insert_with(|| vec![f16::ZERO; n * hd]);
                    for (o, v) in all[r * hd..(r + 1) * hd].iter_mut().zip(&row) {
                        *o = f16::from_f32(*v);
                    }
                }
            }
        }
        if let Some(all) = deltas {
            let d = meswitch_ops::upload(gpu, &all)
                .map_err(|e| device_err("uploading embedding deltas", e))?;
            add_residual_device(gpu, &mut h, &d)
                .map_err(|e| device_err("adding embedding deltas", e))?;
        }
        Ok(h)
    }

    /// Embeds the step's rows and runs the first `n_layers` decoder layers,
    /// appending every row's K/V to `caches[seq]` = (cache, absolute
    /// position of its slot 0), which must have room (see
    /// [`CudaCache::prepare`]); returns `h`. RoPE turns by the absolute
    /// position, append and attention use the slot `pos − start`, as the
    /// CPU's attention uses `pos − cache.start`. `experts` are the step's
    /// (by slot); the layers' expert tables and row maps go into `maps`
    /// before the first launch.
    pub(super) fn run_decoder(
        &self,
        rows: &StepRows,
        experts: &Experts,
        caches: &[(&DeviceKv, usize)],
        n_layers: usize,
        maps: &mut StepTables,
    ) -> Result<CudaSlice<f32>, ModelError> {
        let c = &self.config;
        let gpu = &self.gpu;
        let n = rows.len();
        let (hd, q_dim, kv_dim, ffn) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let slot = &rows.slot;
        // Expert tables, row maps and attention rows first, then the launches.
        let linears = self.prepare_layers(experts, slot, n_layers, maps)?;
        let (kvs, starts): (Vec<&DeviceKv>, Vec<usize>) = caches.iter().copied().unzip();
        let attn_rows = AttnRows::upload_windowed(gpu, &kvs, &starts, &rows.seq_pos)
            .map_err(|e| device_err("uploading attention rows", e))?;
        let maps: &StepTables = maps;
        let mut h = self.embed(rows, experts)?;

        let shape = AttnShape {
            n_heads: c.num_heads,
            n_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            sliding_window: c.sliding_window,
        };
        let mut b = Buffers {
            x: zeros_f16(self, n * hd, "normed activations")?,
            q: zeros_f16(self, n * q_dim, "queries")?,
            k: zeros_f16(self, n * kv_dim, "keys")?,
            v: zeros_f16(self, n * kv_dim, "values")?,
            attn: zeros_f16(self, n * q_dim, "attention output")?,
            o: zeros_f16(self, n * hd, "projection output")?,
            gate: zeros_f16(self, n * ffn, "gate")?,
            up: zeros_f16(self, n * ffn, "up")?,
            act: zeros_f16(self, n * ffn, "SwiGLU output")?,
            norm_tmp: None,
        };
        for (l, lw) in self.weights.layers.iter().enumerate().take(n_layers) {
            let linear = |p: Proj, x: &CudaSlice<f16>, y: &mut CudaSlice<f16>| {
                multi_expert_linear(gpu, &linears[l][p.index()], maps, slot, x, y)
            };
            let input_norms: Vec<_> = experts
                .iter()
                .map(|e| e.1.layers.get(l).and_then(|x| x.input_norm.as_ref()))
                .collect();
            let post_norms: Vec<_> = experts
                .iter()
                .map(|e| e.1.layers.get(l).and_then(|x| x.post_norm.as_ref()))
                .collect();

            self.norm(
                &h,
                &lw.input_norm,
                &input_norms,
                slot,
                &mut b.x,
                &mut b.norm_tmp,
            )?;
            linear(Proj::Q, &b.x, &mut b.q)?;
            linear(Proj::K, &b.x, &mut b.k)?;
            linear(Proj::V, &b.x, &mut b.v)?;
            rope_device(
                gpu,
                &self.rope,
                &mut b.q,
                n,
                c.num_heads,
                attn_rows.positions(),
            )
            .map_err(|e| device_err("RoPE on queries", e))?;
            rope_device(
                gpu,
                &self.rope,
                &mut b.k,
                n,
                c.num_kv_heads,
                attn_rows.positions(),
            )
            .map_err(|e| device_err("RoPE on keys", e))?;
            kv_append_device(gpu, l, &b.k, &b.v, &attn_rows)
                .map_err(|e| device_err("KV append", e))?;
            attention_device(gpu, shape, l, &b.q, &attn_rows, &mut b.attn)
                .map_err(|e| device_err("attention", e))?;
            linear(Proj::O, &b.attn, &mut b.o)?;
            add_residual_device(gpu, &mut h, &b.o).map_err(|e| device_err("residual add", e))?;

            self.norm(
                &h,
                &lw.post_norm,
                &post_norms,
                slot,
                &mut b.x,
                &mut b.norm_tmp,
            )?;
            linear(Proj::Gate, &b.x, &mut b.gate)?;
            linear(Proj::Up, &b.x, &mut b.up)?;
            swiglu_device(gpu, &b.gate, &b.up, &mut b.act).map_err(|e| device_err("SwiGLU", e))?;
            linear(Proj::Down, &b.act, &mut b.o)?;
            add_residual_device(gpu, &mut h, &b.o).map_err(|e| device_err("residual add", e))?;
        }
        Ok(h)
    }

    /// The whole step after validation and cache reservation: decoder, then
    /// the head on the rows whose logits were asked for.
    pub(super) fn forward_step(
        &self,
        steps: &[SeqStep<'_, CudaCache>],
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let c = &self.config;
        let (hd, vocab) = (c.hidden_size, c.vocab_size);
        // The step runs its sequences in expert order; `out` puts the logits
        // back in the caller's.
        let order = expert_order(steps.iter().map(|s| s.expert));
        let batch: Vec<&SeqStep<'_, CudaCache>> = order.iter().map(|&i| &steps[i]).collect();
        let rows = StepRows::new(batch.iter().map(|s| (s.tokens, s.cache.len(), s.expert)));
        let caches: Vec<(&DeviceKv, usize)> = batch
            .iter()
            .map(|s| Ok((s.cache.device()?, s.cache.start())))
            .collect::<Result<_, ModelError>>()?;

        // Rows asked for: a contiguous tail of each sequence's rows.
        let mut wanted = Vec::with_capacity(batch.len());
        let mut start = 0;
        for s in &batch {
            let from = match s.logits {
                LogitsWanted::Last => s.tokens.len() - 1,
                LogitsWanted::From(f) => f,
            };
            wanted.push((start + from, start + s.tokens.len()));
            start += s.tokens.len();
        }
        let picked: usize = wanted.iter().map(|(a, e)| e - a).sum();
        let pslot: Vec<Option<usize>> = wanted
            .iter()
            .flat_map(|&(a, e)| rows.slot[a..e].iter().copied())
            .collect();

        // Every expert table and row map of the step (the head's too)
        // before the first launch.
        let experts = self.step_experts(&rows)?;
        let heads: Vec<_> = experts.iter().map(|e| e.1.lm_head.as_ref()).collect();
        let mut maps = self.step_tables();
        maps.start_step();
        let head = prepare_linear(&self.gpu, self.weights.lm_head(), &heads, &pslot, &mut maps)?;
        let h = self.run_decoder(&rows, &experts, &caches, c.num_layers, &mut maps)?;

        let mut ph = zeros_f32(self, picked * hd, "picked rows")?;
        let mut dst = 0;
        for &(a, e) in &wanted {
            copy_rows(self, &h, (a, e), &mut ph, dst, hd)?;
            dst += e - a;
        }
        drop(h);

        let norms: Vec<_> = experts.iter().map(|e| e.1.final_norm.as_ref()).collect();
        let mut x = zeros_f16(self, picked * hd, "normed head input")?;
        let mut tmp = None;
        self.norm(
            &ph,
            &self.weights.final_norm,
            &norms,
            &pslot,
            &mut x,
            &mut tmp,
        )?;
        let mut logits = zeros_f16(self, picked * vocab, "logits")?;
        multi_expert_linear(&self.gpu, &head, &maps, &pslot, &x, &mut logits)?;
        let logits = self
            .gpu
            .stream()
            .clone_dtoh(&logits)
            .map_err(|e| ModelError::Device(format!("reading the logits: {e}")))?;
        wait(self, "reading the logits")?;
        if logits.len() < picked * vocab {
            return Err(ModelError::Device(
                "logits buffer shorter than asked".into(),
            ));
        }
        let mut out = vec![Vec::new(); steps.len()];
        let mut first = 0;
        for (&(a, e), &seq) in wanted.iter().zip(&order) {
            let rows = &logits[first * vocab..(first + e - a) * vocab];
            first += e - a;
            out[seq] = rows.iter().map(|v| v.to_f32()).collect();
        }
        Ok(out)
    }

    /// The router's features: base model only, a throw-away cache; see
    /// [`crate::model::Backend::hidden_states`]. At `layer == n_layers` the
    /// final RMSNorm is applied on the host in f32, as on the CPU.
    pub(super) fn hidden_states_base(
        &self,
        tokens: &[u32],
        layer: usize,
    ) -> Result<Vec<f32>, ModelError> {
        let c = &self.config;
        let n_layers = c.num_layers;
        if layer > n_layers {
            return Err(ModelError::LayerRange { layer, n_layers });
        }
        let mut cache = CudaCache::default();
        let batch = [SeqStep {
            tokens,
            cache: &mut cache,
            expert: None,
            logits: LogitsWanted::Last,
        }];
        self.validate(&batch)?;
        cache.prepare(&self.gpu, self.geometry(), tokens.len())?;
        let rows = StepRows::new(std::iter::once((tokens, 0, None)));
        let mut maps = self.step_tables();
        maps.start_step();
        let h = self.run_decoder(
            &rows,
            &Vec::new(),
            &[(cache.device()?, 0)],
            (layer + 1).min(n_layers),
            &mut maps,
        )?;
        let mut out = self
            .gpu
            .stream()
            .clone_dtoh(&h)
            .map_err(|e| ModelError::Device(format!("reading hidden states: {e}")))?;
        wait(self, "reading hidden states")?;
        out.truncate(tokens.len() * c.hidden_size);
        if layer == n_layers {
            let w = &self.weights.final_norm_host;
            let mut y = vec![0f32; c.hidden_size];
            for row in out.chunks_mut(c.hidden_size) {
                rms_norm(row, w, c.rms_norm_eps, &mut y);
                row.copy_from_slice(&y);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::{expert_order, StepRows};

    #[test]
    fn expert_order_groups_each_experts_sequences_keeping_their_order() {
        let experts = [Some(3), None, Some(1), Some(3), None, Some(1), Some(0)];
        let order = expert_order(experts.into_iter());
        assert_eq!(order, vec![1, 4, 6, 2, 5, 0, 3]);
        // A permutation: every sequence exactly once.
        let mut seen = order.clone();
        seen.sort_unstable();
        assert_eq!(seen, (0..experts.len()).collect::<Vec<_>>());
        // 32 decode rows round-robin over 16 experts: each expert's two rows
        // end up next to each other, so in one 8-row n-tile.
        let order = expert_order((0..32).map(|b| Some(b % 16)));
        for pair in order.chunks(2) {
            assert_eq!(pair[0] % 16, pair[1] % 16);
            assert_ne!(pair[0] / 8, pair[1] / 8, "arrival order split them");
        }
        assert!(expert_order(std::iter::empty()).is_empty());
    }

    #[test]
    fn step_rows_flatten_sequences_in_order() {
        let (a, b, c) = ([5u32, 6, 7], [8u32], [9u32, 10]);
        let rows = StepRows::new(
            [
                (&a[..], 4, Some(3)),
                (&b[..], 0, None),
                (&c[..], 11, Some(3)),
            ]
            .into_iter(),
        );
        assert_eq!(rows.tokens, vec![5, 6, 7, 8, 9, 10]);
        assert_eq!(
            rows.seq_pos,
            vec![(0, 4), (0, 5), (0, 6), (1, 0), (2, 11), (2, 12)]
        );
        assert_eq!(
            rows.slot,
            vec![Some(0), Some(0), Some(0), None, Some(0), Some(0)]
        );
        assert_eq!(rows.active, vec![3]);
        let two = StepRows::new([(&b[..], 0, Some(9)), (&b[..], 2, Some(1))].into_iter());
        assert_eq!(two.active, vec![9, 1]);
        assert_eq!(two.slot, vec![Some(0), Some(1)]);
    }
}
