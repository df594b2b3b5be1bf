//! GPU bench: the fused multi-expert GEMV against two cuBLAS baselines, on
//! Mistral-7B layer shapes.
//!
//! For every (shape, batch B, distinct experts E, bits) it measures, with
//! criterion timing CUDA events:
//! - `fused`: one `multi_expert_gemv` launch (base + every row's delta) with
//!   the 128-column kernel (`GemvKernel::Chunk128`);
//! - `fused_wide`: the same launch with the wide kernel (`GemvKernel::Wide`,
//!   unverified on a GPU until tests/gpu_kernels.rs passes on one);
//! - `unfused` (baseline a): cuBLAS FP16 GEMM of the base for all rows, then
//!   per active expert one dequantize launch into a dense FP16 scratch and
//!   one cuBLAS GEMM accumulating into that expert's rows;
//! - `dense` (baseline b): cuBLAS FP16 GEMM per active expert on that expert's
//!   full dense weight (what serving E full models costs).
//!
//! Achieved bandwidth counts the minimal bytes of the problem, the same for
//! all three: the base once + each active delta once (as stored on the
//! device) + x + y. It is reported against a device-to-device copy measured
//! in the same run (bytes read + written).
//!
//! Rows are assigned to experts in contiguous blocks (rows of one expert are
//! adjacent) so the baselines can use plain GEMMs; the fused kernel does not
//! care. Configurations with E > B are skipped (not every expert can be
//! active). Weights are random: timing does not depend on values.
//!
//! Without a GPU the bench prints a message and exits 0 (1 when
//! `MESWITCH_REQUIRE_GPU=1`). The sweep is configurable, so a GPU session can
//! run the subset its time allows:
//!
//! | variable | default |
//! |---|---|
//! | `MESWITCH_BENCH_SHAPES` (out x in) | `4096x4096,1024x4096,14336x4096,4096x14336` |
//! | `MESWITCH_BENCH_BATCH` | `1,4,16,32` |
//! | `MESWITCH_BENCH_EXPERTS` | `1,4,16` |
//! | `MESWITCH_BENCH_BITS` | `1,2,4` |
//! | `MESWITCH_BENCH_KERNELS` (`chunk128`, `wide`) | `chunk128,wide` |
//! | `MESWITCH_BENCH_BASELINES` (`0` skips a and b) | `1` |
//! | `MESWITCH_BENCH_WARMUP_MS`, `MESWITCH_BENCH_MEASURE_MS` | `300`, `1000` |
//! | `MESWITCH_BENCH_OUT` (CSV, JSON, PNG) | `target/meswitch-bench` |
//! | `MESWITCH_BENCH_REPLOT=gemv.json` (no GPU: redraw gemv.png from a run) | unset |
//! | `MESWITCH_FONT` (a .ttf for the PNG's labels) | DejaVuSans / Liberation paths |
//!
//! `cargo bench --bench gemv`

use std::cell::RefCell;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::Criterion;
use half::f16;
use meswitch::ops::{
    self, blas, timing, DeviceBase, DeviceDelta, DeviceExperts, DeviceRows, DeviceSlice,
    GemvKernel, Gpu, OpsError,
};
use meswitch::reference::{Bits, PackedDelta};
use rand::{rngs::StdRng, Rng, SeedableRng};

#[path = "support/gemv_plot.rs"]
mod gemv_plot;
#[path = "support/random_delta.rs"]
mod random_delta;
use gemv_plot::plot;
use random_delta::random_packed_delta;

/// Group size of the benched deltas (the method's usual setting).
const GROUP: usize = 128;
/// Fraction of input channels kept salient (the 1%).
const SALIENT_FRACTION: f64 = 0.01;
/// Largest number of distinct experts in the sweep; deltas are built once
/// per (shape, bits) and reused by every batch.
const MAX_EXPERTS: usize = 16;
/// Bytes copied to measure device bandwidth: large enough (4× the 50 MB L2 of
/// an H100) that the copy streams from HBM.
const COPY_BYTES: usize = 1 << 30;
const COPY_TRIALS: usize = 7;

struct Sweep {
    shapes: Vec<(usize, usize)>,
    batches: Vec<usize>,
    experts: Vec<usize>,
    bits: Vec<Bits>,
    kernels: Vec<GemvKernel>,
    baselines: bool,
    warm_up: Duration,
    measure: Duration,
    out_dir: PathBuf,
}

fn env_list<T>(name: &str, default: &str, parse: impl Fn(&str) -> Option<T>) -> Vec<T> {
    let text = std::env::var(name).unwrap_or_else(|_| default.to_string());
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| parse(s).unwrap_or_else(|| panic!("{name}: cannot parse `{s}`")))
        .collect()
}

fn env_ms(name: &str, default: u64) -> Duration {
    Duration::from_millis(
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

impl Sweep {
    fn from_env() -> Sweep {
        Sweep {
            shapes: env_list(
                "MESWITCH_BENCH_SHAPES",
                "4096x4096,1024x4096,14336x4096,4096x14336",
                |s| {
                    let (o, i) = s.split_once('x')?;
                    Some((o.parse().ok()?, i.parse().ok()?))
                },
            ),
            batches: env_list("MESWITCH_BENCH_BATCH", "1,4,16,32", |s| s.parse().ok()),
            experts: env_list("MESWITCH_BENCH_EXPERTS", "1,4,16", |s| {
                s.parse().ok().filter(|e| (1..=MAX_EXPERTS).contains(e))
            }),
            bits: env_list("MESWITCH_BENCH_BITS", "1,2,4", |s| {
                Bits::from_count(s.parse().ok()?).ok()
            }),
            kernels: env_list(
                "MESWITCH_BENCH_KERNELS",
                "chunk128,wide",
                GemvKernel::from_name,
            ),
            baselines: std::env::var("MESWITCH_BENCH_BASELINES").map_or(true, |v| v != "0"),
            warm_up: env_ms("MESWITCH_BENCH_WARMUP_MS", 300),
            measure: env_ms("MESWITCH_BENCH_MEASURE_MS", 1000),
            out_dir: std::env::var("MESWITCH_BENCH_OUT")
                .map(PathBuf::from)
                .unwrap_or_else(|_| PathBuf::from("target/meswitch-bench")),
        }
    }
}

/// A random packed delta in this bench's settings (group [`GROUP`], 1%
/// salient channels).
fn random_delta(
    rng: &mut StdRng,
    out_features: usize,
    in_features: usize,
    bits: Bits,
) -> PackedDelta {
    random_packed_delta(
        rng,
        out_features,
        in_features,
        bits,
        GROUP,
        SALIENT_FRACTION,
    )
}

/// One timed configuration (also what the chart draws).
#[derive(Clone, Debug)]
pub struct Record {
    out_features: usize,
    in_features: usize,
    batch: usize,
    experts: usize,
    bits: u32,
    variant: &'static str,
    seconds: f64,
    min_bytes: usize,
}

impl Record {
    fn gbps(&self) -> f64 {
        self.min_bytes as f64 / self.seconds / 1e9
    }
}

/// Runs `work` under criterion (timed with CUDA events) and returns the
/// median seconds per call over criterion's samples.
fn measure(
    c: &mut Criterion,
    sweep: &Sweep,
    gpu: &Gpu,
    id: &str,
    mut work: impl FnMut() -> Result<(), OpsError>,
) -> f64 {
    // Every (iterations, seconds) criterion asks for; its last `SAMPLES`
    // calls are the measurement samples (earlier ones are warm-up).
    const SAMPLES: usize = 10;
    let calls: RefCell<Vec<f64>> = RefCell::new(Vec::new());
    let mut group = c.benchmark_group("multi_expert_gemv");
    group
        .sample_size(SAMPLES)
        .warm_up_time(sweep.warm_up)
        .measurement_time(sweep.measure);
    group.bench_function(id, |b| {
        b.iter_custom(|iters| {
            let s = timing::time_on_device(gpu, iters as usize, &mut work)
                .unwrap_or_else(|e| panic!("{id}: {e}"));
            calls.borrow_mut().push(s / iters as f64);
            Duration::from_secs_f64(s)
        })
    });
    group.finish();
    let calls = calls.into_inner();
    let mut samples = calls[calls.len().saturating_sub(SAMPLES)..].to_vec();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// `MESWITCH_BENCH_REPLOT=gemv.json`: redraws the chart from a recorded
/// run, on any machine (the GPU machine may have no font for the labels).
fn replot(json_path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(json_path)?)?;
    let field = |v: &serde_json::Value, k: &str| {
        v.get(k).cloned().ok_or(format!("{json_path:?}: no {k:?}"))
    };
    let device = field(&doc, "device")?.as_str().unwrap_or("?").to_string();
    let copy_gbps = field(&doc, "copy_bandwidth_gbps")?
        .as_f64()
        .ok_or("copy_bandwidth_gbps")?;
    let mut records = Vec::new();
    for r in field(&doc, "results")?.as_array().ok_or("results")? {
        let n = |k: &str| {
            r.get(k)
                .and_then(|v| v.as_f64())
                .ok_or(format!("result without {k:?}"))
        };
        let variant = match r.get("variant").and_then(|v| v.as_str()) {
            Some("fused") => "fused",
            Some("fused_wide") => "fused_wide",
            Some("unfused") => "unfused",
            Some("dense") => "dense",
            other => return Err(format!("unknown variant {other:?}").into()),
        };
        records.push(Record {
            out_features: n("out")? as usize,
            in_features: n("in")? as usize,
            batch: n("batch")? as usize,
            experts: n("experts")? as usize,
            bits: n("bits")? as u32,
            variant,
            seconds: n("seconds")?,
            min_bytes: n("min_bytes")? as usize,
        });
    }
    let out = json_path.with_extension("png");
    plot(&out, &device, copy_gbps, &records)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

fn main() {
    if let Some(json) = std::env::var_os("MESWITCH_BENCH_REPLOT") {
        if let Err(e) = replot(Path::new(&json)) {
            eprintln!("replot failed: {e}");
            std::process::exit(1);
        }
        return;
    }
    let gpu = match Gpu::detect() {
        Ok(gpu) => gpu,
        Err(e) => {
            eprintln!("gemv bench skipped: {e}");
            if std::env::var("MESWITCH_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                std::process::exit(1);
            }
            return;
        }
    };
    let sweep = Sweep::from_env();
    // criterion's own HTML plots cost seconds per benchmark of scarce GPU
    // time; this harness draws the one chart the docs need.
    let mut c = Criterion::default().without_plots().configure_from_args();
    let copy = timing::copy_bandwidth(&gpu, COPY_BYTES, COPY_TRIALS).expect("copy bandwidth");
    eprintln!(
        "device: {}; copy bandwidth {:.0} GB/s (read + write)",
        gpu.name(),
        copy / 1e9
    );
    let mut records = Vec::new();
    let mut rng = StdRng::seed_from_u64(0x5eed);
    for &(o, i) in &sweep.shapes {
        let base_w: Vec<f16> = (0..o * i)
            .map(|_| f16::from_f32(rng.random_range(-0.05..0.05)))
            .collect();
        let base = DeviceBase::upload(
            &gpu,
            &meswitch::reference::BaseView {
                out_features: o,
                in_features: i,
                weights: &base_w,
            },
        )
        .expect("upload base");
        drop(base_w);
        for &bits in &sweep.bits {
            let deltas: Vec<DeviceDelta> = (0..MAX_EXPERTS)
                .map(|_| {
                    DeviceDelta::upload(&gpu, &random_delta(&mut rng, o, i, bits).view())
                        .expect("upload delta")
                })
                .collect();
            // Baseline (b)'s dense expert weights, W_base + Δ̂, built on the device.
            let dense: Vec<DeviceSlice<f16>> = if sweep.baselines {
                deltas
                    .iter()
                    .map(|d| {
                        let mut w = gpu.stream().alloc_zeros(o * i).expect("alloc dense expert");
                        ops::dequantize_device(&gpu, d, Some(&base), &mut w).expect("dequantize");
                        w
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let mut scratch: DeviceSlice<f16> =
                gpu.stream().alloc_zeros(o * i).expect("alloc scratch");
            for &b in &sweep.batches {
                let x_host: Vec<f16> = (0..b * i)
                    .map(|_| f16::from_f32(rng.random_range(-1.0..1.0)))
                    .collect();
                let x = ops::upload(&gpu, &x_host).expect("upload x");
                let mut y: DeviceSlice<f16> = gpu.stream().alloc_zeros(b * o).expect("alloc y");
                for &e in sweep.experts.iter().filter(|&&e| e <= b) {
                    // Contiguous blocks: rows [s·b/e, (s+1)·b/e) use expert s.
                    let rows_host: Vec<Option<u32>> =
                        (0..b).map(|r| Some((r * e / b) as u32)).collect();
                    let spans: Vec<(usize, usize)> = (0..e)
                        .map(|s| ((s * b).div_ceil(e), ((s + 1) * b).div_ceil(e)))
                        .collect();
                    let refs: Vec<&DeviceDelta> = deltas[..e].iter().collect();
                    let table = DeviceExperts::new(&gpu, &refs).expect("expert table");
                    let rows = DeviceRows::upload(&gpu, &rows_host, e).expect("rows");
                    let active = rows.active_experts();
                    let min_bytes =
                        base.bytes() + table.device_bytes(&active) + 2 * (b * i + b * o);
                    let label = format!("{o}x{i}/B{b}/E{e}/int{}", bits.count());
                    let mut record = |variant: &'static str, seconds: f64| {
                        let r = Record {
                            out_features: o,
                            in_features: i,
                            batch: b,
                            experts: e,
                            bits: bits.count(),
                            variant,
                            seconds,
                            min_bytes,
                        };
                        eprintln!(
                            "{label} {variant}: {:.2} us, {:.0} GB/s ({:.1}% of copy)",
                            seconds * 1e6,
                            r.gbps(),
                            100.0 * r.gbps() * 1e9 / copy
                        );
                        records.push(r);
                    };
                    for &kernel in &sweep.kernels {
                        let variant = fused_variant(kernel);
                        let t =
                            measure(&mut c, &sweep, &gpu, &format!("{label}/{variant}"), || {
                                ops::multi_expert_gemv_device_with(
                                    &gpu, kernel, &base, &table, &x, &rows, &mut y,
                                )
                            });
                        record(variant, t);
                    }
                    if !sweep.baselines {
                        continue;
                    }
                    let t = measure(&mut c, &sweep, &gpu, &format!("{label}/unfused"), || {
                        blas::linear_f16(&gpu, &base.weights, o, i, &x, b, &mut y, false)?;
                        for (s, &(r0, r1)) in spans.iter().enumerate() {
                            ops::dequantize_device(&gpu, &deltas[s], None, &mut scratch)?;
                            blas::linear_f16(
                                &gpu,
                                &scratch,
                                o,
                                i,
                                &x.slice(r0 * i..r1 * i),
                                r1 - r0,
                                &mut y.slice_mut(r0 * o..r1 * o),
                                true,
                            )?;
                        }
                        Ok(())
                    });
                    record("unfused", t);
                    let t = measure(&mut c, &sweep, &gpu, &format!("{label}/dense"), || {
                        for (s, &(r0, r1)) in spans.iter().enumerate() {
                            blas::linear_f16(
                                &gpu,
                                &dense[s],
                                o,
                                i,
                                &x.slice(r0 * i..r1 * i),
                                r1 - r0,
                                &mut y.slice_mut(r0 * o..r1 * o),
                                false,
                            )?;
                        }
                        Ok(())
                    });
                    record("dense", t);
                }
            }
        }
    }
    c.final_summary();
    if let Err(e) = write_outputs(&sweep.out_dir, &gpu, copy, &records) {
        eprintln!(
            "cannot write bench outputs to {}: {e}",
            sweep.out_dir.display()
        );
        std::process::exit(1);
    }
}

/// The record name of a fused launch with `kernel` (`fused` keeps the name
/// earlier runs' JSON used for the 128-column kernel).
fn fused_variant(kernel: GemvKernel) -> &'static str {
    match kernel {
        GemvKernel::Chunk128 => "fused",
        GemvKernel::Wide => "fused_wide",
    }
}

fn write_outputs(
    dir: &Path,
    gpu: &Gpu,
    copy: f64,
    records: &[Record],
) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    let mut csv = String::from("out,in,batch,experts,bits,variant,us,min_bytes,gbps,frac_of_copy,speedup_vs_unfused,speedup_vs_dense\n");
    let time_of = |r: &Record, variant: &str| {
        records
            .iter()
            .find(|q| {
                (q.out_features, q.in_features, q.batch, q.experts, q.bits)
                    == (r.out_features, r.in_features, r.batch, r.experts, r.bits)
                    && q.variant == variant
            })
            .map(|q| q.seconds)
    };
    let mut json = Vec::new();
    for r in records {
        let vs = |v: &str| time_of(r, v).map(|t| t / r.seconds);
        let fmt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.3}"));
        writeln!(
            csv,
            "{},{},{},{},{},{},{:.3},{},{:.1},{:.4},{},{}",
            r.out_features,
            r.in_features,
            r.batch,
            r.experts,
            r.bits,
            r.variant,
            r.seconds * 1e6,
            r.min_bytes,
            r.gbps(),
            r.gbps() * 1e9 / copy,
            fmt(vs("unfused")),
            fmt(vs("dense"))
        )?;
        json.push(serde_json::json!({
            "out": r.out_features, "in": r.in_features, "batch": r.batch, "experts": r.experts, "bits": r.bits,
            "variant": r.variant, "seconds": r.seconds, "min_bytes": r.min_bytes, "gbps": r.gbps(),
            "frac_of_copy": r.gbps() * 1e9 / copy,
        }));
    }
    std::fs::write(dir.join("gemv.csv"), csv)?;
    let doc = serde_json::json!({
        "device": gpu.name(), "copy_bandwidth_gbps": copy / 1e9,
        "copy_bandwidth_convention": "device-to-device copy, bytes read + written",
        "group_size": GROUP, "salient_fraction": SALIENT_FRACTION, "results": json,
    });
    std::fs::write(dir.join("gemv.json"), serde_json::to_string_pretty(&doc)?)?;
    plot(&dir.join("gemv.png"), gpu.name(), copy / 1e9, records)?;
    eprintln!("wrote {}/gemv.{{csv,json,png}}", dir.display());
    Ok(())
}
