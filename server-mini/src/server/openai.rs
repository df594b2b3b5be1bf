//! OpenAI-compatible request parsing for `/v1/chat/completions` and
//! `/v1/completions` (the response bodies are [`super::responses`]).
//!
//! Requests are read field by field from a JSON value rather than through a
//! derived `Deserialize`, so a wrong type names its field in the error's
//! `param` (clients send many fields we ignore, e.g. `user`; those are
//! accepted as long as they do not ask for something we cannot do).

use serde_json::{Map, Value};

use super::error::ApiError;
pub use super::sampling_fields::{SamplingFields, MAX_TEMPERATURE};
use crate::chat::ChatMessage;
use crate::engine::MAX_TOP_LOGPROBS;

/// OpenAI's limit on `stop` sequences.
pub const MAX_STOP_SEQUENCES: usize = 4;
/// Most choices (`n`) one request may ask for: each is a sequence in the
/// engine's batch, so a large `n` is a large share of it.
pub const MAX_CHOICES: usize = 8;
/// OpenAI's limit on `logprobs` in the completions API (chat allows
/// [`MAX_TOP_LOGPROBS`] `top_logprobs`).
pub const MAX_COMPLETION_LOGPROBS: usize = 5;

/// What to generate from: chat messages (rendered with the chat template) or
/// a raw prompt (text or token ids).
#[derive(Clone, Debug, PartialEq)]
pub enum PromptInput {
    Chat(Vec<ChatMessage>),
    Text(String),
    Tokens(Vec<u32>),
}

/// A validated generation request, before tokenization.
#[derive(Clone, Debug, PartialEq)]
pub struct CompletionRequest {
    pub model: String,
    pub input: PromptInput,
    pub stream: bool,
    /// None: as many as the context allows, up to the server's default.
    pub max_tokens: Option<usize>,
    /// Temperature, top-p/k, penalties, logit bias, seed.
    pub sampling: SamplingFields,
    pub stop: Vec<String>,
    /// Choices to generate (1..=[`MAX_CHOICES`]).
    pub n: usize,
    /// `Some(k)`: report each token's logprob and the `k` most likely.
    pub logprobs: Option<usize>,
    /// `stream_options.include_usage`: a last chunk with the usage.
    pub include_usage: bool,
}

/// Which endpoint a request came in on (decides its response shape).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    pub fn object(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat.completion",
            Endpoint::Completions => "text_completion",
        }
    }
    pub fn chunk_object(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completions => "text_completion",
        }
    }
    pub fn id_prefix(self) -> &'static str {
        match self {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completions => "cmpl",
        }
    }
}

/// Typed access to the fields of a JSON object, each error naming its field.
pub(super) struct Fields<'a>(&'a Map<String, Value>);

fn wrong_type(param: &str, expected: &str) -> ApiError {
    ApiError::invalid(Some(param), format!("`{param}` must be {expected}"))
}

impl Fields<'_> {
    pub(super) fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    pub(super) fn string(&self, key: &str) -> Result<Option<String>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(wrong_type(key, "a string")),
        }
    }

    pub(super) fn boolean(&self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(wrong_type(key, "a boolean")),
        }
    }

    pub(super) fn number(&self, key: &str) -> Result<Option<f64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| wrong_type(key, "a number")),
        }
    }

    pub(super) fn unsigned(&self, key: &str) -> Result<Option<u64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| wrong_type(key, "a non-negative integer")),
        }
    }
}

/// Parses a chat or completions request body.
pub fn parse_request(endpoint: Endpoint, body: &[u8]) -> Result<CompletionRequest, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(None, format!("the body is not valid JSON: {e}")))?;
    let Value::Object(map) = &value else {
        return Err(ApiError::invalid(None, "the body must be a JSON object"));
    };
    let f = Fields(map);
    let model = f
        .string("model")?
        .ok_or_else(|| ApiError::invalid(Some("model"), "`model` is required"))?;
    let input = match endpoint {
        Endpoint::Chat => PromptInput::Chat(parse_messages(f.get("messages"))?),
        Endpoint::Completions => parse_prompt(f.get("prompt"))?,
    };
    let n = f.unsigned("n")?.unwrap_or(1);
    if !(1..=MAX_CHOICES as u64).contains(&n) {
        return Err(ApiError::invalid(
            Some("n"),
            format!("`n` must be in [1, {MAX_CHOICES}]"),
        ));
    }
    if f.get("best_of")
        .and_then(Value::as_u64)
        .is_some_and(|b| b > 1)
    {
        return Err(ApiError::invalid(
            Some("best_of"),
            "only best_of = 1 is supported",
        ));
    }
    // `max_completion_tokens` is the newer name of `max_tokens` in the chat API.
    let max_tokens = match f.unsigned("max_completion_tokens")? {
        Some(m) => Some(m),
        None => f.unsigned("max_tokens")?,
    };
    let max_tokens = match max_tokens {
        Some(0) => {
            return Err(ApiError::invalid(
                Some("max_tokens"),
                "`max_tokens` must be at least 1",
            ))
        }
        Some(m) => Some(usize::try_from(m).unwrap_or(usize::MAX)),
        None => None,
    };
    let sampling = super::sampling_fields::parse(&f)?;
    let logprobs = match endpoint {
        Endpoint::Chat => chat_logprobs(&f)?,
        Endpoint::Completions => completion_logprobs(&f)?,
    };
    let stream = f.boolean("stream")?.unwrap_or(false);
    Ok(CompletionRequest {
        model,
        input,
        stream,
        max_tokens,
        sampling,
        stop: parse_stop(f.get("stop"))?,
        n: n as usize,
        logprobs,
        include_usage: include_usage(&f, stream)?,
    })
}

/// Chat: `logprobs: true` turns them on; `top_logprobs` (0..=20) asks for
/// alternatives and, as OpenAI has it, needs `logprobs: true`.
fn chat_logprobs(f: &Fields) -> Result<Option<usize>, ApiError> {
    let on = f.boolean("logprobs")?.unwrap_or(false);
    let top = f.unsigned("top_logprobs")?;
    if top.is_some_and(|k| k > MAX_TOP_LOGPROBS as u64) {
        return Err(ApiError::invalid(
            Some("top_logprobs"),
            format!("`top_logprobs` must be in [0, {MAX_TOP_LOGPROBS}]"),
        ));
    }
    if top.is_some() && !on {
        return Err(ApiError::invalid(
            Some("top_logprobs"),
            "`top_logprobs` needs `logprobs: true`",
        ));
    }
    Ok(on.then(|| top.unwrap_or(0) as usize))
}

/// Completions: `logprobs: k` (0..=5) reports each token's logprob and the
/// `k` most likely; absent or null, none.
fn completion_logprobs(f: &Fields) -> Result<Option<usize>, ApiError> {
    match f.unsigned("logprobs")? {
        Some(k) if k > MAX_COMPLETION_LOGPROBS as u64 => Err(ApiError::invalid(
            Some("logprobs"),
            format!("`logprobs` must be in [0, {MAX_COMPLETION_LOGPROBS}]"),
        )),
        k => Ok(k.map(|k| k as usize)),
    }
}

/// `stream_options`: an object, only with `stream: true` (as OpenAI);
/// `include_usage` a boolean.
fn include_usage(f: &Fields, stream: bool) -> Result<bool, ApiError> {
    let Some(v) = f.get("stream_options") else {
        return Ok(false);
    };
    let Value::Object(options) = v else {
        return Err(wrong_type("stream_options", "an object"));
    };
    if !stream {
        return Err(ApiError::invalid(
            Some("stream_options"),
            "`stream_options` is only allowed with `stream: true`",
        ));
    }
    match options.get("include_usage") {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(wrong_type("stream_options.include_usage", "a boolean")),
    }
}

fn parse_stop(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let stops = match v {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| wrong_type("stop", "a string or an array of strings"))?,
        Some(_) => return Err(wrong_type("stop", "a string or an array of strings")),
    };
    if stops.len() > MAX_STOP_SEQUENCES {
        return Err(ApiError::invalid(
            Some("stop"),
            format!("at most {MAX_STOP_SEQUENCES} stop sequences"),
        ));
    }
    if stops.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            Some("stop"),
            "stop sequences must not be empty",
        ));
    }
    Ok(stops)
}

const ROLES: [&str; 3] = ["system", "user", "assistant"];

fn parse_messages(v: Option<&Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let items = match v {
        None => {
            return Err(ApiError::invalid(
                Some("messages"),
                "`messages` is required",
            ))
        }
        Some(Value::Array(items)) if !items.is_empty() => items,
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid(
                Some("messages"),
                "`messages` must not be empty",
            ))
        }
        Some(_) => return Err(wrong_type("messages", "an array of messages")),
    };
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let param = format!("messages[{i}]");
            let Value::Object(obj) = m else {
                return Err(wrong_type(&param, "an object with role and content"));
            };
            let role = match obj.get("role") {
                Some(Value::String(r)) if ROLES.contains(&r.as_str()) => r.clone(),
                _ => {
                    return Err(ApiError::invalid(
                        Some(&format!("{param}.role")),
                        format!("`{param}.role` must be one of {}", ROLES.join(", ")),
                    ))
                }
            };
            let content = message_content(obj.get("content"))
                .ok_or_else(|| wrong_type(&format!("{param}.content"), "a string or text parts"))?;
            Ok(ChatMessage { role, content })
        })
        .collect()
}

/// `"text"` or `[{"type": "text", "text": "..."}, ...]` (joined).
fn message_content(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => parts
            .iter()
            .map(
                |p| match (p.get("type")?.as_str()?, p.get("text")?.as_str()) {
                    ("text", Some(t)) => Some(t),
                    _ => None,
                },
            )
            .collect::<Option<Vec<&str>>>()
            .map(|t| t.concat()),
        _ => None,
    }
}

/// `prompt`: a string, a one-string array, or an array of token ids.
fn parse_prompt(v: Option<&Value>) -> Result<PromptInput, ApiError> {
    let bad = || wrong_type("prompt", "a string or an array of token ids");
    match v {
        None => Err(ApiError::invalid(Some("prompt"), "`prompt` is required")),
        Some(Value::String(s)) => Ok(PromptInput::Text(s.clone())),
        Some(Value::Array(items)) => match items.as_slice() {
            [Value::String(s)] => Ok(PromptInput::Text(s.clone())),
            [Value::String(_), ..] => Err(ApiError::invalid(
                Some("prompt"),
                "only one prompt per request is supported",
            )),
            ids => ids
                .iter()
                .map(|i| i.as_u64().and_then(|x| u32::try_from(x).ok()))
                .collect::<Option<Vec<u32>>>()
                .map(PromptInput::Tokens)
                .ok_or_else(bad),
        },
        Some(_) => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<CompletionRequest, ApiError> {
        parse_request(Endpoint::Chat, body.as_bytes())
    }

    #[test]
    fn parses_a_full_chat_request() {
        let r = chat(r#"{"model":"auto","messages":[{"role":"system","content":"Be brief."},
            {"role":"user","content":[{"type":"text","text":"Hi "},{"type":"text","text":"there"}]}],
            "stream":true,"max_tokens":7,"temperature":0.5,"top_p":0.9,"seed":3,"stop":["\n"],"user":"x"}"#)
        .unwrap();
        assert_eq!(r.model, "auto");
        assert_eq!(
            r.input,
            PromptInput::Chat(vec![
                ChatMessage::new("system", "Be brief."),
                ChatMessage::new("user", "Hi there")
            ])
        );
        assert!(r.stream);
        assert_eq!(r.max_tokens, Some(7));
        assert_eq!(
            (r.sampling.temperature, r.sampling.top_p, r.sampling.seed),
            (0.5, 0.9, Some(3))
        );
        assert_eq!(r.stop, vec!["\n".to_string()]);
    }

    #[test]
    fn wrong_types_name_their_field() {
        let cases = [
            (r#"{"model":1,"messages":[]}"#, "model"),
            (r#"{"model":"a","messages":"hi"}"#, "messages"),
            (r#"{"model":"a","messages":[]}"#, "messages"),
            (
                r#"{"model":"a","messages":[{"role":"bot","content":"x"}]}"#,
                "messages[0].role",
            ),
            (
                r#"{"model":"a","messages":[{"role":"user","content":5}]}"#,
                "messages[0].content",
            ),
            (
                r#"{"model":"a","messages":[{"role":"user","content":"x"}],"max_tokens":"9"}"#,
                "max_tokens",
            ),
            (
                r#"{"model":"a","messages":[{"role":"user","content":"x"}],"max_tokens":-1}"#,
                "max_tokens",
            ),
            (
                r#"{"model":"a","messages":[{"role":"user","content":"x"}],"max_tokens":0}"#,
                "max_tokens",
            ),
            (
                r#"{"model":"a","messages":[{"role":"user","content":"x"}],"temperature":3}"#,
                "temperature",
            ),
            (
                r#"{"model":"a","messages":[{"role":"user","content":"x"}],"top_p":0}"#,
                "top_p",
            ),
            (
                r#"{"model":"a","messages":[{"role":"user","content":"x"}],"stream":"yes"}"#,
                "stream",
            ),
            (
                r#"{"model":"a","messages":[{"role":"user","content":"x"}],"n":9}"#,
                "n",
            ),
            (
                r#"{"model":"a","messages":[{"role":"user","content":"x"}],"n":0}"#,
                "n",
            ),
            (
                r#"{"model":"a","messages":[{"role":"user","content":"x"}],"n":"2"}"#,
                "n",
            ),
            (
                r#"{"model":"a","messages":[{"role":"user","content":"x"}],"logprobs":1}"#,
                "logprobs",
            ),
            (
                r#"{"model":"a","messages":[{"role":"user","content":"x"}],"logprobs":true,"top_logprobs":21}"#,
                "top_logprobs",
            ),
            (
                r#"{"model":"a","messages":[{"role":"user","content":"x"}],"logprobs":true,"top_logprobs":-1}"#,
                "top_logprobs",
            ),
            (
                r#"{"model":"a","messages":[{"role":"user","content":"x"}],"top_logprobs":2}"#,
                "top_logprobs",
            ),
            (
                r#"{"model":"a","messages":[{"role":"user","content":"x"}],"stream":true,"stream_options":true}"#,
                "stream_options",
            ),
            (
                r#"{"model":"a","messages":[{"role":"user","content":"x"}],"stream_options":{"include_usage":true}}"#,
                "stream_options",
            ),
            (
                r#"{"model":"a","messages":[{"role":"user","content":"x"}],"stream":true,"stream_options":{"include_usage":"yes"}}"#,
                "stream_options.include_usage",
            ),
            (
                r#"{"model":"a","messages":[{"role":"user","content":"x"}],"stop":[1]}"#,
                "stop",
            ),
            (
                r#"{"model":"a","messages":[{"role":"user","content":"x"}],"stop":["a","b","c","d","e"]}"#,
                "stop",
            ),
        ];
        for (body, param) in cases {
            let e = chat(body).unwrap_err();
            assert_eq!(e.status.as_u16(), 400, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
        }
        for bad in ["", "{", "[1]", "null"] {
            let e = chat(bad).unwrap_err();
            assert_eq!((e.status.as_u16(), e.param), (400, None), "{bad}");
        }
    }

    #[test]
    fn completion_prompt_forms() {
        let p = |s: &str| parse_request(Endpoint::Completions, s.as_bytes()).map(|r| r.input);
        assert_eq!(
            p(r#"{"model":"m","prompt":"hi"}"#).unwrap(),
            PromptInput::Text("hi".into())
        );
        assert_eq!(
            p(r#"{"model":"m","prompt":["hi"]}"#).unwrap(),
            PromptInput::Text("hi".into())
        );
        assert_eq!(
            p(r#"{"model":"m","prompt":[5,6]}"#).unwrap(),
            PromptInput::Tokens(vec![5, 6])
        );
        assert!(p(r#"{"model":"m","prompt":["a","b"]}"#).is_err());
        assert!(p(r#"{"model":"m","prompt":[5,-1]}"#).is_err());
        assert!(p(r#"{"model":"m"}"#).is_err());
    }

    #[test]
    fn choices_logprobs_and_stream_options_parse() {
        let r = chat(
            r#"{"model":"a","messages":[{"role":"user","content":"x"}],"n":3,"logprobs":true,
            "top_logprobs":4,"stream":true,"stream_options":{"include_usage":true}}"#,
        )
        .unwrap();
        assert_eq!((r.n, r.logprobs, r.include_usage), (3, Some(4), true));
        let r = chat(r#"{"model":"a","messages":[{"role":"user","content":"x"}],"logprobs":false,"stream":true,"stream_options":{}}"#).unwrap();
        assert_eq!((r.n, r.logprobs, r.include_usage), (1, None, false));
        let r = chat(r#"{"model":"a","messages":[{"role":"user","content":"x"}],"logprobs":true}"#)
            .unwrap();
        assert_eq!(r.logprobs, Some(0));
        let c = |s: &str| parse_request(Endpoint::Completions, s.as_bytes());
        assert_eq!(
            c(r#"{"model":"m","prompt":"p","logprobs":5}"#)
                .unwrap()
                .logprobs,
            Some(5)
        );
        assert_eq!(
            c(r#"{"model":"m","prompt":"p","logprobs":0}"#)
                .unwrap()
                .logprobs,
            Some(0)
        );
        assert_eq!(c(r#"{"model":"m","prompt":"p"}"#).unwrap().logprobs, None);
        for bad in [r#""logprobs":6"#, r#""logprobs":true"#, r#""logprobs":1.5"#] {
            let e = c(&format!(r#"{{"model":"m","prompt":"p",{bad}}}"#)).unwrap_err();
            assert_eq!(
                (e.status.as_u16(), e.param.as_deref()),
                (400, Some("logprobs")),
                "{bad}"
            );
        }
    }
}
