//! `meswitch decompress`: base + compressed expert → a normal HF checkpoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Parser;
use meswitch_reference::container::{read_expert, ExpertTensor};

use crate::checkpoint::{
    write_config, Checkpoint, TensorFileWriter, TensorPlan, CONFIG_FILE, SINGLE_FILE,
};

use super::Run;

/// Reconstruct W_base + Δ̂ as a Hugging Face checkpoint (same dtype as the base).
#[derive(Parser, Debug)]
#[command(name = "decompress")]
pub struct DecompressArgs {
    /// Base checkpoint directory the expert was compressed against.
    #[arg(long)]
    base: PathBuf,
    /// Compressed expert file.
    #[arg(long)]
    delta: PathBuf,
    /// Output directory.
    #[arg(short = 'o', long = "out")]
    out: PathBuf,
}

/// Files besides the weights that make a checkpoint usable elsewhere; copied
/// from the base when present.
const SIDE_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
];

impl Run for DecompressArgs {
    fn run(self) -> anyhow::Result<()> {
        let base = Checkpoint::open(&self.base).context("opening the base")?;
        let expert = read_expert(&self.delta)
            .with_context(|| format!("reading {}", self.delta.display()))?;
        expert
            .check_base(&base.identity(), &base.shapes())
            .with_context(|| {
                format!(
                    "{} does not fit {}",
                    self.delta.display(),
                    self.base.display()
                )
            })?;
        decompress(&base, &expert.tensors, &self.out)?;
        println!("wrote {}", self.out.display());
        Ok(())
    }
}

/// Writes every base tensor, replaced or corrected by the expert's, in the
/// base tensor's dtype.
pub fn decompress(
    base: &Checkpoint,
    tensors: &BTreeMap<String, ExpertTensor>,
    out: &Path,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let config_source = base.dir().join(CONFIG_FILE);
    std::fs::copy(&config_source, out.join(CONFIG_FILE))
        .or_else(|_| write_config(out, base.config()).map(|_| 0))
        .with_context(|| format!("writing {}", out.join(CONFIG_FILE).display()))?;
    for side in SIDE_FILES {
        let from = base.dir().join(side);
        if from.is_file() {
            std::fs::copy(&from, out.join(side))
                .with_context(|| format!("copying {}", from.display()))?;
        }
    }
    let names = base.tensor_names();
    let plan = names
        .iter()
        .map(|name| {
            Ok(TensorPlan {
                name: name.clone(),
                dtype: base.float_dtype(name)?,
                shape: base.shape(name).unwrap_or_default(),
            })
        })
        .collect::<Result<Vec<_>, crate::checkpoint::CheckpointError>>()?;
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let mut writer = TensorFileWriter::create(&out.join(SINGLE_FILE), plan, &metadata)?;
    for name in &names {
        let values: Vec<f32> = match tensors.get(name) {
            Some(ExpertTensor::Delta(d)) => {
                let mut w = base.tensor_f32(name)?;
                for (w, d) in w.iter_mut().zip(d.dequantize()) {
                    *w += d;
                }
                w
            }
            Some(ExpertTensor::Dense { values, .. }) => values.iter().map(|v| v.to_f32()).collect(),
            None => base.tensor_f32(name)?,
        };
        writer.write_f32(name, &values)?;
    }
    writer.finish()?;
    Ok(())
}
