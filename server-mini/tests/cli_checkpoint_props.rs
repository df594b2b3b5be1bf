//! Property: whatever tensors (shapes, dtypes, values) the streaming writer
//! writes, `Checkpoint` reads back the same names, shapes, dtypes and values
//! (up to the dtype's rounding, applied once).

use std::collections::BTreeMap;

use meswitch_server::checkpoint::{
    write_config, Checkpoint, FloatDtype, TensorFileWriter, TensorPlan, SINGLE_FILE,
};
use proptest::prelude::*;

fn dtype() -> impl Strategy<Value = FloatDtype> {
    prop_oneof![
        Just(FloatDtype::F16),
        Just(FloatDtype::BF16),
        Just(FloatDtype::F32)
    ]
}

fn tensor() -> impl Strategy<Value = (Vec<usize>, FloatDtype, Vec<f32>)> {
    (prop::collection::vec(1usize..6, 0..4), dtype()).prop_flat_map(|(shape, dtype)| {
        let n: usize = shape.iter().product();
        (
            Just(shape),
            Just(dtype),
            prop::collection::vec(-1.0e3f32..1.0e3, n),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn written_tensors_read_back(tensors in prop::collection::vec(tensor(), 1..5)) {
        let dir = tempfile::tempdir().unwrap();
        write_config(dir.path(), &serde_json::json!({"hidden_size": 1})).unwrap();
        let named: BTreeMap<String, (Vec<usize>, FloatDtype, Vec<f32>)> = tensors
            .into_iter()
            .enumerate()
            .map(|(i, t)| (format!("t{i}.weight"), t))
            .collect();
        let plan = named
            .iter()
            .map(|(name, (shape, dtype, _))| TensorPlan { name: name.clone(), dtype: *dtype, shape: shape.clone() })
            .collect();
        let mut w = TensorFileWriter::create(&dir.path().join(SINGLE_FILE), plan, &BTreeMap::new()).unwrap();
        for (name, (_, _, values)) in &named {
            w.write_f32(name, values).unwrap();
        }
        w.finish().unwrap();

        let c = Checkpoint::open(dir.path()).unwrap();
        prop_assert_eq!(c.tensor_names(), named.keys().cloned().collect::<Vec<_>>());
        for (name, (shape, dtype, values)) in &named {
            prop_assert_eq!(c.shape(name).unwrap(), shape.clone());
            prop_assert_eq!(c.float_dtype(name).unwrap(), *dtype);
            let expected = dtype.decode_f32(&dtype.encode_f32(values));
            prop_assert_eq!(c.tensor_f32(name).unwrap(), expected.clone());
            let halves: Vec<f32> = c.tensor_f16(name).unwrap().iter().map(|h| h.to_f32()).collect();
            let expected_halves: Vec<f32> = expected.iter().map(|v| half::f16::from_f32(*v).to_f32()).collect();
            prop_assert_eq!(halves, expected_halves);
        }
    }
}

#[test]
fn writer_refuses_out_of_plan_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let plan = vec![TensorPlan {
        name: "a".into(),
        dtype: FloatDtype::F16,
        shape: vec![2, 2],
    }];
    let path = dir.path().join(SINGLE_FILE);
    let mut w = TensorFileWriter::create(&path, plan.clone(), &BTreeMap::new()).unwrap();
    assert!(w.write_f32("b", &[0.0; 4]).is_err(), "wrong name");
    assert!(w.write_f32("a", &[0.0; 3]).is_err(), "wrong length");
    let w = TensorFileWriter::create(&path, plan, &BTreeMap::new()).unwrap();
    assert!(w.finish().is_err(), "a planned tensor was never written");
}
