//! `meswitch compress` on the real fine-tune deltas in ../shared/data/deltas
//! (see its README). Skips when the data is absent, fails under `CI=true`.

use std::path::{Path, PathBuf};
use std::process::Command;

use meswitch_server::testdata;

fn data_dir() -> Option<PathBuf> {
    // MESWITCH_DELTAS_DIR points elsewhere (e.g. a build outside the repo).
    let found = std::env::var_os("MESWITCH_DELTAS_DIR")
        .map(PathBuf::from)
        .or_else(|| testdata::shared_data("deltas"));
    testdata::require("real deltas", found)
}

/// Runs compress and returns the `all` row's output error ‖X(Δ−Δ̂)ᵀ‖/‖XΔᵀ‖
/// and bits per weight.
fn compress(data: &Path, out: &Path, extra: &[&str]) -> (f64, f64) {
    let mut args: Vec<String> = [
        "compress",
        "--base",
        data.join("base").to_str().unwrap(),
        "--expert",
        data.join("experts/math").to_str().unwrap(),
        "--calib",
        data.join("calib/math.safetensors").to_str().unwrap(),
        "--bits",
        "2",
        "-o",
        out.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    let run = Command::new(env!("CARGO_BIN_EXE_meswitch"))
        .args(&args)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let table = String::from_utf8(run.stdout).unwrap();
    let all = table
        .lines()
        .find(|l| l.starts_with("all "))
        .unwrap_or_else(|| panic!("no all row in\n{table}"));
    let cols: Vec<&str> = all.split_whitespace().collect();
    (
        cols.last().unwrap().parse().unwrap(),
        cols[3].parse().unwrap(),
    )
}

#[test]
fn salient_int2_g128_beats_rtn_int2_g64_on_real_deltas() {
    let Some(data) = data_dir() else { return };
    let t = tempfile::tempdir().unwrap();
    let (method, method_bits) = compress(
        &data,
        &t.path().join("m.safetensors"),
        &["--group", "128", "--salient", "1%"],
    );
    let (rtn, rtn_bits) = compress(
        &data,
        &t.path().join("r.safetensors"),
        &["--group", "64", "--fit", "rtn"],
    );
    eprintln!("output error: method {method:.4} at {method_bits} bits/w, rtn g64 {rtn:.4} at {rtn_bits} bits/w");
    assert!(method_bits < rtn_bits, "the baseline spends more bits");
    assert!(
        method < 0.9 * rtn,
        "INT2 g128 + 1% salient {method} vs INT2 RTN g64 {rtn}"
    );
    // The file decompresses against its base.
    let recon = t.path().join("recon");
    let run = Command::new(env!("CARGO_BIN_EXE_meswitch"))
        .args([
            "decompress",
            "--base",
            data.join("base").to_str().unwrap(),
            "--delta",
            t.path().join("m.safetensors").to_str().unwrap(),
            "-o",
            recon.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(recon.join("model.safetensors").is_file());
}
