//! The real SmolLM2-135M-Instruct Q4_1 GGUF: header, shapes, HF view, sane dequantized values.
//! Skips when the file is missing (fails under CI=true); see shared/data/smollm2/README.md.

use meswitch_server::gguf::{GgmlType, GgufFile};
use meswitch_server::testdata;

fn open() -> Option<GgufFile> {
    let path = testdata::require("SmolLM2 GGUF", testdata::smollm2_gguf())?;
    Some(GgufFile::open(&path).expect("open SmolLM2 GGUF"))
}

#[test]
fn header_shapes_and_config() {
    let Some(f) = open() else { return };
    // 1 embedding + 1 final norm + 30 layers x 9 tensors; no output.weight (tied).
    assert_eq!(f.tensor_infos().len(), 2 + 30 * 9);
    let emb = f.tensor_info("token_embd.weight").unwrap();
    assert_eq!(emb.shape, vec![576, 49152]);
    assert_eq!(emb.dtype, GgmlType::Q8_0);
    let q = f.tensor_info("blk.0.attn_q.weight").unwrap();
    assert_eq!((q.shape.clone(), q.dtype), (vec![576, 576], GgmlType::Q4_1));
    assert_eq!(
        f.tensor_info("blk.29.attn_k.weight").unwrap().shape,
        vec![576, 192]
    );
    assert_eq!(
        f.tensor_info("blk.7.ffn_down.weight").unwrap().shape,
        vec![1536, 576]
    );

    let c = f.hf_config();
    for (k, v) in [
        ("hidden_size", 576),
        ("intermediate_size", 1536),
        ("num_hidden_layers", 30),
        ("num_attention_heads", 9),
        ("num_key_value_heads", 3),
        ("vocab_size", 49152),
        ("head_dim", 64),
    ] {
        assert_eq!(c[k], v, "{k}");
    }
    assert_eq!(c["rope_theta"], 100000.0);
    assert_eq!(c["rms_norm_eps"], 1e-5);
    assert_eq!(c["tie_word_embeddings"], true);

    // Every tensor has an HF name, and they are distinct.
    let mut names: Vec<String> = f
        .tensor_infos()
        .iter()
        .map(|t| f.hf_name(&t.name).unwrap())
        .collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), f.tensor_infos().len());
    assert!(names.contains(&"model.layers.29.mlp.gate_proj.weight".to_string()));
}

#[test]
fn dequantized_values_are_sane() {
    let Some(f) = open() else { return };
    let emb = f.tensor_f32("token_embd.weight").unwrap();
    assert_eq!(emb.len(), 576 * 49152);
    let norms: Vec<f32> = emb
        .chunks(576)
        .map(|r| r.iter().map(|x| x * x).sum::<f32>().sqrt())
        .collect();
    assert!(norms.iter().all(|n| n.is_finite()));
    let mean = norms.iter().sum::<f32>() / norms.len() as f32;
    // A trained embedding: rows neither zero nor exploding, and not all the same length.
    assert!((0.1..100.0).contains(&mean), "mean row norm {mean}");
    let (min, max) = norms
        .iter()
        .fold((f32::MAX, 0f32), |(a, b), &n| (a.min(n), b.max(n)));
    assert!(max > 1.5 * min, "row norms {min}..{max}");
    assert!(norms.iter().filter(|&&n| n < 1e-6).count() < 10);

    // RMSNorm weights are F32 and near 1 on average-ish (positive, finite).
    let ln = f.tensor_f32("blk.0.attn_norm.weight").unwrap();
    assert_eq!(ln.len(), 576);
    assert!(ln.iter().all(|x| x.is_finite()));

    // Q4_1 weights: finite, zero-mean-ish, and the unpermuted Q has the same multiset of rows.
    let raw = f.tensor_f32_raw("blk.0.attn_q.weight").unwrap();
    let q = f.tensor_f32("blk.0.attn_q.weight").unwrap();
    assert!(q.iter().all(|x| x.is_finite()));
    let row_sums = |w: &[f32]| {
        let mut s: Vec<i64> = w
            .chunks(576)
            .map(|r| (r.iter().sum::<f32>() * 1e4) as i64)
            .collect();
        s.sort();
        s
    };
    assert_eq!(row_sums(&raw), row_sums(&q));
    assert_ne!(raw, q);
    // HF row 32 of head 0 (partner of row 0 in rotate_half) is GGUF row 1.
    assert_eq!(&q[32 * 576..33 * 576], &raw[576..2 * 576]);
}

/// Every tensor dequantizes to finite values; prints the time (CPU, this machine, 1 thread).
#[test]
fn every_tensor_dequantizes() {
    let Some(f) = open() else { return };
    let t0 = std::time::Instant::now();
    let mut n = 0usize;
    for t in f.tensor_infos() {
        let w = f.tensor_f32(&t.name).unwrap();
        assert_eq!(w.len(), t.n_elements());
        assert!(w.iter().all(|x| x.is_finite()), "{}", t.name);
        n += w.len();
    }
    let dt = t0.elapsed().as_secs_f64();
    eprintln!(
        "dequantized {n} weights in {:.3} s ({:.0} M weights/s)",
        dt,
        n as f64 / dt / 1e6
    );
}
