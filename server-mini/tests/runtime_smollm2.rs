//! The CPU runtime against llama.cpp's outputs for SmolLM2-135M-Instruct
//! (Q4_1 GGUF): last-position logits, greedy continuations, perplexity.
//! Skips when the model file is missing, fails under CI=true.

use std::path::PathBuf;
use std::sync::OnceLock;

use meswitch_server::generate::{generate, perplexity};
use meswitch_server::model::{
    load_cpu, load_cpu_with, Backend, LoadedModel, LogitsWanted, Numerics, SeqStep,
};
use meswitch_server::sampling::SamplingParams;
use meswitch_server::testdata;
use serde_json::Value;

fn model() -> Option<&'static LoadedModel> {
    static MODEL: OnceLock<Option<LoadedModel>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let path = testdata::require("SmolLM2 GGUF", testdata::smollm2_gguf())?;
            Some(load_cpu(&path).expect("load SmolLM2"))
        })
        .as_ref()
}

/// The model loaded for [`Numerics::LlamaCpp`] (keeps the GGUF's blocks).
fn model_llama_cpp() -> Option<&'static LoadedModel> {
    static MODEL: OnceLock<Option<LoadedModel>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let path = testdata::require("SmolLM2 GGUF", testdata::smollm2_gguf())?;
            Some(load_cpu_with(&path, Numerics::LlamaCpp).expect("load SmolLM2"))
        })
        .as_ref()
}

fn goldens(file: &str) -> Vec<Value> {
    let dir: PathBuf = testdata::smollm2_dir().expect("smollm2 golden folder");
    std::fs::read_to_string(dir.join(file))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// llama.cpp multiplies Q4_1 weights with activations quantized to Q8_1
/// (and keeps an FP16 KV cache); we use f32 activations against the same
/// weights widened to FP16. Layer by layer (eval-callback trace) the two
/// drift apart by ~1% of the residual stream, which moves raw logits by up
/// to ~0.5 but mostly in common: log-probabilities, which cancel the
/// shift, measured within 0.32 over the top 10 and 0.047 for the top token.
/// The bounds below leave a small margin over those measurements.
const TOP_LOGPROB_TOLERANCE: f64 = 0.06;
/// How far below our top logit a golden token may sit and still count as
/// our top-2 pick (ties at FP rounding level).
const TIE_EPSILON: f32 = 1e-4;
const TOP10_LOGPROB_TOLERANCE: f64 = 0.4;

#[test]
fn last_position_logprobs_match_llama_cpp() {
    let Some(m) = model() else { return };
    let (mut worst_top, mut worst_any) = (0f64, 0f64);
    for g in goldens("logits_top10.jsonl") {
        let prompt = ids(&g["prompt_ids"]);
        let mut cache = m.backend.new_cache();
        let logits = m
            .backend
            .forward(&mut [SeqStep {
                tokens: &prompt,
                cache: &mut cache,
                expert: None,
                logits: LogitsWanted::Last,
            }])
            .unwrap()
            .remove(0);
        let lse = meswitch_server::generate::log_sum_exp(&logits);
        let top10 = g["top10"].as_array().unwrap();
        let best = top10[0]["id"].as_u64().unwrap() as u32;
        assert_eq!(
            meswitch_server::sampling::argmax(&logits),
            best,
            "{:?}",
            g["prompt"]
        );
        for (rank, t) in top10.iter().enumerate() {
            let id = t["id"].as_u64().unwrap() as usize;
            let want = t["logprob"].as_f64().unwrap();
            let err = (logits[id] as f64 - lse - want).abs();
            let bound = if rank == 0 {
                TOP_LOGPROB_TOLERANCE
            } else {
                TOP10_LOGPROB_TOLERANCE
            };
            assert!(
                err < bound,
                "prompt {:?} rank {rank} token {id}: logprob off by {err}",
                g["prompt"]
            );
            worst_any = worst_any.max(err);
            if rank == 0 {
                worst_top = worst_top.max(err);
            }
        }
    }
    eprintln!("log-prob difference from llama.cpp: top-1 {worst_top:.4}, top-10 {worst_any:.4}");
}

/// The README's teacher-forced check: feed prompt + golden continuation in
/// one prefill and require every golden token up to `robust_prefix_len` to
/// be our top-1 or top-2 pick (at most one exception).
#[test]
fn golden_tokens_are_in_our_top2_teacher_forced() {
    let Some(m) = model() else { return };
    let vocab = m.backend.config().vocab_size;
    let mut top1 = (0, 0);
    let mut outside = Vec::new();
    for g in goldens("generation_goldens.jsonl") {
        let prompt = ids(&g["prompt_ids"]);
        let golden = ids(&g["generated_ids"]);
        let robust = g["robust_prefix_len"].as_u64().unwrap() as usize;
        let mut all = prompt.clone();
        all.extend(&golden[..robust]);
        let mut cache = m.backend.new_cache();
        let logits = m
            .backend
            .forward(&mut [SeqStep {
                tokens: &all,
                cache: &mut cache,
                expert: None,
                logits: LogitsWanted::From(prompt.len() - 1),
            }])
            .unwrap()
            .remove(0);
        for (i, row) in logits.chunks(vocab).take(robust).enumerate() {
            let want = golden[i] as usize;
            let better = row.iter().filter(|&&v| v > row[want] + TIE_EPSILON).count();
            if better > 1 {
                outside.push(format!(
                    "prompt {} step {i}: {better} tokens above golden {want}",
                    g["id"]
                ));
            }
            top1.0 += usize::from(better == 0);
            top1.1 += 1;
        }
    }
    eprintln!(
        "teacher-forced: golden token is our top-1 at {} of {} steps; outside top-2: {outside:?}",
        top1.0, top1.1
    );
    // Like the issue's "all prompts but at most one": one step may fall just
    // outside our top 2 (measured: one, 0.05 logits below our top).
    assert!(outside.len() <= 1, "{outside:?}");
}

/// How far each greedy continuation is compared with llama.cpp's.
#[derive(Clone, Copy, PartialEq)]
enum Compare {
    /// Up to the golden's `robust_prefix_len` (the tokens before the first
    /// near-tie): the issue's bar.
    RobustPrefix,
    /// Every generated token, the end-of-generation token included.
    Whole,
}

/// Greedy continuations of every golden prompt, compared with llama.cpp's;
/// returns the prompts that differ.
fn greedy_misses(m: &LoadedModel, compare: Compare) -> Vec<String> {
    let mut misses = Vec::new();
    for g in goldens("generation_goldens.jsonl") {
        let prompt = ids(&g["prompt_ids"]);
        let encoded = m
            .tokenizer
            .encode(g["prompt"].as_str().unwrap(), true)
            .unwrap();
        assert_eq!(encoded, prompt, "tokenization of {:?}", g["prompt"]);
        let golden = ids(&g["generated_ids"]);
        let upto = match compare {
            Compare::RobustPrefix => g["robust_prefix_len"].as_u64().unwrap() as usize,
            Compare::Whole => g["n_generated"].as_u64().unwrap() as usize,
        };
        let golden = &golden[..upto.min(golden.len())];
        let params = SamplingParams {
            max_tokens: upto,
            ..Default::default()
        };
        let detok = |ids: &[u32]| m.tokenizer.decode(ids, true).map_err(|e| e.to_string());
        let out = generate(
            &m.backend,
            &detok,
            m.tokenizer.eos_ids(),
            &prompt,
            None,
            params,
            |_| {},
        )
        .unwrap();
        let ours = &out.ids[..out.ids.len().min(upto)];
        if ours != golden {
            let first = ours.iter().zip(golden).position(|(a, b)| a != b);
            let margins = &g["step_top1_top2_logit_margin"];
            misses.push(format!(
                "prompt {}: first difference at {first:?} of {upto} (golden margin there {})",
                g["id"],
                first.map_or(Value::Null, |i| margins[i].clone())
            ));
        }
    }
    misses
}

/// Greedy decoding with llama.cpp's arithmetic ([`Numerics::LlamaCpp`]:
/// ggml's quantized block products, RMSNorm, RoPE, SwiGLU and flash
/// attention reproduced operation by operation, see
/// [`llama_cpp_numerics_reproduce_the_layer_trace`]). The issue allows one
/// prompt of 8 to differ up to its `robust_prefix_len`; measured: none.
#[test]
fn greedy_continuations_with_llama_cpp_numerics_meet_the_issue_target() {
    let Some(m) = model_llama_cpp() else { return };
    let misses = greedy_misses(m, Compare::RobustPrefix);
    eprintln!("llama-cpp numerics: {} misses {misses:?}", misses.len());
    assert!(misses.len() <= 1, "{misses:?}");
}

/// Past the near-ties too: with the same arithmetic there is nothing for a
/// near-tie to flip, so every token of every golden continuation is ours.
#[test]
fn greedy_continuations_with_llama_cpp_numerics_are_llama_cpps_whole() {
    let Some(m) = model_llama_cpp() else { return };
    let misses = greedy_misses(m, Compare::Whole);
    assert!(misses.is_empty(), "{misses:?}");
}

/// The same with exact f32 activations: llama.cpp's 8-bit activations move
/// logits by up to ~0.5, more than the golden margins at some steps, so more
/// prompts may diverge; this test only reports them.
#[test]
#[ignore = "report only: exact numerics are expected to differ from llama.cpp's rounding"]
fn greedy_continuations_exact_numerics_report() {
    let Some(m) = model() else { return };
    let misses = greedy_misses(m, Compare::RobustPrefix);
    eprintln!("exact numerics: {} misses {misses:?}", misses.len());
}

fn check_perplexity(stem: &str) {
    let Some(m) = model() else { return };
    let (ppl, want) = perplexity_of(m, stem);
    let rel = (ppl - want).abs() / want;
    assert!(rel < 0.02, "{stem}: {ppl} vs {want}");
}

/// Our perplexity of a golden text by llama.cpp's convention, and llama.cpp's.
fn perplexity_of(m: &LoadedModel, stem: &str) -> (f64, f64) {
    let dir = testdata::smollm2_dir().unwrap();
    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(format!("{stem}.ppl.json"))).unwrap(),
    )
    .unwrap();
    let text = std::fs::read_to_string(dir.join(format!("{stem}.txt"))).unwrap();
    let tokens = m.tokenizer.encode(&text, false).unwrap();
    assert_eq!(tokens, ids(&golden["token_ids"]), "tokenization of {stem}");
    let ctx = golden["n_ctx"].as_u64().unwrap() as usize;
    let chunks = golden["chunks_lib"].as_array().unwrap();
    let result = perplexity(&m.backend, &tokens, ctx, None, |i, w| {
        let want = chunks[i]["nll_sum"].as_f64().unwrap();
        eprintln!(
            "{stem} window {i}: nll {:.3} (llama.cpp {want:.3})",
            w.nll_sum
        );
    })
    .unwrap();
    assert_eq!(result.windows.len(), chunks.len());
    for (w, c) in result.windows.iter().zip(chunks) {
        assert_eq!(w.scored as u64, c["n_scored"].as_u64().unwrap());
    }
    let want = golden["final_ppl"].as_f64().unwrap();
    eprintln!(
        "{stem}: perplexity {:.4} vs llama.cpp {want:.4} ({:+.2}%)",
        result.ppl,
        (result.ppl / want - 1.0) * 100.0
    );
    (result.ppl, want)
}

#[test]
fn perplexity_python_execmodel_within_2_percent() {
    check_perplexity("ppl_python_execmodel");
}

#[test]
fn perplexity_libpng_manual_within_2_percent() {
    check_perplexity("ppl_libpng_manual");
}

/// Perplexity with [`Numerics::LlamaCpp`]. llama-perplexity evaluates
/// 256-token batches, for which ggml switches to its tiled flash attention
/// (f32 accumulator); we reproduce the one-row kernel, so these are close
/// to llama.cpp's, not equal. Report only.
#[test]
#[ignore = "report: about 3 minutes of CPU"]
fn perplexity_with_llama_cpp_numerics_report() {
    let Some(m) = model_llama_cpp() else { return };
    for stem in ["ppl_python_execmodel", "ppl_libpng_manual"] {
        perplexity_of(m, stem);
    }
}

/// `(name, sum)` of every tensor in llama.cpp's eval-callback trace.
fn trace_sums() -> Vec<(String, f64)> {
    let dir = testdata::smollm2_dir().expect("smollm2 golden folder");
    let text =
        std::fs::read_to_string(dir.join("eval_callback_trace_capital_of_france.txt")).unwrap();
    let mut out = Vec::new();
    let mut name = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("common_debug_cb_eval:") {
            name = rest.split(" = ").next().map(|s| s.trim().to_string());
        } else if let (Some(v), Some(n)) = (line.trim().strip_prefix("sum = "), &name) {
            out.push((n.clone(), v.parse().unwrap()));
        }
    }
    out
}

/// Our sum of a tensor the way the eval callback prints it: f32, in
/// order, over the rows the trace holds.
fn f32_sum(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |a, b| a + b)
}

/// llama.cpp's eval-callback trace prints every tensor's f32 sum to 6
/// decimals. An f32 sum of ~2900 values moves with a change of one ulp in
/// any of them often enough that 32 sums agreeing to the last printed digit
/// means the same bits, and a single different rounding anywhere (a
/// reduction order, a fused multiply-add, an FP16 tie) shows within a layer
/// or two and then grows (measured while building this: a RoPE without
/// ggml's FMA pattern diverged at layer 9, attention scores summed in HF
/// rather than GGUF head order at layer 10). Checked: every layer's output,
/// the final norm, and the logits.
#[test]
fn llama_cpp_numerics_reproduce_the_layer_trace() {
    let Some(m) = model_llama_cpp() else { return };
    let cpu = &m.backend;
    let tokens = [504u32, 3575, 282, 4649, 314];
    let (n, hd) = (cpu.config().num_layers, cpu.config().hidden_size);
    let layers: Vec<usize> = (0..=n).collect();
    let states = cpu.hidden_states_at(&tokens, &layers).unwrap();
    let mut cache = cpu.new_cache();
    let logits = cpu
        .forward(&mut [SeqStep {
            tokens: &tokens,
            cache: &mut cache,
            expert: None,
            logits: LogitsWanted::Last,
        }])
        .unwrap()
        .remove(0);
    let sums = trace_sums();
    let want = |name: &str| -> String {
        let (_, v) = sums
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name} in the trace"));
        format!("{v:.6}")
    };
    let last_row = |h: &[f32]| h[(tokens.len() - 1) * hd..].to_vec();
    let mut checked = Vec::new();
    for (l, h) in states.iter().enumerate() {
        // llama.cpp keeps only the last row from the last layer on.
        let (name, ours) = match l {
            l if l == n => ("result_norm".to_string(), f32_sum(&last_row(h))),
            l if l == n - 1 => (format!("l_out-{l}"), f32_sum(&last_row(h))),
            l => (format!("l_out-{l}"), f32_sum(h)),
        };
        checked.push((want(&name), format!("{ours:.6}"), name));
    }
    checked.push((
        want("result_output"),
        format!("{:.6}", f32_sum(&logits)),
        "result_output".into(),
    ));
    let differ: Vec<_> = checked.iter().filter(|(w, o, _)| w != o).collect();
    assert!(differ.is_empty(), "(llama.cpp, ours, tensor): {differ:?}");
}
