//! `meswitch inspect`: what a compressed-expert file holds.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use meswitch_reference::container::{read_expert, ExpertFile, ExpertTensor};

use super::Run;

/// Print a compressed expert's settings, sizes and per-tensor bits.
#[derive(Parser, Debug)]
#[command(name = "inspect")]
pub struct InspectArgs {
    /// Expert file (.safetensors or .safetensors.index.json).
    file: PathBuf,
}

/// Bytes per stored FP16 value.
const FP16_BYTES: usize = 2;

impl Run for InspectArgs {
    fn run(self) -> anyhow::Result<()> {
        let expert =
            read_expert(&self.file).with_context(|| format!("reading {}", self.file.display()))?;
        print!("{}", describe(&expert));
        Ok(())
    }
}

/// The report as text (separate from printing so tests can read it).
pub fn describe(expert: &ExpertFile) -> String {
    let h = &expert.header;
    let mut s = String::new();
    s.push_str(&format!("expert          {}\n", h.expert_name));
    s.push_str(&format!("format_version  {}\n", expert.format_version));
    s.push_str(&format!("base_identity   {}\n", h.base.digest));
    s.push_str(&format!("settings        {}\n", h.settings));
    s.push_str(&format!(
        "\n{:<48} {:<6} {:>14} {:>4} {:>6} {:>6} {:>8} {:>12}\n",
        "tensor", "kind", "shape", "bits", "group", "k", "bits/w", "bytes"
    ));
    let (mut delta_bytes, mut delta_weights, mut dense_bytes) = (0usize, 0usize, 0usize);
    for (name, tensor) in &expert.tensors {
        match tensor {
            ExpertTensor::Delta(d) => {
                let l = d.layout();
                delta_bytes += l.storage_bytes();
                delta_weights += l.out_features * l.in_features;
                s.push_str(&format!(
                    "{:<48} {:<6} {:>14} {:>4} {:>6} {:>6} {:>8.3} {:>12}\n",
                    name,
                    "delta",
                    format!("{}x{}", l.out_features, l.in_features),
                    l.bits.count(),
                    l.group_size,
                    l.salient,
                    l.bits_per_weight(),
                    l.storage_bytes()
                ));
            }
            ExpertTensor::Dense { shape, values } => {
                let bytes = values.len() * FP16_BYTES;
                dense_bytes += bytes;
                let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
                s.push_str(&format!(
                    "{:<48} {:<6} {:>14} {:>4} {:>6} {:>6} {:>8.3} {:>12}\n",
                    name,
                    "fp16",
                    dims.join("x"),
                    16,
                    "-",
                    "-",
                    16.0,
                    bytes
                ));
            }
        }
    }
    let bpw = if delta_weights == 0 {
        0.0
    } else {
        (delta_bytes * 8) as f64 / delta_weights as f64
    };
    s.push_str(&format!(
        "\ndeltas: {delta_weights} weights in {delta_bytes} bytes ({bpw:.3} bits/weight); \
         dense fp16: {dense_bytes} bytes\n"
    ));
    s
}
