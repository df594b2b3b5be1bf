//! `meswitch perplexity`: llama.cpp's `llama-perplexity` convention
//! (non-overlapping windows of `--ctx` tokens, second half of each scored).

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

use super::generate::{load_on, ComputeArgs, Loaded};
use super::Run;
use crate::generate::perplexity;
use crate::model::Backend;
use crate::tokenizer::Tokenizer;

/// Perplexity of a text file (CPU or CUDA).
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
    #[command(flatten)]
    compute: ComputeArgs,
}

impl Run for PerplexityArgs {
    fn run(self) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(&self.text)
            .with_context(|| format!("reading {}", self.text.display()))?;
        let (loaded, expert) = load_on(&self.compute, &self.model, self.expert.as_deref())?;
        match &loaded {
            Loaded::Cpu(m) => run_perplexity(&m.backend, &m.tokenizer, &text, self.ctx, expert),
            Loaded::Cuda(m) => run_perplexity(&m.backend, &m.tokenizer, &text, self.ctx, expert),
        }
    }
}

fn run_perplexity<B: Backend>(
    backend: &B,
    tokenizer: &Tokenizer,
    text: &str,
    ctx: usize,
    expert: Option<usize>,
) -> anyhow::Result<()> {
    let tokens = tokenizer.encode(text, false)?;
    // llama-perplexity adds no BOS for models that do not ask for one.
    let tokens = match tokenizer.bos_id() {
        Some(b) if !tokenizer.add_bos() && tokens.first() == Some(&b) => tokens[1..].to_vec(),
        _ => tokens,
    };
    eprintln!(
        "{} tokens, {} windows of {}",
        tokens.len(),
        tokens.len() / ctx.max(1),
        ctx
    );
    let mut nll = 0.0;
    let mut count = 0;
    let result = perplexity(backend, &tokens, ctx, expert, |i, w| {
        nll += w.nll_sum;
        count += w.scored;
        eprintln!("[{}] {:.4}", i + 1, (nll / count as f64).exp());
    })?;
    println!("perplexity: {:.4}", result.ppl);
    Ok(())
}
