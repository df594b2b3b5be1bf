//! `meswitch synth`: write a deterministic synthetic model family.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

use crate::checkpoint::FloatDtype;
use crate::synth::{write_family, SynthSettings, SynthShape};

use super::Run;

/// Write a small Mistral-architecture base plus N fine-tune-like experts (tests, demo).
#[derive(Parser, Debug)]
#[command(name = "synth")]
pub struct SynthArgs {
    /// Output directory (gets base/ and experts/expert-NN/).
    #[arg(short = 'o', long = "out")]
    out: PathBuf,
    /// Number of experts.
    #[arg(long, default_value_t = 2)]
    experts: usize,
    /// RNG seed: the same seed writes byte-identical files.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Size preset: tiny, small or mistral-7b-layer.
    #[arg(long, default_value = "tiny")]
    shape: String,
    /// Stored dtype of every tensor: f16, bf16 or f32.
    #[arg(long, default_value = "f16")]
    dtype: String,
}

pub fn parse_dtype(s: &str) -> anyhow::Result<FloatDtype> {
    match s {
        "f16" => Ok(FloatDtype::F16),
        "bf16" => Ok(FloatDtype::BF16),
        "f32" => Ok(FloatDtype::F32),
        other => anyhow::bail!("unsupported dtype {other:?} (expected f16, bf16 or f32)"),
    }
}

impl Run for SynthArgs {
    fn run(self) -> anyhow::Result<()> {
        let shape = SynthShape::named(&self.shape).with_context(|| {
            format!(
                "unknown shape {:?} (expected one of {})",
                self.shape,
                SynthShape::NAMES.join(", ")
            )
        })?;
        let settings = SynthSettings {
            shape,
            experts: self.experts,
            seed: self.seed,
            dtype: parse_dtype(&self.dtype)?,
        };
        let total = crate::synth::tensor_shapes(&shape).len() as u64;
        let bar = super::progress_bar(total);
        let (base, experts) = write_family(&self.out, &settings, |name| {
            bar.set_message(name.to_string());
            bar.inc(1);
        })
        .with_context(|| format!("writing the synthetic family to {}", self.out.display()))?;
        bar.finish_and_clear();
        println!("base    {}", base.display());
        for e in experts {
            println!("expert  {}", e.display());
        }
        Ok(())
    }
}
