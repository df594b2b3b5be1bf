//! How the CPU backend rounds: exactly (f32, the default) or the way
//! llama.cpp's CPU backend does, so a run can be compared token for token
//! with llama.cpp on the same GGUF model.
//!
//! [`Numerics::LlamaCpp`] reproduces the arithmetic of ggml's x86 CPU
//! backend as built for the goldens in `../shared/data/smollm2` (AVX2, FMA,
//! F16C, no AVX-512, one thread), operation by operation, in ggml's order:
//!
//! | op | ggml | here |
//! |---|---|---|
//! | linear on a `Q4_1` / `Q8_0` tensor | activations quantized to `Q8_1`/`Q8_0`, integer block dots in 8 lanes, FMA-accumulated, lanes summed in a fixed tree | [`ggml_quant`] |
//! | RMSNorm | Σx² in f64, then f32 scale, then × weight | [`ggml_ops::rms_norm`] |
//! | RoPE | angle advanced by repeated f32 multiplication, `cosf`/`sinf` | [`ggml_ops::rope`] |
//! | SwiGLU | a polynomial `expf` (ggml's `ggml_v_expf`) | [`ggml_ops::swiglu`] |
//! | attention | FP16 query and KV, f32 scores from an 8-lane FP16 dot, FP16 value accumulator | [`attention`] |
//!
//! Where ggml's C source writes `a*b + c` the compiler (GCC, `-ffp-contract=fast`,
//! the default outside ISO mode, with `-mfma`) fuses it; those places use
//! `mul_add`. Tensors of other types (and rows on an expert, which llama.cpp
//! has none of) are computed exactly.

use std::str::FromStr;

pub mod attention;
pub mod ggml_ops;
pub mod ggml_quant;

pub use attention::{attention_llama_cpp, to_gguf_head_order};
pub use ggml_quant::{BlockKind, GgmlBlocks, Q8Rows};

/// How activations are rounded on the CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Numerics {
    /// f32 activations and KV cache (the reference semantics).
    #[default]
    Exact,
    /// llama.cpp's CPU arithmetic (see the module docs).
    LlamaCpp,
}

impl FromStr for Numerics {
    type Err = String;
    fn from_str(s: &str) -> Result<Numerics, String> {
        match s {
            "exact" => Ok(Numerics::Exact),
            "llama-cpp" => Ok(Numerics::LlamaCpp),
            _ => Err(format!("numerics {s:?}: expected exact or llama-cpp")),
        }
    }
}

impl std::fmt::Display for Numerics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Numerics::Exact => "exact",
            Numerics::LlamaCpp => "llama-cpp",
        })
    }
}

/// Rounds every value to FP16 and back.
pub fn round_f16(x: &mut [f32]) {
    for v in x {
        *v = half::f16::from_f32(*v).to_f32();
    }
}
