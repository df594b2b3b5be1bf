//! Chat templates: the model authors' Jinja template (`tokenizer.chat_template` in GGUF metadata,
//! or `chat_template` in `tokenizer_config.json`) rendered with minijinja the way HF
//! `apply_chat_template` does: `trim_blocks` and `lstrip_blocks` on, Python string methods
//! available (`.strip()`, `.startswith()`, ...), `raise_exception(msg)` defined, and the variables
//! `messages`, `add_generation_prompt`, `bos_token`, `eos_token`.

use serde::Serialize;
use std::path::Path;

/// Name the template is registered under inside its private minijinja environment.
const TEMPLATE_NAME: &str = "chat";

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("{path}: {message}")]
    Config { path: String, message: String },
    #[error("chat template does not parse: {0}")]
    Syntax(String),
    #[error("chat template failed to render: {0}")]
    Render(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compile `source`. `bos_token`/`eos_token` are the texts the template may print.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate, ChatError> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| ChatError::Syntax(e.to_string()))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// The template in a GGUF's `tokenizer.chat_template`, if it has one.
    pub fn from_gguf(f: &crate::gguf::GgufFile) -> Result<Option<ChatTemplate>, ChatError> {
        let meta = f.metadata();
        let Some(src) = meta.get("tokenizer.chat_template").and_then(|v| v.as_str()) else {
            return Ok(None);
        };
        let token_text = |key: &str| -> String {
            let id = meta.get(key).and_then(|v| v.as_u64());
            let toks = meta.get("tokenizer.ggml.tokens").and_then(|v| v.as_array());
            match (id, toks) {
                (Some(id), Some(t)) => t
                    .get(id as usize)
                    .and_then(|v| v.as_str())
                    .unwrap_or("")
                    .to_string(),
                _ => String::new(),
            }
        };
        let (bos, eos) = (
            token_text("tokenizer.ggml.bos_token_id"),
            token_text("tokenizer.ggml.eos_token_id"),
        );
        ChatTemplate::new(src, &bos, &eos).map(Some)
    }

    /// The template in an HF `tokenizer_config.json` (`chat_template` as a string, or the entry
    /// named "default" of a list of `{name, template}`), if it has one.
    pub fn from_tokenizer_config(path: &Path) -> Result<Option<ChatTemplate>, ChatError> {
        let err = |message: String| ChatError::Config {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let cfg: serde_json::Value = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        let src = match cfg.get("chat_template") {
            None | Some(serde_json::Value::Null) => return Ok(None),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(list)) => {
                let named = |n: &str| {
                    list.iter()
                        .find(|t| t.get("name").and_then(|x| x.as_str()) == Some(n))
                };
                let entry = named("default")
                    .ok_or_else(|| err("chat_template list has no \"default\" entry".into()))?;
                let t = entry.get("template").and_then(|t| t.as_str());
                t.ok_or_else(|| err("chat_template entry has no template string".into()))?
                    .to_string()
            }
            Some(_) => return Err(err("chat_template is neither a string nor a list".into())),
        };
        let special = |key: &str| -> String {
            match cfg.get(key) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(v) => v
                    .get("content")
                    .and_then(|c| c.as_str())
                    .unwrap_or("")
                    .to_string(),
                None => String::new(),
            }
        };
        ChatTemplate::new(&src, &special("bos_token"), &special("eos_token")).map(Some)
    }

    /// The prompt text for `messages`; with `add_generation_prompt` the template's opening of an
    /// assistant turn is appended.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ChatError::Syntax(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| ChatError::Render(format!("{e:#}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

    #[test]
    fn renders_messages_and_generation_prompt() {
        let t = ChatTemplate::new(CHATML, "", "").unwrap();
        let msgs = [
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", " Hi "),
        ];
        assert_eq!(
            t.render(&msgs, true).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(!t.render(&msgs, false).unwrap().ends_with("assistant\n"));
    }

    #[test]
    fn python_methods_block_trimming_and_raise_exception() {
        // Mistral-style template: .strip(), loop.index0, bos/eos, raise_exception on bad roles.
        let src = "{{ bos_token }}{% for message in messages %}\n  {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n    {{ raise_exception('roles must alternate') }}\n  {% endif %}\n  {% if message['role'] == 'user' %}\n[INST] {{ message['content'].strip() }} [/INST]\n  {%- else %}\n{{ message['content'] }}{{ eos_token }}\n  {%- endif %}\n{% endfor %}";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        let ok = [
            ChatMessage::new("user", "  hi "),
            ChatMessage::new("assistant", "yo"),
        ];
        assert_eq!(t.render(&ok, false).unwrap(), "<s>[INST] hi [/INST]yo</s>");
        let bad = [ChatMessage::new("assistant", "x")];
        let e = t.render(&bad, false).unwrap_err();
        assert!(e.to_string().contains("roles must alternate"), "{e}");
    }

    #[test]
    fn syntax_errors_are_typed() {
        assert!(matches!(
            ChatTemplate::new("{% for %}", "", ""),
            Err(ChatError::Syntax(_))
        ));
    }

    #[test]
    fn tokenizer_config_string_and_named_list_forms() {
        let dir = std::env::temp_dir().join(format!("meswitch-chat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer_config.json");
        let msgs = [ChatMessage::new("user", "hi")];

        let cfg = serde_json::json!({"chat_template": "{{ bos_token }}{{ messages[0].content }}", "bos_token": {"content": "<s>"}});
        std::fs::write(&path, cfg.to_string()).unwrap();
        let t = ChatTemplate::from_tokenizer_config(&path).unwrap().unwrap();
        assert_eq!(t.render(&msgs, false).unwrap(), "<s>hi");

        let cfg = serde_json::json!({"chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "{{ messages | length }}{{ eos_token }}"}], "eos_token": "</s>"});
        std::fs::write(&path, cfg.to_string()).unwrap();
        let t = ChatTemplate::from_tokenizer_config(&path).unwrap().unwrap();
        assert_eq!(t.render(&msgs, false).unwrap(), "1</s>");

        std::fs::write(&path, "{}").unwrap();
        assert!(ChatTemplate::from_tokenizer_config(&path)
            .unwrap()
            .is_none());
        std::fs::write(&path, "{not json").unwrap();
        assert!(matches!(
            ChatTemplate::from_tokenizer_config(&path),
            Err(ChatError::Config { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
