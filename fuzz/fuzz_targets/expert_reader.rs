//! Fuzzes the expert file reader: any bytes must give `Ok` or a typed
//! error, never a panic, an abort or an allocation far beyond the input. An
//! accepted file must also satisfy the packed layout's invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meswitch_reference::container::{read_expert_bytes, ExpertTensor};

fuzz_target!(|data: &[u8]| {
    if let Ok(expert) = read_expert_bytes(data) {
        for tensor in expert.tensors.values() {
            match tensor {
                ExpertTensor::Delta(delta) => assert!(delta.view().validate().is_ok()),
                ExpertTensor::Dense { shape, values } => {
                    assert_eq!(shape.iter().product::<usize>(), values.len())
                }
            }
        }
    }
});
