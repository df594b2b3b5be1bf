//! Expert file round trips, sharding, base identity and `check_base`.

mod container_support;

use std::collections::BTreeMap;

use container_support::*;
use half::f16;
use meswitch_reference::container::{
    read_expert, read_expert_bytes, BaseIdentity, ExpertTensor, ExpertWriter, FormatError,
    FORMAT_VERSION,
};
use meswitch_reference::Bits;
use proptest::prelude::*;
use rand::{rngs::StdRng, SeedableRng};
use safetensors::{Dtype, SafeTensors};
use serde_json::json;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// write -> read is the identity, through a file and through memory, and
    /// a plain safetensors reader sees the stored arrays.
    #[test]
    fn write_read_identity(seed in any::<u64>(), n_delta in 0usize..4, n_dense in 0usize..3, max_dim in 1usize..300) {
        let tensors = random_expert(seed, n_delta, n_dense, max_dim);
        let scratch = Scratch::new("identity");
        let path = scratch.path("expert.safetensors");
        let files = write_expert(&path, header("math"), &tensors, None).unwrap();
        prop_assert_eq!(files, vec![path.clone()]);
        prop_assert_eq!(scratch.files(), vec!["expert.safetensors".to_string()]);

        let read = read_expert(&path).unwrap();
        prop_assert_eq!(read.format_version, FORMAT_VERSION);
        prop_assert_eq!(&read.header, &header("math"));
        prop_assert_eq!(&read.tensors, &tensors);

        let bytes = std::fs::read(&path).unwrap();
        prop_assert_eq!(&read_expert_bytes(&bytes).unwrap(), &read);

        let plain = SafeTensors::deserialize(&bytes).unwrap();
        let stored = tensors.values().map(|t| match t { ExpertTensor::Delta(_) => 5, _ => 1 }).sum::<usize>();
        prop_assert_eq!(plain.len(), stored);
    }

    /// Sharded output reads back identically, through the index or the
    /// plain path, and every shard is a valid expert file by itself.
    #[test]
    fn sharded_round_trip(seed in any::<u64>(), max_shard in 64u64..4096) {
        let tensors = random_expert(seed, 4, 3, 60);
        let scratch = Scratch::new("sharded");
        let path = scratch.path("expert.safetensors");
        let files = write_expert(&path, header("code"), &tensors, Some(max_shard)).unwrap();
        let n_files = files.len();
        if n_files == 1 {
            prop_assert_eq!(&files[0], &path);
        } else {
            let n = n_files - 1;
            for (i, f) in files[..n].iter().enumerate() {
                let expected = format!("expert-{:05}-of-{n:05}.safetensors", i + 1);
                prop_assert_eq!(f.file_name().unwrap().to_str().unwrap(), expected.as_str());
                let shard = read_expert_bytes(&std::fs::read(f).unwrap()).unwrap();
                prop_assert_eq!(&shard.header, &header("code"));
            }
            prop_assert_eq!(&files[n], &scratch.path("expert.safetensors.index.json"));
            prop_assert_eq!(read_expert(&files[n]).unwrap().tensors, tensors.clone());
        }
        // No temporary files left behind.
        prop_assert_eq!(scratch.files().len(), n_files);
        prop_assert_eq!(read_expert(&path).unwrap().tensors, tensors);
    }
}

/// Every group size including one group per row, every width, k = 0 and
/// k = in, odd sizes: each combination reads back bit-exactly.
#[test]
fn every_setting_round_trips() {
    let mut rng = StdRng::seed_from_u64(7);
    let mut tensors = BTreeMap::new();
    for bits in Bits::ALL {
        for inp in [1usize, 31, 33, 130] {
            for group in [32, 64, 128, inp] {
                for k in [0, 1, inp] {
                    let d = random_delta(&mut rng, 3, inp, bits, group, k);
                    let name = format!("b{}.in{inp}.g{group}.k{k}.weight", bits.count());
                    tensors.insert(name, ExpertTensor::Delta(d));
                }
            }
        }
    }
    let bytes = expert_bytes(header("all"), &tensors);
    assert_eq!(read_expert_bytes(&bytes).unwrap().tensors, tensors);
}

/// More than 65536 input channels: salient indices are stored as U32.
#[test]
fn wide_matrices_store_u32_indices() {
    let mut rng = StdRng::seed_from_u64(8);
    let inp = 65_537;
    let mut tensors = BTreeMap::new();
    tensors.insert(
        "wide.weight".to_string(),
        ExpertTensor::Delta(random_delta(&mut rng, 1, inp, Bits::Four, 128, 3)),
    );
    tensors.insert(
        "narrow.weight".to_string(),
        ExpertTensor::Delta(random_delta(&mut rng, 1, 65_536, Bits::One, 64, 3)),
    );
    let bytes = expert_bytes(header("wide"), &tensors);
    let plain = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(
        plain.tensor("wide.weight.salient_index").unwrap().dtype(),
        Dtype::U32
    );
    assert_eq!(
        plain.tensor("narrow.weight.salient_index").unwrap().dtype(),
        Dtype::U16
    );
    let read = read_expert_bytes(&bytes).unwrap();
    assert_eq!(read.tensors, tensors);
    let ExpertTensor::Delta(d) = &read.tensors["wide.weight"] else {
        panic!("kind changed")
    };
    assert!(d.salient_index().iter().all(|&i| (i as usize) < inp));
}

/// U32 arrays are 4-byte aligned in the file, so they can be mapped in place.
#[test]
fn u32_arrays_are_aligned() {
    let tensors = random_expert(11, 6, 4, 77);
    let bytes = expert_bytes(header("aligned"), &tensors);
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!((8 + n) % 8, 0);
    let plain = SafeTensors::deserialize(&bytes).unwrap();
    let base = bytes.as_ptr() as usize;
    let mut checked = 0;
    for (name, view) in plain.tensors() {
        if view.dtype() == Dtype::U32 && !view.data().is_empty() {
            assert_eq!((view.data().as_ptr() as usize - base) % 4, 0, "{name}");
            checked += 1;
        }
    }
    assert!(checked >= 6);
}

#[test]
fn identity_ignores_order_and_irrelevant_keys_but_not_architecture() {
    let config = json!({"hidden_size": 64, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
        "architectures": ["MistralForCausalLM"], "torch_dtype": "bfloat16"});
    let tensors = vec![("b".to_string(), vec![4, 64]), ("a".to_string(), vec![64])];
    let id = BaseIdentity::compute(&config, &tensors);
    assert!(BaseIdentity::is_well_formed(&id.digest));

    // Reordered tensors, config keys in another order, an irrelevant key
    // changed, integral float written as an integer, eps as GGUF's f32.
    let same = json!({"architectures": ["MistralForCausalLM"], "rms_norm_eps": f64::from(1e-5f32),
        "rope_theta": 10000, "hidden_size": 64, "torch_dtype": "float16"});
    let reversed: Vec<_> = tensors.iter().rev().cloned().collect();
    assert_eq!(BaseIdentity::compute(&same, &reversed), id);

    let changed = [
        json!({"hidden_size": 65, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "architectures": ["MistralForCausalLM"]}),
        json!({"hidden_size": 64, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "architectures": ["MistralForCausalLM"]}),
        json!({"hidden_size": 64, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "architectures": ["LlamaForCausalLM"]}),
        json!({"hidden_size": 64, "rope_theta": 10000.0, "rms_norm_eps": 1e-5}),
    ];
    for c in changed {
        assert_ne!(BaseIdentity::compute(&c, &tensors), id, "{c}");
    }
    let reshaped = vec![("b".to_string(), vec![64, 4]), ("a".to_string(), vec![64])];
    assert_ne!(BaseIdentity::compute(&config, &reshaped), id);
    let renamed = vec![("c".to_string(), vec![4, 64]), ("a".to_string(), vec![64])];
    assert_ne!(BaseIdentity::compute(&config, &renamed), id);
}

#[test]
fn check_base_accepts_the_base_and_names_what_differs() {
    let mut rng = StdRng::seed_from_u64(3);
    let mut tensors = BTreeMap::new();
    tensors.insert(
        "q.weight".to_string(),
        ExpertTensor::Delta(random_delta(&mut rng, 8, 64, Bits::Two, 32, 2)),
    );
    tensors.insert("norm.weight".to_string(), random_dense(&mut rng, vec![64]));
    let expert = read_expert_bytes(&expert_bytes(header("e"), &tensors)).unwrap();
    let base_id = header("e").base;
    let shapes: BTreeMap<String, Vec<usize>> = [
        ("q.weight", vec![8, 64]),
        ("norm.weight", vec![64]),
        ("k.weight", vec![8, 64]),
    ]
    .into_iter()
    .map(|(n, s)| (n.to_string(), s))
    .collect();
    expert.check_base(&base_id, &shapes).unwrap();

    let other = BaseIdentity::compute(&json!({"hidden_size": 65}), &[]);
    assert!(matches!(
        expert.check_base(&other, &shapes),
        Err(FormatError::BaseMismatch { .. })
    ));

    let mut wrong = shapes.clone();
    wrong.insert("q.weight".into(), vec![64, 8]);
    let err = expert.check_base(&base_id, &wrong).unwrap_err();
    assert!(
        matches!(&err, FormatError::BaseShape { tensor, .. } if tensor == "q.weight"),
        "{err}"
    );

    let mut missing = shapes.clone();
    missing.remove("norm.weight");
    let err = expert.check_base(&base_id, &missing).unwrap_err();
    assert!(
        matches!(&err, FormatError::NotInBase { tensor } if tensor == "norm.weight"),
        "{err}"
    );
}

#[test]
fn writer_rejects_bad_tensors_and_leaves_no_temporaries() {
    let mut rng = StdRng::seed_from_u64(5);
    let scratch = Scratch::new("reject");
    let path = scratch.path("e.safetensors");
    let delta = ExpertTensor::Delta(random_delta(&mut rng, 2, 40, Bits::Four, 32, 1));
    {
        let mut w = ExpertWriter::create(&path, header("e"), None).unwrap();
        w.add("a", &delta).unwrap();
        let write_err = |r: Result<(), FormatError>| matches!(r, Err(FormatError::Write { .. }));
        assert!(write_err(w.add("a", &delta)), "duplicate name");
        let clash = ExpertTensor::Dense {
            shape: vec![1],
            values: vec![f16::ONE],
        };
        assert!(write_err(w.add("a.codes", &clash)), "stored-name clash");
        assert!(write_err(w.add("", &clash)), "empty name");
        assert!(write_err(w.add("__metadata__", &clash)), "reserved name");
        let short = ExpertTensor::Dense {
            shape: vec![2, 3],
            values: vec![f16::ONE; 5],
        };
        assert!(write_err(w.add("short", &short)), "shape/length mismatch");
        let nan = ExpertTensor::Dense {
            shape: vec![1],
            values: vec![f16::NAN],
        };
        assert!(write_err(w.add("nan", &nan)), "non-finite");
        let empty = ExpertTensor::Dense {
            shape: vec![0],
            values: vec![],
        };
        assert!(write_err(w.add("empty", &empty)), "zero dimension");
        assert!(!scratch.files().is_empty(), "spools exist while writing");
        // Dropped unfinished.
    }
    assert!(
        scratch.files().is_empty(),
        "left behind: {:?}",
        scratch.files()
    );

    let mut bad = header("e");
    bad.base.digest = "xyz".into();
    assert!(ExpertWriter::create(&path, bad, None).is_err());
}

/// An expert with no tensors (identical to its base) is still a valid file.
#[test]
fn empty_expert_round_trips() {
    let bytes = expert_bytes(header("nothing"), &BTreeMap::new());
    let read = read_expert_bytes(&bytes).unwrap();
    assert!(read.tensors.is_empty());
    assert_eq!(read.header, header("nothing"));
}

/// An I/O failure part-way leaves the writer refusing to produce a file.
#[test]
fn writer_io_errors_poison_the_writer() {
    let mut rng = StdRng::seed_from_u64(6);
    let delta = ExpertTensor::Delta(random_delta(&mut rng, 2, 40, Bits::Four, 32, 1));
    let missing = std::env::temp_dir().join("meswitch-no-such-dir/sub/e.safetensors");
    assert!(matches!(
        ExpertWriter::create(&missing, header("e"), None),
        Err(FormatError::Io { .. })
    ));

    let scratch = Scratch::new("poison");
    let mut w = ExpertWriter::create(&scratch.path("e.safetensors"), header("e"), Some(1)).unwrap();
    w.add("a", &delta).unwrap();
    std::fs::remove_dir_all(&scratch.0).unwrap();
    // The shard is full: closing it needs the vanished folder.
    assert!(matches!(w.add("b", &delta), Err(FormatError::Io { .. })));
    assert!(matches!(
        w.add("c", &delta),
        Err(FormatError::Writer { .. })
    ));
    assert!(w.finish().is_err());
    assert!(!scratch.0.exists(), "temporaries recreated");
}

/// Write and read speed of a Mistral-7B-shaped INT2 expert layer set
/// (CPU, this machine). Run explicitly:
/// `cargo test --release -p meswitch-reference --test container_roundtrip -- --ignored --nocapture`.
#[test]
#[ignore]
fn throughput_mistral_shapes() {
    let mut rng = StdRng::seed_from_u64(9);
    let shapes = [
        (4096, 4096),
        (1024, 4096),
        (1024, 4096),
        (4096, 4096),
        (14336, 4096),
        (14336, 4096),
        (4096, 14336),
    ];
    let mut tensors = BTreeMap::new();
    for (i, &(out, inp)) in shapes.iter().enumerate() {
        let k = inp / 100;
        tensors.insert(
            format!("t{i}.weight"),
            ExpertTensor::Delta(random_delta(&mut rng, out, inp, Bits::Two, 128, k)),
        );
    }
    let scratch = Scratch::new("throughput");
    let path = scratch.path("layer.safetensors");
    let t = std::time::Instant::now();
    write_expert(&path, header("speed"), &tensors, None).unwrap();
    let write_s = t.elapsed().as_secs_f64();
    let mb = std::fs::metadata(&path).unwrap().len() as f64 / 1e6;
    let t = std::time::Instant::now();
    let read = read_expert(&path).unwrap();
    let read_s = t.elapsed().as_secs_f64();
    assert_eq!(read.tensors.len(), shapes.len());
    println!("one Mistral-7B layer, INT2 g128 1% salient: {mb:.1} MB file; write {write_s:.3} s ({:.0} MB/s), read+verify {read_s:.3} s ({:.0} MB/s)", mb / write_s, mb / read_s);
}
