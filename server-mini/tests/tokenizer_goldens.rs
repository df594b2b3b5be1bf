//! Tokenizers against independent references: llama.cpp ids for SmolLM2 (GGUF tokenizer), and
//! SentencePiece-checked ids for Mistral's tokenizer.json.

use meswitch_server::gguf::GgufFile;
use meswitch_server::testdata;
use meswitch_server::tokenizer::Tokenizer;
use serde_json::Value;

fn jsonl(path: &std::path::Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
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

fn smollm2() -> Option<Tokenizer> {
    let path = testdata::require("SmolLM2 GGUF", testdata::smollm2_gguf())?;
    Some(Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap())
}

#[test]
fn smollm2_matches_llama_cpp_on_every_golden() {
    let Some(tok) = smollm2() else { return };
    let dir = testdata::require("shared/data/smollm2", testdata::smollm2_dir()).expect("goldens");
    assert!(!tok.add_bos());
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.vocab_size(), 49152);
    assert!(
        tok.eos_ids().contains(&2) && tok.eos_ids().contains(&0),
        "{:?}",
        tok.eos_ids()
    );
    let goldens = jsonl(&dir.join("tokenizer_goldens.jsonl"));
    assert_eq!(goldens.len(), 27);
    let mut failures = vec![];
    for g in &goldens {
        let text = g["text"].as_str().unwrap();
        let got = tok.encode(text, true).unwrap();
        if got != ids(&g["ids"]) {
            failures.push(format!(
                "{} parse_special: got {got:?} want {}",
                g["id"], g["ids"]
            ));
        }
        let got = tok.encode(text, false).unwrap();
        if got != ids(&g["ids_no_parse_special"]) {
            failures.push(format!(
                "{} no_parse_special: got {got:?} want {}",
                g["id"], g["ids_no_parse_special"]
            ));
        }
        // Decoding with special tokens shown gives the text back exactly.
        assert_eq!(
            tok.decode(&ids(&g["ids"]), false).unwrap(),
            text,
            "decode {}",
            g["id"]
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn smollm2_generation_prompts_and_skip_special() {
    let Some(tok) = smollm2() else { return };
    let dir = testdata::smollm2_dir().expect("goldens");
    for g in jsonl(&dir.join("generation_goldens.jsonl")) {
        let prompt = g["prompt"].as_str().unwrap();
        assert_eq!(
            tok.encode(prompt, true).unwrap(),
            ids(&g["prompt_ids"]),
            "prompt {}",
            g["id"]
        );
        let gen = ids(&g["generated_ids"]);
        assert_eq!(
            tok.decode(&gen, true).unwrap(),
            g["generated_text"].as_str().unwrap(),
            "gen {}",
            g["id"]
        );
        assert_eq!(
            tok.decode(&gen, false).unwrap(),
            g["generated_text_special"].as_str().unwrap()
        );
    }
}

#[test]
fn mistral_tokenizer_json_matches_sentencepiece() {
    let Some(dir) = testdata::require("shared/data/mistral", testdata::shared_data("mistral"))
    else {
        return;
    };
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    assert!(tok.add_bos());
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_ids(), &[2]);
    let checks = jsonl(&dir.join("tokenizer_check.jsonl"));
    assert_eq!(checks.len(), 36);
    for c in &checks {
        let text = c["text"].as_str().unwrap();
        let want = ids(&c["ids"]);
        assert_eq!(tok.encode(text, true).unwrap(), want, "{:?}", c["category"]);
        assert_eq!(
            tok.decode(&want, true).unwrap(),
            text,
            "decode {:?}",
            c["category"]
        );
    }
}

#[test]
fn decode_rejects_out_of_range_ids() {
    let Some(tok) = smollm2() else { return };
    assert!(tok.decode(&[49152], false).is_err());
}

/// The perplexity texts (~9000 characters each) tokenize exactly as llama-tokenize
/// --no-parse-special did; prints the encode time (CPU, this machine).
#[test]
fn smollm2_long_texts_match_llama_cpp() {
    let Some(tok) = smollm2() else { return };
    let dir = testdata::smollm2_dir().expect("goldens");
    for name in ["ppl_python_execmodel", "ppl_libpng_manual"] {
        let text = std::fs::read_to_string(dir.join(format!("{name}.txt"))).unwrap();
        let golden: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join(format!("{name}.ppl.json"))).unwrap(),
        )
        .unwrap();
        let t0 = std::time::Instant::now();
        let got = tok.encode(&text, false).unwrap();
        let dt = t0.elapsed();
        assert_eq!(got, ids(&golden["token_ids"]), "{name}");
        eprintln!(
            "{name}: {} chars -> {} tokens in {:.2} ms",
            text.len(),
            got.len(),
            dt.as_secs_f64() * 1e3
        );
        assert_eq!(tok.decode(&got, false).unwrap(), text);
    }
}

/// `add_bos_token: false` in tokenizer_config.json wins over a post-processor that adds BOS
/// (as in transformers); the same tokenizer.json with the shipped config adds it.
#[test]
fn tokenizer_config_add_bos_overrides_post_processor() {
    let Some(src) = testdata::require("shared/data/mistral", testdata::shared_data("mistral"))
    else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("meswitch-tok-nobos-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"add_bos_token": false, "bos_token": "<s>", "eos_token": "</s>"}"#,
    )
    .unwrap();
    let tok = Tokenizer::from_model_path(&dir).unwrap();
    assert!(!tok.add_bos());
    assert_eq!(tok.encode("Hello world", true).unwrap(), vec![22557, 1526]);
    // An explicit "<s>" in the text is still a token of its own.
    assert_eq!(tok.encode("<s>Hello", true).unwrap()[0], 1);
    std::fs::remove_dir_all(&dir).unwrap();

    let shipped = Tokenizer::from_model_path(&src).unwrap();
    assert_eq!(
        shipped.encode("Hello world", true).unwrap(),
        vec![1, 22557, 1526]
    );
}
