//! A byte-level tokenizer for the synthetic family, written as the
//! `tokenizer.json` the Hugging Face `tokenizers` library loads.
//!
//! ```text
//!   id 0 <unk>   id 1 <s>   id 2 </s>      special tokens
//!   id 3 + b     byte b (0..=255), spelled with GPT-2's byte→char table
//! ```
//!
//! No merges: every byte is one token, so any UTF-8 text round-trips and
//! the model's 512-entry vocabulary covers the tokenizer.

use std::path::Path;

use serde_json::{json, Map, Value};

use crate::checkpoint::CheckpointError;

pub const UNK_ID: u32 = 0;
pub const BOS_ID: u32 = 1;
pub const EOS_ID: u32 = 2;
/// Id of byte 0; byte b is `FIRST_BYTE_ID + b`.
pub const FIRST_BYTE_ID: u32 = 3;
const SPECIALS: [(&str, u32); 3] = [("<unk>", UNK_ID), ("<s>", BOS_ID), ("</s>", EOS_ID)];

/// A Mistral-style chat template over the special tokens above.
const CHAT_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}\
{% if message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]\
{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}";

/// GPT-2's reversible byte → printable char table (what the ByteLevel
/// pre-tokenizer and decoder use): printable Latin-1 bytes map to
/// themselves, the rest to U+0100 onwards in byte order.
pub fn byte_char(b: u8) -> char {
    let printable = |x: u8| (b'!'..=b'~').contains(&x) || (0xA1..=0xAC).contains(&x) || x >= 0xAE;
    if printable(b) {
        char::from(b)
    } else {
        let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
        char::from_u32(0x100 + rank).expect("U+0100..U+0143 are chars")
    }
}

pub fn tokenizer_json() -> Value {
    let mut vocab = Map::new();
    for (content, id) in SPECIALS {
        vocab.insert(content.into(), json!(id));
    }
    for b in 0..=255u8 {
        vocab.insert(
            byte_char(b).to_string(),
            json!(FIRST_BYTE_ID + u32::from(b)),
        );
    }
    let added: Vec<Value> = SPECIALS
        .iter()
        .map(|(content, id)| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
                            "trim_offsets": true, "use_regex": true});
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [BOS_ID], "tokens": ["<s>"]}}
        },
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": "<unk>",
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": []
        }
    })
}

pub fn tokenizer_config_json() -> Value {
    json!({
        "add_bos_token": true,
        "add_eos_token": false,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 4096,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    })
}

pub fn write_files(dir: &Path) -> Result<(), CheckpointError> {
    for (file, value) in [
        ("tokenizer.json", tokenizer_json()),
        ("tokenizer_config.json", tokenizer_config_json()),
    ] {
        let path = dir.join(file);
        let mut text =
            serde_json::to_string_pretty(&value).map_err(|e| CheckpointError::Write {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        text.push('\n');
        std::fs::write(&path, text).map_err(|error| CheckpointError::Io { path, error })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_a_bijection_matching_gpt2() {
        let chars: std::collections::BTreeSet<char> = (0..=255u8).map(byte_char).collect();
        assert_eq!(chars.len(), 256);
        // Known entries of GPT-2's table: space → 'Ġ' (U+0120), '\n' → 'Ċ' (U+010A).
        assert_eq!(byte_char(b' '), 'Ġ');
        assert_eq!(byte_char(b'\n'), 'Ċ');
        assert_eq!(byte_char(b'a'), 'a');
        assert_eq!(byte_char(0xAD), 'Ń');
    }

    #[test]
    fn vocab_has_every_byte_and_specials() {
        let t = tokenizer_json();
        let vocab = t["model"]["vocab"].as_object().unwrap();
        assert_eq!(vocab.len(), 256 + SPECIALS.len());
        let mut ids: Vec<u64> = vocab.values().map(|v| v.as_u64().unwrap()).collect();
        ids.sort_unstable();
        assert_eq!(ids, (0..259).collect::<Vec<u64>>());
    }
}
