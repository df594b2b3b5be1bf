//! GGUF `tokenizer.ggml.model = "llama"`: SentencePiece BPE (Llama-2, Mistral), expressed as an HF
//! BPE model the way HF's `SpmConverter` does it:
//! - normalizer: prepend "▁" (when `add_space_prefix`), replace " " with "▁";
//! - no pre-tokenizer; BPE with byte fallback to the `<0xNN>` tokens and `<unk>`;
//! - merges: every split of a normal piece into two normal pieces, ranked by the merged piece's
//!   score (SentencePiece merges the highest-scoring adjacent pair first, as llama.cpp does);
//! - decoder: "▁" → " ", byte fallback, fuse, strip the one leading space.

use super::from_gguf::{finish, meta_err, string_array, token_id, token_type};
use super::{Tokenizer, TokenizerError};
use crate::gguf::{GgufFile, GgufValue};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::{DecoderWrapper, NormalizerWrapper};

/// SentencePiece's word-boundary marker (U+2581), which stands for a space.
const SPACE_MARK: &str = "\u{2581}";

pub(super) fn build(f: &GgufFile) -> Result<Tokenizer, TokenizerError> {
    let meta = f.metadata();
    let tokens = string_array(f, "tokenizer.ggml.tokens")?;
    let n_vocab = tokens.len();
    let key = "tokenizer.ggml.scores";
    let scores: Vec<f64> = match meta.get(key).and_then(GgufValue::as_array) {
        Some(a) => a
            .iter()
            .map(|v| v.as_f64().ok_or_else(|| meta_err(key, "has a non-number")))
            .collect::<Result<_, _>>()?,
        None => {
            return Err(meta_err(
                key,
                "is missing (needed to rank SentencePiece merges)",
            ))
        }
    };
    let key = "tokenizer.ggml.token_type";
    let types: Vec<i64> = match meta.get(key).and_then(GgufValue::as_array) {
        Some(a) => a
            .iter()
            .map(|v| v.as_i64().unwrap_or(token_type::NORMAL))
            .collect(),
        None => vec![token_type::NORMAL; n_vocab],
    };
    if scores.len() != n_vocab || types.len() != n_vocab {
        return Err(meta_err(
            "tokenizer.ggml.scores/token_type",
            "length differs from tokenizer.ggml.tokens",
        ));
    }

    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i as u32))
        .collect();
    let normal = |id: u32| types[id as usize] == token_type::NORMAL;
    // (score of merged piece, merged id, left id, right id)
    let mut ranked: Vec<(f64, u32, u32, u32)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if types[id] != token_type::NORMAL {
            continue;
        }
        for (at, _) in piece.char_indices().skip(1) {
            let (l, r) = (&piece[..at], &piece[at..]);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                if normal(li) && normal(ri) {
                    ranked.push((scores[id], id as u32, li, ri));
                }
            }
        }
    }
    ranked.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then((a.1, a.2, a.3).cmp(&(b.1, b.2, b.3)))
    });
    let merges: Vec<(String, String)> = ranked
        .iter()
        .map(|&(_, _, l, r)| {
            (
                tokens[l as usize].to_string(),
                tokens[r as usize].to_string(),
            )
        })
        .collect();

    let unk = token_id(f, "tokenizer.ggml.unknown_token_id", n_vocab)?.unwrap_or(0);
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(tokens.get(unk as usize).unwrap_or(&"<unk>").to_string())
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(|e| TokenizerError::Build(e.to_string()))?;
    let mut tk = tokenizers::Tokenizer::new(bpe);

    let add_space_prefix = meta
        .get("tokenizer.ggml.add_space_prefix")
        .and_then(GgufValue::as_bool)
        .unwrap_or(true);
    let replace_space =
        Replace::new(" ", SPACE_MARK).map_err(|e| TokenizerError::Build(e.to_string()))?;
    let mut norm: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        norm.push(Prepend::new(SPACE_MARK.into()).into());
    }
    norm.push(replace_space.into());
    tk.with_normalizer(Some(NormalizerSequence::new(norm)));

    let mark_to_space =
        Replace::new(SPACE_MARK, " ").map_err(|e| TokenizerError::Build(e.to_string()))?;
    let mut dec: Vec<DecoderWrapper> = vec![
        mark_to_space.into(),
        ByteFallback::default().into(),
        Fuse::default().into(),
    ];
    if add_space_prefix {
        dec.push(Strip::new(' ', 1, 0).into());
    }
    tk.with_decoder(Some(DecoderSequence::new(dec)));

    // llama.cpp adds BOS for SentencePiece vocabularies unless the file says otherwise.
    finish(
        f,
        tk,
        &tokens,
        &types,
        &[token_type::CONTROL, token_type::UNKNOWN],
        true,
    )
}
