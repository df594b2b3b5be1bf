//! Tokenizers for the runtime: HF `tokenizer.json` files, or the tokenizer stored in a GGUF's
//! `tokenizer.ggml.*` metadata, both run by the `tokenizers` crate.
//!
//! `parse_special` follows llama.cpp: when true, the text of a special (control) token such as
//! `<|im_start|>` becomes that token; when false it is tokenized as ordinary text. We keep two
//! copies of the HF tokenizer, identical except for `encode_special_tokens`, because that switch is
//! a setting of the tokenizer, not an argument of `encode`.

mod bytes;
mod from_gguf;
mod spm;

use std::path::Path;

/// Token texts that end a generation in llama.cpp's EOG list (beside the declared eos/eot ids).
const EOG_TEXTS: &[&str] = &[
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<end_of_turn>",
    "<|end|>",
    "</s>",
];

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: cannot load tokenizer: {message}")]
    Load { path: String, message: String },
    #[error("GGUF tokenizer: metadata {key:?} {problem}")]
    Metadata { key: String, problem: String },
    #[error("GGUF tokenizer model {model:?} with pre-tokenizer {pre:?} is not supported (gpt2 BPE with pre = {supported} is)")]
    Unsupported {
        model: String,
        pre: String,
        supported: String,
    },
    #[error("building the tokenizer: {0}")]
    Build(String),
    #[error("encode: {0}")]
    Encode(String),
    #[error("decode: {0}")]
    Decode(String),
}

/// BOS handling on top of the `tokenizers` pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BosFix {
    None,
    /// We put BOS first (GGUF vocabularies, or an HF post-processor that does not add it).
    Prepend,
    /// The post-processor adds BOS but the config says not to: drop it.
    StripFirst,
}

pub struct Tokenizer {
    /// Special tokens in the text are matched.
    special: tokenizers::Tokenizer,
    /// Special-token text is plain text.
    plain: tokenizers::Tokenizer,
    /// Run the tokenizer's post-processor (HF files: it adds BOS itself when configured).
    post_process: bool,
    /// What encode does about BOS beyond the post-processor.
    fix_bos: BosFix,
    bos: Option<u32>,
    add_bos: bool,
    eos: Vec<u32>,
    vocab_size: usize,
    token_bytes: bytes::TokenBytes,
}

impl Tokenizer {
    fn new(
        special: tokenizers::Tokenizer,
        post_process: bool,
        bos: Option<u32>,
        add_bos: bool,
        mut eos: Vec<u32>,
    ) -> Tokenizer {
        // Every special token whose text is a known end-of-generation marker also stops generation.
        for (id, tok) in special.get_added_tokens_decoder() {
            if tok.special && EOG_TEXTS.contains(&tok.content.as_str()) {
                eos.push(id);
            }
        }
        eos.sort_unstable();
        eos.dedup();
        let mut plain = special.clone();
        plain.set_encode_special_tokens(true);
        let vocab_size = special.get_vocab_size(true);
        let token_bytes = bytes::TokenBytes::new(&special);
        // GGUF vocabularies have no post-processor: BOS is ours to add.
        let fix_bos = if add_bos && !post_process {
            BosFix::Prepend
        } else {
            BosFix::None
        };
        Tokenizer {
            special,
            plain,
            post_process,
            fix_bos,
            bos,
            add_bos,
            eos,
            vocab_size,
            token_bytes,
        }
    }

    /// The tokenizer stored in a GGUF file's metadata.
    pub fn from_gguf(f: &crate::gguf::GgufFile) -> Result<Tokenizer, TokenizerError> {
        from_gguf::build(f)
    }

    /// An HF `tokenizer.json`. BOS/EOS come from `tokenizer_config.json` beside it when present
    /// (and `generation_config.json` for extra EOS ids); BOS insertion is the post-processor's.
    pub fn from_file(tokenizer_json: &Path) -> Result<Tokenizer, TokenizerError> {
        let path = tokenizer_json.display().to_string();
        let tk =
            tokenizers::Tokenizer::from_file(tokenizer_json).map_err(|e| TokenizerError::Load {
                path: path.clone(),
                message: e.to_string(),
            })?;
        let dir = tokenizer_json.parent().unwrap_or(Path::new("."));
        let config = read_json(&dir.join("tokenizer_config.json"))?;
        let token_id = |key: &str| -> Option<u32> {
            let v = config.as_ref()?.get(key)?;
            let text = v.as_str().or_else(|| v.get("content")?.as_str())?;
            tk.token_to_id(text)
        };
        let bos = token_id("bos_token");
        let mut eos: Vec<u32> = token_id("eos_token").into_iter().collect();
        if let Some(gen) = read_json(&dir.join("generation_config.json"))? {
            match gen.get("eos_token_id") {
                Some(serde_json::Value::Array(a)) => {
                    eos.extend(a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32))
                }
                Some(v) => eos.extend(v.as_u64().map(|v| v as u32)),
                None => {}
            }
        }
        // Does the post-processor put BOS first? `add_bos_token` in tokenizer_config.json wins
        // over it, as in transformers (which rebuilds the post-processor from that flag).
        let pp_adds_bos = match bos {
            Some(b) => {
                let e = tk
                    .encode("a", true)
                    .map_err(|e| TokenizerError::Build(e.to_string()))?;
                e.get_ids().first() == Some(&b)
            }
            None => false,
        };
        let wanted = config
            .as_ref()
            .and_then(|c| c.get("add_bos_token"))
            .and_then(|v| v.as_bool())
            .unwrap_or(pp_adds_bos);
        let mut t = Tokenizer::new(tk, true, bos, wanted && bos.is_some(), eos);
        t.fix_bos = match (wanted, pp_adds_bos) {
            (true, false) => BosFix::Prepend,
            (false, true) => BosFix::StripFirst,
            _ => BosFix::None,
        };
        Ok(t)
    }

    /// The tokenizer of a model given by path: a `.gguf` file (its metadata tokenizer), a
    /// `tokenizer.json` file, or an HF model folder holding `tokenizer.json`.
    pub fn from_model_path(path: &Path) -> Result<Tokenizer, TokenizerError> {
        if path.is_dir() {
            return Tokenizer::from_file(&path.join("tokenizer.json"));
        }
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            let f = crate::gguf::GgufFile::open(path).map_err(|e| TokenizerError::Load {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
            return Tokenizer::from_gguf(&f);
        }
        Tokenizer::from_file(path)
    }

    /// Token ids of `text`; BOS first when [`Self::add_bos`].
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let tk = if parse_special {
            &self.special
        } else {
            &self.plain
        };
        let enc = tk
            .encode(text, self.post_process)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.fix_bos == BosFix::Prepend {
            ids.extend(self.bos);
        }
        let enc_ids = enc.get_ids();
        let skip =
            usize::from(self.fix_bos == BosFix::StripFirst && enc_ids.first() == self.bos.as_ref());
        ids.extend_from_slice(&enc_ids[skip..]);
        Ok(ids)
    }

    /// Text of `ids`; with `skip_special` special tokens are left out.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(TokenizerError::Decode(format!(
                "token id {bad} >= vocab size {}",
                self.vocab_size
            )));
        }
        self.special
            .decode(ids, skip_special)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// Ids that end a generation (eos, eot and known end-of-turn special tokens), sorted.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// Whether [`Self::encode`] puts BOS first.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The raw bytes token `id` adds to the decoded text, a piece of a
    /// UTF-8 character included (see `bytes.rs`); none for special tokens;
    /// None outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        self.token_bytes.of(&self.special, id)
    }

    /// Text of a token id in the vocabulary (raw byte-level form for BPE), if any.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.special.id_to_token(id)
    }
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>, TokenizerError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(TokenizerError::Io {
                path: path.display().to_string(),
                source,
            })
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TokenizerError::Load {
            path: path.display().to_string(),
            message: e.to_string(),
        })
}
