//! Checkpoint reading (single file, sharded, dtypes), base/expert mismatches
//! and calibration through `meswitch compress`.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

use half::f16;
use meswitch_server::checkpoint::{write_checkpoint, Checkpoint, CheckpointError};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::json;

fn meswitch(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meswitch"))
        .args(args)
        .output()
        .expect("the meswitch binary runs")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn one_line_error(out: &Output) -> String {
    assert!(!out.status.success(), "expected failure");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.lines().count(), 1, "one line expected: {err}");
    assert!(err.starts_with("error: "), "{err}");
    err
}

fn config() -> serde_json::Value {
    json!({"architectures": ["MistralForCausalLM"], "hidden_size": 64, "num_hidden_layers": 1})
}

/// A deterministic pseudo-random f16 tensor (no RNG crate needed).
fn values(n: usize, salt: u32) -> Vec<f16> {
    (0..n as u32)
        .map(|i| {
            let h = i
                .wrapping_mul(2_654_435_761)
                .wrapping_add(salt.wrapping_mul(40_503));
            f16::from_f32(((h >> 8) % 2001) as f32 / 1000.0 - 1.0)
        })
        .collect()
}

fn tensors(salt: u32, q_out: usize) -> Vec<(String, Vec<usize>, Vec<f16>)> {
    vec![
        (
            "model.layers.0.self_attn.q_proj.weight".into(),
            vec![q_out, 64],
            values(q_out * 64, salt),
        ),
        (
            "model.layers.0.mlp.up_proj.weight".into(),
            vec![96, 64],
            values(96 * 64, salt + 1),
        ),
        ("model.norm.weight".into(), vec![64], values(64, salt + 2)),
    ]
}

fn write_raw(path: &Path, entries: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView)> = entries
        .iter()
        .map(|(n, d, shape, bytes)| {
            (
                n.to_string(),
                TensorView::new(*d, shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn sharded_and_single_file_checkpoints_read_the_same() {
    let t = tempfile::tempdir().unwrap();
    let single = t.path().join("single");
    let ts = tensors(1, 64);
    write_checkpoint(&single, &config(), &ts).unwrap();
    // The same tensors split over two shards, in BF16 and F32.
    let sharded = t.path().join("sharded");
    std::fs::create_dir_all(&sharded).unwrap();
    std::fs::copy(single.join("config.json"), sharded.join("config.json")).unwrap();
    let as_f32 = |v: &[f16]| {
        v.iter()
            .flat_map(|x| x.to_f32().to_le_bytes())
            .collect::<Vec<u8>>()
    };
    let as_bf16 = |v: &[f16]| {
        v.iter()
            .flat_map(|x| half::bf16::from_f32(x.to_f32()).to_le_bytes())
            .collect::<Vec<u8>>()
    };
    write_raw(
        &sharded.join("model-00001-of-00002.safetensors"),
        &[(&ts[0].0, Dtype::F32, ts[0].1.clone(), as_f32(&ts[0].2))],
    );
    write_raw(
        &sharded.join("model-00002-of-00002.safetensors"),
        &[
            (&ts[1].0, Dtype::BF16, ts[1].1.clone(), as_bf16(&ts[1].2)),
            (&ts[2].0, Dtype::F32, ts[2].1.clone(), as_f32(&ts[2].2)),
        ],
    );
    let index = json!({"metadata": {}, "weight_map": {
        ts[0].0.clone(): "model-00001-of-00002.safetensors",
        ts[1].0.clone(): "model-00002-of-00002.safetensors",
        ts[2].0.clone(): "model-00002-of-00002.safetensors",
    }});
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();

    let a = Checkpoint::open(&single).unwrap();
    let b = Checkpoint::open(&sharded).unwrap();
    assert_eq!(a.tensor_names(), b.tensor_names());
    assert_eq!(
        a.identity(),
        b.identity(),
        "identity depends on config + shapes only"
    );
    // F32 holds f16 values exactly; BF16 keeps 8 mantissa bits.
    assert_eq!(
        a.tensor_f32(&ts[0].0).unwrap(),
        b.tensor_f32(&ts[0].0).unwrap()
    );
    assert_eq!(
        a.tensor_f16(&ts[2].0).unwrap(),
        b.tensor_f16(&ts[2].0).unwrap()
    );
    for (x, y) in a
        .tensor_f32(&ts[1].0)
        .unwrap()
        .iter()
        .zip(b.tensor_f32(&ts[1].0).unwrap())
    {
        assert!((x - y).abs() <= x.abs() / 128.0 + 1e-6, "{x} vs {y}");
    }
    assert!(matches!(
        a.tensor_f32("no.such.tensor"),
        Err(CheckpointError::MissingTensor { .. })
    ));

    // An index pointing outside the directory is refused.
    let hostile = json!({"weight_map": {"x": "../single/model.safetensors"}});
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        hostile.to_string(),
    )
    .unwrap();
    assert!(matches!(
        Checkpoint::open(&sharded),
        Err(CheckpointError::Index { .. })
    ));
}

#[test]
fn truncated_weights_are_an_error_not_a_panic() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("m");
    write_checkpoint(&dir, &config(), &tensors(1, 64)).unwrap();
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    for cut in [0, 7, 8, 100, bytes.len() - 1] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        match Checkpoint::open(&dir) {
            Err(CheckpointError::Safetensors { .. }) => {}
            other => panic!("cut at {cut}: {:?}", other.map(|c| c.tensor_names())),
        }
    }
}

#[test]
fn mismatched_base_and_expert_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let (base, expert, out) = (
        t.path().join("b"),
        t.path().join("e"),
        t.path().join("o.safetensors"),
    );
    write_checkpoint(&base, &config(), &tensors(1, 64)).unwrap();
    // Same config, one tensor with another shape.
    write_checkpoint(&expert, &config(), &tensors(2, 32)).unwrap();
    let err = one_line_error(&meswitch(&[
        "compress",
        "--base",
        s(&base),
        "--expert",
        s(&expert),
        "-o",
        s(&out),
    ]));
    assert!(
        err.contains("q_proj") && err.contains("[64, 64]") && err.contains("[32, 64]"),
        "{err}"
    );
    assert!(!out.exists(), "nothing written on a refused pair");
    // Another architecture.
    let mut other = config();
    other["hidden_size"] = json!(128);
    write_checkpoint(&expert, &other, &tensors(2, 64)).unwrap();
    let err = one_line_error(&meswitch(&[
        "compress",
        "--base",
        s(&base),
        "--expert",
        s(&expert),
        "-o",
        s(&out),
    ]));
    assert!(err.contains("hidden_size"), "{err}");
    // A tensor missing from the expert.
    write_checkpoint(&expert, &config(), &tensors(2, 64)[..2]).unwrap();
    let err = one_line_error(&meswitch(&[
        "compress",
        "--base",
        s(&base),
        "--expert",
        s(&expert),
        "-o",
        s(&out),
    ]));
    assert!(err.contains("model.norm.weight"), "{err}");
}

#[test]
fn unsupported_dtype_is_named() {
    let t = tempfile::tempdir().unwrap();
    let (base, expert, out) = (
        t.path().join("b"),
        t.path().join("e"),
        t.path().join("o.safetensors"),
    );
    let ts = tensors(1, 64);
    write_checkpoint(&base, &config(), &ts).unwrap();
    write_checkpoint(&expert, &config(), &ts).unwrap();
    let mut entries: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = ts
        .iter()
        .map(|(n, shape, v)| {
            (
                n.as_str(),
                Dtype::F16,
                shape.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    entries[2].1 = Dtype::I16; // same byte size, integer type
    write_raw(&expert.join("model.safetensors"), &entries);
    let err = one_line_error(&meswitch(&[
        "compress",
        "--base",
        s(&base),
        "--expert",
        s(&expert),
        "-o",
        s(&out),
    ]));
    assert!(
        err.contains("unsupported dtype I16") && err.contains("model.norm.weight"),
        "{err}"
    );
}

#[test]
fn calibration_adds_output_error_and_is_checked() {
    let t = tempfile::tempdir().unwrap();
    let (base, expert) = (t.path().join("b"), t.path().join("e"));
    write_checkpoint(&base, &config(), &tensors(1, 64)).unwrap();
    // Expert = base + small delta.
    let fine: Vec<_> = tensors(1, 64)
        .into_iter()
        .zip(tensors(9, 64))
        .map(|((n, shape, w), (_, _, d))| {
            let v = w
                .iter()
                .zip(&d)
                .map(|(w, d)| f16::from_f32(w.to_f32() + 0.01 * d.to_f32()))
                .collect();
            (n, shape, v)
        })
        .collect();
    write_checkpoint(&expert, &config(), &fine).unwrap();
    let calib = t.path().join("calib.safetensors");
    let act = |salt| {
        values(16 * 64, salt)
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect::<Vec<u8>>()
    };
    write_raw(
        &calib,
        &[
            (
                "layers.0.self_attn.q_proj.input",
                Dtype::F16,
                vec![16, 64],
                act(20),
            ),
            (
                "layers.0.mlp.up_proj.input",
                Dtype::F16,
                vec![16, 64],
                act(21),
            ),
        ],
    );
    let out = t.path().join("o.safetensors");
    let run = meswitch(&[
        "compress",
        "--base",
        s(&base),
        "--expert",
        s(&expert),
        "--bits",
        "2",
        "--group",
        "32",
        "--salient",
        "4",
        "--calib",
        s(&calib),
        "--fit",
        "act",
        "-o",
        s(&out),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let table = String::from_utf8(run.stdout).unwrap();
    assert!(table.contains("|X(D-D^)|/|XD|"), "{table}");
    let q = table.lines().find(|l| l.starts_with("q_proj")).unwrap();
    let out_err: f64 = q.split_whitespace().last().unwrap().parse().unwrap();
    assert!(out_err > 0.0 && out_err < 1.0, "{q}");

    // Activations of the wrong width are refused, naming the tensor.
    write_raw(
        &calib,
        &[(
            "layers.0.mlp.up_proj.input",
            Dtype::F16,
            vec![16, 32],
            act(21)[..16 * 32 * 2].to_vec(),
        )],
    );
    let err = one_line_error(&meswitch(&[
        "compress",
        "--base",
        s(&base),
        "--expert",
        s(&expert),
        "--calib",
        s(&calib),
        "-o",
        s(&out),
    ]));
    assert!(err.contains("layers.0.mlp.up_proj.input"), "{err}");
}

#[test]
fn synthetic_tokenizer_loads_and_round_trips() {
    let t = tempfile::tempdir().unwrap();
    let run = meswitch(&["synth", "-o", s(t.path()), "--experts", "0"]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let tok = tokenizers::Tokenizer::from_file(t.path().join("base/tokenizer.json")).unwrap();
    let text = "Héllo, wörld!\n  x = 1 + 2";
    let enc = tok.encode(text, true).unwrap();
    assert_eq!(enc.get_ids()[0], 1, "<s> first");
    assert_eq!(enc.get_ids().len(), 1 + text.len(), "one token per byte");
    assert_eq!(tok.decode(enc.get_ids(), true).unwrap(), text);
    let specials: HashMap<String, u32> = tok.get_vocab(true);
    assert_eq!(specials["</s>"], 2);
}
