//! Random packed deltas for the benches: timing depends on the layout, not
//! on the values, so codes are random words (padding bits cleared so the
//! delta validates) and scales, offsets and salient values are small.

use half::f16;
use meswitch::reference::{Bits, DeltaLayout, PackedDelta};
use rand::{rngs::StdRng, Rng};

/// A valid packed delta `[out_features, in_features]` of `bits`, groups of
/// `group` (the whole row when `group ≥ in_features`) and a
/// `salient_fraction` of input channels kept FP16 at random positions.
pub fn random_packed_delta(
    rng: &mut StdRng,
    out_features: usize,
    in_features: usize,
    bits: Bits,
    group: usize,
    salient_fraction: f64,
) -> PackedDelta {
    let k = (salient_fraction * in_features as f64).round() as usize;
    let group = group.min(in_features);
    let l = DeltaLayout::new(out_features, in_features, bits, group, k).expect("bench layout");
    let wpr = l.words_per_row();
    let used_bits = in_features * bits.count() as usize - (wpr - 1) * 32;
    let last_mask = if used_bits == 32 {
        u32::MAX
    } else {
        (1u32 << used_bits) - 1
    };
    let codes = (0..l.code_words())
        .map(|w| {
            rng.random::<u32>()
                & if w % wpr == wpr - 1 {
                    last_mask
                } else {
                    u32::MAX
                }
        })
        .collect();
    let scales = (0..l.group_params())
        .map(|_| f16::from_f32(rng.random_range(1e-4..1e-3)))
        .collect();
    let offsets = (0..l.group_params())
        .map(|_| f16::from_f32(rng.random_range(-1e-3..0.0)))
        .collect();
    let mut index: Vec<u32> = (0..in_features as u32).collect();
    for i in 0..k {
        let j = rng.random_range(i..in_features);
        index.swap(i, j);
    }
    let mut salient_index = index[..k].to_vec();
    salient_index.sort_unstable();
    let salient_values = (0..l.salient_values())
        .map(|_| f16::from_f32(rng.random_range(-1e-2..1e-2)))
        .collect();
    PackedDelta::new(l, codes, scales, offsets, salient_index, salient_values).expect("bench delta")
}
