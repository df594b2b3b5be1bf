//! The CUDA backend against the CPU backend: same model, same steps, logits
//! compared step by step. Skips without a CUDA device, fails under
//! `MESWITCH_REQUIRE_GPU=1`.
//!
//! Tolerance. Both backends hold the same FP16 weights and deltas and both
//! reduce in f32; they differ in the activations: the CUDA backend rounds
//! every linear's input and output to FP16 (unit roundoff u = 2⁻¹¹) and
//! keeps the KV cache in FP16, the CPU keeps f32. Per layer about six such
//! roundings sit on the path (normed x, q/k/v, attention output, o_proj
//! output, SwiGLU output, down output), each a relative error ≤ u of its
//! tensor; errors of different elements are independent, so through a dot
//! product of length n they add in quadrature, not linearly. For the
//! 2-layer synthetic model that bounds the logit error by a few u times the
//! logit scale: we allow 1% of the row's logit spread (max − min), ~20·u,
//! and require equal argmax unless the CPU's top-2 gap is below twice the
//! observed error. For SmolLM2 (30 layers) the repository's llama.cpp
//! comparison is the yardstick: llama.cpp's Q8 activations (u ≈ 2⁻⁸, 8×
//! coarser than FP16) stay within 0.047 of our top-token log-probability
//! and 0.32 over the top 10 (tests/runtime_smollm2.rs); FP16 activations
//! must do at least as well, so those bounds are reused. Every comparison
//! prints its measured ratio so the first GPU run can tighten them.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use half::f16;
use meswitch_ops::Gpu;
use meswitch_reference::container::{ExpertFile, ExpertHeader, ExpertTensor, FORMAT_VERSION};
use meswitch_reference::{compress_matrix, Bits, CompressSettings, SalientSpec};
use meswitch_server::model::cuda::{CudaBackend, CudaCache};
use meswitch_server::model::weights::{names, Proj};
use meswitch_server::model::{
    Backend, CpuBackend, Expert, KvCache, LogitsWanted, MemorySource, ModelConfig, ModelError,
    SeqStep, WeightSource,
};
use rand::{rngs::StdRng, Rng, SeedableRng};

const REQUIRE_GPU: &str = "MESWITCH_REQUIRE_GPU";

fn gpu_required() -> bool {
    std::env::var(REQUIRE_GPU).is_ok_and(|v| v == "1")
}

/// Whether a device is usable (probed once), without keeping it: each test
/// opens its own [`Gpu`] for its backend.
fn have_gpu() -> bool {
    static FOUND: OnceLock<Result<(), String>> = OnceLock::new();
    match FOUND.get_or_init(|| Gpu::detect().map(drop).map_err(|e| e.to_string())) {
        Ok(()) => true,
        Err(reason) if gpu_required() => {
            panic!("{REQUIRE_GPU}=1 but there is no usable CUDA device: {reason}")
        }
        Err(reason) => {
            eprintln!("skipped: no CUDA device ({reason})");
            false
        }
    }
}

fn gpu() -> Gpu {
    Gpu::detect().expect("the device found by have_gpu")
}

// ---- a small random Llama with experts -------------------------------------

/// Widths are multiples of 128 where the fused GEMV kernel needs them
/// (hidden, q_dim, ffn), so both the kernel path and (prefill > 64 rows)
/// the cuBLAS path run; SmolLM2 covers in % 128 ≠ 0.
fn config(sliding_window: Option<usize>) -> ModelConfig {
    ModelConfig {
        hidden_size: 128,
        intermediate_size: 256,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 32,
        vocab_size: 96,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        sliding_window,
        tie_word_embeddings: true,
        max_position_embeddings: Some(600),
    }
}

fn random(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f16> {
    (0..n)
        .map(|_| f16::from_f32(rng.random_range(-scale..scale)))
        .collect()
}

fn norm_weight(rng: &mut StdRng, n: usize) -> Vec<f16> {
    (0..n)
        .map(|_| f16::from_f32(rng.random_range(0.7..1.3)))
        .collect()
}

fn base_model(c: &ModelConfig, seed: u64) -> MemorySource {
    let mut rng = StdRng::seed_from_u64(seed);
    let h = c.hidden_size;
    let mut t = BTreeMap::new();
    t.insert(
        names::EMBED.to_string(),
        (
            vec![c.vocab_size, h],
            random(&mut rng, c.vocab_size * h, 1.0),
        ),
    );
    t.insert(
        names::FINAL_NORM.to_string(),
        (vec![h], norm_weight(&mut rng, h)),
    );
    for l in 0..c.num_layers {
        t.insert(names::input_norm(l), (vec![h], norm_weight(&mut rng, h)));
        t.insert(names::post_norm(l), (vec![h], norm_weight(&mut rng, h)));
        for p in Proj::ALL {
            let [o, i] = p.shape(c);
            // ~1/sqrt(in) so activations stay O(1) through the layers.
            let scale = 1.7 / (i as f32).sqrt();
            t.insert(
                names::proj(l, p),
                (vec![o, i], random(&mut rng, o * i, scale)),
            );
        }
    }
    MemorySource {
        config: c.to_hf(),
        tensors: t,
    }
}

fn packed(rng: &mut StdRng, o: usize, i: usize, bits: Bits, group: usize) -> ExpertTensor {
    let scale = 0.5 / (i as f32).sqrt();
    let delta: Vec<f32> = (0..o * i)
        .map(|_| rng.random_range(-scale..scale))
        .collect();
    let settings = CompressSettings::new(bits, group, SalientSpec::Count(2));
    ExpertTensor::Delta(compress_matrix(&delta, o, i, &settings, None).expect("compress"))
}

fn dense(values: Vec<f16>, shape: Vec<usize>) -> ExpertTensor {
    ExpertTensor::Dense { shape, values }
}

/// Expert "a": INT4 g32 deltas on every projection of every layer, its own
/// final norm and layer-0 input norm. Expert "b": INT2 g64 deltas on layer
/// 1, a delta on the tied embeddings (so its lm_head is that delta too) and
/// a dense replacement of layer 0's down_proj (the cuBLAS dense path).
fn expert_file(base: &MemorySource, c: &ModelConfig, name: &str, seed: u64) -> ExpertFile {
    let mut rng = StdRng::seed_from_u64(seed);
    let h = c.hidden_size;
    let mut tensors = BTreeMap::new();
    if name == "a" {
        for l in 0..c.num_layers {
            for p in Proj::ALL {
                let [o, i] = p.shape(c);
                tensors.insert(names::proj(l, p), packed(&mut rng, o, i, Bits::Four, 32));
            }
        }
        tensors.insert(
            names::FINAL_NORM.to_string(),
            dense(norm_weight(&mut rng, h), vec![h]),
        );
        tensors.insert(
            names::input_norm(0),
            dense(norm_weight(&mut rng, h), vec![h]),
        );
    } else {
        for p in Proj::ALL {
            let [o, i] = p.shape(c);
            tensors.insert(names::proj(1, p), packed(&mut rng, o, i, Bits::Two, 64));
        }
        tensors.insert(
            names::EMBED.to_string(),
            packed(&mut rng, c.vocab_size, h, Bits::Two, 64),
        );
        let [o, i] = Proj::Down.shape(c);
        let scale = 1.7 / (i as f32).sqrt();
        tensors.insert(
            names::proj(0, Proj::Down),
            dense(random(&mut rng, o * i, scale), vec![o, i]),
        );
    }
    ExpertFile {
        header: ExpertHeader {
            base: base.identity(),
            expert_name: name.to_string(),
            settings: serde_json::json!({}),
        },
        format_version: FORMAT_VERSION,
        tensors,
    }
}

fn place(file: ExpertFile, src: &MemorySource, c: &ModelConfig) -> Expert {
    Expert::from_file(file, c, &src.identity(), &src.shapes()).expect("expert fits the base")
}

/// The same model on both backends, with experts "a" and "b" (ids 0, 1).
fn pair(sliding_window: Option<usize>, seed: u64) -> (CpuBackend, CudaBackend) {
    let c = config(sliding_window);
    let src = base_model(&c, seed);
    let mut cpu = CpuBackend::load(&src).expect("CPU load");
    let mut cuda = CudaBackend::load(&src, gpu()).expect("CUDA load");
    for (name, s) in [("a", seed + 1), ("b", seed + 2)] {
        let cpu_id = cpu.add_expert(place(expert_file(&src, &c, name, s), &src, &c));
        let cuda_id = cuda.add_expert(place(expert_file(&src, &c, name, s), &src, &c));
        assert_eq!(cpu_id, cuda_id);
    }
    (cpu, cuda)
}

// ---- comparing logits --------------------------------------------------------

/// Largest |Δ| over a row, as a fraction of the CPU row's spread.
fn spread_ratio(cpu: &[f32], gpu: &[f32]) -> f32 {
    let (lo, hi) = cpu
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let worst = cpu
        .iter()
        .zip(gpu)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    worst / (hi - lo).max(f32::MIN_POSITIVE)
}

fn argmax(v: &[f32]) -> usize {
    (0..v.len()).fold(0, |best, i| if v[i] > v[best] { i } else { best })
}

/// Top-2 gap of a row.
fn top2_gap(v: &[f32]) -> f32 {
    let top = argmax(v);
    let second = v
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != top)
        .map(|(_, &x)| x)
        .fold(f32::NEG_INFINITY, f32::max);
    v[top] - second
}

/// 1% of the spread: ~20 FP16 unit roundoffs (module docs).
const SYNTH_SPREAD_TOLERANCE: f32 = 0.01;

fn assert_rows_close(what: &str, cpu: &[f32], gpu: &[f32], vocab: usize) -> f32 {
    assert_eq!(cpu.len(), gpu.len(), "{what}: logit counts differ");
    let mut worst = 0f32;
    for (r, (a, b)) in cpu.chunks(vocab).zip(gpu.chunks(vocab)).enumerate() {
        assert!(
            b.iter().all(|v| v.is_finite()),
            "{what} row {r}: non-finite CUDA logits"
        );
        let ratio = spread_ratio(a, b);
        worst = worst.max(ratio);
        assert!(
            ratio <= SYNTH_SPREAD_TOLERANCE,
            "{what} row {r}: max |Δlogit| is {ratio:.2e} of the spread (allowed {SYNTH_SPREAD_TOLERANCE})"
        );
        let max_abs = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        if top2_gap(a) > 2.0 * max_abs {
            assert_eq!(argmax(a), argmax(b), "{what} row {r}: argmax differs");
        }
    }
    worst
}

/// A sequence's part of a step: (tokens, expert, logits wanted).
type Seq = (Vec<u32>, Option<usize>, LogitsWanted);
/// A planned part: (sequence index, new tokens, expert, logits wanted).
type Planned = (usize, usize, Option<usize>, LogitsWanted);

/// One step on a backend.
fn step<B: Backend>(
    b: &B,
    caches: &mut [B::Cache],
    seqs: &[Seq],
) -> Result<Vec<Vec<f32>>, ModelError> {
    let mut batch: Vec<SeqStep<'_, B::Cache>> = seqs
        .iter()
        .zip(caches.iter_mut())
        .map(|((tokens, expert, logits), cache)| SeqStep {
            tokens,
            cache,
            expert: *expert,
            logits: *logits,
        })
        .collect();
    b.forward(&mut batch)
}

/// One step of the sequences `idx` on both backends, each on its own caches
/// (taken out of `cpu_caches`/`gpu_caches` for the step and put back);
/// the caches must end the same length. Returns (CPU, CUDA) logits.
fn step_both(
    (cpu, cuda): (&CpuBackend, &CudaBackend),
    (cpu_caches, gpu_caches): (&mut [KvCache], &mut [CudaCache]),
    idx: &[usize],
    seqs: &[Seq],
) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let mut cc: Vec<KvCache> = idx
        .iter()
        .map(|&i| std::mem::take(&mut cpu_caches[i]))
        .collect();
    let mut gc: Vec<CudaCache> = idx
        .iter()
        .map(|&i| std::mem::take(&mut gpu_caches[i]))
        .collect();
    let want = step(cpu, &mut cc, seqs).expect("CPU step");
    let got = step(cuda, &mut gc, seqs).expect("CUDA step");
    for ((&i, c), g) in idx.iter().zip(cc).zip(gc) {
        assert_eq!(c.len(), g.len(), "cache lengths of sequence {i}");
        cpu_caches[i] = c;
        gpu_caches[i] = g;
    }
    (want, got)
}

fn tokens(rng: &mut StdRng, n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()
}

/// Several steps of four sequences: prefills and decodes mixed in one step,
/// experts a and b and no expert, one sequence asking for every position's
/// logits. Run with and without a sliding window shorter than the prompts.
#[test]
fn mixed_steps_match_the_cpu_backend() {
    if !have_gpu() {
        return;
    }
    for (window, seed) in [(None, 10), (Some(6), 20)] {
        let (cpu, cuda) = pair(window, seed);
        let vocab = cpu.config().vocab_size;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut cpu_caches: Vec<KvCache> = (0..4).map(|_| cpu.new_cache()).collect();
        let mut gpu_caches: Vec<CudaCache> = (0..4).map(|_| cuda.new_cache()).collect();
        let mut worst = 0f32;
        // Step 0: prefills of 9 (a), 3 (b) and 1 (no expert) tokens; seq 3 joins later.
        let mut plan: Vec<Vec<Planned>> = vec![vec![
            (0, 9, Some(0), LogitsWanted::Last),
            (1, 3, Some(1), LogitsWanted::Last),
            (2, 1, None, LogitsWanted::Last),
        ]];
        // Step 1: decodes of 0..3 and a 70-row prefill (> 64 rows: cuBLAS base path) of seq 3 (a), all logits.
        plan.push(vec![
            (0, 1, Some(0), LogitsWanted::Last),
            (1, 1, Some(1), LogitsWanted::Last),
            (2, 1, None, LogitsWanted::Last),
            (3, 70, Some(0), LogitsWanted::From(0)),
        ]);
        // Steps 2..6: everyone decodes; seq 2 feeds two tokens at once.
        for _ in 0..5 {
            plan.push(vec![
                (0, 1, Some(0), LogitsWanted::Last),
                (1, 1, Some(1), LogitsWanted::Last),
                (2, 2, None, LogitsWanted::From(1)),
                (3, 1, Some(0), LogitsWanted::Last),
            ]);
        }
        for (k, s) in plan.iter().enumerate() {
            let seqs: Vec<Seq> = s
                .iter()
                .map(|&(_, n, e, w)| (tokens(&mut rng, n, vocab), e, w))
                .collect();
            let idx: Vec<usize> = s.iter().map(|&(i, ..)| i).collect();
            let (want, got) = step_both(
                (&cpu, &cuda),
                (&mut cpu_caches, &mut gpu_caches),
                &idx,
                &seqs,
            );
            for (j, (w, g)) in want.iter().zip(&got).enumerate() {
                let what = format!("window {window:?} step {k} sequence {}", idx[j]);
                worst = worst.max(assert_rows_close(&what, w, g, vocab));
            }
        }
        eprintln!("window {window:?}: worst max|Δlogit| / spread = {worst:.3e}");
    }
}

/// Cases of the random-plan property: `MESWITCH_GPU_PROPTEST_CASES`
/// (default 16; each case runs both backends over a few steps).
fn proptest_cases() -> u32 {
    std::env::var("MESWITCH_GPU_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16)
}

/// Random step plans: each step a random subset of four sequences (each
/// with its fixed expert: a, b, none, a), each feeding 1..12 tokens or,
/// sometimes, a 65..80-token chunk (the > 64-row paths), asking for the
/// last or every position's logits. Every step's logits match the CPU.
#[test]
fn random_step_plans_match_the_cpu_backend() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    if !have_gpu() {
        return;
    }
    let (cpu, cuda) = pair(Some(40), 60);
    let vocab = cpu.config().vocab_size;
    const EXPERT_OF: [Option<usize>; 4] = [Some(0), Some(1), None, Some(0)];
    let part = (
        any::<bool>(),
        prop_oneof![8 => 1usize..12, 1 => 65usize..80],
        any::<bool>(),
    );
    let plan = prop::collection::vec(prop::collection::vec(part, 4), 1..4);
    let mut runner = TestRunner::new(Config::with_cases(proptest_cases()));
    let worst = std::cell::Cell::new(0f32);
    runner
        .run(&(plan, any::<u64>()), |(plan, seed)| {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut cpu_caches: Vec<KvCache> = (0..4).map(|_| cpu.new_cache()).collect();
            let mut gpu_caches: Vec<CudaCache> = (0..4).map(|_| cuda.new_cache()).collect();
            for (k, step_plan) in plan.iter().enumerate() {
                let idx: Vec<usize> = (0..4).filter(|&i| step_plan[i].0).collect();
                if idx.is_empty() {
                    continue;
                }
                let seqs: Vec<Seq> = idx
                    .iter()
                    .map(|&i| {
                        let (_, n, all) = step_plan[i];
                        let w = if all {
                            LogitsWanted::From(0)
                        } else {
                            LogitsWanted::Last
                        };
                        (tokens(&mut rng, n, vocab), EXPERT_OF[i], w)
                    })
                    .collect();
                let (want, got) = step_both(
                    (&cpu, &cuda),
                    (&mut cpu_caches, &mut gpu_caches),
                    &idx,
                    &seqs,
                );
                for (j, (w, g)) in want.iter().zip(&got).enumerate() {
                    let what = format!("plan step {k} sequence {}", idx[j]);
                    worst.set(worst.get().max(assert_rows_close(&what, w, g, vocab)));
                }
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "random plans: worst max|Δlogit| / spread = {:.3e}",
        worst.get()
    );
}

/// A sequence crossing the cache's first allocation (256 positions) grows
/// it; contents survive (later logits still match the CPU).
#[test]
fn cache_growth_keeps_contents() {
    if !have_gpu() {
        return;
    }
    let (cpu, cuda) = pair(None, 30);
    let vocab = cpu.config().vocab_size;
    let mut rng = StdRng::seed_from_u64(31);
    let mut cc = [cpu.new_cache()];
    let mut gc = [cuda.new_cache()];
    for (k, n) in [250usize, 5, 3, 1, 1].into_iter().enumerate() {
        let seqs = [(tokens(&mut rng, n, vocab), Some(0), LogitsWanted::Last)];
        let want = step(&cpu, &mut cc, &seqs).expect("CPU step");
        let got = step(&cuda, &mut gc, &seqs).expect("CUDA step");
        assert_rows_close(&format!("growth step {k}"), &want[0], &got[0], vocab);
    }
    assert_eq!(gc[0].len(), 260);
    assert!(gc[0].capacity() >= 260, "capacity {}", gc[0].capacity());
}

/// A long decode under a small sliding window: the device cache cuts back
/// to the last `w` positions whenever `2·w` are stored (the CPU's rule),
/// many times over; logits match the CPU at every step, and the device
/// cache never holds more than `2·w` + one step's rows.
#[test]
fn long_decode_past_the_window_matches_the_cpu_backend() {
    if !have_gpu() {
        return;
    }
    const WINDOW: usize = 5;
    let (cpu, cuda) = pair(Some(WINDOW), 70);
    let vocab = cpu.config().vocab_size;
    let mut rng = StdRng::seed_from_u64(71);
    let mut cc = [cpu.new_cache(), cpu.new_cache()];
    let mut gc = [cuda.new_cache(), cuda.new_cache()];
    // Prefills of 7 (a) and 13 (> 2·w at once, b), then decodes of one
    // token, with a 3-token step crossing a cut now and then.
    let mut sizes = vec![(7usize, 13usize)];
    for k in 0..45 {
        sizes.push(if k % 11 == 4 { (3, 1) } else { (1, 1) });
    }
    let mut worst = 0f32;
    let mut cuts = 0;
    for (k, &(n0, n1)) in sizes.iter().enumerate() {
        let seqs = [
            (tokens(&mut rng, n0, vocab), Some(0), LogitsWanted::From(0)),
            (tokens(&mut rng, n1, vocab), Some(1), LogitsWanted::Last),
        ];
        let starts: Vec<usize> = gc.iter().map(CudaCache::start).collect();
        let want = step(&cpu, &mut cc, &seqs).expect("CPU step");
        let got = step(&cuda, &mut gc, &seqs).expect("CUDA step");
        for (s, (w, g)) in want.iter().zip(&got).enumerate() {
            let what = format!("window {WINDOW} step {k} sequence {s}");
            worst = worst.max(assert_rows_close(&what, w, g, vocab));
        }
        for (s, (c, g)) in cc.iter().zip(&gc).enumerate() {
            assert_eq!(c.len(), g.len(), "step {k} sequence {s}: lengths");
            let rows = seqs[s].0.len();
            assert!(
                g.stored_positions() < 2 * WINDOW + rows,
                "step {k} sequence {s}: {} positions stored",
                g.stored_positions()
            );
            assert!(
                g.capacity() <= (2 * WINDOW).max(13),
                "step {k} sequence {s}: capacity {}",
                g.capacity()
            );
        }
        cuts += gc
            .iter()
            .zip(&starts)
            .filter(|(g, &before)| g.start() != before)
            .count();
    }
    assert!(cuts >= 10, "only {cuts} cuts: the window was not exercised");
    eprintln!(
        "long decode, window {WINDOW}: {cuts} cuts, worst max|Δlogit| / spread = {worst:.3e}"
    );
}

/// Experts removed and added between steps: a step's expert tables are
/// built from the experts loaded at that step (none outlives it), so after
/// removing "a" and adding a new expert under a new id, steps mixing the
/// new one, "b" and the base still match the CPU, and the removed id is
/// refused.
#[test]
fn steps_after_removing_and_adding_experts_match_the_cpu_backend() {
    if !have_gpu() {
        return;
    }
    let seed = 80;
    let (mut cpu, mut cuda) = pair(None, seed);
    let c = cpu.config().clone();
    let src = base_model(&c, seed);
    let vocab = c.vocab_size;
    let mut rng = StdRng::seed_from_u64(81);
    let mut cc = [cpu.new_cache(), cpu.new_cache(), cpu.new_cache()];
    let mut gc = [cuda.new_cache(), cuda.new_cache(), cuda.new_cache()];
    let mut run =
        |cpu: &CpuBackend, cuda: &CudaBackend, experts: [Option<usize>; 3], what: &str| {
            let seqs: Vec<Seq> = experts
                .iter()
                .map(|&e| (tokens(&mut rng, 2, vocab), e, LogitsWanted::From(0)))
                .collect();
            let want = step(cpu, &mut cc, &seqs).expect("CPU step");
            let got = step(cuda, &mut gc, &seqs).expect("CUDA step");
            for (s, (w, g)) in want.iter().zip(&got).enumerate() {
                assert_rows_close(&format!("{what} sequence {s}"), w, g, vocab);
            }
        };
    run(&cpu, &cuda, [Some(0), Some(1), None], "before");
    cpu.remove_expert(0).expect("CPU remove a");
    cuda.remove_expert(0).expect("CUDA remove a");
    // The new expert has a's structure (deltas everywhere) with other values.
    let id_cpu = cpu.add_expert(place(expert_file(&src, &c, "a", seed + 9), &src, &c));
    let id_gpu = cuda.add_expert(place(expert_file(&src, &c, "a", seed + 9), &src, &c));
    assert_eq!((id_cpu, id_gpu), (2, 2));
    run(&cpu, &cuda, [Some(2), Some(1), None], "after");
    run(&cpu, &cuda, [Some(1), Some(2), Some(2)], "after, swapped");
    let mut one = [cuda.new_cache()];
    let old = [(vec![1u32], Some(0), LogitsWanted::Last)];
    assert!(matches!(
        step(&cuda, &mut one, &old),
        Err(ModelError::UnknownExpert(0))
    ));
}

/// The router's features agree (after a middle layer and after the final
/// norm), and bad inputs are the CPU backend's typed errors, with the
/// caches unchanged by a failed step.
#[test]
fn hidden_states_and_errors() {
    if !have_gpu() {
        return;
    }
    let (cpu, mut cuda) = pair(None, 40);
    let c = cpu.config().clone();
    let toks: Vec<u32> = (0..12).map(|i| (i * 7 % c.vocab_size) as u32).collect();
    for layer in [0, c.num_layers] {
        let want = cpu.hidden_states(&toks, layer).expect("CPU hidden");
        let got = cuda.hidden_states(&toks, layer).expect("CUDA hidden");
        assert_eq!(want.len(), got.len());
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = want
            .iter()
            .zip(&got)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!("hidden layer {layer}: max |Δ| = {worst:.3e} of max |h| {scale:.3}");
        assert!(
            worst <= 0.01 * scale,
            "hidden layer {layer}: {worst} vs scale {scale}"
        );
    }
    assert!(matches!(
        cuda.hidden_states(&toks, c.num_layers + 1),
        Err(ModelError::LayerRange { .. })
    ));

    let mut caches = [cuda.new_cache()];
    let ok = [(vec![1u32, 2, 3], Some(0), LogitsWanted::Last)];
    step(&cuda, &mut caches, &ok).expect("first step");
    let bad_token = [(vec![c.vocab_size as u32], None, LogitsWanted::Last)];
    assert!(matches!(
        step(&cuda, &mut caches, &bad_token),
        Err(ModelError::Token { .. })
    ));
    let bad_expert = [(vec![1u32], Some(7), LogitsWanted::Last)];
    assert!(matches!(
        step(&cuda, &mut caches, &bad_expert),
        Err(ModelError::UnknownExpert(7))
    ));
    let bad_range = [(vec![1u32, 2], None, LogitsWanted::From(2))];
    assert!(matches!(
        step(&cuda, &mut caches, &bad_range),
        Err(ModelError::LogitsRange { .. })
    ));
    assert_eq!(caches[0].len(), 3, "failed steps leave the cache as it was");
    let removed = cuda.remove_expert(0).expect("remove a");
    assert_eq!(removed.name, "a");
    assert!(matches!(
        step(&cuda, &mut caches, &ok),
        Err(ModelError::UnknownExpert(0))
    ));
    assert_eq!(cuda.expert_names(), vec!["b".to_string()]);
}

/// SmolLM2-135M (GGUF; hidden 576, so every linear takes the cuBLAS path
/// for in % 128 ≠ 0): a prompt prefill, greedy decode steps, and a second
/// sequence decoding in the same steps. Log-probabilities compared with
/// the llama.cpp bounds of tests/runtime_smollm2.rs (module docs).
#[test]
fn smollm2_matches_the_cpu_backend() {
    if !have_gpu() {
        return;
    }
    let Some(path) = meswitch_server::testdata::smollm2_gguf() else {
        eprintln!("skipped: SmolLM2 GGUF not found");
        return;
    };
    let m = meswitch_server::model::load_cpu(&path).expect("load SmolLM2 on CPU");
    let file = meswitch_server::gguf::GgufFile::open(&path).expect("open GGUF");
    let src = meswitch_server::model::GgufSource::new(file);
    let cuda = CudaBackend::load(&src, gpu()).expect("load SmolLM2 on CUDA");
    let vocab = m.backend.config().vocab_size;
    let prompt = m
        .tokenizer
        .encode("The capital of France is a city where", true)
        .expect("tokenize");
    let other = m
        .tokenizer
        .encode("def fibonacci(n):", true)
        .expect("tokenize");
    let mut cc = [m.backend.new_cache(), m.backend.new_cache()];
    let mut gc = [cuda.new_cache(), cuda.new_cache()];
    let (mut worst_top, mut worst_any) = (0f64, 0f64);
    let mut seqs = vec![
        (prompt.clone(), None, LogitsWanted::Last),
        (other.clone(), None, LogitsWanted::From(0)),
    ];
    for k in 0..8 {
        let want = step(&m.backend, &mut cc, &seqs).expect("CPU step");
        let got = step(&cuda, &mut gc, &seqs).expect("CUDA step");
        for (s, (w, g)) in want.iter().zip(&got).enumerate() {
            for (r, (a, b)) in w.chunks(vocab).zip(g.chunks(vocab)).enumerate() {
                assert!(
                    b.iter().all(|v| v.is_finite()),
                    "step {k} seq {s} row {r}: non-finite"
                );
                let (la, lb) = (log_softmax(a), log_softmax(b));
                let top = argmax(a);
                worst_top = worst_top.max((la[top] - lb[top]).abs());
                let mut order: Vec<usize> = (0..vocab).collect();
                order.sort_by(|&i, &j| a[j].total_cmp(&a[i]));
                for &i in &order[..10] {
                    worst_any = worst_any.max((la[i] - lb[i]).abs());
                }
                if f64::from(top2_gap(a)) > 2.0 * worst_any {
                    assert_eq!(top, argmax(b), "step {k} seq {s} row {r}: argmax differs");
                }
            }
        }
        // Greedy continuation from the CPU's choice, so both see the same tokens.
        seqs = want
            .iter()
            .map(|w| {
                let last = &w[w.len() - vocab..];
                (vec![argmax(last) as u32], None, LogitsWanted::Last)
            })
            .collect();
    }
    eprintln!("SmolLM2: worst top-token |Δlogprob| {worst_top:.4}, top-10 {worst_any:.4}");
    assert!(
        worst_top <= 0.06,
        "top-token log-probability differs by {worst_top}"
    );
    assert!(
        worst_any <= 0.4,
        "a top-10 log-probability differs by {worst_any}"
    );
}

fn log_softmax(v: &[f32]) -> Vec<f64> {
    let max = v.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let sum: f64 = v.iter().map(|&x| (x as f64 - max).exp()).sum();
    v.iter().map(|&x| x as f64 - max - sum.ln()).collect()
}

/// Runs everywhere: without a device, loading is the typed `NoDevice`
/// error (no panic); with one, it loads.
#[test]
fn load_without_a_device_is_a_typed_error() {
    let c = config(None);
    let src = base_model(&c, 50);
    match Gpu::detect() {
        Err(e) => {
            assert!(gpu_required_is_off(), "{REQUIRE_GPU}=1 but no device: {e}");
            match CudaBackend::load_detect(&src) {
                Err(ModelError::NoDevice(why)) => assert!(!why.is_empty()),
                Err(other) => panic!("expected NoDevice, got {other}"),
                Ok(_) => panic!("loaded on a device that Gpu::detect could not open"),
            }
        }
        Ok(_) => {
            let b = CudaBackend::load_detect(&src).expect("load on the device");
            assert_eq!(b.config().hidden_size, c.hidden_size);
        }
    }
}

fn gpu_required_is_off() -> bool {
    !gpu_required()
}

/// The engine runs a backend on its own thread.
#[test]
fn backend_and_cache_are_send() {
    fn send<T: Send>() {}
    send::<CudaBackend>();
    send::<CudaCache>();
}
