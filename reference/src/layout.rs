//! The packed delta layout: the one definition of how a compressed delta
//! matrix is laid out in memory and on disk. Every other crate (the CUDA
//! kernels' host code, the file container, the runtime) calls into this
//! module instead of re-deriving offsets.
//!
//! A delta matrix Δ has shape `[out, in]` (Hugging Face convention, y = x·Δᵀ).
//! It is stored as five arrays:
//!
//! ```text
//!   codes           u32  [out, words_per_row]   words_per_row = ceil(in·bits / 32)
//!   scales          f16  [out, n_groups]        n_groups = ceil(in / group_size)
//!   offsets         f16  [out, n_groups]
//!   salient_index   u32  [k]                    sorted, unique, each < in
//!   salient_values  f16  [out, k]               FP16 residual at the salient columns
//! ```
//!
//! Codes are packed little-endian along the input dimension; every row
//! starts on a fresh word, and because `bits` divides 32 no code straddles
//! two words. Column `c` of row `r` lives in word `r·words_per_row + c·bits/32`
//! at bit offset `(c·bits) mod 32`:
//!
//! ```text
//!   bits = 4   word w holds columns 8w .. 8w+7
//!     bit  31..28 27..24 23..20 19..16 15..12 11..8  7..4   3..0
//!          c7     c6     c5     c4     c3     c2     c1     c0
//!
//!   bits = 2   word w holds columns 16w .. 16w+15
//!     bit  31..30 29..28  ...  3..2  1..0
//!          c15    c14     ...  c1    c0
//!
//!   bits = 1   word w holds columns 32w .. 32w+31, column c at bit c mod 32
//! ```
//!
//! Padding bits past column `in - 1` in the last word of a row are zero (the
//! reader rejects a file where they are not, so two files for the same delta
//! are byte-identical).
//!
//! Dequantization of a code `q ∈ [0, 2^bits − 1]` in group `g = c / group_size`:
//!
//! ```text
//!   Q(Δ)[r, c] = offsets[r, g] + scales[r, g] · q          (computed in f32)
//!   Δ̂[r, c]    = Q(Δ)[r, c] + S[r, c]
//!   S[r, c]    = salient_values[r, i]   if c == salient_index[i], else 0
//! ```
//!
//! Codes are stored for salient columns too (the code nearest the value), so a
//! kernel runs one uniform loop over all columns and then adds the k residual
//! columns; the residual makes those columns equal to Δ up to FP16 rounding.

use crate::error::LayoutError;

/// Bit width of the quantized (non-salient) part of a delta.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Bits {
    One,
    Two,
    Four,
}

impl Bits {
    pub const ALL: [Bits; 3] = [Bits::One, Bits::Two, Bits::Four];

    pub fn count(self) -> u32 {
        match self {
            Bits::One => 1,
            Bits::Two => 2,
            Bits::Four => 4,
        }
    }

    pub fn from_count(bits: u32) -> Result<Bits, LayoutError> {
        match bits {
            1 => Ok(Bits::One),
            2 => Ok(Bits::Two),
            4 => Ok(Bits::Four),
            other => Err(LayoutError::UnsupportedBits(other)),
        }
    }

    /// Largest code, 2^bits − 1.
    pub fn max_code(self) -> u32 {
        (1 << self.count()) - 1
    }

    /// Codes per 32-bit word.
    pub fn codes_per_word(self) -> usize {
        (32 / self.count()) as usize
    }

    fn mask(self) -> u32 {
        self.max_code()
    }
}

/// Group sizes other than "the whole row" that the format accepts. They are
/// multiples of 32 so that, for every bit width, a group starts on a word
/// boundary and a kernel can fetch a group's codes as whole words.
pub const GROUP_SIZES: [usize; 3] = [32, 64, 128];

/// Shape and quantization settings of one packed delta matrix; everything
/// needed to compute array lengths and offsets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeltaLayout {
    pub out_features: usize,
    pub in_features: usize,
    pub bits: Bits,
    /// One of [`GROUP_SIZES`], or `in_features` for one group per row.
    pub group_size: usize,
    /// Number of salient input channels, `0 ..= in_features`.
    pub salient: usize,
}

/// Upper bound on either dimension. Large enough for any real LLM weight
/// (Mixtral's 14336, Llama-3's 128256-row embeddings) while keeping every
/// derived size far from `usize` overflow on 64-bit hosts, so a hostile
/// header cannot make us compute a wrapped-around allocation size.
pub const MAX_DIM: usize = 1 << 24;

impl DeltaLayout {
    /// Validates a layout, so that every size derived from it is meaningful.
    pub fn new(
        out_features: usize,
        in_features: usize,
        bits: Bits,
        group_size: usize,
        salient: usize,
    ) -> Result<DeltaLayout, LayoutError> {
        if out_features == 0 || in_features == 0 {
            return Err(LayoutError::EmptyShape {
                out_features,
                in_features,
            });
        }
        if out_features > MAX_DIM || in_features > MAX_DIM {
            return Err(LayoutError::TooLarge {
                out_features,
                in_features,
            });
        }
        if !(GROUP_SIZES.contains(&group_size) || group_size == in_features) {
            return Err(LayoutError::UnsupportedGroup {
                group_size,
                in_features,
            });
        }
        if salient > in_features {
            return Err(LayoutError::TooManySalient {
                salient,
                in_features,
            });
        }
        Ok(DeltaLayout {
            out_features,
            in_features,
            bits,
            group_size,
            salient,
        })
    }

    pub fn words_per_row(&self) -> usize {
        words_per_row(self.in_features, self.bits)
    }

    pub fn n_groups(&self) -> usize {
        self.in_features.div_ceil(self.group_size)
    }

    pub fn code_words(&self) -> usize {
        self.out_features * self.words_per_row()
    }

    pub fn group_params(&self) -> usize {
        self.out_features * self.n_groups()
    }

    pub fn salient_values(&self) -> usize {
        self.out_features * self.salient
    }

    /// Index width needed for salient channel indices on disk (u16 when every
    /// index fits, else u32).
    pub fn salient_index_bytes(&self) -> usize {
        if self.in_features <= u16::MAX as usize + 1 {
            2
        } else {
            4
        }
    }

    /// Bytes of the packed representation as stored on disk: codes, FP16
    /// scales and offsets, salient indices and FP16 salient columns.
    pub fn storage_bytes(&self) -> usize {
        self.code_words() * 4
            + self.group_params() * 2 * 2
            + self.salient * self.salient_index_bytes()
            + self.salient_values() * 2
    }

    /// Average stored bits per weight, everything counted.
    pub fn bits_per_weight(&self) -> f64 {
        (self.storage_bytes() * 8) as f64 / (self.out_features * self.in_features) as f64
    }
}

pub fn words_per_row(in_features: usize, bits: Bits) -> usize {
    in_features.div_ceil(bits.codes_per_word())
}

/// Word index within a row and bit shift of column `col`.
#[inline]
pub fn code_position(col: usize, bits: Bits) -> (usize, u32) {
    let per_word = bits.codes_per_word();
    (col / per_word, ((col % per_word) as u32) * bits.count())
}

/// Reads the code of column `col` from one row's words.
#[inline]
pub fn unpack_code(row_words: &[u32], col: usize, bits: Bits) -> u32 {
    let (word, shift) = code_position(col, bits);
    (row_words[word] >> shift) & bits.mask()
}

/// Packs one row of codes (each `<= bits.max_code()`) into `row_words`,
/// which must hold `words_per_row(codes.len(), bits)` words. Padding bits are
/// left zero.
pub fn pack_row(codes: &[u8], bits: Bits, row_words: &mut [u32]) {
    debug_assert_eq!(row_words.len(), words_per_row(codes.len(), bits));
    row_words.fill(0);
    for (col, &code) in codes.iter().enumerate() {
        debug_assert!(u32::from(code) <= bits.max_code());
        let (word, shift) = code_position(col, bits);
        row_words[word] |= (u32::from(code) & bits.mask()) << shift;
    }
}

/// Unpacks one row of `in_features` codes.
pub fn unpack_row(row_words: &[u32], in_features: usize, bits: Bits) -> Vec<u8> {
    (0..in_features)
        .map(|c| unpack_code(row_words, c, bits) as u8)
        .collect()
}

/// True when the padding bits past the last column of a row are all zero.
pub fn row_padding_is_zero(row_words: &[u32], in_features: usize, bits: Bits) -> bool {
    let used_bits = in_features * bits.count() as usize;
    let last = row_words.len() - 1;
    let used_in_last = used_bits - last * 32;
    used_in_last == 32 || row_words[last] >> used_in_last == 0
}
