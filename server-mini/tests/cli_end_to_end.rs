//! `meswitch synth → compress → inspect → decompress` on a tiny synthetic
//! family, through the real binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use meswitch_server::checkpoint::Checkpoint;
use meswitch_server::compress::linear_kind;

fn meswitch(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meswitch"))
        .args(args)
        .output()
        .expect("the meswitch binary runs")
}

fn ok(args: &[&str]) -> String {
    let out = meswitch(args);
    assert!(
        out.status.success(),
        "meswitch {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn synth(dir: &Path, seed: u64, experts: usize) {
    ok(&[
        "synth",
        "-o",
        s(dir),
        "--experts",
        &experts.to_string(),
        "--seed",
        &seed.to_string(),
    ]);
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

#[test]
fn synth_is_deterministic_per_seed() {
    let t = tempfile::tempdir().unwrap();
    let (a, b, c) = (t.path().join("a"), t.path().join("b"), t.path().join("c"));
    synth(&a, 7, 2);
    synth(&b, 7, 2);
    synth(&c, 8, 2);
    let (fa, fb) = (files_under(&a), files_under(&b));
    assert_eq!(fa.len(), 3 * 4, "base + 2 experts, 4 files each");
    for (x, y) in fa.iter().zip(&fb) {
        assert_eq!(x.strip_prefix(&a).unwrap(), y.strip_prefix(&b).unwrap());
        assert!(
            std::fs::read(x).unwrap() == std::fs::read(y).unwrap(),
            "{x:?} differs"
        );
    }
    let weights = |d: &Path| std::fs::read(d.join("base/model.safetensors")).unwrap();
    assert_ne!(
        weights(&a),
        weights(&c),
        "another seed must give another model"
    );
}

/// ‖W_expert − W_base‖ relative to ‖W_base‖ per linear tensor, and that the
/// two experts differ from each other: the family looks like fine-tunes.
#[test]
fn synthetic_deltas_are_small_and_distinct() {
    let t = tempfile::tempdir().unwrap();
    synth(t.path(), 1, 2);
    let base = Checkpoint::open(&t.path().join("base")).unwrap();
    let e0 = Checkpoint::open(&t.path().join("experts/expert-00")).unwrap();
    let e1 = Checkpoint::open(&t.path().join("experts/expert-01")).unwrap();
    assert_eq!(base.config()["architectures"][0], "MistralForCausalLM");
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let mut linear = 0;
    for name in base.tensor_names() {
        if linear_kind(&name).is_none() {
            continue;
        }
        linear += 1;
        let w = base.tensor_f32(&name).unwrap();
        let d0: Vec<f32> = e0
            .tensor_f32(&name)
            .unwrap()
            .iter()
            .zip(&w)
            .map(|(e, b)| e - b)
            .collect();
        let d1: Vec<f32> = e1
            .tensor_f32(&name)
            .unwrap()
            .iter()
            .zip(&w)
            .map(|(e, b)| e - b)
            .collect();
        let rel = norm(&d0) / norm(&w);
        assert!((0.002..0.01).contains(&rel), "{name}: ‖Δ‖/‖W‖ = {rel}");
        let diff: Vec<f32> = d0.iter().zip(&d1).map(|(a, b)| a - b).collect();
        assert!(norm(&diff) > 0.5 * norm(&d0), "{name}: experts too alike");
    }
    assert_eq!(linear, 2 * 7);
}

/// Relative reconstruction error of every linear tensor of a decompressed
/// expert: ‖W_recon − W_expert‖ / ‖W_expert − W_base‖.
fn reconstruction_errors(base: &Path, expert: &Path, recon: &Path) -> Vec<f64> {
    let (b, e, r) = (
        Checkpoint::open(base).unwrap(),
        Checkpoint::open(expert).unwrap(),
        Checkpoint::open(recon).unwrap(),
    );
    assert_eq!(r.tensor_names(), b.tensor_names());
    assert_eq!(r.config(), b.config());
    let mut errors = Vec::new();
    for name in b.tensor_names() {
        assert_eq!(
            r.dtype(&name),
            b.dtype(&name),
            "{name}: dtype must follow the base"
        );
        let (wb, we, wr) = (
            b.tensor_f32(&name).unwrap(),
            e.tensor_f32(&name).unwrap(),
            r.tensor_f32(&name).unwrap(),
        );
        if linear_kind(&name).is_none() {
            // Dense tensors are stored as FP16 and the family is FP16: exact.
            assert_eq!(wr, we, "{name}: dense tensor must be the expert's");
            continue;
        }
        let (mut num, mut den) = (0f64, 0f64);
        for ((b, e), r) in wb.iter().zip(&we).zip(&wr) {
            num += f64::from(r - e).powi(2);
            den += f64::from(e - b).powi(2);
        }
        errors.push((num / den).sqrt());
    }
    errors
}

#[test]
fn compress_inspect_decompress_round_trip() {
    let t = tempfile::tempdir().unwrap();
    synth(t.path(), 3, 1);
    let base = t.path().join("base");
    let expert = t.path().join("experts/expert-00");
    let mut mean_error = Vec::new();
    for bits in ["1", "2", "4"] {
        let file = t.path().join(format!("int{bits}.safetensors"));
        let table = ok(&[
            "compress",
            "--base",
            s(&base),
            "--expert",
            s(&expert),
            "--bits",
            bits,
            "--group",
            "64",
            "--salient",
            "2%",
            "-o",
            s(&file),
        ]);
        for kind in [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
            "all",
        ] {
            assert!(
                table.lines().any(|l| l.starts_with(kind)),
                "no {kind} row in\n{table}"
            );
        }
        let listing = ok(&["inspect", s(&file)]);
        assert!(listing.contains("expert          expert-00"), "{listing}");
        assert!(listing.contains(&format!("\"bits\":{bits}")), "{listing}");
        let delta_rows: Vec<&str> = listing.lines().filter(|l| l.contains(" delta ")).collect();
        assert_eq!(delta_rows.len(), 14, "{listing}");
        for row in &delta_rows {
            let cols: Vec<&str> = row.split_whitespace().collect();
            assert_eq!(cols[3], bits, "{row}");
            assert_eq!(cols[4], "64", "{row}");
            let bpw: f64 = cols[6].parse().unwrap();
            let b: f64 = bits.parse().unwrap();
            // Codes + FP16 scale/offset per 64 + ~2 % FP16 columns.
            assert!(bpw > b + 0.4 && bpw < b + 1.2, "{row}");
        }
        let recon = t.path().join(format!("recon{bits}"));
        ok(&[
            "decompress",
            "--base",
            s(&base),
            "--delta",
            s(&file),
            "-o",
            s(&recon),
        ]);
        assert!(recon.join("tokenizer.json").is_file());
        let errors = reconstruction_errors(&base, &expert, &recon);
        let mean = errors.iter().sum::<f64>() / errors.len() as f64;
        let worst = errors.iter().cloned().fold(0.0, f64::max);
        // Bounds: uniform b-bit quantization of roughly Gaussian rows, plus
        // FP16 storage of the reconstruction (generous; see docs/perf.md for measured values).
        let bound = match bits {
            "1" => 0.8,
            "2" => 0.4,
            _ => 0.15,
        };
        assert!(
            worst < bound,
            "INT{bits}: worst relative error {worst} (mean {mean})"
        );
        mean_error.push(mean);
    }
    assert!(
        mean_error[0] > mean_error[1] && mean_error[1] > mean_error[2],
        "more bits must reconstruct better: {mean_error:?}"
    );
}

#[test]
fn compress_embeddings_makes_them_deltas() {
    let t = tempfile::tempdir().unwrap();
    synth(t.path(), 4, 1);
    let base = t.path().join("base");
    let expert = t.path().join("experts/expert-00");
    let file = t.path().join("e.safetensors");
    let table = ok(&[
        "compress",
        "--base",
        s(&base),
        "--expert",
        s(&expert),
        "--bits",
        "4",
        "--group",
        "32",
        "--target-bits",
        "5",
        "--compress-embeddings",
        "-o",
        s(&file),
    ]);
    assert!(
        table.lines().any(|l| l.starts_with("embed_tokens")),
        "{table}"
    );
    assert!(table.lines().any(|l| l.starts_with("lm_head")), "{table}");
    let listing = ok(&["inspect", s(&file)]);
    let row = listing
        .lines()
        .find(|l| l.starts_with("model.embed_tokens.weight"))
        .unwrap();
    assert!(row.contains(" delta "), "{row}");
    for r in listing.lines().filter(|l| l.contains(" delta ")) {
        let bpw: f64 = r.split_whitespace().nth(6).unwrap().parse().unwrap();
        assert!(bpw <= 5.0, "--target-bits 5 exceeded: {r}");
    }
}

fn assert_one_line_error(out: &Output, needle: &str) {
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(lines[0].contains(needle), "{err} should mention {needle}");
}

#[test]
fn errors_are_one_line_and_non_zero() {
    let t = tempfile::tempdir().unwrap();
    synth(t.path(), 5, 1);
    let base = t.path().join("base");
    let expert = t.path().join("experts/expert-00");
    let out = t.path().join("x.safetensors");
    let missing = t.path().join("missing");
    assert_one_line_error(
        &meswitch(&[
            "compress",
            "--base",
            s(&missing),
            "--expert",
            s(&expert),
            "-o",
            s(&out),
        ]),
        "missing",
    );
    assert_one_line_error(
        &meswitch(&[
            "compress",
            "--base",
            s(&base),
            "--expert",
            s(&expert),
            "--bits",
            "3",
            "-o",
            s(&out),
        ]),
        "bit width 3",
    );
    assert_one_line_error(
        &meswitch(&[
            "compress",
            "--base",
            s(&base),
            "--expert",
            s(&expert),
            "--salient",
            "1%",
            "--target-bits",
            "3",
            "-o",
            s(&out),
        ]),
        "cannot be used with",
    );
    assert_one_line_error(
        &meswitch(&[
            "compress",
            "--base",
            s(&base),
            "--expert",
            s(&expert),
            "--fit",
            "act",
            "-o",
            s(&out),
        ]),
        "--calib",
    );
    assert_one_line_error(&meswitch(&["inspect", s(&missing)]), "missing");
    assert_one_line_error(
        &meswitch(&["synth", "-o", s(&out), "--shape", "huge"]),
        "unknown shape",
    );
    assert_one_line_error(&meswitch(&["no-such-command"]), "no-such-command");
    // A delta file that is not a delta file.
    assert_one_line_error(
        &meswitch(&[
            "decompress",
            "--base",
            s(&base),
            "--delta",
            s(&base.join("model.safetensors")),
            "-o",
            s(&t.path().join("r")),
        ]),
        "model.safetensors",
    );
}
