//! Build an HF `tokenizers` tokenizer from GGUF `tokenizer.ggml.*` metadata, following how
//! llama.cpp (`llama-vocab.cpp`) interprets the same keys.
//!
//! Supported: `tokenizer.ggml.model = "gpt2"` (byte-level BPE) with the pre-tokenizers below.
//! llama.cpp pre-tokenizes with a list of regexes applied in turn, each splitting the pieces the
//! previous one produced, matches kept as pieces ("isolated"); we build the same with a
//! `Sequence` of `Split(regex, Isolated)`, then byte-level mapping without its own regex.

use super::{Tokenizer, TokenizerError};
use crate::gguf::{GgufFile, GgufValue};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

/// GPT-2's pre-tokenizer regex as llama.cpp writes it.
const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Every digit its own piece (llama.cpp's first regex for the starcoder family, smollm included).
const SINGLE_DIGIT_REGEX: &str = r"\p{N}";
/// Llama-3 style regex (llama.cpp `LLAMA_VOCAB_PRE_TYPE_LLAMA3`).
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp `tokenizer.ggml.pre` names → its regex list (`llama_vocab::impl::load`, the
/// `regex_exprs` switch). Only the families we have checked are listed.
fn pre_regexes(pre: &str) -> Option<&'static [&'static str]> {
    Some(match pre {
        "default" | "gpt-2" | "gpt2" | "mpt" | "olmo" | "jais" => &[GPT2_REGEX],
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b" => {
            &[SINGLE_DIGIT_REGEX, GPT2_REGEX]
        }
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" => &[LLAMA3_REGEX],
        _ => return None,
    })
}

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp `llama_token_type`).
pub(super) mod token_type {
    pub const NORMAL: i64 = 1;
    pub const UNKNOWN: i64 = 2;
    pub const CONTROL: i64 = 3;
    pub const USER_DEFINED: i64 = 4;
}

pub(super) fn meta_err(key: &str, problem: &str) -> TokenizerError {
    TokenizerError::Metadata {
        key: key.into(),
        problem: problem.into(),
    }
}

pub(super) fn string_array<'a>(f: &'a GgufFile, key: &str) -> Result<Vec<&'a str>, TokenizerError> {
    let arr = f
        .metadata()
        .get(key)
        .ok_or_else(|| meta_err(key, "is missing"))?;
    let arr = arr
        .as_array()
        .ok_or_else(|| meta_err(key, "is not an array"))?;
    arr.iter()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| meta_err(key, "has a non-string element"))
        })
        .collect()
}

pub(super) fn token_id(
    f: &GgufFile,
    key: &str,
    n_vocab: usize,
) -> Result<Option<u32>, TokenizerError> {
    match f.metadata().get(key) {
        None => Ok(None),
        Some(v) => {
            let id = v
                .as_u64()
                .ok_or_else(|| meta_err(key, "is not an integer"))?;
            if id as usize >= n_vocab {
                return Err(meta_err(
                    key,
                    &format!("= {id} is outside the vocabulary of {n_vocab}"),
                ));
            }
            Ok(Some(id as u32))
        }
    }
}

pub(super) fn build(f: &GgufFile) -> Result<Tokenizer, TokenizerError> {
    let meta = f.metadata();
    let model = meta
        .get("tokenizer.ggml.model")
        .and_then(GgufValue::as_str)
        .unwrap_or("");
    let pre = meta
        .get("tokenizer.ggml.pre")
        .and_then(GgufValue::as_str)
        .unwrap_or("default");
    let unsupported = || TokenizerError::Unsupported {
        model: model.into(),
        pre: pre.into(),
        supported: "default/gpt2/starcoder/smollm/llama3 families; or llama (SentencePiece BPE)"
            .into(),
    };
    if model == "llama" {
        return super::spm::build(f);
    }
    if model != "gpt2" {
        return Err(unsupported());
    }
    let regexes = pre_regexes(pre).ok_or_else(unsupported)?;

    let tokens = string_array(f, "tokenizer.ggml.tokens")?;
    let n_vocab = tokens.len();
    let types: Vec<i64> = match meta.get("tokenizer.ggml.token_type") {
        None => vec![1; n_vocab],
        Some(v) => {
            let a = v
                .as_array()
                .ok_or_else(|| meta_err("tokenizer.ggml.token_type", "is not an array"))?;
            a.iter().map(|t| t.as_i64().unwrap_or(1)).collect()
        }
    };
    if types.len() != n_vocab {
        return Err(meta_err(
            "tokenizer.ggml.token_type",
            "length differs from tokenizer.ggml.tokens",
        ));
    }
    let merges = string_array(f, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            // llama.cpp splits at the first space after the first byte (`word.find(' ', 1)`).
            let at = m
                .char_indices()
                .skip(1)
                .find(|&(_, c)| c == ' ')
                .map(|(i, _)| i);
            at.map(|i| (m[..i].to_string(), m[i + 1..].to_string()))
                .ok_or_else(|| {
                    meta_err(
                        "tokenizer.ggml.merges",
                        &format!("entry {m:?} has no space"),
                    )
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i as u32))
        .collect();
    // llama.cpp's llama3 pre-tokenizer family looks whole pieces up in the vocabulary before
    // merging (`ignore_merges`) and adds BOS unless the file says otherwise; others do neither.
    let llama3_family = regexes == [LLAMA3_REGEX];
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(llama3_family)
        .build()
        .map_err(|e| TokenizerError::Build(e.to_string()))?;

    let mut tk = tokenizers::Tokenizer::new(bpe);
    let mut steps: Vec<PreTokenizerWrapper> = Vec::new();
    for re in regexes {
        let split = Split::new(
            SplitPattern::Regex(re.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| TokenizerError::Build(format!("regex {re:?}: {e}")))?;
        steps.push(split.into());
    }
    // add_prefix_space = false (llama.cpp adds none for gpt2 BPE), trim_offsets irrelevant to
    // ids, use_regex = false (the splits above replace GPT-2's built-in regex).
    steps.push(ByteLevel::new(false, true, false).into());
    tk.with_pre_tokenizer(Some(Sequence::new(steps)));
    tk.with_decoder(Some(ByteLevelDecoder::default()));

    // Control tokens are special (hidden by decode(skip_special), text parsed only with
    // parse_special); user-defined tokens are always matched in text, like llama.cpp.
    finish(
        f,
        tk,
        &tokens,
        &types,
        &[token_type::CONTROL],
        llama3_family,
    )
}

/// What every GGUF vocabulary shares once its model is built: tokens of the
/// `special_types` become special added tokens (hidden by
/// `decode(skip_special)`, matched in text only with `parse_special`),
/// user-defined tokens are always matched, like llama.cpp; then BOS, the
/// end-of-generation ids and the add-BOS flag (`default_add_bos` when the
/// file does not say).
pub(super) fn finish(
    f: &GgufFile,
    mut tk: tokenizers::Tokenizer,
    tokens: &[&str],
    types: &[i64],
    special_types: &[i64],
    default_add_bos: bool,
) -> Result<Tokenizer, TokenizerError> {
    let mut special = Vec::new();
    let mut user = Vec::new();
    for (tok, ty) in tokens.iter().zip(types) {
        if special_types.contains(ty) {
            special.push(AddedToken::from(tok.to_string(), true));
        } else if *ty == token_type::USER_DEFINED {
            user.push(AddedToken::from(tok.to_string(), false));
        }
    }
    tk.add_special_tokens(&special);
    tk.add_tokens(&user);

    let n_vocab = tokens.len();
    let bos = token_id(f, "tokenizer.ggml.bos_token_id", n_vocab)?;
    let mut eos = Vec::new();
    for key in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ] {
        eos.extend(token_id(f, key, n_vocab)?);
    }
    let add_bos = f
        .metadata()
        .get("tokenizer.ggml.add_bos_token")
        .and_then(GgufValue::as_bool)
        .unwrap_or(default_add_bos);
    if add_bos && bos.is_none() {
        return Err(meta_err(
            "tokenizer.ggml.bos_token_id",
            "is missing but add_bos_token is true",
        ));
    }
    Ok(Tokenizer::new(tk, false, bos, add_bos, eos))
}
