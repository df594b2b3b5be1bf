//! From an OpenAI request to prompt token ids: the model's chat template
//! (`crate::chat`) and tokenizer (`crate::tokenizer`), shared with
//! `meswitch generate`.

use std::path::Path;
use std::sync::Arc;

use super::error::ApiError;
use super::openai::PromptInput;
use crate::chat::{ChatError, ChatTemplate};
use crate::generate::Detokenize;
use crate::model::load::is_gguf;
use crate::tokenizer::Tokenizer;

/// The chat template of a base model (GGUF metadata or `tokenizer_config.json`), if it has one.
pub fn chat_template_for(model: &Path) -> Result<Option<ChatTemplate>, ChatError> {
    if is_gguf(model) {
        let f = crate::gguf::GgufFile::open(model).map_err(|e| ChatError::Config {
            path: model.display().to_string(),
            message: e.to_string(),
        })?;
        ChatTemplate::from_gguf(&f)
    } else {
        let config = model.join("tokenizer_config.json");
        if !config.is_file() {
            return Ok(None);
        }
        ChatTemplate::from_tokenizer_config(&config)
    }
}

/// Token ids of a rendered chat prompt. Chat templates write the BOS text
/// themselves, so when the tokenizer also adds one the doubled BOS is dropped.
pub fn encode_chat(tokenizer: &Tokenizer, rendered: &str) -> Result<Vec<u32>, String> {
    let mut ids = tokenizer
        .encode(rendered, true)
        .map_err(|e| e.to_string())?;
    if tokenizer.add_bos() {
        if let (Some(b), [first, second, ..]) = (tokenizer.bos_id(), ids.as_slice()) {
            if *first == b && *second == b {
                ids.remove(0);
            }
        }
    }
    Ok(ids)
}

/// The tokenizer shared between the HTTP layer (encoding) and the engine
/// (decoding).
#[derive(Clone)]
pub struct SharedTokenizer(pub Arc<Tokenizer>);

impl Detokenize for SharedTokenizer {
    fn detokenize(&self, ids: &[u32]) -> Result<String, String> {
        self.0.detokenize(ids)
    }
    fn vocab_size(&self) -> Option<usize> {
        Detokenize::vocab_size(&*self.0)
    }
    fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        self.0.token_bytes(id)
    }
}

/// Turns request inputs into prompt ids.
pub struct Prompter {
    tokenizer: SharedTokenizer,
    template: Option<ChatTemplate>,
    /// The model's vocabulary: token-id prompts must stay below it.
    model_vocab: usize,
}

impl Prompter {
    pub fn new(
        tokenizer: Tokenizer,
        template: Option<ChatTemplate>,
        model_vocab: usize,
    ) -> Prompter {
        Prompter {
            tokenizer: SharedTokenizer(Arc::new(tokenizer)),
            template,
            model_vocab,
        }
    }

    pub fn tokenizer(&self) -> &SharedTokenizer {
        &self.tokenizer
    }

    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// Prompt ids; errors are 400s naming `messages` or `prompt`.
    pub fn encode(&self, input: &PromptInput) -> Result<Vec<u32>, ApiError> {
        let tok = &self.tokenizer.0;
        let ids = match input {
            PromptInput::Chat(messages) => {
                let template = self.template.as_ref().ok_or_else(|| {
                    ApiError::invalid(
                        Some("messages"),
                        "this model has no chat template; use /v1/completions",
                    )
                })?;
                let text = template
                    .render(messages, true)
                    .map_err(|e| ApiError::invalid(Some("messages"), e.to_string()))?;
                encode_chat(tok, &text).map_err(|e| ApiError::invalid(Some("messages"), e))?
            }
            PromptInput::Text(text) => tok
                .encode(text, false)
                .map_err(|e| ApiError::invalid(Some("prompt"), e.to_string()))?,
            PromptInput::Tokens(ids) => {
                if let Some(bad) = ids.iter().find(|&&t| t as usize >= self.model_vocab) {
                    return Err(ApiError::invalid(
                        Some("prompt"),
                        format!(
                            "token id {bad} is outside the vocabulary of {} tokens",
                            self.model_vocab
                        ),
                    ));
                }
                ids.clone()
            }
        };
        if ids.is_empty() {
            let param = match input {
                PromptInput::Chat(_) => "messages",
                _ => "prompt",
            };
            return Err(ApiError::invalid(Some(param), "the prompt is empty"));
        }
        Ok(ids)
    }
}
