//! `meswitch tokenize`: token ids of a text as a JSON array, to compare tokenizers against other
//! implementations (llama.cpp's `llama-tokenize --ids`, HF `tokenizers`).

use std::path::PathBuf;

use crate::tokenizer::Tokenizer;
use anyhow::Context;
use clap::Parser;

use super::Run;

/// Print the token ids of TEXT as a JSON array.
#[derive(Parser, Debug)]
#[command(name = "tokenize")]
pub struct TokenizeArgs {
    /// A .gguf file, an HF model folder holding tokenizer.json, or a tokenizer.json file.
    #[arg(long)]
    model: PathBuf,
    /// Tokenize special-token text (e.g. `<|im_start|>`) as plain text, like
    /// `llama-tokenize --no-parse-special`.
    #[arg(long)]
    no_parse_special: bool,
    /// The text to tokenize (exact bytes; no escapes are interpreted).
    text: String,
}

impl Run for TokenizeArgs {
    fn run(self) -> anyhow::Result<()> {
        let tok = Tokenizer::from_model_path(&self.model)
            .with_context(|| format!("loading the tokenizer of {}", self.model.display()))?;
        let ids = tok.encode(&self.text, !self.no_parse_special)?;
        println!("{}", serde_json::to_string(&ids)?);
        Ok(())
    }
}
