//! Shared harness of the GPU kernel tests: the skip/require policy, the
//! random problems (`Case`), and the tolerance described in `gpu_kernels.rs`.

pub use std::sync::OnceLock;

pub use half::f16;
pub use meswitch::ops::{
    self, Backend, DeviceBase, DeviceDelta, DeviceExperts, DeviceRows, DeviceSlice,
    ExpertTableCache, Gpu,
};
pub use meswitch::reference::{
    self, layout::GROUP_SIZES, BaseView, Bits, DeltaLayout, DeltaView, PackedDelta,
};
pub use proptest::prelude::*;
pub use rand::{rngs::StdRng, Rng, SeedableRng};

pub const REQUIRE_GPU: &str = "MESWITCH_REQUIRE_GPU";
/// u₁₆: unit roundoff of FP16 (11-bit significand).
pub const U16: f64 = 1.0 / 2048.0;
/// u₃₂: unit roundoff of f32 (24-bit significand).
pub const U32: f64 = 1.0 / 16_777_216.0;
/// FP16 roundings a kernel may apply while forming one weight: scale·q+offset
/// (2 if not fused), + salient residual, + base weight.
pub const WEIGHT_ROUNDINGS: f64 = 4.0;
/// Multiple of n·u₃₂ allowed for summation order (module docs, item 2).
pub const SUM_ORDER: f64 = 4.0;
/// Smallest positive FP16 subnormal, 2⁻²⁴.
pub const FP16_TINY: f64 = 5.960_464_5e-8;
/// An FP16 NaN bit pattern the kernels never produce from finite inputs:
/// written into every output before a launch, so an element the kernel
/// forgets to write fails the comparison.
pub const POISON: f16 = f16::from_bits(0x7E5A);
/// The largest batch the tests draw (the kernels' per-launch maximum).
pub const MAX_TEST_BATCH: usize = 64;
pub const MAX_TEST_EXPERTS: usize = 16;

pub fn gpu_required() -> bool {
    std::env::var(REQUIRE_GPU).is_ok_and(|v| v == "1")
}

/// The skip policy, separated from device discovery so that it can be tested
/// on a machine without a GPU.
pub fn skip_or_fail<T>(found: Result<T, String>, required: bool) -> Option<T> {
    match found {
        Ok(gpu) => Some(gpu),
        Err(reason) if required => {
            panic!("{REQUIRE_GPU}=1 but there is no usable CUDA device: {reason}")
        }
        Err(reason) => {
            eprintln!("skipped: no CUDA device ({reason})");
            None
        }
    }
}

/// The device shared by every test of this binary (one context, one stream).
pub fn gpu_or_skip() -> Option<&'static Gpu> {
    static GPU: OnceLock<Result<Gpu, String>> = OnceLock::new();
    let found = GPU.get_or_init(|| Gpu::detect().map_err(|e| e.to_string()));
    skip_or_fail(found.as_ref().map_err(Clone::clone), gpu_required())
}

/// How rows map to experts.
#[derive(Clone, Copy, Debug)]
pub enum RowMix {
    Random,
    AllOneExpert,
    EveryRowDifferent,
    NoExpert,
}

pub fn row_mix() -> impl Strategy<Value = RowMix> {
    prop_oneof![
        4 => Just(RowMix::Random),
        1 => Just(RowMix::AllOneExpert),
        1 => Just(RowMix::EveryRowDifferent),
        1 => Just(RowMix::NoExpert),
    ]
}

pub fn bits() -> impl Strategy<Value = Bits> {
    prop_oneof![Just(Bits::One), Just(Bits::Two), Just(Bits::Four)]
}

/// A random problem: base, experts, activations and the row → expert map.
pub struct Case {
    pub out_features: usize,
    pub in_features: usize,
    pub base: Vec<f16>,
    pub experts: Vec<PackedDelta>,
    pub x: Vec<f16>,
    pub rows: Vec<Option<u32>>,
}

/// Nonzero uniform FP16 in ±[lo, hi]; never exactly zero, so no product
/// vanishes and hides a missing term.
pub fn value(rng: &mut StdRng, lo: f32, hi: f32) -> f16 {
    let v = rng.random_range(lo..hi);
    f16::from_f32(if rng.random::<bool>() { v } else { -v })
}

pub fn random_delta(rng: &mut StdRng, layout: DeltaLayout) -> PackedDelta {
    let (out, inf, bits) = (layout.out_features, layout.in_features, layout.bits);
    let mut codes = vec![0u32; layout.code_words()];
    let wpr = layout.words_per_row();
    for r in 0..out {
        let row: Vec<u8> = (0..inf)
            .map(|_| rng.random_range(0..=bits.max_code()) as u8)
            .collect();
        reference::layout::pack_row(&row, bits, &mut codes[r * wpr..(r + 1) * wpr]);
    }
    // Steps sized so that offset + scale·q spans about ±1, like the base.
    let step = 2.0 / bits.max_code() as f32;
    let scales = (0..layout.group_params())
        .map(|_| f16::from_f32(rng.random_range(0.05 * step..step)))
        .collect();
    let offsets = (0..layout.group_params())
        .map(|_| f16::from_f32(rng.random_range(-1.2f32..0.2)))
        .collect();
    let mut columns: Vec<u32> = (0..inf as u32).collect();
    for i in 0..layout.salient {
        let j = rng.random_range(i..inf);
        columns.swap(i, j);
    }
    let mut salient_index = columns[..layout.salient].to_vec();
    salient_index.sort_unstable();
    let salient_values = (0..layout.salient_values())
        .map(|_| value(rng, 0.01, 0.5))
        .collect();
    PackedDelta::new(
        layout,
        codes,
        scales,
        offsets,
        salient_index,
        salient_values,
    )
    .expect("generated delta is valid")
}

impl Case {
    #[allow(clippy::too_many_arguments)]
    pub fn random(
        rng: &mut StdRng,
        out_features: usize,
        in_features: usize,
        bits: Bits,
        group: usize,
        n_experts: usize,
        batch: usize,
        mix: RowMix,
    ) -> Case {
        let base = (0..out_features * in_features)
            .map(|_| value(rng, 0.01, 1.0))
            .collect();
        let experts = (0..n_experts)
            .map(|_| {
                let k = match rng.random_range(0..4) {
                    0 => 0,
                    1 => in_features,
                    _ => rng.random_range(0..=in_features.min(40)),
                };
                let group = if group >= in_features {
                    in_features
                } else {
                    group
                };
                let layout = DeltaLayout::new(out_features, in_features, bits, group, k)
                    .expect("test layout is valid");
                random_delta(rng, layout)
            })
            .collect();
        let x = (0..batch * in_features)
            .map(|_| value(rng, 0.01, 1.0))
            .collect();
        let rows = (0..batch)
            .map(|b| match mix {
                _ if n_experts == 0 => None,
                RowMix::NoExpert => None,
                RowMix::AllOneExpert => Some((n_experts - 1) as u32),
                RowMix::EveryRowDifferent => Some((b % n_experts) as u32),
                RowMix::Random => {
                    let e = rng.random_range(0..=n_experts);
                    (e < n_experts).then_some(e as u32)
                }
            })
            .collect();
        Case {
            out_features,
            in_features,
            base,
            experts,
            x,
            rows,
        }
    }

    pub fn batch(&self) -> usize {
        self.rows.len()
    }

    pub fn base(&self) -> BaseView<'_> {
        BaseView {
            out_features: self.out_features,
            in_features: self.in_features,
            weights: &self.base,
        }
    }

    pub fn views(&self) -> Vec<DeltaView<'_>> {
        self.experts.iter().map(PackedDelta::view).collect()
    }

    /// `Σᵢ |x[b,i]|·a[r,i]` (see the module docs) for every output element;
    /// `with_base = false` for the delta-only kernel.
    pub fn magnitudes(&self, with_base: bool) -> Vec<f64> {
        let (o, n) = (self.out_features, self.in_features);
        let x_abs: Vec<f64> = self.x.iter().map(|v| f64::from(v.to_f32().abs())).collect();
        let dot = |a: &[f64], b: usize| -> f64 {
            a.iter()
                .zip(&x_abs[b * n..(b + 1) * n])
                .map(|(a, x)| a * x)
                .sum()
        };
        let mut active: Vec<u32> = self.rows.iter().flatten().copied().collect();
        active.sort_unstable();
        active.dedup();
        let mut m = vec![0f64; self.batch() * o];
        // Row by row, each active expert's magnitudes once per output row.
        let mut expert_rows = vec![vec![0f64; n]; self.experts.len()];
        for r in 0..o {
            let base_row: Vec<f64> = if with_base {
                self.base[r * n..(r + 1) * n]
                    .iter()
                    .map(|w| f64::from(w.to_f32().abs()))
                    .collect()
            } else {
                vec![0.0; n]
            };
            for &e in &active {
                let a = &mut expert_rows[e as usize];
                a.fill(0.0);
                expert_magnitude_row(&self.experts[e as usize].view(), r, a);
            }
            for (b, e) in self.rows.iter().enumerate() {
                m[b * o + r] =
                    dot(&base_row, b) + e.map_or(0.0, |e| dot(&expert_rows[e as usize], b));
            }
        }
        m
    }

    /// Compares a kernel's `y` with the reference's. `initial` is the
    /// accumulate kernel's input `y` (None for the fused kernel).
    pub fn assert_close(&self, y: &[f16], initial: Option<&[f16]>, what: &str) {
        let mut expected = vec![f16::ZERO; y.len()];
        let magnitudes = match initial {
            None => {
                reference::multi_expert_gemv(
                    &self.base(),
                    &self.views(),
                    &self.x,
                    &self.rows,
                    &mut expected,
                )
                .unwrap();
                self.magnitudes(true)
            }
            Some(init) => {
                expected.copy_from_slice(init);
                reference::delta_gemv_accumulate(
                    self.out_features,
                    self.in_features,
                    &self.views(),
                    &self.x,
                    &self.rows,
                    &mut expected,
                )
                .unwrap();
                let mut m = self.magnitudes(false);
                // The existing y enters the single f32 sum too.
                for (m, v) in m.iter_mut().zip(init) {
                    *m += f64::from(v.to_f32().abs());
                }
                m
            }
        };
        let n = self.in_features as f64;
        for (i, ((got, want), mag)) in y.iter().zip(&expected).zip(&magnitudes).enumerate() {
            let (b, r) = (i / self.out_features, i % self.out_features);
            if let (Some(init), None) = (initial, self.rows[b]) {
                assert_eq!(
                    got.to_bits(),
                    init[i].to_bits(),
                    "{what}: row {b} has no expert, y[{b},{r}] must be untouched"
                );
                continue;
            }
            let want = f64::from(want.to_f32());
            let tol = mag * (WEIGHT_ROUNDINGS * U16 + SUM_ORDER * n * U32)
                + 2.0 * U16 * want.abs()
                + FP16_TINY;
            let got_f = f64::from(got.to_f32());
            assert!(
                got.is_finite() && (got_f - want).abs() <= tol,
                "{what}: y[{b},{r}] = {got_f} (bits {:#06x}), reference {want}, tolerance {tol:.3e}; \
                 row expert {:?}, shape [{}, {}], batch {}",
                got.to_bits(),
                self.rows[b],
                self.out_features,
                self.in_features,
                self.batch()
            );
        }
    }
}

/// The dequantize kernel's output for the case's first expert: bit-identical
/// to the reference, as the header promises (same f32 operations in the same
/// order, no FMA contraction, one FP16 rounding).
pub fn assert_dequantize_exact(case: &Case, with_base: bool, got: &[f16]) {
    let mut want = vec![f16::ZERO; got.len()];
    let base_view = case.base();
    reference::dequantize_f16(
        &case.experts[0].view(),
        with_base.then_some(&base_view),
        &mut want,
    )
    .unwrap();
    let n = case.in_features;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            g.to_bits() == w.to_bits(),
            "dequantize[{}, {}] = {g} (bits {:#06x}), reference {w} (bits {:#06x}), base: {with_base}",
            i / n,
            i % n,
            g.to_bits(),
            w.to_bits(),
        );
    }
}

/// Adds `|offset| + |scale|·q + |s|` of row `r` of a delta to `a`.
pub fn expert_magnitude_row(d: &DeltaView, r: usize, a: &mut [f64]) {
    let l = &d.layout;
    let words = d.row_codes(r);
    for (c, ai) in a.iter_mut().enumerate() {
        let p = d.group(r, c / l.group_size);
        let q = reference::layout::unpack_code(words, c, l.bits);
        *ai += f64::from(p.offset.to_f32().abs()) + f64::from(p.scale.to_f32()) * f64::from(q);
    }
    for (i, &j) in d.salient_index.iter().enumerate() {
        a[j as usize] += f64::from(d.salient_values[r * l.salient + i].to_f32().abs());
    }
}

pub fn download(gpu: &Gpu, y: &DeviceSlice<f16>) -> Vec<f16> {
    ops::download(gpu, y).expect("device to host copy")
}

pub fn upload_case(gpu: &Gpu, case: &Case) -> (DeviceBase, Vec<DeviceDelta>) {
    let base = DeviceBase::upload(gpu, &case.base()).expect("upload base");
    let experts = case
        .views()
        .iter()
        .map(|v| DeviceDelta::upload(gpu, v).expect("upload delta"))
        .collect();
    (base, experts)
}

/// Cases per GPU proptest: `MESWITCH_GPU_PROPTEST_CASES`, default 64 (a
/// GPU session has minutes, and every case also runs the CPU reference).
pub fn proptest_cases() -> u32 {
    std::env::var("MESWITCH_GPU_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

/// Input widths the GEMV kernels take: multiples of their K chunk.
pub const K_CHUNK: usize = 128;

/// Output rows that are and are not multiples of the kernels' 16-row tile
/// (one row, odd, prime); input widths mostly multiples of `K_CHUNK` (the
/// kernels' requirement; 4096 = Mistral's hidden size), sometimes not (those
/// go through the cuBLAS fallback, which must agree too); every group size,
/// including one group per row (`usize::MAX`).
pub fn shape() -> impl Strategy<Value = (usize, usize, usize)> {
    (
        prop_oneof![Just(1usize), 1usize..=300, Just(256usize), Just(333usize)],
        prop_oneof![
            6 => (1usize..=8).prop_map(|k| k * K_CHUNK),
            1 => Just(4096usize),
            2 => 1usize..=700,
        ],
        prop_oneof![
            Just(GROUP_SIZES[0]),
            Just(GROUP_SIZES[1]),
            Just(GROUP_SIZES[2]),
            Just(usize::MAX)
        ],
    )
}
