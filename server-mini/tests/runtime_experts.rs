//! The runtime with experts on a tiny random Llama: mixed batches, experts
//! against an explicitly reconstructed model, base rows, identity checks.

use std::collections::BTreeMap;

use half::f16;
use meswitch_reference::container::{ExpertFile, ExpertHeader, ExpertTensor, FORMAT_VERSION};
use meswitch_reference::{compress_matrix, Bits, CompressSettings, SalientSpec};
use meswitch_server::model::weights::{names, Proj};
use meswitch_server::model::{
    Backend, CpuBackend, Expert, LogitsWanted, MemorySource, ModelConfig, SeqStep, WeightSource,
};
use rand::{Rng, SeedableRng};

fn config() -> ModelConfig {
    ModelConfig {
        hidden_size: 64,
        intermediate_size: 96,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        vocab_size: 50,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        sliding_window: None,
        tie_word_embeddings: true,
        max_position_embeddings: Some(64),
    }
}

fn random(rng: &mut impl Rng, n: usize, scale: f32) -> Vec<f16> {
    (0..n)
        .map(|_| f16::from_f32(rng.random_range(-scale..scale)))
        .collect()
}

fn base_model(seed: u64) -> MemorySource {
    let c = config();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut t = BTreeMap::new();
    let h = c.hidden_size;
    t.insert(
        names::EMBED.to_string(),
        (
            vec![c.vocab_size, h],
            random(&mut rng, c.vocab_size * h, 1.0),
        ),
    );
    t.insert(names::FINAL_NORM.to_string(), (vec![h], vec![f16::ONE; h]));
    for l in 0..c.num_layers {
        t.insert(
            names::input_norm(l),
            (
                vec![h],
                random(&mut rng, h, 1.0)
                    .iter()
                    .map(|v| f16::from_f32(1.0 + v.to_f32() * 0.2))
                    .collect(),
            ),
        );
        t.insert(names::post_norm(l), (vec![h], vec![f16::ONE; h]));
        for p in Proj::ALL {
            let [o, i] = p.shape(&c);
            t.insert(
                names::proj(l, p),
                (vec![o, i], random(&mut rng, o * i, 0.3)),
            );
        }
    }
    MemorySource {
        config: c.to_hf(),
        tensors: t,
    }
}

/// An expert with INT4 deltas on every projection of layer `layer`, its
/// own final norm, and for `layer == 1` an INT2 delta on the tied embeddings; returns the file and the dense expert model it encodes.
fn expert(base: &MemorySource, name: &str, seed: u64, layer: usize) -> (ExpertFile, MemorySource) {
    let c = config();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut tensors = BTreeMap::new();
    let mut dense = MemorySource {
        config: base.config.clone(),
        tensors: base.tensors.clone(),
    };
    for p in Proj::ALL {
        let [o, i] = p.shape(&c);
        let delta: Vec<f32> = (0..o * i).map(|_| rng.random_range(-0.1f32..0.1)).collect();
        let settings = CompressSettings::new(Bits::Four, 32, SalientSpec::Count(2));
        let packed = compress_matrix(&delta, o, i, &settings, None).unwrap();
        let hat = packed.dequantize();
        let name = names::proj(layer, p);
        // The expert's full weight, for the reference model: base + Δ̂. The
        // runtime keeps base and Δ̂ apart in f32, the reference rounds the
        // sum to FP16 once: the tolerance below covers that.
        let entry = dense.tensors.get_mut(&name).unwrap();
        for (w, d) in entry.1.iter_mut().zip(&hat) {
            *w = f16::from_f32(w.to_f32() + d);
        }
        tensors.insert(name, ExpertTensor::Delta(packed));
    }
    if layer == 1 {
        // This expert also changes the (tied) embeddings by a delta, so its
        // lm_head changes too.
        let (v, h) = (c.vocab_size, c.hidden_size);
        let delta: Vec<f32> = (0..v * h).map(|_| rng.random_range(-0.2f32..0.2)).collect();
        let settings = CompressSettings::new(Bits::Two, 32, SalientSpec::Count(1));
        let packed = compress_matrix(&delta, v, h, &settings, None).unwrap();
        let hat = packed.dequantize();
        let entry = dense.tensors.get_mut(names::EMBED).unwrap();
        for (w, d) in entry.1.iter_mut().zip(&hat) {
            *w = f16::from_f32(w.to_f32() + d);
        }
        tensors.insert(names::EMBED.to_string(), ExpertTensor::Delta(packed));
    }
    let norm: Vec<f16> = (0..c.hidden_size)
        .map(|_| f16::from_f32(rng.random_range(0.5..1.5)))
        .collect();
    dense.tensors.insert(
        names::FINAL_NORM.to_string(),
        (vec![c.hidden_size], norm.clone()),
    );
    tensors.insert(
        names::FINAL_NORM.to_string(),
        ExpertTensor::Dense {
            shape: vec![c.hidden_size],
            values: norm,
        },
    );
    let file = ExpertFile {
        header: ExpertHeader {
            base: base.identity(),
            expert_name: name.to_string(),
            settings: serde_json::json!({}),
        },
        format_version: FORMAT_VERSION,
        tensors,
    };
    (file, dense)
}

fn run(b: &CpuBackend, steps: Vec<(Vec<u32>, Option<usize>)>) -> Vec<Vec<f32>> {
    let mut caches: Vec<_> = steps.iter().map(|_| b.new_cache()).collect();
    let mut batch: Vec<SeqStep<_>> = steps
        .iter()
        .zip(caches.iter_mut())
        .map(|((t, e), c)| SeqStep {
            tokens: t,
            cache: c,
            expert: *e,
            logits: LogitsWanted::Last,
        })
        .collect();
    b.forward(&mut batch).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn add(b: &mut CpuBackend, f: ExpertFile) -> usize {
    let e = Expert::from_file(
        f,
        b.config(),
        &b.identity().clone(),
        &b.base_shapes().clone(),
    )
    .unwrap();
    b.add_expert(e)
}

#[test]
fn expert_rows_match_the_reconstructed_model_and_mixed_batches_match_alone() {
    let base = base_model(1);
    let (f0, dense0) = expert(&base, "a", 2, 0);
    let (f1, dense1) = expert(&base, "b", 3, 1);
    let mut b = CpuBackend::load(&base).unwrap();
    let e0 = add(&mut b, f0);
    let e1 = add(&mut b, f1);
    let plain = CpuBackend::load(&base).unwrap();
    let ref0 = CpuBackend::load(&dense0).unwrap();
    let ref1 = CpuBackend::load(&dense1).unwrap();

    let prompt: Vec<u32> = vec![3, 17, 42, 5, 9, 11];
    // Alone, each expert equals its reconstructed dense model; base = base.
    let alone0 = run(&b, vec![(prompt.clone(), Some(e0))]).remove(0);
    let alone1 = run(&b, vec![(prompt.clone(), Some(e1))]).remove(0);
    let alone_base = run(&b, vec![(prompt.clone(), None)]).remove(0);
    // FP16 rounding of base + Δ̂ in the reference, over logits of size ~10.
    let tol = 2e-2;
    assert!(max_diff(&alone0, &run(&ref0, vec![(prompt.clone(), None)])[0]) < tol);
    assert!(max_diff(&alone1, &run(&ref1, vec![(prompt.clone(), None)])[0]) < tol);
    assert!(max_diff(&alone_base, &run(&plain, vec![(prompt.clone(), None)])[0]) < 1e-5);
    // The experts do change the output.
    assert!(max_diff(&alone0, &alone_base) > 0.1);
    assert!(max_diff(&alone1, &alone_base) > 0.1);

    // One mixed step: prefill of three sequences with different experts.
    let mixed = run(
        &b,
        vec![
            (prompt.clone(), Some(e1)),
            (prompt.clone(), None),
            (prompt.clone(), Some(e0)),
        ],
    );
    assert!(max_diff(&mixed[0], &alone1) < 1e-4);
    assert!(max_diff(&mixed[1], &alone_base) < 1e-4);
    assert!(max_diff(&mixed[2], &alone0) < 1e-4);
}

/// Decode steps of several sequences batched together give the logits each
/// would get decoding alone, and prefill-then-decode equals one prefill.
#[test]
fn batched_decode_equals_sequential() {
    let base = base_model(4);
    let (f0, _) = expert(&base, "a", 5, 1);
    let mut b = CpuBackend::load(&base).unwrap();
    let e0 = add(&mut b, f0);
    let prompts: [(Vec<u32>, Option<usize>); 2] =
        [(vec![1, 2, 3, 4], Some(e0)), (vec![7, 8], None)];
    let mut caches: Vec<_> = prompts.iter().map(|_| b.new_cache()).collect();
    for ((p, e), c) in prompts.iter().zip(caches.iter_mut()) {
        b.forward(&mut [SeqStep {
            tokens: p,
            cache: c,
            expert: *e,
            logits: LogitsWanted::Last,
        }])
        .unwrap();
    }
    let next = [[10u32], [20u32]];
    let mut batch: Vec<SeqStep<_>> = caches
        .iter_mut()
        .zip(&prompts)
        .zip(&next)
        .map(|((c, (_, e)), t)| SeqStep {
            tokens: t,
            cache: c,
            expert: *e,
            logits: LogitsWanted::Last,
        })
        .collect();
    let decoded = b.forward(&mut batch).unwrap();
    for (i, ((p, e), t)) in prompts.iter().zip(&next).enumerate() {
        let mut full = p.clone();
        full.push(t[0]);
        let whole = run(&b, vec![(full, *e)]).remove(0);
        assert!(max_diff(&decoded[i], &whole) < 1e-4, "sequence {i}");
    }
}

#[test]
fn expert_for_another_base_is_rejected() {
    let base = base_model(6);
    let other = base_model(7);
    let mut other_cfg = other.config.clone();
    other_cfg["rope_theta"] = serde_json::json!(500000.0);
    let other = MemorySource {
        config: other_cfg,
        tensors: other.tensors,
    };
    let (f, _) = expert(&other, "x", 8, 0);
    let b = CpuBackend::load(&base).unwrap();
    let err = Expert::from_file(f, b.config(), b.identity(), b.base_shapes());
    assert!(err.is_err());
}

#[test]
fn bad_steps_are_errors_and_leave_caches_alone() {
    let base = base_model(9);
    let b = CpuBackend::load(&base).unwrap();
    let mut c = b.new_cache();
    let bad: [&[u32]; 2] = [&[], &[1, 999]];
    for t in bad {
        assert!(b
            .forward(&mut [SeqStep {
                tokens: t,
                cache: &mut c,
                expert: None,
                logits: LogitsWanted::Last
            }])
            .is_err());
    }
    assert!(b
        .forward(&mut [SeqStep {
            tokens: &[1],
            cache: &mut c,
            expert: Some(3),
            logits: LogitsWanted::Last
        }])
        .is_err());
    assert!(b
        .forward(&mut [SeqStep {
            tokens: &[1; 65],
            cache: &mut c,
            expert: None,
            logits: LogitsWanted::Last
        }])
        .is_err());
    assert!(c.is_empty());
}

/// Mistral's sliding window: with window 2 and 2 layers the last position
/// sees tokens 3..5 of 6 at most, so earlier tokens cannot change its
/// logits; without the window they do.
#[test]
fn sliding_window_limits_what_the_last_token_sees() {
    let mut base = base_model(10);
    let logits_for = |src: &MemorySource, tokens: &[u32]| {
        let b = CpuBackend::load(src).unwrap();
        run(&b, vec![(tokens.to_vec(), None)]).remove(0)
    };
    let a = [1u32, 2, 3, 4, 5, 6];
    let b = [9u32, 8, 7, 4, 5, 6];
    assert!(max_diff(&logits_for(&base, &a), &logits_for(&base, &b)) > 1e-3);
    base.config["sliding_window"] = serde_json::json!(2);
    assert_eq!(logits_for(&base, &a), logits_for(&base, &b));
}

/// Under a sliding window the cache drops what no later query can see: it
/// never holds more than 2·window positions, and decoding token by token
/// through those drops gives the logits of one prefill of the whole
/// sequence (which keeps everything until it ends).
#[test]
fn sliding_window_cache_stays_bounded_and_exact() {
    let mut base = base_model(11);
    let window = 5;
    base.config["sliding_window"] = serde_json::json!(window);
    let b = CpuBackend::load(&base).unwrap();
    let vocab = b.config().vocab_size;
    let tokens: Vec<u32> = (0..40u32).map(|i| (i * 7 + 3) % vocab as u32).collect();

    let mut whole = b.new_cache();
    let all = b
        .forward(&mut [SeqStep {
            tokens: &tokens,
            cache: &mut whole,
            expert: None,
            logits: LogitsWanted::From(0),
        }])
        .unwrap()
        .remove(0);

    let mut cache = b.new_cache();
    let mut most_stored = 0;
    for (i, t) in tokens.iter().enumerate() {
        let step = b
            .forward(&mut [SeqStep {
                tokens: std::slice::from_ref(t),
                cache: &mut cache,
                expert: None,
                logits: LogitsWanted::Last,
            }])
            .unwrap()
            .remove(0);
        most_stored = most_stored.max(cache.stored_positions());
        let want = &all[i * vocab..(i + 1) * vocab];
        // Same products, possibly summed in another order across batch sizes.
        assert!(
            max_diff(&step, want) < 1e-4,
            "token {i}: {}",
            max_diff(&step, want)
        );
    }
    assert_eq!(cache.len(), tokens.len());
    assert!(most_stored < 2 * window, "stored {most_stored} positions");
    assert!(cache.stored_positions() < tokens.len());
}
