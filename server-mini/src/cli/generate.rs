//! `meswitch generate`: prefill a prompt, then stream sampled tokens to
//! stdout, on the CPU or CUDA backend (`--device`), optionally through one
//! expert.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Parser;

use super::Run;
use crate::chat::{ChatMessage, ChatTemplate};
use crate::generate::generate;
use crate::model::cuda::CudaBackend;
use crate::model::load::load_cuda;
use crate::model::{load_cpu_with, Backend, LoadedModel, ModelError, Numerics};
use crate::sampling::SamplingParams;
use crate::tokenizer::Tokenizer;

/// Where a command computes.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    /// CUDA device 0 when one can be opened, else the CPU (with a note).
    #[default]
    Auto,
    Cpu,
    Cuda,
}

/// Where and how `generate` and `perplexity` compute.
#[derive(clap::Args, Debug)]
pub struct ComputeArgs {
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// `exact` (f32), or `llama-cpp`: llama.cpp's CPU arithmetic on a
    /// GGUF's Q4_1/Q8_0 tensors, bit for bit, to compare with llama.cpp.
    #[arg(long, default_value_t = Numerics::Exact)]
    pub numerics: Numerics,
}

/// A base model loaded on the chosen backend, with its tokenizer.
pub enum Loaded {
    Cpu(Box<LoadedModel>),
    Cuda(Box<CudaModel>),
}

/// The CUDA twin of [`LoadedModel`].
pub struct CudaModel {
    pub backend: CudaBackend,
    pub tokenizer: Tokenizer,
}

/// Loads the model on `device` and, when given, its expert; returns the
/// expert's id. `Auto` falls back to the CPU only when there is no device
/// (any other CUDA failure is an error). llama.cpp's numerics exist on the
/// CPU only, so they choose it under `Auto` and refuse `Cuda`.
pub fn load_on(
    compute: &ComputeArgs,
    model: &Path,
    expert: Option<&Path>,
) -> anyhow::Result<(Loaded, Option<usize>)> {
    let (device, numerics) = (compute.device, compute.numerics);
    if numerics != Numerics::Exact && device == Device::Cuda {
        anyhow::bail!("--numerics {numerics} computes on the CPU; drop --device cuda");
    }
    let cuda = match device {
        _ if numerics != Numerics::Exact => None,
        Device::Cpu => None,
        Device::Cuda => Some(load_cuda(model)),
        Device::Auto => match load_cuda(model) {
            Err(ModelError::NoDevice(why)) => {
                eprintln!("[device: cpu (no CUDA device: {why})]");
                None
            }
            other => Some(other),
        },
    };
    let Some(cuda) = cuda else {
        let (m, id) = load_with_expert(model, expert, numerics)?;
        return Ok((Loaded::Cpu(Box::new(m)), id));
    };
    let (mut backend, tokenizer) =
        cuda.with_context(|| format!("loading {} on CUDA", model.display()))?;
    eprintln!("[device: cuda ({})]", backend.gpu().name());
    let id = match expert {
        Some(p) => Some(
            backend
                .load_expert(p)
                .with_context(|| format!("loading expert {}", p.display()))?,
        ),
        None => None,
    };
    Ok((Loaded::Cuda(Box::new(CudaModel { backend, tokenizer })), id))
}

/// Generate text from a prompt (CPU or CUDA).
#[derive(Parser, Debug)]
#[command(name = "generate")]
pub struct GenerateArgs {
    /// Base model: a .gguf file or an HF checkpoint folder.
    #[arg(long)]
    model: PathBuf,
    /// Compressed expert file (from `meswitch compress`) to apply.
    #[arg(long)]
    expert: Option<PathBuf>,
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as one user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    #[command(flatten)]
    compute: ComputeArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(clap::Args, Debug)]
pub struct SamplingArgs {
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// 1 = off.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 1 = off.
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// OpenAI's: minus this times each generated copy of a token; 0 = off.
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    frequency_penalty: f32,
    /// OpenAI's: minus this once a token was generated; 0 = off.
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    presence_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Stop when the text contains this (repeatable).
    #[arg(long)]
    stop: Vec<String>,
}

impl SamplingArgs {
    pub fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            logit_bias: Vec::new(),
            seed: self.seed,
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
        }
    }
}

/// Loads the model on the CPU and, when given, its expert; returns the
/// expert's id.
pub fn load_with_expert(
    model: &Path,
    expert: Option<&Path>,
    numerics: Numerics,
) -> anyhow::Result<(LoadedModel, Option<usize>)> {
    let mut m =
        load_cpu_with(model, numerics).with_context(|| format!("loading {}", model.display()))?;
    let id = match expert {
        Some(p) => Some(
            m.backend
                .load_expert(p)
                .with_context(|| format!("loading expert {}", p.display()))?,
        ),
        None => None,
    };
    Ok((m, id))
}

fn chat_template(model: &Path) -> anyhow::Result<ChatTemplate> {
    crate::server::prompt::chat_template_for(model)?
        .ok_or_else(|| anyhow::anyhow!("{} has no chat template (drop --chat)", model.display()))
}

impl Run for GenerateArgs {
    fn run(self) -> anyhow::Result<()> {
        let params = self.sampling.params();
        params.validate()?;
        let prompt = if self.chat {
            chat_template(&self.model)?.render(&[ChatMessage::new("user", &self.prompt)], true)?
        } else {
            self.prompt.clone()
        };
        let (loaded, expert) = load_on(&self.compute, &self.model, self.expert.as_deref())?;
        match &loaded {
            Loaded::Cpu(m) => {
                run_generate(&m.backend, &m.tokenizer, self.chat, &prompt, expert, params)
            }
            Loaded::Cuda(m) => {
                run_generate(&m.backend, &m.tokenizer, self.chat, &prompt, expert, params)
            }
        }
    }
}

fn run_generate<B: Backend>(
    backend: &B,
    tokenizer: &Tokenizer,
    chat: bool,
    prompt: &str,
    expert: Option<usize>,
    params: SamplingParams,
) -> anyhow::Result<()> {
    let ids = if chat {
        crate::server::prompt::encode_chat(tokenizer, prompt).map_err(anyhow::Error::msg)?
    } else {
        tokenizer.encode(prompt, true)?
    };
    let mut out = std::io::stdout().lock();
    let start = std::time::Instant::now();
    let g = generate(
        backend,
        tokenizer,
        tokenizer.eos_ids(),
        &ids,
        expert,
        params,
        |text| {
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        },
    )?;
    writeln!(out)?;
    let total = start.elapsed().as_secs_f64();
    let decoded = g.ids.len().saturating_sub(1);
    eprintln!(
        "[{} prompt tokens in {:.3} s ({:.1} tokens/s); {} decode steps in {:.3} s ({:.1} tokens/s); stop: {:?}; {:.2} s total]",
        g.prompt_tokens,
        g.prefill_time.as_secs_f64(),
        g.prompt_tokens as f64 / g.prefill_time.as_secs_f64(),
        decoded,
        g.decode_time.as_secs_f64(),
        decoded as f64 / g.decode_time.as_secs_f64(),
        g.stop,
        total
    );
    Ok(())
}
