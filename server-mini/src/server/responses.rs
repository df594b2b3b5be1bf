//! OpenAI-compatible response bodies of `/v1/chat/completions` and
//! `/v1/completions`: whole responses, streamed chunks, usage and logprobs.

use serde::Serialize;
use serde_json::{Map, Value};

use super::openai::Endpoint;
use crate::engine::TokenLogprob;

/// What OpenAI reports for a probability that underflows (JSON has no -inf).
pub const LOGPROB_FLOOR: f32 = -9999.0;

/// OpenAI's `finish_reason`.
pub fn finish_reason(stop: crate::generate::StopReason) -> &'static str {
    match stop {
        crate::generate::StopReason::MaxTokens => "length",
        crate::generate::StopReason::Eos | crate::generate::StopReason::StopString => "stop",
    }
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Usage {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// How `auto` routed the request (extension field `meswitch_route`).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RouteInfo {
    pub domain: String,
    pub confidence: f32,
    /// The expert chosen (the base model's name when routed to the base).
    pub expert: String,
}

/// Who served a request: the `model` field and headers.
#[derive(Clone, Debug, PartialEq)]
pub struct Served {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub route: Option<RouteInfo>,
}

/// One finished choice of a whole (non-streaming) response.
#[derive(Clone, Debug, PartialEq)]
pub struct ChoiceOut {
    pub text: String,
    pub finish: &'static str,
    /// Present when the request asked for logprobs.
    pub logprobs: Option<Vec<TokenLogprob>>,
}

/// A whole (non-streaming) response body: choices indexed in order.
pub fn completion_body(
    endpoint: Endpoint,
    served: &Served,
    choices: &[ChoiceOut],
    usage: Usage,
) -> Value {
    let choices = choices
        .iter()
        .enumerate()
        .map(|(index, c)| {
            let logprobs = c
                .logprobs
                .as_deref()
                .map_or(Value::Null, |l| logprobs_json(endpoint, l, 0));
            match endpoint {
                Endpoint::Chat => serde_json::json!({
                    "index": index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": logprobs,
                    "finish_reason": c.finish,
                }),
                Endpoint::Completions => serde_json::json!({
                    "index": index, "text": c.text, "logprobs": logprobs, "finish_reason": c.finish,
                }),
            }
        })
        .collect();
    envelope(endpoint.object(), served, choices, Some(usage))
}

/// One choice's part of a streamed chunk.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChunkChoice<'a> {
    pub index: usize,
    /// Chat: the opening chunk of a choice carries the assistant role.
    pub role: bool,
    pub text: Option<&'a str>,
    /// Already in the endpoint's shape ([`logprobs_json`]).
    pub logprobs: Option<Value>,
    pub finish: Option<&'a str>,
}

/// One streamed chunk with one choice. Usage goes in its own last chunk
/// ([`usage_chunk`]).
pub fn chunk_body(endpoint: Endpoint, served: &Served, c: ChunkChoice<'_>) -> Value {
    let logprobs = c.logprobs.unwrap_or(Value::Null);
    let choice = match endpoint {
        Endpoint::Chat => {
            let mut delta = Map::new();
            if c.role {
                delta.insert("role".into(), "assistant".into());
            }
            if let Some(t) = c.text {
                delta.insert("content".into(), t.into());
            }
            serde_json::json!({"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": c.finish})
        }
        Endpoint::Completions => serde_json::json!({
            "index": c.index, "text": c.text.unwrap_or(""), "logprobs": logprobs, "finish_reason": c.finish,
        }),
    };
    envelope(endpoint.chunk_object(), served, vec![choice], None)
}

/// `stream_options.include_usage`: the chunk before `[DONE]`, with no choices.
pub fn usage_chunk(endpoint: Endpoint, served: &Served, usage: Usage) -> Value {
    envelope(endpoint.chunk_object(), served, Vec::new(), Some(usage))
}

fn logprob_value(l: f32) -> f32 {
    if l.is_finite() {
        l.max(LOGPROB_FLOOR)
    } else {
        LOGPROB_FLOOR
    }
}

/// Tokens' logprobs in the endpoint's shape. Chat:
///
/// ```text
///   {"content": [{"token", "logprob", "bytes": [u8..], "top_logprobs": [{"token", "logprob", "bytes"}..]}..]}
/// ```
///
/// `bytes` are the token's own (a piece of a UTF-8 character shows its real
/// bytes where `token` has U+FFFD), null when the tokenizer cannot say.
///
/// completions (`text_offset`: in characters of the completion text, the
/// first token at `text_offset`, for a stream's later chunks):
///
/// ```text
///   {"tokens": [..], "token_logprobs": [..], "top_logprobs": [{token: logprob}..], "text_offset": [..]}
/// ```
pub fn logprobs_json(endpoint: Endpoint, tokens: &[TokenLogprob], text_offset: usize) -> Value {
    match endpoint {
        Endpoint::Chat => {
            let entry = |c: &crate::engine::Candidate| {
                serde_json::json!({
                    "token": c.text,
                    "logprob": logprob_value(c.logprob),
                    "bytes": c.bytes,
                })
            };
            let content: Vec<Value> = tokens
                .iter()
                .map(|t| {
                    let mut e = entry(&t.sampled);
                    e["top_logprobs"] = t.top.iter().map(entry).collect();
                    e
                })
                .collect();
            serde_json::json!({ "content": content })
        }
        Endpoint::Completions => {
            let mut offset = text_offset;
            let mut offsets = Vec::with_capacity(tokens.len());
            for t in tokens {
                offsets.push(offset);
                offset += t.sampled.text.chars().count();
            }
            let top: Vec<Value> = tokens
                .iter()
                .map(|t| {
                    // Keyed by text: ids that decode alike (partial UTF-8
                    // bytes all show as U+FFFD) keep the likeliest's entry.
                    let mut m = Map::new();
                    for c in &t.top {
                        m.entry(c.text.clone())
                            .or_insert_with(|| logprob_value(c.logprob).into());
                    }
                    Value::Object(m)
                })
                .collect();
            serde_json::json!({
                "tokens": tokens.iter().map(|t| t.sampled.text.as_str()).collect::<Vec<_>>(),
                "token_logprobs": tokens.iter().map(|t| logprob_value(t.sampled.logprob)).collect::<Vec<_>>(),
                "top_logprobs": top,
                "text_offset": offsets,
            })
        }
    }
}

fn envelope(object: &str, served: &Served, choices: Vec<Value>, usage: Option<Usage>) -> Value {
    let mut v = serde_json::json!({
        "id": served.id,
        "object": object,
        "created": served.created,
        "model": served.model,
        "choices": choices,
    });
    if let Some(u) = usage {
        v["usage"] = serde_json::to_value(u).unwrap_or(Value::Null);
    }
    if let Some(r) = &served.route {
        v["meswitch_route"] = serde_json::to_value(r).unwrap_or(Value::Null);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(id: u32, text: &str, logprob: f32, top: &[(u32, &str, f32)]) -> TokenLogprob {
        let c = |id, text: &str, logprob| crate::engine::Candidate {
            id,
            text: text.to_string(),
            bytes: Some(text.as_bytes().to_vec()),
            logprob,
        };
        TokenLogprob {
            sampled: c(id, text, logprob),
            top: top.iter().map(|&(i, t, l)| c(i, t, l)).collect(),
        }
    }

    #[test]
    fn logprobs_have_openai_shapes() {
        let tokens = [
            token(
                5,
                "hé",
                -0.5,
                &[(5, "hé", -0.5), (6, "x", -1.0), (9, "x", -2.0)],
            ),
            token(7, "y", f32::NEG_INFINITY, &[(8, "z", -0.1)]),
        ];
        let chat = logprobs_json(Endpoint::Chat, &tokens, 0);
        let first = &chat["content"][0];
        assert_eq!(first["token"], "hé");
        assert_eq!(first["logprob"], -0.5);
        assert_eq!(first["bytes"], serde_json::json!([104, 195, 169]));
        assert_eq!(first["top_logprobs"][1]["token"], "x");
        assert_eq!(
            chat["content"][1]["logprob"], LOGPROB_FLOOR,
            "no -inf in JSON"
        );
        let cmpl = logprobs_json(Endpoint::Completions, &tokens, 10);
        assert_eq!(cmpl["tokens"], serde_json::json!(["hé", "y"]));
        assert_eq!(cmpl["token_logprobs"][0], -0.5);
        assert_eq!(
            cmpl["top_logprobs"][0]["x"], -1.0,
            "the likelier of two 'x'"
        );
        assert_eq!(
            cmpl["text_offset"],
            serde_json::json!([10, 12]),
            "in characters"
        );
    }

    #[test]
    fn chat_bytes_are_the_token_s_not_its_text_s() {
        let mut partial = token(3, "\u{FFFD}", -0.2, &[]);
        partial.sampled.bytes = Some(vec![0xE6]);
        let mut unknown = token(4, "?", -0.3, &[]);
        unknown.sampled.bytes = None;
        let chat = logprobs_json(Endpoint::Chat, &[partial, unknown], 0);
        assert_eq!(chat["content"][0]["token"], "\u{FFFD}");
        assert_eq!(chat["content"][0]["bytes"], serde_json::json!([0xE6]));
        assert_eq!(chat["content"][1]["bytes"], Value::Null);
    }

    #[test]
    fn chunks_and_bodies_have_openai_fields() {
        let served = Served {
            id: "chatcmpl-1".into(),
            created: 5,
            model: "expert-01".into(),
            route: Some(RouteInfo {
                domain: "math".into(),
                confidence: 0.75,
                expert: "expert-01".into(),
            }),
        };
        let choices = [
            ChoiceOut {
                text: "hey".into(),
                finish: "stop",
                logprobs: None,
            },
            ChoiceOut {
                text: "ho".into(),
                finish: "length",
                logprobs: Some(vec![token(1, "ho", -0.25, &[])]),
            },
        ];
        let b = completion_body(Endpoint::Chat, &served, &choices, Usage::new(3, 2));
        assert_eq!(b["choices"][0]["message"]["content"], "hey");
        assert_eq!(b["choices"][0]["logprobs"], Value::Null);
        assert_eq!(b["choices"][1]["index"], 1);
        assert_eq!(b["choices"][1]["logprobs"]["content"][0]["logprob"], -0.25);
        assert_eq!(b["usage"]["total_tokens"], 5);
        assert_eq!(b["meswitch_route"]["confidence"], 0.75);
        let c = chunk_body(
            Endpoint::Chat,
            &served,
            ChunkChoice {
                index: 2,
                role: true,
                text: Some("a"),
                ..Default::default()
            },
        );
        assert_eq!(c["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(c["choices"][0]["index"], 2);
        assert_eq!(c["object"], "chat.completion.chunk");
        assert!(c.get("usage").is_none());
        let last = chunk_body(
            Endpoint::Completions,
            &served,
            ChunkChoice {
                finish: Some("length"),
                ..Default::default()
            },
        );
        assert_eq!(last["choices"][0]["finish_reason"], "length");
        assert!(last.get("usage").is_none());
        let u = usage_chunk(Endpoint::Completions, &served, Usage::new(1, 1));
        assert_eq!(u["choices"], serde_json::json!([]));
        assert_eq!(u["usage"]["completion_tokens"], 1);
    }
}
