//! `meswitch perplexity`: llama.cpp's `llama-perplexity` convention
//! (non-overlapping windows of `--ctx` tokens, second half of each scored).

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

use super::generate::load_with_expert;
use super::Run;
use crate::generate::perplexity;

/// Perplexity of a text file (CPU).
#[derive(Parser, Debug)]
#[command(name = "perplexity")]
pub struct PerplexityArgs {
    /// Base model: a .gguf file or an HF checkpoint folder.
    #[arg(long)]
    model: PathBuf,
    /// Compressed expert file to apply.
    #[arg(long)]
    expert: Option<PathBuf>,
    /// UTF-8 text file, tokenized whole without BOS and without special tokens.
    #[arg(long)]
    text: PathBuf,
    /// Window length in tokens.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
}

impl Run for PerplexityArgs {
    fn run(self) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(&self.text)
            .with_context(|| format!("reading {}", self.text.display()))?;
        let (m, expert) = load_with_expert(&self.model, self.expert.as_deref())?;
        let tokens = m.tokenizer.encode(&text, false)?;
        // llama-perplexity adds no BOS for models that do not ask for one.
        let tokens = match m.tokenizer.bos_id() {
            Some(b) if !m.tokenizer.add_bos() && tokens.first() == Some(&b) => tokens[1..].to_vec(),
            _ => tokens,
        };
        eprintln!(
            "{} tokens, {} windows of {}",
            tokens.len(),
            tokens.len() / self.ctx.max(1),
            self.ctx
        );
        let mut nll = 0.0;
        let mut count = 0;
        let result = perplexity(&m.backend, &tokens, self.ctx, expert, |i, w| {
            nll += w.nll_sum;
            count += w.scored;
            eprintln!("[{}] {:.4}", i + 1, (nll / count as f64).exp());
        })?;
        println!("perplexity: {:.4}", result.ppl);
        Ok(())
    }
}
