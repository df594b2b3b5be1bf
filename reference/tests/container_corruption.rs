//! Every corruption of a valid expert file is an error naming what is
//! wrong, never a panic and never a silently different expert.

mod container_support;

use std::collections::BTreeMap;

use container_support::*;
use half::f16;
use meswitch_reference::container::{
    read_expert, read_expert_bytes, ExpertFile, ExpertTensor, FormatError,
};
use meswitch_reference::error::DeltaError;
use meswitch_reference::Bits;
use proptest::prelude::*;
use rand::{rngs::StdRng, SeedableRng};
use serde_json::json;

/// A small expert with every kind of stored array: a delta with salient
/// channels, one without, and a dense tensor.
fn small_expert() -> BTreeMap<String, ExpertTensor> {
    let mut rng = StdRng::seed_from_u64(42);
    let mut t = BTreeMap::new();
    t.insert(
        "q.weight".to_string(),
        ExpertTensor::Delta(random_delta(&mut rng, 3, 40, Bits::Two, 32, 2)),
    );
    t.insert(
        "k.weight".to_string(),
        ExpertTensor::Delta(random_delta(&mut rng, 2, 33, Bits::One, 33, 0)),
    );
    t.insert("norm.weight".to_string(), random_dense(&mut rng, vec![5]));
    t
}

fn small_file() -> (Vec<u8>, ExpertFile) {
    let bytes = expert_bytes(header("small"), &small_expert());
    let parsed = read_expert_bytes(&bytes).unwrap();
    (bytes, parsed)
}

/// Length of the 8-byte prefix plus the JSON header.
fn data_start(bytes: &[u8]) -> usize {
    8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
}

#[test]
fn every_truncation_is_an_error() {
    let (bytes, _) = small_file();
    for len in 0..bytes.len() {
        assert!(
            read_expert_bytes(&bytes[..len]).is_err(),
            "prefix of {len} bytes parsed"
        );
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(
        read_expert_bytes(&longer).is_err(),
        "trailing byte accepted"
    );
}

/// Every single-bit flip anywhere: an error, or (only for a flip that
/// turns header padding into other JSON whitespace) the same expert. A flip
/// in the data is a checksum error naming the tensor that holds the byte.
#[test]
fn every_bit_flip_is_caught() {
    let (bytes, parsed) = small_file();
    let start = data_start(&bytes);
    let parts = Parts::split(&bytes);
    let mut tensors_by_offset: Vec<(usize, usize, String)> = parts
        .header
        .iter()
        .filter(|(n, _)| n.as_str() != "__metadata__")
        .map(|(n, info)| {
            let o = &info["data_offsets"];
            (
                o[0].as_u64().unwrap() as usize + start,
                o[1].as_u64().unwrap() as usize + start,
                n.clone(),
            )
        })
        .collect();
    tensors_by_offset.sort();
    let mut accepted = 0;
    for at in 0..bytes.len() {
        for bit in 0..8 {
            let mut bad = bytes.clone();
            bad[at] ^= 1 << bit;
            match read_expert_bytes(&bad) {
                Ok(same) => {
                    assert!(
                        at < start && b" \t\r\n".contains(&bad[at]),
                        "flip at {at} bit {bit} accepted"
                    );
                    assert_eq!(same, parsed);
                    accepted += 1;
                }
                Err(FormatError::Checksum { tensor, .. }) if at >= start => {
                    let (_, _, owner) = tensors_by_offset
                        .iter()
                        .find(|(s, e, _)| (*s..*e).contains(&at))
                        .unwrap();
                    assert_eq!(&tensor, owner);
                }
                Err(e) if at >= start => panic!("data flip at {at} gave {e}, not a checksum error"),
                Err(_) => {}
            }
        }
    }
    // Padding spaces can become tabs etc.; only those.
    assert!(accepted < 8 * 8);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random multi-byte damage anywhere never panics and never yields a
    /// different expert.
    #[test]
    fn random_damage_never_panics(edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)) {
        let (bytes, parsed) = small_file();
        let mut bad = bytes.clone();
        for (at, value) in &edits {
            let i = at.index(bad.len());
            bad[i] = *value;
        }
        if let Ok(read) = read_expert_bytes(&bad) {
            prop_assert_eq!(read, parsed);
        }
    }

    /// Arbitrary bytes with a plausible length prefix never panic.
    #[test]
    fn garbage_never_panics(len in 0u64..2000, body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut bytes = len.to_le_bytes().to_vec();
        bytes.extend_from_slice(&body);
        prop_assert!(read_expert_bytes(&bytes).is_err());
    }
}

/// Rebuilds the small file after `edit`, re-signing the checksums so the
/// edit reaches the structural checks, and returns the reader's error.
fn resigned_error(edit: impl FnOnce(&mut Parts)) -> FormatError {
    let (bytes, _) = small_file();
    let mut parts = Parts::split(&bytes);
    edit(&mut parts);
    parts.resign();
    read_expert_bytes(&parts.join()).expect_err("edited file was accepted")
}

fn assert_names(err: &FormatError, what: &str) {
    assert!(
        err.to_string().contains(what),
        "error does not name {what:?}: {err}"
    );
}

#[test]
fn resplit_and_resign_round_trips() {
    // The tool the following tests use must not itself break files.
    let (bytes, parsed) = small_file();
    let mut parts = Parts::split(&bytes);
    parts.resign();
    assert_eq!(read_expert_bytes(&parts.join()).unwrap(), parsed);
}

#[test]
fn grown_or_shrunk_stored_shapes_are_shape_errors() {
    let err = resigned_error(|p| {
        let mut codes = p.data["q.weight.codes"].clone();
        codes.extend_from_slice(&[0; 12]);
        p.set_tensor("q.weight.codes", "U32", vec![4, 3], codes);
    });
    assert!(
        matches!(&err, FormatError::Shape { tensor, .. } if tensor == "q.weight.codes"),
        "{err}"
    );

    let err = resigned_error(|p| {
        let idx = p.data["q.weight.salient_index"][..2].to_vec();
        p.set_tensor("q.weight.salient_index", "U16", vec![1], idx);
    });
    assert!(
        matches!(&err, FormatError::Shape { tensor, .. } if tensor == "q.weight.salient_index"),
        "{err}"
    );

    let err = resigned_error(|p| {
        let v = p.data["norm.weight"][..8].to_vec();
        p.set_tensor("norm.weight", "F16", vec![4], v);
    });
    assert!(
        matches!(&err, FormatError::Shape { tensor, .. } if tensor == "norm.weight"),
        "{err}"
    );
}

#[test]
fn grown_or_shrunk_metadata_shapes_are_errors() {
    // (A change that keeps every stored shape, e.g. in 40 -> 41 with the
    // padding bits zero, is a consistent file for another shape; only
    // `check_base` can tell, see container_roundtrip.)
    for shape in [
        json!([3, 49]),
        json!([4, 40]),
        json!([3, 32]),
        json!([2, 40]),
    ] {
        let err =
            resigned_error(|p| p.edit_tensor_meta("q.weight", |t| t["shape"] = shape.clone()));
        assert!(matches!(err, FormatError::Shape { .. }), "{shape}: {err}");
        assert_names(&err, "q.weight.");
    }
    // A huge declared shape must fail on the shape check, before any
    // allocation sized from it.
    let err = resigned_error(|p| {
        p.edit_tensor_meta("q.weight", |t| t["shape"] = json!([1 << 24, 1 << 24]))
    });
    assert!(matches!(err, FormatError::Shape { .. }), "{err}");
    let err = resigned_error(|p| {
        p.edit_tensor_meta("norm.weight", |t| t["shape"] = json!([1 << 24, 1 << 24]))
    });
    assert!(matches!(err, FormatError::Shape { .. }), "{err}");
    let err =
        resigned_error(|p| p.edit_tensor_meta("q.weight", |t| t["shape"] = json!([1 << 25, 1])));
    assert!(matches!(err, FormatError::Metadata { .. }), "{err}");
    let err = resigned_error(|p| p.edit_tensor_meta("norm.weight", |t| t["shape"] = json!([0])));
    assert!(matches!(err, FormatError::Metadata { .. }), "{err}");
}

#[test]
fn wrong_dtypes_are_dtype_errors() {
    for (name, dtype) in [
        ("q.weight.codes", "I32"),
        ("q.weight.scales", "BF16"),
        ("q.weight.salient_index", "I16"),
        ("norm.weight", "U16"),
    ] {
        let err = resigned_error(|p| {
            let bytes = p.data[name].clone();
            let shape = p.header[name]["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            p.set_tensor(name, dtype, shape, bytes);
        });
        assert!(
            matches!(&err, FormatError::Dtype { tensor, .. } if tensor == name),
            "{name}: {err}"
        );
    }
    // salient_index as U32 where the layout calls for U16.
    let err = resigned_error(|p| {
        let idx: Vec<u8> = p.data["q.weight.salient_index"]
            .chunks(2)
            .flat_map(|c| [c[0], c[1], 0, 0])
            .collect();
        p.set_tensor("q.weight.salient_index", "U32", vec![2], idx);
    });
    assert!(matches!(err, FormatError::Dtype { .. }), "{err}");
}

#[test]
fn bad_layout_settings_in_metadata() {
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("bits", json!(3), "bit width"),
        ("bits", json!(-1), "bits"),
        ("bits", json!(1u64 << 40), "bits"),
        ("group_size", json!(48), "group size"),
        ("group_size", json!(0), "group size"),
        ("salient", json!(41), "salient"),
        ("salient", json!("2"), "salient"),
        ("kind", json!("sparse"), "unknown kind"),
        ("extra", json!(1), "unexpected key"),
    ];
    for (key, value, what) in cases {
        let err = resigned_error(|p| p.edit_tensor_meta("q.weight", |t| t[key] = value.clone()));
        assert_names(&err, what);
        assert_names(&err, "q.weight");
    }
    let err = resigned_error(|p| {
        p.edit_tensor_meta("q.weight", |t| {
            t.as_object_mut().unwrap().remove("bits");
        })
    });
    assert_names(&err, "missing `bits`");
    let err = resigned_error(|p| p.edit_tensor_meta("q.weight", |t| *t = json!([1, 2])));
    assert_names(&err, "not a JSON object");
}

#[test]
fn metadata_and_file_must_list_the_same_tensors() {
    let err = resigned_error(|p| p.remove_tensor("q.weight.offsets"));
    assert!(
        matches!(&err, FormatError::MissingTensor { tensor, .. } if tensor == "q.weight.offsets"),
        "{err}"
    );

    let err = resigned_error(|p| p.set_tensor("stowaway", "F16", vec![1], vec![0, 0]));
    assert!(
        matches!(&err, FormatError::UnexpectedTensor { tensor, .. } if tensor == "stowaway"),
        "{err}"
    );

    let err = resigned_error(|p| {
        let mut t: serde_json::Value = serde_json::from_str(&p.meta("tensors")).unwrap();
        t.as_object_mut().unwrap().remove("norm.weight");
        p.set_meta("tensors", t.to_string());
    });
    assert!(
        matches!(&err, FormatError::UnexpectedTensor { tensor, .. } if tensor == "norm.weight"),
        "{err}"
    );

    // Dense `q.weight.codes` would collide with delta `q.weight`'s codes.
    let err = resigned_error(|p| {
        p.edit_tensor_meta("q.weight.codes", |t| {
            *t = json!({"kind": "dense", "shape": [3, 2]})
        })
    });
    assert_names(&err, "claimed by both");
}

#[test]
fn bad_metadata_values() {
    let cases: Vec<(&str, Option<&str>, &str)> = vec![
        ("format", Some("pt"), "format"),
        ("format_version", Some("2"), "version \"2\""),
        ("base_identity", Some("abc"), "base_identity"),
        ("expert_name", Some(""), "expert_name"),
        ("settings", Some("{bits: 2"), "settings"),
        ("tensors", Some("[]"), "tensors"),
        ("tensors", Some("{"), "tensors"),
        ("checksums", Some("{\"x\": 1}"), "checksums"),
        ("surprise", Some("1"), "unknown key"),
        ("tensors", None, "tensors"),
        ("checksums", None, "checksums"),
        ("settings", None, "settings"),
    ];
    for (key, value, what) in cases {
        let (bytes, _) = small_file();
        let mut p = Parts::split(&bytes);
        match value {
            Some(v) => p.set_meta(key, v.to_string()),
            None => {
                p.header
                    .get_mut("__metadata__")
                    .unwrap()
                    .as_object_mut()
                    .unwrap()
                    .remove(key);
            }
        }
        p.resign_metadata();
        let err = read_expert_bytes(&p.join()).expect_err(key);
        assert_names(&err, what);
    }
    let err = resigned_error(|p| {
        p.header.remove("__metadata__");
        p.header.insert("__metadata__".into(), json!({}));
    });
    assert!(matches!(err, FormatError::Metadata { .. }), "{err}");
}

#[test]
fn metadata_edits_without_resigning_are_checksum_errors() {
    let (bytes, _) = small_file();
    let mut p = Parts::split(&bytes);
    p.set_meta("settings", json!({"bits": 4}).to_string());
    let err = read_expert_bytes(&p.join()).unwrap_err();
    assert!(
        matches!(&err, FormatError::Checksum { tensor, .. } if tensor == "__metadata__"),
        "{err}"
    );

    let mut p = Parts::split(&bytes);
    p.set_meta("checksums", {
        let mut c: serde_json::Value = serde_json::from_str(&p.meta("checksums")).unwrap();
        c["norm.weight"] = json!("00000000");
        c.to_string()
    });
    p.resign_metadata();
    let err = read_expert_bytes(&p.join()).unwrap_err();
    assert!(
        matches!(&err, FormatError::Checksum { tensor, .. } if tensor == "norm.weight"),
        "{err}"
    );
}

/// Values that pass every size check but break the layout's invariants,
/// with valid checksums: caught by `PackedDelta::new` and the value checks.
#[test]
fn layout_invariants_are_checked_after_decoding() {
    let set_u32 = |p: &mut Parts, name: &str, i: usize, v: u32| {
        let mut d = p.data[name].clone();
        d[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
        p.data.insert(name.into(), d);
    };
    let set_u16 = |p: &mut Parts, name: &str, i: usize, v: u16| {
        let mut d = p.data[name].clone();
        d[2 * i..2 * i + 2].copy_from_slice(&v.to_le_bytes());
        p.data.insert(name.into(), d);
    };
    // q: 40 columns at 2 bits = 3 words per row; the third holds columns
    // 32..39, so its top 16 bits are padding.
    let err = resigned_error(|p| set_u32(p, "q.weight.codes", 2, 1 << 31));
    assert!(
        matches!(
            err,
            FormatError::Delta {
                source: DeltaError::Padding { row: 0 },
                ..
            }
        ),
        "{err}"
    );
    let err = resigned_error(|p| set_u16(p, "q.weight.salient_index", 0, 40));
    assert!(
        matches!(
            err,
            FormatError::Delta {
                source: DeltaError::SalientIndex { .. },
                ..
            }
        ),
        "{err}"
    );
    let err = resigned_error(|p| {
        let i1 = u16::from_le_bytes(p.data["q.weight.salient_index"][2..4].try_into().unwrap());
        set_u16(p, "q.weight.salient_index", 0, i1);
    });
    assert!(
        matches!(
            err,
            FormatError::Delta {
                source: DeltaError::SalientIndex { .. },
                ..
            }
        ),
        "{err}"
    );
    for bad in [f16::NAN, f16::INFINITY, f16::from_f32(-0.5)] {
        let err = resigned_error(|p| set_u16(p, "q.weight.scales", 1, bad.to_bits()));
        assert!(
            matches!(
                err,
                FormatError::Delta {
                    source: DeltaError::GroupParam { .. },
                    ..
                }
            ),
            "{err}"
        );
    }
    let err = resigned_error(|p| set_u16(p, "q.weight.offsets", 0, f16::NEG_INFINITY.to_bits()));
    assert!(
        matches!(
            err,
            FormatError::Delta {
                source: DeltaError::GroupParam { .. },
                ..
            }
        ),
        "{err}"
    );
    let err = resigned_error(|p| set_u16(p, "q.weight.salient_values", 3, f16::NAN.to_bits()));
    assert!(
        matches!(&err, FormatError::Values { tensor, .. } if tensor == "q.weight"),
        "{err}"
    );
    let err = resigned_error(|p| set_u16(p, "norm.weight", 4, f16::INFINITY.to_bits()));
    assert!(
        matches!(&err, FormatError::Values { tensor, .. } if tensor == "norm.weight"),
        "{err}"
    );
}

#[test]
fn hostile_headers() {
    // Header length far beyond the file.
    let mut bytes = (1u64 << 40).to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    assert!(matches!(
        read_expert_bytes(&bytes),
        Err(FormatError::Safetensors { .. })
    ));
    // A tensor claiming a huge shape with no data behind it.
    let header = r#"{"x":{"dtype":"F16","shape":[4294967296,4294967296],"data_offsets":[0,0]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    assert!(read_expert_bytes(&bytes).is_err());
    // Valid safetensors without our metadata.
    let header = r#"{"x":{"dtype":"F16","shape":[1],"data_offsets":[0,2]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&[0, 0]);
    let err = read_expert_bytes(&bytes).unwrap_err();
    assert_names(&err, "__metadata__");
}

/// An edit of a shard index's JSON.
type IndexEdit = Box<dyn Fn(&mut serde_json::Value)>;

/// Shards + index: a damaged index or a shard that disagrees with it is an
/// error naming the index.
#[test]
fn damaged_shard_indexes() {
    let tensors = small_expert();
    let edits: Vec<(&str, IndexEdit)> = vec![
        (
            "escape",
            Box::new(|i| i["weight_map"]["norm.weight"] = json!("../x.safetensors")),
        ),
        (
            "moved",
            Box::new(|i| {
                let other = i["weight_map"]["q.weight.codes"].clone();
                i["weight_map"]["norm.weight"] = other;
            }),
        ),
        (
            "dropped",
            Box::new(|i| {
                i["weight_map"]
                    .as_object_mut()
                    .unwrap()
                    .remove("norm.weight");
            }),
        ),
        (
            "total",
            Box::new(|i| i["metadata"]["total_size"] = json!(1)),
        ),
        (
            "renamed",
            Box::new(|i| i["metadata"]["expert_name"] = json!("other")),
        ),
        (
            "version",
            Box::new(|i| i["metadata"]["format_version"] = json!("9")),
        ),
        (
            "no map",
            Box::new(|i| {
                i.as_object_mut().unwrap().remove("weight_map");
            }),
        ),
        (
            "missing shard",
            Box::new(|i| i["weight_map"]["norm.weight"] = json!("gone.safetensors")),
        ),
    ];
    for (what, edit) in edits {
        let scratch = Scratch::new("index");
        let path = scratch.path("e.safetensors");
        let files = write_expert(&path, header("small"), &tensors, Some(1)).unwrap();
        assert_eq!(files.len(), 4, "one shard per tensor, plus the index");
        let index_path = files.last().unwrap();
        let mut index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(index_path).unwrap()).unwrap();
        edit(&mut index);
        std::fs::write(index_path, index.to_string()).unwrap();
        assert!(
            read_expert(index_path).is_err(),
            "{what}: damaged index accepted"
        );
    }
    // A corrupted shard is reported with the shard's path.
    let scratch = Scratch::new("index");
    let path = scratch.path("e.safetensors");
    let files = write_expert(&path, header("small"), &tensors, Some(1)).unwrap();
    let mut shard = std::fs::read(&files[0]).unwrap();
    let last = shard.len() - 1;
    shard[last] ^= 1;
    std::fs::write(&files[0], shard).unwrap();
    let err = read_expert(&path).unwrap_err();
    assert_names(&err, "e-00001-of-00003.safetensors");
    assert!(matches!(err, FormatError::Checksum { .. }), "{err}");
}
