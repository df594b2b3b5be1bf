//! `meswitch tokenize` prints llama.cpp's ids for a golden string as a JSON array.

use meswitch_server::testdata;
use std::process::Command;

#[test]
fn tokenize_prints_golden_ids_as_json() {
    let Some(gguf) = testdata::require("SmolLM2 GGUF", testdata::smollm2_gguf()) else {
        return;
    };
    let dir = testdata::smollm2_dir().expect("goldens");
    let text = std::fs::read_to_string(dir.join("tokenizer_goldens.jsonl")).unwrap();
    // A ChatML line: special tokens parsed by default, plain text with --no-parse-special.
    let g: serde_json::Value = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|g| g["text"].as_str().unwrap().contains("<|im_start|>"))
        .expect("a golden with special tokens");
    let run = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_meswitch"))
            .arg("tokenize")
            .arg("--model")
            .arg(&gguf)
            .args(extra)
            .arg(g["text"].as_str().unwrap())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    assert_eq!(run(&[]), g["ids"]);
    assert_eq!(run(&["--no-parse-special"]), g["ids_no_parse_special"]);
    assert_ne!(g["ids"], g["ids_no_parse_special"]);
}
