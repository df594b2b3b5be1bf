//! Compression throughput: MB of FP16 delta compressed per second, on a
//! Mistral-7B-shaped matrix (4096×4096, q_proj/o_proj), INT2 with groups of
//! 128 and 1% salient channels, data-free and activation-aware.
//!
//! `cargo bench --bench compress`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use meswitch::reference::{compress_matrix, Bits, CompressSettings, SalientSpec};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Mistral-7B's hidden size: q_proj and o_proj are HIDDEN × HIDDEN.
const HIDDEN: usize = 4096;

fn bench(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(7);
    let delta: Vec<f32> = (0..HIDDEN * HIDDEN)
        .map(|_| (rng.random::<f32>() - 0.5) * 1e-3)
        .collect();
    let energy: Vec<f32> = (0..HIDDEN).map(|_| rng.random::<f32>() * 100.0).collect();
    let mut group = c.benchmark_group("compress_4096x4096");
    group.sample_size(10);
    // Throughput counted as the FP16 delta's size, the unit the issue asks for.
    group.throughput(Throughput::Bytes((HIDDEN * HIDDEN * 2) as u64));
    for bits in Bits::ALL {
        for aware in [false, true] {
            let settings = CompressSettings::new(bits, 128, SalientSpec::Fraction(0.01));
            let label = format!(
                "int{}_{}",
                bits.count(),
                if aware { "act" } else { "data_free" }
            );
            group.bench_function(BenchmarkId::from_parameter(label), |b| {
                b.iter(|| {
                    compress_matrix(
                        &delta,
                        HIDDEN,
                        HIDDEN,
                        &settings,
                        aware.then_some(&energy[..]),
                    )
                    .unwrap()
                })
            });
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // No HTML plots: criterion's plotters backend needs system fonts, which a
    // bare build machine or CI image does not have; the figures go to docs/perf.md.
    config = Criterion::default().without_plots();
    targets = bench
}
criterion_main!(benches);
