//! Hand-built GGUF files: a well-formed one round-trips, hostile ones give typed errors.

use super::*;
use half::f16;

/// Minimal GGUF writer for tests: metadata (key, type id, encoded value) and tensors.
struct Builder {
    version: u32,
    kv: Vec<(String, u32, Vec<u8>)>,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
    alignment: u64,
}

fn gstr(s: &str) -> Vec<u8> {
    let mut b = (s.len() as u64).to_le_bytes().to_vec();
    b.extend(s.as_bytes());
    b
}

impl Builder {
    fn new() -> Self {
        Builder {
            version: 3,
            kv: vec![],
            tensors: vec![],
            alignment: DEFAULT_ALIGNMENT,
        }
    }
    fn kv(mut self, k: &str, ty: u32, v: Vec<u8>) -> Self {
        self.kv.push((k.into(), ty, v));
        self
    }
    fn tensor(mut self, name: &str, shape: &[u64], ty: GgmlType, data: Vec<u8>) -> Self {
        self.tensors
            .push((name.into(), shape.to_vec(), ty as u32, data));
        self
    }
    fn build(&self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(self.version.to_le_bytes());
        b.extend((self.tensors.len() as u64).to_le_bytes());
        b.extend((self.kv.len() as u64).to_le_bytes());
        for (k, ty, v) in &self.kv {
            b.extend(gstr(k));
            b.extend(ty.to_le_bytes());
            b.extend(v);
        }
        let mut offset = 0u64;
        let mut offsets = vec![];
        for (name, shape, ty, data) in &self.tensors {
            b.extend(gstr(name));
            b.extend((shape.len() as u32).to_le_bytes());
            for d in shape {
                b.extend(d.to_le_bytes());
            }
            b.extend(ty.to_le_bytes());
            b.extend(offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + data.len() as u64).div_ceil(self.alignment) * self.alignment;
        }
        let start = (b.len() as u64).div_ceil(self.alignment) * self.alignment;
        b.resize(start as usize, 0);
        for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
            b.resize((start + off) as usize, 0);
            b.extend(data);
        }
        b
    }
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn llama_like() -> Builder {
    let (n_head, n_kv, head_dim, d) = (2u32, 1u32, 4usize, 8usize);
    let q: Vec<f32> = (0..d * d).map(|x| x as f32).collect();
    let k: Vec<f32> = (0..d * head_dim).map(|x| -(x as f32)).collect();
    let emb: Vec<u8> = (0..d * 3)
        .flat_map(|x| f16::from_f32(x as f32 * 0.5).to_le_bytes())
        .collect();
    let mut tokens = vocab_array(&["a", "b", "c"]);
    tokens.truncate(tokens.len());
    Builder::new()
        .kv("general.architecture", vtype::STRING, gstr("llama"))
        .kv(
            "llama.embedding_length",
            vtype::U32,
            (d as u32).to_le_bytes().to_vec(),
        )
        .kv(
            "llama.attention.head_count",
            vtype::U32,
            n_head.to_le_bytes().to_vec(),
        )
        .kv(
            "llama.attention.head_count_kv",
            vtype::U32,
            n_kv.to_le_bytes().to_vec(),
        )
        .kv("llama.block_count", vtype::U32, 1u32.to_le_bytes().to_vec())
        .kv(
            "llama.rope.freq_base",
            vtype::F32,
            100000f32.to_le_bytes().to_vec(),
        )
        .kv("tokenizer.ggml.tokens", vtype::ARRAY, tokens)
        .tensor("token_embd.weight", &[d as u64, 3], GgmlType::F16, emb)
        .tensor(
            "blk.0.attn_q.weight",
            &[d as u64, d as u64],
            GgmlType::F32,
            f32s(&q),
        )
        .tensor(
            "blk.0.attn_k.weight",
            &[d as u64, head_dim as u64],
            GgmlType::F32,
            f32s(&k),
        )
        .tensor(
            "blk.0.attn_q.bias",
            &[d as u64],
            GgmlType::F32,
            f32s(&(0..d).map(|x| x as f32).collect::<Vec<_>>()),
        )
}

fn vocab_array(toks: &[&str]) -> Vec<u8> {
    let mut b = vtype::STRING.to_le_bytes().to_vec();
    b.extend((toks.len() as u64).to_le_bytes());
    for t in toks {
        b.extend(gstr(t));
    }
    b
}

#[test]
fn well_formed_file_round_trips() {
    let f = GgufFile::from_bytes(llama_like().build()).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.architecture(), Some("llama"));
    assert_eq!(f.tensor_infos().len(), 4);
    let emb = f.tensor_f32("token_embd.weight").unwrap();
    assert_eq!(emb.len(), 24);
    assert_eq!(emb[5], 2.5);
    let toks = f.metadata()["tokenizer.ggml.tokens"].as_array().unwrap();
    assert_eq!(toks[2].as_str(), Some("c"));

    let c = f.hf_config();
    assert_eq!(c["hidden_size"], 8);
    assert_eq!(c["num_key_value_heads"], 1);
    assert_eq!(c["head_dim"], 4);
    assert_eq!(c["vocab_size"], 3);
    assert_eq!(c["rope_theta"], 100000.0);
    assert_eq!(c["tie_word_embeddings"], true);
    assert_eq!(c["architectures"][0], "LlamaForCausalLM");
}

#[test]
fn q_and_k_are_unpermuted_with_their_own_head_counts() {
    let f = GgufFile::from_bytes(llama_like().build()).unwrap();
    let d = 8;
    // Q: 2 heads of head_dim 4, raw row r holds r*d..; HF row 1 of head 0 = GGUF row 2.
    let q = f.tensor_f32("blk.0.attn_q.weight").unwrap();
    let raw = f.tensor_f32_raw("blk.0.attn_q.weight").unwrap();
    let hf_rows: Vec<usize> = (0..8).map(|r| q[r * d] as usize / d).collect();
    assert_eq!(hf_rows, vec![0, 2, 1, 3, 4, 6, 5, 7]);
    assert_ne!(q, raw);
    // K: 1 KV head of head_dim 4.
    let k = f.tensor_f32("blk.0.attn_k.weight").unwrap();
    let k_rows: Vec<usize> = (0..4).map(|r| (-k[r * d]) as usize / d).collect();
    assert_eq!(k_rows, vec![0, 2, 1, 3]);
    // A Q bias is permuted like the rows it belongs to.
    let qb = f.tensor_f32("blk.0.attn_q.bias").unwrap();
    assert_eq!(qb, vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
    // Non-RoPE tensors are untouched.
    assert_eq!(
        f.tensor_f32("token_embd.weight").unwrap(),
        f.tensor_f32_raw("token_embd.weight").unwrap()
    );
}

#[test]
fn hf_names() {
    let f = GgufFile::from_bytes(llama_like().build()).unwrap();
    let cases = [
        ("token_embd.weight", Some("model.embed_tokens.weight")),
        ("output_norm.weight", Some("model.norm.weight")),
        ("output.weight", Some("lm_head.weight")),
        (
            "blk.12.attn_q.weight",
            Some("model.layers.12.self_attn.q_proj.weight"),
        ),
        (
            "blk.0.attn_output.weight",
            Some("model.layers.0.self_attn.o_proj.weight"),
        ),
        (
            "blk.3.ffn_norm.weight",
            Some("model.layers.3.post_attention_layernorm.weight"),
        ),
        (
            "blk.3.ffn_down.weight",
            Some("model.layers.3.mlp.down_proj.weight"),
        ),
        (
            "blk.3.attn_k.bias",
            Some("model.layers.3.self_attn.k_proj.bias"),
        ),
        ("rope_freqs.weight", None),
        ("blk.x.attn_q.weight", None),
        ("blk.1.attn_q", None),
    ];
    for (g, want) in cases {
        assert_eq!(f.hf_name(g).as_deref(), want, "{g}");
    }
}

#[test]
fn hostile_headers_give_typed_errors() {
    let good = llama_like().build();
    // Every truncation of a valid file is an error, never a panic.
    for cut in (0..good.len()).step_by(7) {
        assert!(
            GgufFile::from_bytes(good[..cut].to_vec()).is_err(),
            "cut at {cut}"
        );
    }
    let mut b = good.clone();
    b[0] = b'X';
    assert!(matches!(
        GgufFile::from_bytes(b),
        Err(GgufError::BadMagic(_))
    ));
    let mut b = good.clone();
    b[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(matches!(
        GgufFile::from_bytes(b),
        Err(GgufError::Version(1))
    ));
    // Absurd metadata count: rejected before allocation.
    let mut b = good.clone();
    b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        GgufFile::from_bytes(b),
        Err(GgufError::CountTooLarge { .. })
    ));
    let mut b = good.clone();
    b[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert!(matches!(
        GgufFile::from_bytes(b),
        Err(GgufError::CountTooLarge { .. })
    ));
}

#[test]
fn bad_tensor_tables_are_rejected() {
    let data = f32s(&[1.0; 4]);
    // Tensor runs past the end of the file.
    let b = Builder::new()
        .tensor("t", &[8], GgmlType::F32, data.clone())
        .build();
    let e = GgufFile::from_bytes(b).err().unwrap();
    assert!(matches!(e, GgufError::BadTensor { .. }), "{e}");
    // Row length not a multiple of the Q8_0 block.
    let b = Builder::new()
        .tensor("t", &[16], GgmlType::Q8_0, vec![0; 34])
        .build();
    assert!(matches!(
        GgufFile::from_bytes(b),
        Err(GgufError::BadTensor { .. })
    ));
    // Too many dimensions.
    let b = Builder::new()
        .tensor("t", &[1, 1, 1, 1, 4], GgmlType::F32, data.clone())
        .build();
    assert!(matches!(
        GgufFile::from_bytes(b),
        Err(GgufError::BadTensor { .. })
    ));
    // Shape product overflow.
    let b = Builder::new()
        .tensor("t", &[1 << 40, 1 << 40], GgmlType::F32, data.clone())
        .build();
    assert!(GgufFile::from_bytes(b).is_err());
    // Duplicate names.
    let b = Builder::new()
        .tensor("t", &[4], GgmlType::F32, data.clone())
        .tensor("t", &[4], GgmlType::F32, data.clone())
        .build();
    assert!(matches!(
        GgufFile::from_bytes(b),
        Err(GgufError::DuplicateTensor(_))
    ));
    // Unsupported ggml type (Q5_K = 13).
    let mut bld = Builder::new().tensor("t", &[256], GgmlType::F32, vec![0; 1024]);
    bld.tensors[0].2 = 13;
    assert!(matches!(
        GgufFile::from_bytes(bld.build()),
        Err(GgufError::UnsupportedType { ty: 13, .. })
    ));
    // Bad alignment key.
    let b = Builder::new()
        .kv("general.alignment", vtype::U32, 3u32.to_le_bytes().to_vec())
        .build();
    assert!(matches!(
        GgufFile::from_bytes(b),
        Err(GgufError::BadAlignment(3))
    ));
    // Unknown value type and array of unknown type.
    let b = Builder::new().kv("k", 99, vec![]).build();
    assert!(matches!(
        GgufFile::from_bytes(b),
        Err(GgufError::BadValueType { ty: 99, .. })
    ));
    let mut arr = 77u32.to_le_bytes().to_vec();
    arr.extend(0u64.to_le_bytes());
    let b = Builder::new().kv("k", vtype::ARRAY, arr).build();
    assert!(matches!(
        GgufFile::from_bytes(b),
        Err(GgufError::BadValueType { ty: 77, .. })
    ));
}

#[test]
fn custom_alignment_is_honoured() {
    let mut bld = Builder::new()
        .kv(
            "general.alignment",
            vtype::U32,
            64u32.to_le_bytes().to_vec(),
        )
        .tensor("a", &[3], GgmlType::F32, f32s(&[1.0, 2.0, 3.0]))
        .tensor("b", &[2], GgmlType::F32, f32s(&[4.0, 5.0]));
    bld.alignment = 64;
    let f = GgufFile::from_bytes(bld.build()).unwrap();
    assert_eq!(f.tensor_info("b").unwrap().offset, 64);
    assert_eq!(f.tensor_f32("b").unwrap(), vec![4.0, 5.0]);
    assert!(matches!(f.tensor_f32("zzz"), Err(GgufError::NoTensor(_))));
}

#[test]
fn all_scalar_value_types_parse() {
    let b = Builder::new()
        .kv("u8", vtype::U8, vec![200])
        .kv("i8", vtype::I8, vec![0xFF])
        .kv("u16", vtype::U16, 60000u16.to_le_bytes().to_vec())
        .kv("i16", vtype::I16, (-5i16).to_le_bytes().to_vec())
        .kv("i32", vtype::I32, (-7i32).to_le_bytes().to_vec())
        .kv("u64", vtype::U64, u64::MAX.to_le_bytes().to_vec())
        .kv("i64", vtype::I64, (-9i64).to_le_bytes().to_vec())
        .kv("f64", vtype::F64, 0.25f64.to_le_bytes().to_vec())
        .kv("bool", vtype::BOOL, vec![1])
        .build();
    let f = GgufFile::from_bytes(b).unwrap();
    let m = f.metadata();
    assert_eq!(m["u8"], GgufValue::U8(200));
    assert_eq!(m["i8"].as_i64(), Some(-1));
    assert_eq!(m["u16"].as_u64(), Some(60000));
    assert_eq!(m["i16"].as_i64(), Some(-5));
    assert_eq!(m["i32"].as_i64(), Some(-7));
    assert_eq!(m["u64"].as_u64(), Some(u64::MAX));
    assert_eq!(m["u64"].as_i64(), None);
    assert_eq!(m["i64"].as_i64(), Some(-9));
    assert_eq!(m["f64"].as_f64(), Some(0.25));
    assert_eq!(m["bool"].as_bool(), Some(true));
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any corruption of a valid file is either rejected with an error or, when it still
        /// parses, every tensor reads back without panicking and with the declared length.
        #[test]
        fn corrupted_files_never_panic(edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
            let mut b = llama_like().build();
            for (at, byte) in edits {
                let i = at.index(b.len());
                b[i] = byte;
            }
            if let Ok(f) = GgufFile::from_bytes(b) {
                for t in f.tensor_infos().to_vec() {
                    if let Ok(w) = f.tensor_f32(&t.name) {
                        prop_assert_eq!(w.len(), t.n_elements());
                    }
                }
                let _ = f.hf_config();
            }
        }

        /// Random prefixes of a valid file never parse into something out of bounds.
        #[test]
        fn random_bytes_after_magic_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut b = b"GGUF".to_vec();
            b.extend(3u32.to_le_bytes());
            b.extend(tail);
            let _ = GgufFile::from_bytes(b);
        }
    }
}
