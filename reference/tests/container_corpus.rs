//! The cargo-fuzz seed corpus of the expert reader, run as an ordinary test
//! (`fuzz/corpus/expert_reader/`): every file goes through
//! `read_expert_bytes` without a panic; `valid-*` files parse (to the expert
//! they were generated from), `bad-*` files are errors.
//!
//! Regenerate the seeds with
//! `MESWITCH_WRITE_CORPUS=1 cargo test -p meswitch-reference --test container_corpus -- corpus_seeds`.

mod container_support;

use std::collections::BTreeMap;
use std::path::PathBuf;

use container_support::*;
use meswitch_reference::container::{read_expert_bytes, ExpertTensor};
use meswitch_reference::Bits;
use rand::{rngs::StdRng, SeedableRng};

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/expert_reader")
}

/// The valid seeds: (file name, tensors).
fn valid_seeds() -> Vec<(&'static str, BTreeMap<String, ExpertTensor>)> {
    let mut rng = StdRng::seed_from_u64(2024);
    let mut small = BTreeMap::new();
    small.insert(
        "model.layers.0.self_attn.q_proj.weight".to_string(),
        ExpertTensor::Delta(random_delta(&mut rng, 4, 40, Bits::Two, 32, 2)),
    );
    small.insert(
        "model.layers.0.mlp.down_proj.weight".to_string(),
        ExpertTensor::Delta(random_delta(&mut rng, 3, 33, Bits::One, 33, 0)),
    );
    small.insert(
        "model.norm.weight".to_string(),
        random_dense(&mut rng, vec![6]),
    );
    let mut four = BTreeMap::new();
    four.insert(
        "model.layers.1.self_attn.o_proj.weight".to_string(),
        ExpertTensor::Delta(random_delta(&mut rng, 2, 130, Bits::Four, 130, 130)),
    );
    four.insert(
        "model.layers.1.mlp.up_proj.weight".to_string(),
        ExpertTensor::Delta(random_delta(&mut rng, 5, 64, Bits::Four, 64, 1)),
    );
    let mut dense = BTreeMap::new();
    dense.insert(
        "lm_head.weight".to_string(),
        random_dense(&mut rng, vec![3, 7]),
    );
    vec![
        ("valid-small.safetensors", small),
        ("valid-int4-all-salient.safetensors", four),
        ("valid-dense.safetensors", dense),
        ("valid-empty.safetensors", BTreeMap::new()),
    ]
}

/// Damaged variants of the first valid seed.
fn bad_seeds(valid: &[u8]) -> Vec<(String, Vec<u8>)> {
    let header_end = 8 + u64::from_le_bytes(valid[..8].try_into().unwrap()) as usize;
    let mut seeds = vec![
        ("bad-truncated-prefix".to_string(), valid[..5].to_vec()),
        (
            "bad-truncated-header".to_string(),
            valid[..header_end / 2].to_vec(),
        ),
        (
            "bad-truncated-data".to_string(),
            valid[..valid.len() - 3].to_vec(),
        ),
    ];
    let mut flip = |name: &str, at: usize| {
        let mut b = valid.to_vec();
        b[at] ^= 0x10;
        seeds.push((name.to_string(), b));
    };
    flip("bad-flipped-length", 1);
    flip("bad-flipped-header", header_end / 3);
    flip("bad-flipped-data", header_end + 5);
    flip("bad-flipped-last", valid.len() - 1);
    let resigned = |edit: &dyn Fn(&mut Parts)| {
        let mut p = Parts::split(valid);
        edit(&mut p);
        p.resign();
        p.join()
    };
    seeds.push((
        "bad-version".into(),
        resigned(&|p| p.set_meta("format_version", "2".into())),
    ));
    seeds.push(("bad-bits".into(), resigned(&|p| p.edit_tensor_meta("model.norm.weight", |t| *t = serde_json::json!({"kind": "delta", "shape": [6, 1], "bits": 3, "group_size": 1, "salient": 0})))));
    seeds.push((
        "bad-huge-shape".into(),
        resigned(&|p| {
            p.edit_tensor_meta("model.norm.weight", |t| {
                t["shape"] = serde_json::json!([16777216, 16777216])
            })
        }),
    ));
    seeds.push((
        "bad-padding-bits".into(),
        resigned(&|p| {
            let name = "model.layers.0.self_attn.q_proj.weight.codes";
            let mut d = p.data[name].clone();
            d[11] |= 0x80;
            p.data.insert(name.into(), d);
        }),
    ));
    seeds
        .into_iter()
        .map(|(n, b)| (format!("{n}.safetensors"), b))
        .collect()
}

#[test]
fn corpus_seeds() {
    let dir = corpus_dir();
    let valid = valid_seeds();
    if std::env::var_os("MESWITCH_WRITE_CORPUS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        let first = expert_bytes(header("seed"), &valid[0].1);
        for (name, tensors) in &valid {
            std::fs::write(dir.join(name), expert_bytes(header("seed"), tensors)).unwrap();
        }
        for (name, bytes) in bad_seeds(&first) {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
    // Every valid seed on disk is still read as the expert it was made from
    // (catches a reader change that would orphan existing files).
    for (name, tensors) in &valid {
        let bytes = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let parsed = read_expert_bytes(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(&parsed.tensors, tensors, "{name}");
        assert_eq!(parsed.header, header("seed"), "{name}");
    }
}

#[test]
fn every_corpus_file_is_handled() {
    let mut n_valid = 0;
    let mut n_bad = 0;
    let mut total = 0;
    for entry in std::fs::read_dir(corpus_dir()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(&path).unwrap();
        total += bytes.len();
        let result = std::panic::catch_unwind(|| read_expert_bytes(&bytes));
        let result = result.unwrap_or_else(|_| panic!("{name}: reader panicked"));
        if name.starts_with("valid-") {
            result.unwrap_or_else(|e| panic!("{name}: {e}"));
            n_valid += 1;
        } else if name.starts_with("bad-") {
            assert!(result.is_err(), "{name} was accepted");
            n_bad += 1;
        }
        // Other names: inputs the fuzzer found interesting; no panic is all
        // that is asked of them.
    }
    assert!(
        n_valid >= 4 && n_bad >= 10,
        "corpus incomplete: {n_valid} valid, {n_bad} bad"
    );
    assert!(total < 200_000, "corpus is {total} bytes");
}
