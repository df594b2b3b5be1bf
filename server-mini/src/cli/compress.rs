//! `meswitch compress`: fine-tuned checkpoint → compressed expert file.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use meswitch_reference::{Bits, SalientSpec};

use crate::checkpoint::Checkpoint;
use crate::compress::{compress_expert, format_table, summarize, CompressOptions, Fit};

use super::Run;

/// Compress a fine-tuned checkpoint into base + ME-Switch delta.
#[derive(Parser, Debug)]
#[command(name = "compress")]
#[command(group = clap::ArgGroup::new("salient_choice").args(["salient", "target_bits"]))]
pub struct CompressArgs {
    /// Base checkpoint directory (config.json + safetensors).
    #[arg(long)]
    base: PathBuf,
    /// Fine-tuned checkpoint directory of the same architecture.
    #[arg(long)]
    expert: PathBuf,
    /// Bits per non-salient weight: 1, 2 or 4.
    #[arg(long, default_value_t = 2)]
    bits: u32,
    /// Group size along the input dimension: 32, 64, 128 or `in` (one group per row).
    #[arg(long, default_value = "128")]
    group: String,
    /// Salient input channels per matrix: a count (`16`) or a percentage of `in` (`1%`).
    #[arg(long)]
    salient: Option<String>,
    /// Pick the salient count per matrix to reach this average bits per weight.
    #[arg(long = "target-bits")]
    target_bits: Option<f64>,
    /// Calibration activations: safetensors of `layers.{i}.{self_attn|mlp}.{proj}.input` [tokens, in].
    #[arg(long)]
    calib: Option<PathBuf>,
    /// Also compress embed_tokens and lm_head as deltas (default: stored FP16).
    #[arg(long = "compress-embeddings")]
    compress_embeddings: bool,
    /// Group fit: rtn (min/max), mse (error-minimising step), act (activation-weighted; needs --calib).
    #[arg(long, default_value = "mse")]
    fit: String,
    /// Expert name recorded in the file (default: the expert directory's name).
    #[arg(long)]
    name: Option<String>,
    /// Split the output into shards of at most this many MiB.
    #[arg(long = "max-shard-mib")]
    max_shard_mib: Option<u64>,
    /// Output file (.safetensors).
    #[arg(short = 'o', long = "out")]
    out: PathBuf,
}

/// Bytes per MiB, for `--max-shard-mib`.
const MIB: u64 = 1 << 20;

/// `16` → count, `1%` / `0.5%` → fraction of `in`.
pub fn parse_salient(s: &str) -> anyhow::Result<SalientSpec> {
    let bad = || {
        anyhow::anyhow!(
            "invalid --salient {s:?} (expected a count like 16 or a percentage like 1%)"
        )
    };
    if let Some(p) = s.strip_suffix('%') {
        let p: f64 = p.trim().parse().map_err(|_| bad())?;
        if !(0.0..=100.0).contains(&p) {
            return Err(bad());
        }
        Ok(SalientSpec::Fraction(p / 100.0))
    } else {
        Ok(SalientSpec::Count(s.trim().parse().map_err(|_| bad())?))
    }
}

/// `32`/`64`/`128`, or `in` / `row` for one group per row.
pub fn parse_group(s: &str) -> anyhow::Result<usize> {
    match s {
        "in" | "row" => Ok(usize::MAX),
        _ => {
            let g: usize = s.parse().map_err(|_| {
                anyhow::anyhow!("invalid --group {s:?} (expected 32, 64, 128 or in)")
            })?;
            if !meswitch_reference::layout::GROUP_SIZES.contains(&g) {
                anyhow::bail!("unsupported --group {g} (expected 32, 64, 128 or in)");
            }
            Ok(g)
        }
    }
}

fn parse_fit(s: &str) -> anyhow::Result<Fit> {
    match s {
        "rtn" => Ok(Fit::Rtn),
        "mse" => Ok(Fit::Mse),
        "act" => Ok(Fit::Act),
        other => anyhow::bail!("unknown --fit {other:?} (expected rtn, mse or act)"),
    }
}

impl Run for CompressArgs {
    fn run(self) -> anyhow::Result<()> {
        let bits = Bits::from_count(self.bits)?;
        let group_size = parse_group(&self.group)?;
        let salient = match (&self.salient, self.target_bits) {
            (Some(s), None) => parse_salient(s)?,
            (None, Some(t)) if t.is_finite() && t > 0.0 => SalientSpec::TargetBits(t),
            (None, Some(t)) => anyhow::bail!("invalid --target-bits {t}"),
            _ => SalientSpec::Count(0),
        };
        let fit = parse_fit(&self.fit)?;
        let base = Checkpoint::open(&self.base).context("opening the base")?;
        let expert = Checkpoint::open(&self.expert).context("opening the expert")?;
        let calib = self
            .calib
            .as_deref()
            .map(Checkpoint::open_file)
            .transpose()
            .context("opening the calibration file")?;
        let expert_name = self.name.clone().unwrap_or_else(|| {
            self.expert
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "expert".into())
        });
        let options = CompressOptions {
            bits,
            group_size,
            salient,
            fit,
            compress_embeddings: self.compress_embeddings,
            expert_name,
            max_shard_bytes: self.max_shard_mib.map(|m| m * MIB),
        };
        let bar = super::progress_bar(base.tensor_names().len() as u64);
        let report = compress_expert(&base, &expert, calib.as_ref(), &options, &self.out, |n| {
            bar.set_message(n.to_string());
            bar.inc(1);
        })?;
        bar.finish_and_clear();
        let bytes: u64 = report
            .files
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum();
        println!(
            "{} deltas, {} dense tensors -> {} ({:.2} MiB)",
            report.tensors.len(),
            report.dense_tensors,
            report
                .files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            bytes as f64 / MIB as f64
        );
        print!("{}", format_table(&summarize(&report.tensors)));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn salient_and_group_arguments_parse() {
        assert_eq!(parse_salient("16").unwrap(), SalientSpec::Count(16));
        assert_eq!(parse_salient("1%").unwrap(), SalientSpec::Fraction(0.01));
        assert!(parse_salient("x%").is_err());
        assert!(parse_salient("150%").is_err());
        assert!(parse_salient("-3").is_err());
        assert_eq!(parse_group("64").unwrap(), 64);
        assert_eq!(parse_group("in").unwrap(), usize::MAX);
        assert!(parse_group("48").is_err());
    }
}
