//! GPU bench: decode steps of the CUDA model runtime on a Mistral-7B-shaped
//! synthetic model (4096 hidden, 14336 ffn, 32 layers, 32/8 heads, vocab
//! 32000; random FP16) with 16 experts whose every linear is a random
//! *packed* INT2 g128 delta with 1% salient channels, built directly through
//! `meswitch_reference::layout` (compressing real 7B deltas would take hours;
//! kernel speed does not depend on the values).
//!
//! For batch B ∈ {1, 8, 32} decode rows (one per sequence, each sequence
//! holding `CONTEXT` cached positions), rows spread round-robin over the
//! experts, and the same batches with no expert (base only), it reports:
//! - step time (criterion, host wall time of one `Backend::forward`, which
//!   ends by copying the logits to the host, so includes all device work);
//! - tokens/s = B / step time;
//! - the byte floor: base linears + lm_head, the active experts' deltas and
//!   every sequence's KV cache, each read once, at the device-to-device copy
//!   bandwidth measured in the same run (`ops::timing::copy_bandwidth`),
//!   and the step time as a multiple of that floor.
//!
//! Host memory: the base is built once per distinct matrix shape and cloned
//! per layer (~29 GB peak while uploading); each expert's deltas are clones
//! of one random delta per shape (~2.1 GB each on the device and host).
//!
//! | variable | default |
//! |---|---|
//! | `MESWITCH_DECODE_LAYERS` (cut for a quick run) | `32` |
//! | `MESWITCH_DECODE_EXPERTS` | `16` |
//! | `MESWITCH_DECODE_BATCH` | `1,8,32` |
//! | `MESWITCH_DECODE_CONTEXT` (cached positions per sequence) | `256` |
//! | `MESWITCH_DECODE_MEASURE_S` (criterion measurement time) | `3` |
//!
//! Without a GPU the bench prints a message and exits 0 (1 when
//! `MESWITCH_REQUIRE_GPU=1`). `cargo bench --bench decode`

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use criterion::Criterion;
use half::f16;
use meswitch::ops::{timing, Gpu};
use meswitch::reference::container::{ExpertFile, ExpertHeader, ExpertTensor, FORMAT_VERSION};
use meswitch::reference::{Bits, PackedDelta};
use meswitch::server::model::cuda::{CudaBackend, CudaCache};
use meswitch::server::model::weights::{names, Proj};
use meswitch::server::model::{
    Backend, Expert, LogitsWanted, MemorySource, ModelConfig, SeqStep, WeightSource,
};
use rand::{rngs::StdRng, Rng, SeedableRng};

#[path = "support/random_delta.rs"]
mod random_delta;
use random_delta::random_packed_delta;

const BITS: Bits = Bits::Two;
const GROUP: usize = 128;
/// Salient input channels per matrix: 1% (ME-Switch's setting).
const SALIENT_PERCENT: usize = 1;
/// Copy-bandwidth probe: 1 GiB each way, median of 5.
const COPY_BYTES: usize = 1 << 30;
const COPY_TRIALS: usize = 5;
/// Decode steps a cache may advance past `CONTEXT` before it is cut back,
/// so the attention length stays near `CONTEXT` over a long measurement.
const CONTEXT_SLACK: usize = 64;
/// Single steps timed for the summary line (median).
const SUMMARY_STEPS: usize = 21;
/// Random base weights: uniform in ±this, so activations stay finite over
/// 32 layers (the timing does not depend on the values).
const BASE_SCALE: f32 = 0.02;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(name)
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| !v.is_empty())
        .unwrap_or_else(|| default.to_vec())
}

fn mistral_7b(layers: usize, context: usize) -> ModelConfig {
    ModelConfig {
        hidden_size: 4096,
        intermediate_size: 14336,
        num_layers: layers,
        num_heads: 32,
        num_kv_heads: 8,
        head_dim: 128,
        vocab_size: 32000,
        rope_theta: 1_000_000.0,
        rms_norm_eps: 1e-5,
        sliding_window: None,
        tie_word_embeddings: false,
        max_position_embeddings: Some((context + CONTEXT_SLACK + 1).next_power_of_two()),
    }
}

fn random_f16(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f16> {
    (0..n)
        .map(|_| f16::from_f32(rng.random_range(-scale..scale)))
        .collect()
}

/// The base: one random matrix per distinct shape, cloned into every layer.
fn base_model(c: &ModelConfig, rng: &mut StdRng) -> MemorySource {
    let h = c.hidden_size;
    let mut by_shape: BTreeMap<[usize; 2], Vec<f16>> = BTreeMap::new();
    for p in Proj::ALL {
        let [o, i] = p.shape(c);
        by_shape
            .entry([o, i])
            .or_insert_with(|| random_f16(rng, o * i, BASE_SCALE));
    }
    let mut t = BTreeMap::new();
    let table = |rng: &mut StdRng| random_f16(rng, c.vocab_size * h, BASE_SCALE);
    t.insert(
        names::EMBED.to_string(),
        (vec![c.vocab_size, h], table(rng)),
    );
    t.insert(
        names::LM_HEAD.to_string(),
        (vec![c.vocab_size, h], table(rng)),
    );
    t.insert(names::FINAL_NORM.to_string(), (vec![h], vec![f16::ONE; h]));
    for l in 0..c.num_layers {
        t.insert(names::input_norm(l), (vec![h], vec![f16::ONE; h]));
        t.insert(names::post_norm(l), (vec![h], vec![f16::ONE; h]));
        for p in Proj::ALL {
            let [o, i] = p.shape(c);
            t.insert(names::proj(l, p), (vec![o, i], by_shape[&[o, i]].clone()));
        }
    }
    MemorySource {
        config: c.to_hf(),
        tensors: t,
    }
}

/// Expert `e`: every linear of every layer a clone of the shape's delta.
fn expert(
    src: &MemorySource,
    c: &ModelConfig,
    deltas: &BTreeMap<[usize; 2], PackedDelta>,
    e: usize,
) -> Expert {
    let mut tensors = BTreeMap::new();
    for l in 0..c.num_layers {
        for p in Proj::ALL {
            let d = deltas[&p.shape(c)].clone();
            tensors.insert(names::proj(l, p), ExpertTensor::Delta(d));
        }
    }
    let file = ExpertFile {
        header: ExpertHeader {
            base: src.identity(),
            expert_name: format!("expert-{e}"),
            settings: serde_json::json!({ "bits": 2, "group": GROUP, "salient_percent": SALIENT_PERCENT }),
        },
        format_version: FORMAT_VERSION,
        tensors,
    };
    Expert::from_file(file, c, &src.identity(), &src.shapes()).expect("bench expert fits")
}

/// Bytes one decode step must read at least: base linears and lm_head
/// (embedding rows are negligible), active deltas, the KV caches.
fn byte_floor(b: &CudaBackend, experts: &[usize], caches: &[CudaCache]) -> f64 {
    let c = b.config();
    let linears: usize = Proj::ALL
        .iter()
        .map(|p| p.shape(c)[0] * p.shape(c)[1])
        .sum::<usize>()
        * c.num_layers;
    let base = 2 * (linears + c.vocab_size * c.hidden_size);
    let deltas: usize = experts.iter().filter_map(|&e| b.expert_bytes(e)).sum();
    let kv: usize = caches
        .iter()
        .map(|k| k.len() * c.kv_dim() * 2 * 2 * c.num_layers)
        .sum();
    (base + deltas + kv) as f64
}

/// One decode step: every sequence one token.
fn decode_step(
    b: &CudaBackend,
    caches: &mut [CudaCache],
    experts: &[Option<usize>],
    token: u32,
    context: usize,
) {
    for k in caches.iter_mut() {
        if k.len() >= context + CONTEXT_SLACK {
            k.truncate(context);
        }
    }
    let tokens = [token];
    let mut batch: Vec<SeqStep<'_, CudaCache>> = caches
        .iter_mut()
        .zip(experts)
        .map(|(cache, &expert)| SeqStep {
            tokens: &tokens,
            cache,
            expert,
            logits: LogitsWanted::Last,
        })
        .collect();
    b.forward(&mut batch).expect("decode step");
}

fn main() {
    let gpu = match Gpu::detect() {
        Ok(gpu) => gpu,
        Err(e) => {
            eprintln!("decode bench skipped: {e}");
            if std::env::var("MESWITCH_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                std::process::exit(1);
            }
            return;
        }
    };
    let layers = env_usize("MESWITCH_DECODE_LAYERS", 32);
    let n_experts = env_usize("MESWITCH_DECODE_EXPERTS", 16);
    let batches = env_list("MESWITCH_DECODE_BATCH", &[1, 8, 32]);
    let context = env_usize("MESWITCH_DECODE_CONTEXT", 256).max(1);
    let measure = Duration::from_secs(env_usize("MESWITCH_DECODE_MEASURE_S", 3) as u64);
    let c = mistral_7b(layers, context);

    let copy = timing::copy_bandwidth(&gpu, COPY_BYTES, COPY_TRIALS).expect("copy bandwidth");
    eprintln!(
        "device: {}; copy bandwidth {:.0} GB/s (read + write)",
        gpu.name(),
        copy / 1e9
    );
    let t0 = Instant::now();
    let mut rng = StdRng::seed_from_u64(0xdec0de);
    let src = base_model(&c, &mut rng);
    let mut backend = CudaBackend::load(&src, gpu).expect("load the synthetic base");
    let mut deltas = BTreeMap::new();
    for p in Proj::ALL {
        let [o, i] = p.shape(&c);
        deltas.entry([o, i]).or_insert_with(|| {
            random_packed_delta(&mut rng, o, i, BITS, GROUP, SALIENT_PERCENT as f64 / 100.0)
        });
    }
    let ids: Vec<usize> = (0..n_experts)
        .map(|e| backend.add_expert(expert(&src, &c, &deltas, e)))
        .collect();
    drop(src);
    if let Some(&id) = ids.first() {
        let bytes = backend.expert_bytes(id).expect("expert on the device");
        eprintln!("expert device bytes: {:.2} GB each", bytes as f64 / 1e9);
    }
    eprintln!(
        "model: {layers} layers, base {:.2} GB on the device, {n_experts} experts; setup {:.0} s",
        backend.base_bytes() as f64 / 1e9,
        t0.elapsed().as_secs_f64()
    );

    let mut crit = Criterion::default()
        .without_plots()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(measure)
        .configure_from_args();
    let mut summary = Vec::new();
    for &batch in &batches {
        for with_experts in [true, false] {
            if with_experts && ids.is_empty() {
                continue;
            }
            let row_experts: Vec<Option<usize>> = (0..batch)
                .map(|s| with_experts.then(|| ids[s % ids.len()]))
                .collect();
            let mut caches: Vec<CudaCache> = (0..batch).map(|_| backend.new_cache()).collect();
            // Prefill every sequence to `context` positions in one step.
            let prompt: Vec<u32> = (0..context)
                .map(|t| (t * 31 % c.vocab_size) as u32)
                .collect();
            {
                let mut steps: Vec<SeqStep<'_, CudaCache>> = caches
                    .iter_mut()
                    .zip(&row_experts)
                    .map(|(cache, &expert)| SeqStep {
                        tokens: &prompt,
                        cache,
                        expert,
                        logits: LogitsWanted::Last,
                    })
                    .collect();
                backend.forward(&mut steps).expect("prefill");
            }
            let mode = if with_experts { "experts" } else { "base" };
            let name = format!("decode/{mode}/batch{batch}");
            crit.bench_function(&name, |bench| {
                bench.iter_custom(|iters| {
                    let start = Instant::now();
                    for i in 0..iters {
                        decode_step(
                            &backend,
                            &mut caches,
                            &row_experts,
                            (i % 1000) as u32,
                            context,
                        );
                    }
                    start.elapsed()
                })
            });
            // The summary's figure: median of single timed steps.
            let mut times: Vec<f64> = (0..SUMMARY_STEPS)
                .map(|i| {
                    let start = Instant::now();
                    decode_step(&backend, &mut caches, &row_experts, i as u32, context);
                    start.elapsed().as_secs_f64()
                })
                .collect();
            times.sort_by(f64::total_cmp);
            let step_s = times[times.len() / 2];
            let mut active: Vec<usize> = row_experts.iter().flatten().copied().collect();
            active.sort_unstable();
            active.dedup();
            let floor = byte_floor(&backend, &active, &caches) / copy;
            summary.push(format!(
                "{mode:>7} batch {batch:>2}: step {:>7.3} ms (median of {SUMMARY_STEPS}), {:>8.1} tokens/s; byte floor {:.3} ms ({} active experts) -> {:.2}x floor",
                step_s * 1e3,
                batch as f64 / step_s,
                floor * 1e3,
                active.len(),
                step_s / floor
            ));
        }
    }
    eprintln!(
        "\nsummary (device {}, copy {:.0} GB/s):",
        backend.gpu().name(),
        copy / 1e9
    );
    for s in summary {
        eprintln!("  {s}");
    }
}
