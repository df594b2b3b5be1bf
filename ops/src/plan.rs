//! Kernel variants and the host-side plan of a launch: which entry point a
//! delta needs, how a call's experts are grouped into one descriptor table
//! per variant, and which rows each pass covers (the drawing is in
//! [`crate::launch`]'s docs). Pure host code, tested without a GPU.

use meswitch_ptx::abi;
use meswitch_reference::{Bits, DeltaLayout};

use crate::error::OpsError;
use crate::launch::NO_EXPERT;

/// Which GEMV kernel family runs the delta items of a launch. Both compute
/// the same thing with the same per-weight rounding (only the order of the
/// f32 sums differs) and take the same launch shape and parameters, so a
/// GPU session can time one against the other
/// (`MESWITCH_BENCH_KERNELS`, benches/gemv.rs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum GemvKernel {
    /// Items of 128 input columns (`ptx/kernels/gemv_core.cuh`); verified and
    /// timed on an H100. The default everywhere.
    #[default]
    Chunk128,
    /// Items of 16 code bytes per lane and row, i.e. 128/256/512 columns for
    /// INT4/INT2/INT1 (`ptx/kernels/gemv_wide.cuh`). **Unverified on a GPU.**
    /// A (bits, group) variant whose input width is not whole wide items
    /// (`meswitch_ptx::gemv_wide_supports_in_features`) runs the 128-column
    /// kernel instead; so do launches in which no row has an expert.
    Wide,
}

impl GemvKernel {
    pub const ALL: [GemvKernel; 2] = [GemvKernel::Chunk128, GemvKernel::Wide];

    /// Short name, as the bench's `MESWITCH_BENCH_KERNELS` spells it.
    pub fn name(self) -> &'static str {
        match self {
            GemvKernel::Chunk128 => "chunk128",
            GemvKernel::Wide => "wide",
        }
    }

    pub fn from_name(name: &str) -> Option<GemvKernel> {
        GemvKernel::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Input columns of one delta item of this kernel for `bits`-bit codes:
    /// 128 for the 128-column kernel; 128, 256 or 512 (INT4, INT2, INT1) for
    /// the wide one. An input width that is a multiple of it runs this kernel.
    pub fn item_columns(self, bits: Bits) -> usize {
        match self {
            GemvKernel::Chunk128 => abi::MESWITCH_GEMV_K_CHUNK as usize,
            GemvKernel::Wide => meswitch_ptx::gemv_wide_item_columns(bits.count())
                .expect("every Bits has a wide item width"),
        }
    }
}

/// A (bits, group) kernel variant, identified by its two GEMV entry points
/// (named by `meswitch_ptx`, the single source of entry-point names), and the
/// two of the wide kernel where the input width allows it. All experts of one
/// launch must share it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Variant {
    fused: String,
    delta: String,
    /// `(fused, delta)` entry families of the wide kernel, `None` when the
    /// input width is not whole wide items (or for the base-only variant).
    wide: Option<(String, String)>,
}

impl Variant {
    pub(crate) fn of(layout: &DeltaLayout) -> Result<Variant, OpsError> {
        let (bits, group, inf) = (layout.bits.count(), layout.group_size, layout.in_features);
        let unsupported = || {
            OpsError::Unsupported(format!(
                "no GEMV kernel variant for {bits}-bit codes with group size {group} (in = {inf})"
            ))
        };
        let wide = meswitch_ptx::multi_expert_gemv_wide_entry(bits, group, inf)
            .zip(meswitch_ptx::delta_gemv_wide_entry(bits, group, inf));
        Ok(Variant {
            fused: meswitch_ptx::multi_expert_gemv_entry(bits, group, inf)
                .ok_or_else(unsupported)?,
            delta: meswitch_ptx::delta_gemv_entry(bits, group, inf).ok_or_else(unsupported)?,
            wide,
        })
    }

    /// Any variant computes the base part the same way; this one serves
    /// launches in which no row has an expert.
    pub(crate) fn base_only() -> Variant {
        let g = abi::MESWITCH_GROUP_128 as usize;
        Variant::of(&DeltaLayout {
            out_features: 1,
            in_features: abi::MESWITCH_GEMV_K_CHUNK as usize,
            bits: Bits::Four,
            group_size: g,
            salient: 0,
        })
        .map(|v| Variant { wide: None, ..v })
        .expect("the 4-bit, group-128 variant exists")
    }

    /// Entry family of the fused kernel (base + deltas) under `kernel`.
    pub(crate) fn fused_kernel(&self, kernel: GemvKernel) -> &str {
        match (&self.wide, kernel) {
            (Some((fused, _)), GemvKernel::Wide) => fused,
            _ => &self.fused,
        }
    }

    /// Entry family of the delta-only kernel under `kernel`.
    pub(crate) fn delta_kernel(&self, kernel: GemvKernel) -> &str {
        match (&self.wide, kernel) {
            (Some((_, delta)), GemvKernel::Wide) => delta,
            _ => &self.delta,
        }
    }

    /// The entry family one pass launches: the fused kernel for the pass that
    /// also computes the base, the delta-only one for the others.
    pub(crate) fn pass_kernel(&self, kernel: GemvKernel, with_base: bool) -> &str {
        if with_base {
            self.fused_kernel(kernel)
        } else {
            self.delta_kernel(kernel)
        }
    }
}

pub(crate) fn dequant_kernel(bits: Bits) -> Result<String, OpsError> {
    meswitch_ptx::dequantize_entry(bits.count()).ok_or_else(|| {
        OpsError::Unsupported(format!("no dequantize kernel for {} bits", bits.count()))
    })
}

/// Where an expert's descriptor lives: (variant table, index within it).
pub(crate) type Place = (usize, u32);

/// The host half of `ExpertTable::new`: the distinct variants, ascending,
/// and for each expert (global index) its (table, index within the table).
/// Experts keep their relative order inside a table, so with one variant
/// the local index is the global one.
pub(crate) fn group_by_variant(
    layouts: &[DeltaLayout],
) -> Result<(Vec<Variant>, Vec<Place>), OpsError> {
    let variants: Vec<Variant> = layouts.iter().map(Variant::of).collect::<Result<_, _>>()?;
    let mut distinct = variants.clone();
    distinct.sort_unstable();
    distinct.dedup();
    let mut count = vec![0u32; distinct.len()];
    let place = variants
        .iter()
        .map(|v| {
            let t = distinct
                .binary_search(v)
                .expect("every variant is in the list");
            count[t] += 1;
            (t, count[t] - 1)
        })
        .collect();
    Ok((distinct, place))
}

/// The host half of `passes`: for each pass, the variant table it uses
/// (`None`: no expert at all) and its row ids in that table's numbering
/// (`None`: the global ids as uploaded, valid when there is one table).
pub(crate) fn plan(
    place: &[(usize, u32)],
    n_tables: usize,
    rows: &[Option<u32>],
) -> Vec<(Option<usize>, Option<Vec<u32>>)> {
    if n_tables <= 1 {
        // Global numbering is the table's numbering.
        return vec![((n_tables == 1).then_some(0), None)];
    }
    let mut active: Vec<usize> = rows
        .iter()
        .flatten()
        .map(|&e| place[e as usize].0)
        .collect();
    active.sort_unstable();
    active.dedup();
    if active.is_empty() {
        return vec![(None, Some(vec![NO_EXPERT; rows.len()]))];
    }
    active
        .into_iter()
        .map(|t| {
            let ids = rows
                .iter()
                .map(|e| match e.map(|e| place[e as usize]) {
                    Some((vt, local)) if vt == t => local,
                    _ => NO_EXPERT,
                })
                .collect();
            (Some(t), Some(ids))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(bits: Bits, group: usize, in_features: usize) -> DeltaLayout {
        DeltaLayout::new(8, in_features, bits, group, 0).unwrap()
    }

    #[test]
    fn kernel_names_follow_the_header() {
        let k = GemvKernel::default();
        let v = Variant::of(&layout(Bits::Four, 128, 4096)).unwrap();
        assert_eq!(v.fused_kernel(k), "meswitch_multi_expert_gemv_b4_g128");
        assert_eq!(v.delta_kernel(k), "meswitch_delta_gemv_b4_g128");
        let row = Variant::of(&layout(Bits::Two, 4096, 4096)).unwrap();
        assert_eq!(row.delta_kernel(k), "meswitch_delta_gemv_b2_grow");
        assert_eq!(dequant_kernel(Bits::One).unwrap(), "meswitch_dequantize_b1");
        assert_eq!(
            Variant::base_only().fused_kernel(k),
            "meswitch_multi_expert_gemv_b4_g128"
        );
    }

    #[test]
    fn every_layout_group_has_a_variant() {
        for bits in Bits::ALL {
            for &g in meswitch_reference::layout::GROUP_SIZES.iter() {
                let v = Variant::of(&layout(bits, g, 4096)).unwrap();
                assert!(v
                    .fused_kernel(GemvKernel::Chunk128)
                    .ends_with(&format!("_b{}_g{g}", bits.count())));
            }
            let row = Variant::of(&layout(bits, 640, 640)).unwrap();
            assert!(row.delta_kernel(GemvKernel::Chunk128).ends_with("_grow"));
            // Distinct variants are distinct entry points.
            assert_ne!(
                Variant::of(&layout(bits, 32, 4096)).unwrap(),
                Variant::of(&layout(bits, 64, 4096)).unwrap()
            );
        }
    }

    #[test]
    fn the_default_kernel_is_the_128_column_one() {
        assert_eq!(GemvKernel::default(), GemvKernel::Chunk128);
        for k in GemvKernel::ALL {
            assert_eq!(GemvKernel::from_name(k.name()), Some(k));
        }
        assert_eq!(GemvKernel::from_name("fast"), None);
    }

    #[test]
    fn wide_kernel_names_and_fallbacks() {
        let w = GemvKernel::Wide;
        for bits in Bits::ALL {
            let b = bits.count();
            for (g, tag) in [(32, "32"), (64, "64"), (128, "128"), (14336, "row")] {
                let v = Variant::of(&layout(bits, g, 14336)).unwrap();
                assert_eq!(
                    v.fused_kernel(w),
                    format!("meswitch_multi_expert_gemv_wide_b{b}_g{tag}")
                );
                assert_eq!(
                    v.delta_kernel(w),
                    format!("meswitch_delta_gemv_wide_b{b}_g{tag}")
                );
                // The same variant under the default kernel: the 128-column entries.
                assert_eq!(
                    v.fused_kernel(GemvKernel::Chunk128),
                    format!("meswitch_multi_expert_gemv_b{b}_g{tag}")
                );
                assert_eq!(v.pass_kernel(w, true), v.fused_kernel(w));
                assert_eq!(v.pass_kernel(w, false), v.delta_kernel(w));
            }
        }
        // 384 columns: whole 128-column items (INT4) but not 256 (INT2) or
        // 512 (INT1): those fall back to the 128-column kernel.
        let int4 = Variant::of(&layout(Bits::Four, 128, 384)).unwrap();
        assert_eq!(
            int4.fused_kernel(w),
            "meswitch_multi_expert_gemv_wide_b4_g128"
        );
        let int2 = Variant::of(&layout(Bits::Two, 128, 384)).unwrap();
        assert_eq!(int2.fused_kernel(w), "meswitch_multi_expert_gemv_b2_g128");
        assert_eq!(int2.delta_kernel(w), "meswitch_delta_gemv_b2_g128");
        let int1 = Variant::of(&layout(Bits::One, 64, 768)).unwrap();
        assert_eq!(int1.delta_kernel(w), "meswitch_delta_gemv_b1_g64");
        assert_eq!(w.item_columns(Bits::One), 512);
        assert_eq!(w.item_columns(Bits::Two), 256);
        assert_eq!(w.item_columns(Bits::Four), 128);
        for bits in Bits::ALL {
            assert_eq!(GemvKernel::Chunk128.item_columns(bits), 128);
            // A width of whole items has wide entries; one item short of
            // whole (when that is still whole 128-column chunks) has not.
            let item = w.item_columns(bits);
            assert!(Variant::of(&layout(bits, 128, 3 * item))
                .unwrap()
                .wide
                .is_some());
            if item > 128 {
                let short = Variant::of(&layout(bits, 128, 3 * item + 128)).unwrap();
                assert!(short.wide.is_none());
            }
        }
        // No expert in the launch: nothing for the wide items to do.
        assert_eq!(
            Variant::base_only().fused_kernel(w),
            "meswitch_multi_expert_gemv_b4_g128"
        );
        // The wide entry of a variant exists for every batch size.
        let v = Variant::of(&layout(Bits::Two, 128, 4096)).unwrap();
        for batch in [1, 8, 9, 64] {
            let e = meswitch_ptx::gemv_entry_for_batch(v.pass_kernel(w, true), batch).unwrap();
            assert!(e.starts_with("meswitch_multi_expert_gemv_wide_b2_g128_t"));
        }
    }

    /// A mixed batch under the wide kernel: each pass picks its own
    /// variant's entry, so one variant may run wide while another (whose
    /// width is not whole wide items) falls back, in the same call.
    #[test]
    fn mixed_variants_under_the_wide_kernel() {
        let (int2, int4) = (layout(Bits::Two, 128, 384), layout(Bits::Four, 128, 384));
        let (variants, place) = group_by_variant(&[int2, int4, int2]).unwrap();
        let passes = plan(&place, variants.len(), &[Some(1), Some(0), None, Some(2)]);
        let entries: Vec<&str> = passes
            .iter()
            .enumerate()
            .map(|(k, (t, _))| variants[t.unwrap()].pass_kernel(GemvKernel::Wide, k == 0))
            .collect();
        // Variants sort by entry name: b2 before b4. The first pass is fused.
        assert_eq!(
            entries,
            vec![
                "meswitch_multi_expert_gemv_b2_g128",
                "meswitch_delta_gemv_wide_b4_g128"
            ]
        );
        let default: Vec<&str> = passes
            .iter()
            .enumerate()
            .map(|(k, (t, _))| variants[t.unwrap()].pass_kernel(GemvKernel::default(), k == 0))
            .collect();
        assert_eq!(
            default,
            vec![
                "meswitch_multi_expert_gemv_b2_g128",
                "meswitch_delta_gemv_b4_g128"
            ]
        );
    }

    #[test]
    fn mixed_variants_are_planned_one_pass_each() {
        // Experts 0 and 2 share table 0, expert 1 is alone in table 1.
        let place = [(0, 0), (1, 0), (0, 1)];
        let rows = [Some(2), None, Some(1), Some(0)];
        let n = NO_EXPERT;
        assert_eq!(
            plan(&place, 2, &rows),
            vec![
                (Some(0), Some(vec![1, n, n, 0])),
                (Some(1), Some(vec![n, n, 0, n])),
            ]
        );
        // Only table 1 active: it becomes the (fused) first pass.
        assert_eq!(
            plan(&place, 2, &[Some(1), None]),
            vec![(Some(1), Some(vec![0, n]))]
        );
        // Several tables, no expert in the batch: one base-only pass.
        assert_eq!(
            plan(&place, 2, &[None, None]),
            vec![(None, Some(vec![n, n]))]
        );
    }

    #[test]
    fn one_variant_uses_the_global_ids() {
        assert_eq!(
            plan(&[(0, 0), (0, 1)], 1, &[Some(1), None]),
            vec![(Some(0), None)]
        );
        assert_eq!(plan(&[], 0, &[None]), vec![(None, None)]);
    }

    #[test]
    fn experts_are_grouped_by_variant_in_order() {
        let (a, b) = (layout(Bits::Two, 128, 4096), layout(Bits::Four, 128, 4096));
        let (variants, place) = group_by_variant(&[a, b, a, a, b]).unwrap();
        assert_eq!(
            variants,
            vec![Variant::of(&a).unwrap(), Variant::of(&b).unwrap()]
        );
        assert_eq!(place, vec![(0, 0), (1, 0), (0, 1), (0, 2), (1, 1)]);
        // One variant: local index == global index.
        let (_, place) = group_by_variant(&[b, b, b]).unwrap();
        assert_eq!(place, vec![(0, 0), (0, 1), (0, 2)]);
    }
}
