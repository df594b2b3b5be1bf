//! Shared helpers of the container tests: random experts, scratch folders,
//! and a tool that takes a valid file apart and puts it back together after
//! an edit, optionally re-signing the checksums so the edit reaches the
//! structural checks behind them.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use half::f16;
use meswitch_reference::container::{
    BaseIdentity, ExpertHeader, ExpertTensor, ExpertWriter, FormatError,
};
use meswitch_reference::layout::{pack_row, words_per_row, GROUP_SIZES};
use meswitch_reference::{Bits, DeltaLayout, PackedDelta};
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// A scratch folder removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "meswitch-container-{tag}-{}-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    pub fn files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn header(name: &str) -> ExpertHeader {
    let config = json!({"architectures": ["MistralForCausalLM"], "hidden_size": 64});
    ExpertHeader {
        base: BaseIdentity::compute(&config, &[("w".into(), vec![8, 64])]),
        expert_name: name.to_owned(),
        settings: json!({"bits": 2, "group_size": 128, "salient": "1%", "eps": 1e-5}),
    }
}

/// A random valid packed delta: random codes (padding zero), non-negative
/// scales, signed offsets, `k` sorted unique salient indices, nonzero values.
pub fn random_delta(
    rng: &mut StdRng,
    out: usize,
    inp: usize,
    bits: Bits,
    group: usize,
    k: usize,
) -> PackedDelta {
    let layout = DeltaLayout::new(out, inp, bits, group, k).unwrap();
    let wpr = words_per_row(inp, bits);
    let mut codes = vec![0u32; out * wpr];
    for row in codes.chunks_mut(wpr) {
        let row_codes: Vec<u8> = (0..inp)
            .map(|_| rng.random_range(0..=bits.max_code()) as u8)
            .collect();
        pack_row(&row_codes, bits, row);
    }
    let n = layout.group_params();
    let scales = (0..n)
        .map(|_| f16::from_f32(rng.random_range(0.0..0.01)))
        .collect();
    let offsets = (0..n)
        .map(|_| f16::from_f32(rng.random_range(-0.02..0.02)))
        .collect();
    let mut index: Vec<u32> = sample(rng, inp, k).into_iter().map(|i| i as u32).collect();
    index.sort_unstable();
    let values = (0..out * k)
        .map(|_| f16::from_f32(rng.random_range(-0.5..0.5) + 0.001))
        .collect();
    PackedDelta::new(layout, codes, scales, offsets, index, values).unwrap()
}

pub fn random_dense(rng: &mut StdRng, shape: Vec<usize>) -> ExpertTensor {
    let n = shape.iter().product();
    let values = (0..n)
        .map(|_| f16::from_f32(rng.random_range(-1.0..1.0)))
        .collect();
    ExpertTensor::Dense { shape, values }
}

/// A small random expert: `n_delta` deltas of mixed settings and `n_dense`
/// dense tensors, named like Hugging Face Mistral tensors.
pub fn random_expert(
    seed: u64,
    n_delta: usize,
    n_dense: usize,
    max_dim: usize,
) -> BTreeMap<String, ExpertTensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tensors = BTreeMap::new();
    for i in 0..n_delta {
        let out = rng.random_range(1..=max_dim);
        let inp = rng.random_range(1..=max_dim);
        let bits = Bits::ALL[rng.random_range(0..3)];
        let group = match rng.random_range(0..4) {
            3 => inp,
            g => GROUP_SIZES[g],
        };
        let k = match rng.random_range(0..3) {
            0 => 0,
            1 => inp,
            _ => rng.random_range(0..=inp),
        };
        let delta = random_delta(&mut rng, out, inp, bits, group, k);
        tensors.insert(
            format!("model.layers.{i}.self_attn.q_proj.weight"),
            ExpertTensor::Delta(delta),
        );
    }
    for i in 0..n_dense {
        let shape = if rng.random_bool(0.5) {
            vec![rng.random_range(1..=max_dim)]
        } else {
            vec![rng.random_range(1..=max_dim), rng.random_range(1..=max_dim)]
        };
        tensors.insert(
            format!("model.layers.{i}.input_layernorm.weight"),
            random_dense(&mut rng, shape),
        );
    }
    tensors
}

pub fn write_expert(
    path: &Path,
    header: ExpertHeader,
    tensors: &BTreeMap<String, ExpertTensor>,
    max_shard_bytes: Option<u64>,
) -> Result<Vec<PathBuf>, FormatError> {
    let mut writer = ExpertWriter::create(path, header, max_shard_bytes)?;
    for (name, tensor) in tensors {
        writer.add(name, tensor)?;
    }
    writer.finish()
}

/// Writes an expert to a scratch file and returns its bytes.
pub fn expert_bytes(header: ExpertHeader, tensors: &BTreeMap<String, ExpertTensor>) -> Vec<u8> {
    let scratch = Scratch::new("bytes");
    let path = scratch.path("e.safetensors");
    write_expert(&path, header, tensors, None).unwrap();
    std::fs::read(&path).unwrap()
}

/// A safetensors file taken apart: its header JSON and each tensor's bytes.
#[derive(Clone, Debug)]
pub struct Parts {
    pub header: serde_json::Map<String, Value>,
    pub data: BTreeMap<String, Vec<u8>>,
}

impl Parts {
    pub fn split(bytes: &[u8]) -> Parts {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Map<String, Value> =
            serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        let body = &bytes[8 + n..];
        let mut data = BTreeMap::new();
        for (name, info) in &header {
            if name == "__metadata__" {
                continue;
            }
            let offsets = &info["data_offsets"];
            let (s, e) = (
                offsets[0].as_u64().unwrap() as usize,
                offsets[1].as_u64().unwrap() as usize,
            );
            data.insert(name.clone(), body[s..e].to_vec());
        }
        Parts { header, data }
    }

    /// `__metadata__[key]`, parsed when it holds JSON.
    pub fn meta(&self, key: &str) -> String {
        self.header["__metadata__"][key]
            .as_str()
            .unwrap()
            .to_owned()
    }

    pub fn set_meta(&mut self, key: &str, value: String) {
        self.header.get_mut("__metadata__").unwrap()[key] = Value::String(value);
    }

    /// Edits one entry of the `tensors` metadata JSON.
    pub fn edit_tensor_meta(&mut self, name: &str, edit: impl FnOnce(&mut Value)) {
        let mut tensors: Value = serde_json::from_str(&self.meta("tensors")).unwrap();
        edit(&mut tensors[name]);
        self.set_meta("tensors", tensors.to_string());
    }

    /// Recomputes every data checksum and the metadata checksum, so that an
    /// edit is judged by the structural checks, not caught as corruption.
    pub fn resign(&mut self) {
        let mut checksums = serde_json::Map::new();
        for (name, bytes) in &self.data {
            checksums.insert(
                name.clone(),
                json!(format!("{:08x}", crc32c::crc32c(bytes))),
            );
        }
        self.set_meta("checksums", Value::Object(checksums).to_string());
        self.resign_metadata();
    }

    pub fn resign_metadata(&mut self) {
        let mut crc = 0u32;
        let meta: BTreeMap<String, String> = self.header["__metadata__"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.as_str() != "metadata_checksum")
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
            .collect();
        for (k, v) in meta {
            for part in [k.as_bytes(), &[0], v.as_bytes(), &[0]] {
                crc = crc32c::crc32c_append(crc, part);
            }
        }
        self.set_meta("metadata_checksum", format!("{crc:08x}"));
    }

    /// Sets a stored tensor's dtype, shape and bytes.
    pub fn set_tensor(&mut self, name: &str, dtype: &str, shape: Vec<usize>, bytes: Vec<u8>) {
        self.header.insert(
            name.to_owned(),
            json!({"dtype": dtype, "shape": shape, "data_offsets": [0, 0]}),
        );
        self.data.insert(name.to_owned(), bytes);
    }

    pub fn remove_tensor(&mut self, name: &str) {
        self.header.remove(name);
        self.data.remove(name);
    }

    /// Serializes with fresh contiguous offsets.
    pub fn join(&self) -> Vec<u8> {
        let mut header = self.header.clone();
        let mut body = Vec::new();
        for (name, bytes) in &self.data {
            let s = body.len();
            body.extend_from_slice(bytes);
            header.get_mut(name).unwrap()["data_offsets"] = json!([s, body.len()]);
        }
        let text = Value::Object(header).to_string();
        let mut out = (text.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(&body);
        out
    }
}
