//! The GGUF SentencePiece ("llama" model) tokenizer path, checked on Mistral's vocabulary: a
//! synthetic GGUF carries Mistral's pieces and token types as llama.cpp's converter writes them,
//! with scores standing in for the SentencePiece model's: a piece's score is minus the rank of
//! the first merge in tokenizer.json that makes it (the real model gives whitespace runs such as
//! "▁▁" very low scores, so id order is not score order). Our SentencePiece → BPE reconstruction
//! (merges from scores, normalizer, byte fallback, decoder) must then tokenize the 36 strings
//! exactly as SentencePiece did (shared/data/mistral/tokenizer_check.jsonl).

use meswitch_server::gguf::{write_gguf, GgufFile, GgufValue};
use meswitch_server::testdata;
use meswitch_server::tokenizer::Tokenizer;
use serde_json::Value;

/// llama.cpp token types.
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const BYTE: i32 = 6;

#[test]
fn spm_gguf_matches_sentencepiece_on_mistral_vocab() {
    let Some(dir) = testdata::require("shared/data/mistral", testdata::shared_data("mistral"))
    else {
        return;
    };
    let tj: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap())
            .unwrap();
    let vocab = tj["model"]["vocab"].as_object().unwrap();
    let mut pieces = vec![String::new(); vocab.len()];
    for (piece, id) in vocab {
        pieces[id.as_u64().unwrap() as usize] = piece.clone();
    }
    // Pieces no merge makes (single characters, bytes, specials) are never a merge result, so
    // their score does not matter; below every merge rank.
    let mut scores = vec![f32::MIN; pieces.len()];
    for (rank, m) in tj["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .rev()
    {
        let (l, r) = match m {
            Value::String(s) => s.split_once(' ').unwrap(),
            _ => (m[0].as_str().unwrap(), m[1].as_str().unwrap()),
        };
        let id = vocab[&format!("{l}{r}")].as_u64().unwrap() as usize;
        scores[id] = -(rank as f32);
    }
    let types: Vec<GgufValue> = pieces
        .iter()
        .enumerate()
        .map(|(id, p)| {
            GgufValue::I32(match id {
                0 => UNKNOWN,
                1 | 2 => CONTROL,
                _ if p.len() == 6 && p.starts_with("<0x") && p.ends_with('>') => BYTE,
                _ => NORMAL,
            })
        })
        .collect();
    let meta = vec![
        ("general.architecture", GgufValue::String("llama".into())),
        ("tokenizer.ggml.model", GgufValue::String("llama".into())),
        (
            "tokenizer.ggml.tokens",
            GgufValue::Array(
                pieces
                    .iter()
                    .map(|p| GgufValue::String(p.clone()))
                    .collect(),
            ),
        ),
        (
            "tokenizer.ggml.scores",
            GgufValue::Array(scores.into_iter().map(GgufValue::F32).collect()),
        ),
        ("tokenizer.ggml.token_type", GgufValue::Array(types)),
        ("tokenizer.ggml.bos_token_id", GgufValue::U32(1)),
        ("tokenizer.ggml.eos_token_id", GgufValue::U32(2)),
        ("tokenizer.ggml.unknown_token_id", GgufValue::U32(0)),
    ];
    let f = GgufFile::from_bytes(write_gguf(&meta, &[])).unwrap();
    let tok = Tokenizer::from_gguf(&f).unwrap();
    assert!(tok.add_bos());
    assert_eq!(tok.eos_ids(), &[2]);

    let text = std::fs::read_to_string(dir.join("tokenizer_check.jsonl")).unwrap();
    let mut n = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let c: Value = serde_json::from_str(line).unwrap();
        let s = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["sentencepiece_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            tok.encode(s, true).unwrap(),
            want,
            "{:?}: {s:?}",
            c["category"]
        );
        assert_eq!(
            tok.decode(&want, true).unwrap(),
            s,
            "decode {:?}",
            c["category"]
        );
        n += 1;
    }
    assert_eq!(n, 36);
}
