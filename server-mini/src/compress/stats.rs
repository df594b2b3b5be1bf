//! What `meswitch compress` reports: per tensor, and pooled per projection
//! type (q, k, v, o, gate, up, down, embeddings).

use meswitch_reference::DeltaLayout;

/// Bits per weight of the uncompressed delta the ratio is measured against.
pub const FP16_BITS: f64 = 16.0;

/// Measurements of one compressed delta.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorStats {
    /// Hugging Face tensor name.
    pub name: String,
    /// Projection type: `q_proj`, ..., `down_proj`, `embed_tokens`, `lm_head`.
    pub kind: String,
    pub layout: DeltaLayout,
    /// ‖Δ − Δ̂‖_F / ‖Δ‖_F.
    pub relative_error: f64,
    /// ‖X(Δ − Δ̂)ᵀ‖_F / ‖XΔᵀ‖_F, when calibration activations were given.
    pub output_error: Option<f64>,
}

/// One row of the closing table: every matrix of one projection type.
#[derive(Clone, Debug, PartialEq)]
pub struct ProjectionStats {
    pub kind: String,
    pub matrices: usize,
    pub weights: u64,
    pub storage_bytes: u64,
    /// Stored bits per weight over all matrices of the type, everything
    /// counted (codes, scales, offsets, salient indices and columns).
    pub bits_per_weight: f64,
    /// FP16 delta bytes / stored bytes.
    pub ratio_vs_fp16: f64,
    /// Mean over matrices of ‖Δ − Δ̂‖/‖Δ‖.
    pub relative_error: f64,
    /// Mean over matrices of ‖X(Δ − Δ̂)ᵀ‖/‖XΔᵀ‖ (only matrices with activations).
    pub output_error: Option<f64>,
}

/// Order of rows in the table: attention, MLP, then embeddings.
const KIND_ORDER: [&str; 9] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "embed_tokens",
    "lm_head",
];

/// Pools tensor stats per projection type, plus a final `all` row.
pub fn summarize(tensors: &[TensorStats]) -> Vec<ProjectionStats> {
    let mut kinds: Vec<&str> = tensors.iter().map(|t| t.kind.as_str()).collect();
    kinds.sort_by_key(|k| {
        (
            KIND_ORDER.iter().position(|o| o == k).unwrap_or(usize::MAX),
            k.to_string(),
        )
    });
    kinds.dedup();
    let mut rows: Vec<ProjectionStats> = kinds
        .iter()
        .map(|kind| pool(kind, tensors.iter().filter(|t| t.kind == *kind)))
        .collect();
    if rows.len() > 1 {
        rows.push(pool("all", tensors.iter()));
    }
    rows
}

fn pool<'a>(kind: &str, tensors: impl Iterator<Item = &'a TensorStats>) -> ProjectionStats {
    let (mut matrices, mut weights, mut bytes, mut err) = (0usize, 0u64, 0u64, 0f64);
    let (mut out_err, mut out_n) = (0f64, 0usize);
    for t in tensors {
        matrices += 1;
        weights += (t.layout.out_features * t.layout.in_features) as u64;
        bytes += t.layout.storage_bytes() as u64;
        err += t.relative_error;
        if let Some(e) = t.output_error {
            out_err += e;
            out_n += 1;
        }
    }
    let bits_per_weight = if weights == 0 {
        0.0
    } else {
        (bytes * 8) as f64 / weights as f64
    };
    ProjectionStats {
        kind: kind.to_string(),
        matrices,
        weights,
        storage_bytes: bytes,
        bits_per_weight,
        ratio_vs_fp16: if bytes == 0 {
            0.0
        } else {
            weights as f64 * FP16_BITS / (bytes * 8) as f64
        },
        relative_error: if matrices == 0 {
            0.0
        } else {
            err / matrices as f64
        },
        output_error: (out_n > 0).then(|| out_err / out_n as f64),
    }
}

/// The closing table as text.
pub fn format_table(rows: &[ProjectionStats]) -> String {
    let calibrated = rows.iter().any(|r| r.output_error.is_some());
    let mut s = format!(
        "{:<12} {:>8} {:>12} {:>10} {:>9} {:>12}",
        "projection", "matrices", "weights", "bits/w", "vs fp16", "|D-D^|/|D|"
    );
    if calibrated {
        s.push_str(&format!(" {:>16}", "|X(D-D^)|/|XD|"));
    }
    s.push('\n');
    for r in rows {
        s.push_str(&format!(
            "{:<12} {:>8} {:>12} {:>10.3} {:>8.2}x {:>12.4}",
            r.kind, r.matrices, r.weights, r.bits_per_weight, r.ratio_vs_fp16, r.relative_error
        ));
        if calibrated {
            match r.output_error {
                Some(e) => s.push_str(&format!(" {e:>16.4}")),
                None => s.push_str(&format!(" {:>16}", "-")),
            }
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use meswitch_reference::Bits;

    fn stats(kind: &str, out: usize, inp: usize, salient: usize, err: f64) -> TensorStats {
        TensorStats {
            name: format!("x.{kind}"),
            kind: kind.into(),
            layout: DeltaLayout::new(out, inp, Bits::Two, 64, salient).unwrap(),
            relative_error: err,
            output_error: None,
        }
    }

    #[test]
    fn pooled_bits_weigh_matrices_by_size() {
        // A big matrix without salient channels and a small one with many:
        // the pooled figure must sit near the big one's, not the plain mean.
        let big = stats("q_proj", 256, 256, 0, 0.1);
        let small = stats("q_proj", 8, 64, 32, 0.3);
        let rows = summarize(&[big.clone(), small.clone()]);
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        let expected = ((big.layout.storage_bytes() + small.layout.storage_bytes()) * 8) as f64
            / (256 * 256 + 8 * 64) as f64;
        assert!((r.bits_per_weight - expected).abs() < 1e-12);
        let plain_mean = (big.layout.bits_per_weight() + small.layout.bits_per_weight()) / 2.0;
        assert!((r.bits_per_weight - plain_mean).abs() > 0.1);
        assert!((r.ratio_vs_fp16 - 16.0 / expected).abs() < 1e-12);
        assert!((r.relative_error - 0.2).abs() < 1e-12);
        assert_eq!(r.output_error, None);
    }

    #[test]
    fn rows_follow_projection_order_and_end_with_all() {
        let rows = summarize(&[
            stats("down_proj", 64, 64, 0, 0.1),
            stats("q_proj", 64, 64, 0, 0.1),
        ]);
        let kinds: Vec<&str> = rows.iter().map(|r| r.kind.as_str()).collect();
        assert_eq!(kinds, ["q_proj", "down_proj", "all"]);
        assert_eq!(rows[2].matrices, 2);
    }
}
