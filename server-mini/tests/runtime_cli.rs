//! End to end on the synthetic family: synth → compress → runtime with the
//! expert file, checked against the decompressed expert checkpoint, plus
//! the generate / perplexity commands and their errors.

use std::path::Path;

use meswitch_server::checkpoint::Checkpoint;
use meswitch_server::model::{Backend, CpuBackend, LogitsWanted, SeqStep};

fn cli(args: &[&str]) -> anyhow::Result<()> {
    let mut all = vec!["meswitch"];
    all.extend_from_slice(args);
    meswitch_server::cli::main(all)
}

fn last_logits(b: &CpuBackend, tokens: &[u32], expert: Option<usize>) -> Vec<f32> {
    let mut cache = b.new_cache();
    b.forward(&mut [SeqStep {
        tokens,
        cache: &mut cache,
        expert,
        logits: LogitsWanted::Last,
    }])
    .unwrap()
    .remove(0)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn compressed_expert_equals_its_decompressed_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let fam = dir.path().join("fam");
    cli(&["synth", "-o", s(&fam), "--experts", "2"]).unwrap();
    let base = fam.join("base");
    let e0 = fam.join("experts/expert-00");
    let e1 = fam.join("experts/expert-01");
    let file = dir.path().join("e0.safetensors");
    cli(&[
        "compress",
        "--base",
        s(&base),
        "--expert",
        s(&e0),
        "--bits",
        "4",
        "--group",
        "32",
        "--salient",
        "1%",
        "-o",
        s(&file),
    ])
    .unwrap();
    let recon = dir.path().join("recon");
    cli(&[
        "decompress",
        "--base",
        s(&base),
        "--delta",
        s(&file),
        "-o",
        s(&recon),
    ])
    .unwrap();

    let mut b = CpuBackend::load(&Checkpoint::open(&base).unwrap()).unwrap();
    let id = b.load_expert(&file).unwrap();
    let dense = CpuBackend::load(&Checkpoint::open(&recon).unwrap()).unwrap();
    let truth = CpuBackend::load(&Checkpoint::open(&e0).unwrap()).unwrap();

    let tokens: Vec<u32> = (1..12).collect();
    let ours = last_logits(&b, &tokens, Some(id));
    let base_logits = last_logits(&b, &tokens, None);
    let recon_logits = last_logits(&dense, &tokens, None);
    let true_logits = last_logits(&truth, &tokens, None);
    // The decompressed checkpoint rounds base + Δ̂ to FP16 once; the runtime
    // adds Δ̂ in f32. Logits here are O(1), so 1e-2 is a few FP16 ulps of
    // accumulated difference.
    let d = max_diff(&ours, &recon_logits);
    assert!(d < 1e-2, "runtime expert vs decompressed checkpoint: {d}");
    // INT4 compression keeps the expert much closer to itself than to the base.
    assert!(max_diff(&ours, &true_logits) < 0.5 * max_diff(&base_logits, &true_logits));

    // An expert file checked against a different base is refused: the
    // identity covers config and tensor shapes (not values), so alter the
    // config of a copy of the base.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(base.join(f), other.join(f)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(base.join("config.json")).unwrap()).unwrap();
    config["rope_theta"] = serde_json::json!(12345.0);
    std::fs::write(other.join("config.json"), config.to_string()).unwrap();
    let mut wrong = CpuBackend::load(&Checkpoint::open(&other).unwrap()).unwrap();
    let err = wrong.load_expert(&file).unwrap_err().to_string();
    assert!(err.contains("base"), "{err}");
    let _ = e1;

    // The commands run end to end, and refuse bad input with an error.
    cli(&[
        "generate",
        "--model",
        s(&base),
        "--expert",
        s(&file),
        "--prompt",
        "hello",
        "--max-tokens",
        "4",
        "--temperature",
        "0.8",
        "--seed",
        "3",
    ])
    .unwrap();
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "short").unwrap();
    assert!(cli(&[
        "perplexity",
        "--model",
        s(&base),
        "--text",
        s(&text),
        "--ctx",
        "64"
    ])
    .is_err());
    assert!(cli(&[
        "generate",
        "--model",
        s(&base),
        "--prompt",
        "x",
        "--top-p",
        "0"
    ])
    .is_err());
    assert!(cli(&[
        "generate",
        "--model",
        s(&dir.path().join("missing")),
        "--prompt",
        "x"
    ])
    .is_err());
    // llama.cpp's numerics run on the CPU (on a checkpoint without ggml
    // blocks they are the exact ones); they refuse a CUDA device outright.
    let with = |numerics: &str, device: &str| {
        cli(&[
            "generate",
            "--model",
            s(&base),
            "--prompt",
            "x",
            "--max-tokens",
            "2",
            "--numerics",
            numerics,
            "--device",
            device,
        ])
    };
    with("llama-cpp", "auto").unwrap();
    let err = with("llama-cpp", "cuda").unwrap_err().to_string();
    assert!(err.contains("CPU"), "{err}");
    assert!(with("fast", "cpu").is_err());
}
