//! A token's raw bytes: what it adds to the decoded text, byte for byte,
//! even when that is a piece of a UTF-8 character (which decoding the token
//! alone renders as U+FFFD). These are OpenAI's logprob `bytes`.
//!
//! The mapping follows the tokenizer's decoder, as `tokenizers` applies it:
//!
//! ```text
//!   ByteLevel (GPT-2 BPE)        each char is one byte through GPT-2's table:
//!                                  "Ġcaf" → 20 63 61 66     "Ã" → C3     "©" → A9
//!   ByteFallback / Metaspace     "<0xE6>" → E6; else the piece with ▁ as a space:
//!   (SentencePiece)                "▁café" → 20 63 61 66 C3 A9
//!   anything else                the token decoded alone; unknown if that holds U+FFFD
//! ```
//!
//! Special tokens add nothing (decoding skips them), so they have no bytes.
//! SentencePiece's decoder also drops the first space of a whole text; a
//! token on its own keeps it (as llama.cpp's `token_to_piece`).

/// SentencePiece's word-boundary marker (U+2581), which stands for a space.
const SPACE_MARK: char = '\u{2581}';
/// A byte-fallback token is spelled `<0xNN>`: six characters.
const BYTE_TOKEN_LEN: usize = 6;
/// U+0100: where GPT-2's table puts the bytes that are not printable
/// Latin-1, in byte order.
const FIRST_SHIFTED_CHAR: u32 = 0x100;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ByteForm {
    ByteLevel,
    SentencePiece,
    Text,
}

/// How to get each token's bytes from one tokenizer.
#[derive(Clone, Debug)]
pub(super) struct TokenBytes {
    form: ByteForm,
    /// Ids of special added tokens, sorted.
    special: Vec<u32>,
}

/// Decoder types named anywhere in the decoder (a `Sequence` nests them).
fn decoder_types(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            if let Some(serde_json::Value::String(t)) = m.get("type") {
                out.push(t.clone());
            }
            m.values().for_each(|x| decoder_types(x, out));
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| decoder_types(x, out)),
        _ => {}
    }
}

impl TokenBytes {
    pub(super) fn new(tk: &tokenizers::Tokenizer) -> TokenBytes {
        let mut types = Vec::new();
        if let Some(json) = tk.get_decoder().and_then(|d| serde_json::to_value(d).ok()) {
            decoder_types(&json, &mut types);
        }
        let has = |t: &str| types.iter().any(|x| x == t);
        let form = if has("ByteLevel") {
            ByteForm::ByteLevel
        } else if has("ByteFallback") || has("Metaspace") {
            ByteForm::SentencePiece
        } else {
            ByteForm::Text
        };
        let mut special: Vec<u32> = tk
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        special.sort_unstable();
        TokenBytes { form, special }
    }

    /// The bytes `id` adds to the decoded text (special tokens: none);
    /// None for an id outside the vocabulary, or when the decoder is of
    /// an unknown kind and the token alone is not whole characters.
    pub(super) fn of(&self, tk: &tokenizers::Tokenizer, id: u32) -> Option<Vec<u8>> {
        if self.special.binary_search(&id).is_ok() {
            return Some(Vec::new());
        }
        match self.form {
            ByteForm::ByteLevel => Some(byte_level(&tk.id_to_token(id)?)),
            ByteForm::SentencePiece => Some(sentence_piece(&tk.id_to_token(id)?)),
            ByteForm::Text => tk
                .decode(&[id], true)
                .ok()
                .filter(|t| !t.contains('\u{FFFD}'))
                .map(String::into_bytes),
        }
    }
}

/// GPT-2's table keeps these bytes as the Latin-1 char of the same value.
fn printable(b: u8) -> bool {
    (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE
}

/// The byte GPT-2's byte→char table maps to `c`, if any.
fn byte_of_char(c: char) -> Option<u8> {
    let c = c as u32;
    if let Ok(b) = u8::try_from(c) {
        if printable(b) {
            return Some(b);
        }
    }
    let rank = c.checked_sub(FIRST_SHIFTED_CHAR)? as usize;
    (0..=u8::MAX).filter(|&b| !printable(b)).nth(rank)
}

/// As `tokenizers`' ByteLevel decoder: every char through the table, or,
/// when one is not in it (an added token's text), the piece as UTF-8.
fn byte_level(piece: &str) -> Vec<u8> {
    piece
        .chars()
        .map(byte_of_char)
        .collect::<Option<Vec<u8>>>()
        .unwrap_or_else(|| piece.as_bytes().to_vec())
}

/// `<0xNN>` is byte NN; any other piece is its text with ▁ as a space.
fn sentence_piece(piece: &str) -> Vec<u8> {
    if piece.len() == BYTE_TOKEN_LEN && piece.starts_with("<0x") && piece.ends_with('>') {
        if let Ok(b) = u8::from_str_radix(&piece[3..5], 16) {
            return vec![b];
        }
    }
    piece.replace(SPACE_MARK, " ").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_inverts_gpt2_s() {
        // Known entries of GPT-2's table: Ġ is a space, Ċ a newline.
        for (c, b) in [
            ('\u{100}', 0x00),
            ('\u{10A}', 0x0A),
            ('\u{120}', 0x20),
            ('!', 0x21),
            ('\u{121}', 0x7F),
            ('\u{142}', 0xA0),
            ('\u{143}', 0xAD),
            ('\u{FF}', 0xFF),
        ] {
            assert_eq!(byte_of_char(c), Some(b), "{c:?}");
        }
        // A bijection: the 256 chars it accepts give 256 bytes.
        let mut seen = [false; 256];
        for c in (0..0x200).filter_map(char::from_u32) {
            if let Some(b) = byte_of_char(c) {
                assert!(!seen[b as usize], "byte {b:#04x} twice");
                seen[b as usize] = true;
            }
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(byte_of_char('\u{144}'), None, "past the 68 shifted chars");
        assert_eq!(byte_of_char(' '), None);
    }

    #[test]
    fn byte_level_pieces() {
        assert_eq!(byte_level("\u{120}caf"), b" caf");
        assert_eq!(byte_level("\u{C3}"), [0xC3]);
        assert_eq!(byte_level("\u{C3}\u{A9}"), "é".as_bytes());
        assert_eq!(byte_level("<|im_end|>"), b"<|im_end|>");
        assert_eq!(byte_level("a b"), b"a b", "a space is not in the table");
    }

    #[test]
    fn sentence_piece_pieces() {
        assert_eq!(sentence_piece("<0xE6>"), [0xE6]);
        assert_eq!(sentence_piece("<0x0A>"), [0x0A]);
        assert_eq!(sentence_piece("\u{2581}café"), " café".as_bytes());
        assert_eq!(sentence_piece("<0xZZ>"), b"<0xZZ>");
        assert_eq!(sentence_piece("<0x41>x"), b"<0x41>x");
    }

    /// Text with 2-, 3- and 4-byte characters: byte-level vocabularies
    /// split some of them across tokens.
    const MULTI_BYTE: &str = "naïve café 東京 🙂";

    /// The bytes of `text`'s tokens end to end, and whether some token on
    /// its own decodes to U+FFFD (a piece of a character: the case the raw
    /// bytes are for).
    fn token_bytes_of(tok: &crate::tokenizer::Tokenizer, text: &str) -> (Vec<u8>, bool) {
        let ids = tok.encode(text, false).unwrap();
        let bytes = ids
            .iter()
            .flat_map(|&id| tok.token_bytes(id).unwrap())
            .collect();
        let partial = ids
            .iter()
            .any(|&id| tok.decode(&[id], true).unwrap().contains('\u{FFFD}'));
        (bytes, partial)
    }

    fn demo_tokenizer() -> crate::tokenizer::Tokenizer {
        let dir = tempfile::tempdir().unwrap();
        let base = crate::synth::write_tiny_base(dir.path());
        crate::tokenizer::Tokenizer::from_model_path(&base).unwrap()
    }

    #[test]
    fn demo_tokenizer_bytes_rebuild_any_text() {
        let tok = demo_tokenizer();
        let (bytes, partial) = token_bytes_of(&tok, MULTI_BYTE);
        assert_eq!(bytes, MULTI_BYTE.as_bytes());
        assert!(partial, "one token per byte: 'ï' is two");
        let eos = tok.eos_ids()[0];
        assert_eq!(tok.token_bytes(eos), Some(Vec::new()), "special: no bytes");
        assert_eq!(tok.token_bytes(tok.vocab_size() as u32), None);
        let mut runner = proptest::test_runner::TestRunner::default();
        runner
            .run(&proptest::prelude::any::<String>(), |text| {
                proptest::prop_assert_eq!(token_bytes_of(&tok, &text).0, text.as_bytes());
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn smollm2_bytes_rebuild_multi_byte_text() {
        let Some(path) = crate::testdata::require("SmolLM2 GGUF", crate::testdata::smollm2_gguf())
        else {
            return;
        };
        let gguf = crate::gguf::GgufFile::open(&path).unwrap();
        let tok = crate::tokenizer::Tokenizer::from_gguf(&gguf).unwrap();
        let (bytes, partial) = token_bytes_of(&tok, MULTI_BYTE);
        assert_eq!(bytes, MULTI_BYTE.as_bytes());
        assert!(partial, "SmolLM2 splits some of these characters");
        let (bytes, _) = token_bytes_of(&tok, "Hello world\n\tdone");
        assert_eq!(bytes, b"Hello world\n\tdone");
    }

    #[test]
    fn mistral_sentencepiece_bytes_rebuild_multi_byte_text() {
        let Some(dir) = crate::testdata::require(
            "shared/data/mistral",
            crate::testdata::shared_data("mistral"),
        ) else {
            return;
        };
        let tok = crate::tokenizer::Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
        // BOS is special (no bytes); the decoder drops the space SentencePiece
        // puts first, a token alone keeps it.
        // Rare characters, which a 32k vocabulary spells byte by byte.
        let text = format!("{MULTI_BYTE} ꙮ𝔘🦀");
        let (bytes, partial) = token_bytes_of(&tok, &text);
        assert_eq!(bytes, format!(" {text}").as_bytes());
        assert!(
            partial,
            "byte fallback: some of ꙮ𝔘🦀 is not in the vocabulary"
        );
    }
}
