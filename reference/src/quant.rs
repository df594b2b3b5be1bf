//! Asymmetric uniform quantizer of one group: `value ≈ offset + scale · q`,
//! `q ∈ [0, 2^bits − 1]`, with FP16 `scale` and `offset`.
//!
//! # How the step size is fitted
//!
//! Round-to-nearest over `[min, max]` lets one outlier set the step for the
//! whole group. Instead we minimise the group's (optionally weighted) squared
//! error over the entries that take part (non-salient ones):
//!
//! 1. **Clipping search.** For `CLIP_STEPS` shrink factors `p` from 1.0 down to
//!    `MIN_CLIP`, the range `[mid − p·half, mid + p·half]` is tried (asymmetric
//!    ranges come from step 2). Each candidate is scored by its true error with
//!    the FP16-rounded scale and offset that would be stored.
//! 2. **Least-squares refinement.** Given the codes of the best candidate, the
//!    optimal `(offset, scale)` is a weighted linear regression of the values on
//!    the codes (closed form). Re-assigning codes and re-fitting is Lloyd's
//!    algorithm for a uniform grid; we run `LLOYD_ITERATIONS` rounds.
//!
//! Every candidate is evaluated exactly as it will be dequantized, and the best
//! one is kept, so the result is never worse than plain min/max
//! round-to-nearest (which is candidate `p = 1`).

use half::f16;

use crate::layout::Bits;

/// Number of clipping ratios tried in the search.
pub const CLIP_STEPS: usize = 24;
/// Smallest clipping ratio tried. Below ~0.4 of the range, clipping error on
/// the tails dominates for every distribution we have seen in real deltas.
pub const MIN_CLIP: f32 = 0.4;
/// Rounds of code re-assignment + least-squares refit. Converges in 2–4.
pub const LLOYD_ITERATIONS: usize = 4;

/// Quantization parameters of one group, as stored.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupParams {
    pub scale: f16,
    pub offset: f16,
}

impl GroupParams {
    pub const ZERO: GroupParams = GroupParams {
        scale: f16::ZERO,
        offset: f16::ZERO,
    };

    /// Code nearest to `value` under these parameters.
    #[inline]
    pub fn code_of(&self, value: f32, bits: Bits) -> u8 {
        self.decoded(bits).code_of(value)
    }

    #[inline]
    pub fn dequantize(&self, code: u32) -> f32 {
        self.offset.to_f32() + self.scale.to_f32() * code as f32
    }

    /// The parameters widened to f32 once, for loops over a group's entries
    /// (FP16 → f32 is a software conversion on baseline x86-64).
    #[inline]
    pub fn decoded(&self, bits: Bits) -> DecodedParams {
        let scale = self.scale.to_f32();
        DecodedParams {
            offset: self.offset.to_f32(),
            scale,
            inv_scale: if scale > 0.0 { 1.0 / scale } else { 0.0 },
            max_code: bits.max_code() as f32,
        }
    }

    /// Largest step that keeps the scale finite when stored as FP16.
    fn from_range(lo: f32, hi: f32, bits: Bits) -> GroupParams {
        let scale = ((hi - lo) / bits.max_code() as f32).max(0.0);
        GroupParams::rounded(lo, scale)
    }

    fn rounded(offset: f32, scale: f32) -> GroupParams {
        GroupParams {
            scale: f16::from_f32(scale.clamp(0.0, f16::MAX.to_f32())),
            offset: f16::from_f32(offset.clamp(f16::MIN.to_f32(), f16::MAX.to_f32())),
        }
    }
}

/// [`GroupParams`] widened to f32. Every code assignment in the crate goes
/// through [`DecodedParams::code_of`], so compression and error measurement
/// agree bit for bit.
#[derive(Clone, Copy, Debug)]
pub struct DecodedParams {
    pub offset: f32,
    pub scale: f32,
    inv_scale: f32,
    max_code: f32,
}

impl DecodedParams {
    #[inline]
    pub fn code_of(&self, value: f32) -> u8 {
        ((value - self.offset) * self.inv_scale)
            .round()
            .clamp(0.0, self.max_code) as u8
    }

    #[inline]
    pub fn dequantize(&self, code: u8) -> f32 {
        self.offset + self.scale * f32::from(code)
    }
}

/// The entries of one group that take part in the fit.
pub struct GroupData<'a> {
    pub values: &'a [f32],
    /// Per-entry weight (e.g. ‖X[:, j]‖² for activation-aware fitting); all 1 when `None`.
    pub weights: Option<&'a [f32]>,
    /// Entries with `include[i] == false` (salient channels) are ignored.
    pub include: Option<&'a [bool]>,
}

impl GroupData<'_> {
    fn entries(&self) -> impl Iterator<Item = (f32, f32)> + '_ {
        self.values.iter().enumerate().filter_map(move |(i, &v)| {
            if self.include.is_some_and(|inc| !inc[i]) {
                return None;
            }
            Some((v, self.weights.map_or(1.0, |w| w[i])))
        })
    }

    /// Weighted squared error of quantizing these entries with `params`.
    pub fn error(&self, params: &GroupParams, bits: Bits) -> f64 {
        let p = params.decoded(bits);
        self.entries()
            .map(|(v, w)| {
                let e = v - p.dequantize(p.code_of(v));
                f64::from(w) * f64::from(e) * f64::from(e)
            })
            .sum()
    }
}

/// Plain round-to-nearest over `[min, max]` of the included entries.
pub fn fit_min_max(data: &GroupData, bits: Bits) -> GroupParams {
    match min_max(data) {
        Some((lo, hi)) => GroupParams::from_range(lo, hi, bits),
        None => GroupParams::ZERO,
    }
}

/// Fits scale and offset to minimise the weighted squared error (see module docs).
pub fn fit_group(data: &GroupData, bits: Bits) -> GroupParams {
    let Some((lo, hi)) = min_max(data) else {
        return GroupParams::ZERO;
    };
    if hi <= lo {
        return GroupParams::from_range(lo, hi, bits);
    }
    let mid = 0.5 * (lo + hi);
    let half = 0.5 * (hi - lo);
    let mut best = GroupParams::from_range(lo, hi, bits);
    let mut best_err = data.error(&best, bits);
    for step in 1..CLIP_STEPS {
        let p = 1.0 - (1.0 - MIN_CLIP) * step as f32 / (CLIP_STEPS - 1) as f32;
        let candidate = GroupParams::from_range(mid - p * half, mid + p * half, bits);
        let err = data.error(&candidate, bits);
        if err < best_err {
            best = candidate;
            best_err = err;
        }
    }
    let mut current = best;
    for _ in 0..LLOYD_ITERATIONS {
        let Some(refit) = least_squares(data, &current, bits) else {
            break;
        };
        let err = data.error(&refit, bits);
        if err < best_err {
            best = refit;
            best_err = err;
        }
        if refit == current {
            break;
        }
        current = refit;
    }
    best
}

fn min_max(data: &GroupData) -> Option<(f32, f32)> {
    data.entries().fold(None, |acc, (v, _)| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

/// Weighted regression `v ≈ offset + scale·q` over the codes that `params`
/// assigns. `None` when the codes are all equal (the slope is undetermined).
fn least_squares(data: &GroupData, params: &GroupParams, bits: Bits) -> Option<GroupParams> {
    let (mut sw, mut sq, mut sv, mut sqq, mut sqv) = (0f64, 0f64, 0f64, 0f64, 0f64);
    let p = params.decoded(bits);
    for (v, w) in data.entries() {
        let q = f64::from(p.code_of(v));
        let (v, w) = (f64::from(v), f64::from(w));
        sw += w;
        sq += w * q;
        sv += w * v;
        sqq += w * q * q;
        sqv += w * q * v;
    }
    let det = sw * sqq - sq * sq;
    if sw <= 0.0 || det <= 1e-12 * sw * sqq.max(1.0) {
        return None;
    }
    let scale = (sw * sqv - sq * sv) / det;
    if scale <= 0.0 {
        return None;
    }
    let offset = (sv - scale * sq) / sw;
    Some(GroupParams::rounded(offset as f32, scale as f32))
}
