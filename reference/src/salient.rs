//! Salient input channels: the few columns of Δ kept in FP16.
//!
//! Channel `j` is scored by the error quantizing it would cause:
//! `e_j = a_j · ‖Δ[:, j] − Q(Δ)[:, j]‖²`, where `a_j = ‖X[:, j]‖²` from
//! calibration activations X (activation-aware) or 1 (data-free). The top-k
//! channels are kept; the quantizer is then refitted without them, so an
//! outlier channel no longer sets the step size of its groups.

use crate::layout::{Bits, DeltaLayout, GROUP_SIZES};

/// How many salient channels a matrix keeps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SalientSpec {
    /// Exactly this many (capped at `in_features`).
    Count(usize),
    /// This fraction of `in_features`, rounded to nearest.
    Fraction(f64),
    /// The largest count whose average stored bits per weight stays at or
    /// under this target (0 when even the codes alone exceed it).
    TargetBits(f64),
}

impl SalientSpec {
    /// Resolves to a count for a matrix with this layout (its `salient` field is ignored).
    pub fn resolve(
        &self,
        out_features: usize,
        in_features: usize,
        bits: Bits,
        group: usize,
    ) -> usize {
        match *self {
            SalientSpec::Count(n) => n.min(in_features),
            SalientSpec::Fraction(f) => {
                ((f.clamp(0.0, 1.0) * in_features as f64).round() as usize).min(in_features)
            }
            SalientSpec::TargetBits(target) => {
                let bpw = |k| {
                    DeltaLayout {
                        out_features,
                        in_features,
                        bits,
                        group_size: group,
                        salient: k,
                    }
                    .bits_per_weight()
                };
                // bits_per_weight grows monotonically in k: binary search.
                if bpw(0) > target {
                    return 0;
                }
                let (mut lo, mut hi) = (0usize, in_features);
                while lo < hi {
                    let mid = (lo + hi).div_ceil(2);
                    if bpw(mid) <= target {
                        lo = mid;
                    } else {
                        hi = mid - 1;
                    }
                }
                lo
            }
        }
    }
}

/// Indices of the `k` highest scores, sorted ascending. Ties go to the lower
/// index, so the choice is deterministic.
pub fn top_k_channels(scores: &[f64], k: usize) -> Vec<u32> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut chosen: Vec<u32> = order[..k.min(scores.len())]
        .iter()
        .map(|&i| i as u32)
        .collect();
    chosen.sort_unstable();
    chosen
}

/// Group sizes accepted on the command line (`in` means one group per row).
pub fn group_size_for(requested: usize, in_features: usize) -> usize {
    if GROUP_SIZES.contains(&requested) && requested < in_features {
        requested
    } else {
        in_features
    }
}
