//! A generation's engine events turned into the response: a whole JSON body,
//! or Server-Sent Events.
//!
//! ```text
//!   data: {"object":"chat.completion.chunk","choices":[{"delta":{"role":"assistant"}}],...}\n\n
//!   data: {..."delta":{"content":"Hel"}...}\n\n
//!   data: {..."delta":{},"finish_reason":"stop"}],"usage":{...}}\n\n
//!   data: [DONE]\n\n
//! ```
//!
//! The SSE body owns the engine's event receiver: when the client goes away
//! hyper drops the body, the receiver closes, and the engine frees the slot
//! at its next step. (Not streaming, hyper drops the handler's future on a
//! closed connection, with the same effect.) [`Accounting`] dropped before the
//! end counts a disconnect.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use hyper::body::{Body, Frame};
use tokio::sync::mpsc::UnboundedReceiver;

use super::error::ApiError;
use super::metrics::Metrics;
use super::openai::{chunk_body, finish_reason, Endpoint, Served, Usage};
use crate::engine::Event;
use crate::generate::StopReason;

/// The last SSE event of every stream.
pub const SSE_DONE: &[u8] = b"data: [DONE]\n\n";

/// One SSE `data:` event. JSON never contains a raw newline, so one line suffices.
pub fn sse_event(json: &str) -> Bytes {
    let mut b = Vec::with_capacity(json.len() + 8);
    b.extend_from_slice(b"data: ");
    b.extend_from_slice(json.as_bytes());
    b.extend_from_slice(b"\n\n");
    Bytes::from(b)
}

/// Latency and token accounting of one generation request.
pub struct Accounting {
    pub metrics: Arc<Metrics>,
    pub endpoint: Endpoint,
    pub arrived: Instant,
    pub model: String,
    pub prompt_tokens: usize,
    last_text: Option<Instant>,
    /// The request reached its end (done or failed); dropped before that,
    /// the client went away.
    settled: bool,
}

impl Accounting {
    pub fn new(
        metrics: Arc<Metrics>,
        endpoint: Endpoint,
        arrived: Instant,
        model: String,
        prompt_tokens: usize,
    ) -> Accounting {
        metrics.prompt_tokens.add(&[&model], prompt_tokens as u64);
        Accounting {
            metrics,
            endpoint,
            arrived,
            model,
            prompt_tokens,
            last_text: None,
            settled: false,
        }
    }

    /// Records time to first text or the gap since the previous text.
    pub fn on_text(&mut self) {
        let now = Instant::now();
        match self.last_text {
            None => self.metrics.time_to_first_token.observe(now - self.arrived),
            Some(prev) => self.metrics.inter_token.observe(now - prev),
        }
        self.last_text = Some(now);
    }

    pub fn on_done(&mut self, completion_tokens: usize) {
        self.settled = true;
        self.metrics
            .completion_tokens
            .add(&[&self.model], completion_tokens as u64);
        self.metrics
            .request_duration
            .observe(self.arrived.elapsed());
    }

    /// The request failed on the engine's side (not a disconnect).
    pub fn on_failed(&mut self) {
        self.settled = true;
    }
}

impl Drop for Accounting {
    fn drop(&mut self) {
        if !self.settled {
            self.metrics
                .disconnects
                .add(&[endpoint_path(self.endpoint)], 1);
        }
    }
}

pub fn endpoint_path(e: Endpoint) -> &'static str {
    match e {
        Endpoint::Chat => "/v1/chat/completions",
        Endpoint::Completions => "/v1/completions",
    }
}

/// The end of a non-streaming generation.
pub struct Collected {
    pub text: String,
    pub stop: StopReason,
    pub completion_tokens: usize,
}

/// Reads events to the end (after `Started`). An engine-side failure is a 500.
pub async fn collect(
    events: &mut UnboundedReceiver<Event>,
    acct: &mut Accounting,
) -> Result<Collected, ApiError> {
    let mut text = String::new();
    loop {
        match events.recv().await {
            Some(Event::Text(t)) => {
                if !t.is_empty() {
                    acct.on_text();
                    text.push_str(&t);
                }
            }
            Some(Event::Done {
                stop,
                completion_tokens,
            }) => {
                acct.on_done(completion_tokens);
                return Ok(Collected {
                    text,
                    stop,
                    completion_tokens,
                });
            }
            Some(Event::Error(e)) => {
                acct.on_failed();
                return Err(ApiError::internal(format!("generation failed: {e}")));
            }
            Some(Event::Started { .. }) => {}
            None => {
                acct.on_failed();
                return Err(ApiError::internal("the engine dropped the request"));
            }
        }
    }
}

/// The SSE response body.
pub struct SseBody {
    events: UnboundedReceiver<Event>,
    served: Served,
    acct: Accounting,
    /// The opening chunk (chat: the assistant role), sent before any text.
    opening: Option<Bytes>,
    finished: bool,
}

impl SseBody {
    pub fn new(events: UnboundedReceiver<Event>, served: Served, acct: Accounting) -> SseBody {
        let opening = match acct.endpoint {
            Endpoint::Chat => Some(sse_event(
                &chunk_body(Endpoint::Chat, &served, Some(""), true, None).to_string(),
            )),
            Endpoint::Completions => None,
        };
        SseBody {
            events,
            served,
            acct,
            opening,
            finished: false,
        }
    }

    /// The final frames: an error event (if any) and `[DONE]`.
    fn end(&mut self, last: Bytes) -> Frame<Bytes> {
        self.finished = true;
        let mut b = Vec::with_capacity(last.len() + SSE_DONE.len());
        b.extend_from_slice(&last);
        b.extend_from_slice(SSE_DONE);
        Frame::data(Bytes::from(b))
    }
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        if let Some(o) = this.opening.take() {
            return Poll::Ready(Some(Ok(Frame::data(o))));
        }
        if this.finished {
            return Poll::Ready(None);
        }
        loop {
            let event = match this.events.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(e) => e,
            };
            let endpoint = this.acct.endpoint;
            let frame = match event {
                Some(Event::Text(t)) if t.is_empty() => continue,
                Some(Event::Text(t)) => {
                    this.acct.on_text();
                    let c = chunk_body(endpoint, &this.served, Some(&t), false, None);
                    Frame::data(sse_event(&c.to_string()))
                }
                Some(Event::Started { .. }) => continue,
                Some(Event::Done {
                    stop,
                    completion_tokens,
                }) => {
                    this.acct.on_done(completion_tokens);
                    let usage = Usage::new(this.acct.prompt_tokens, completion_tokens);
                    let c = chunk_body(
                        endpoint,
                        &this.served,
                        None,
                        false,
                        Some((finish_reason(stop), usage)),
                    );
                    this.end(sse_event(&c.to_string()))
                }
                Some(Event::Error(e)) => {
                    this.acct.on_failed();
                    let err = ApiError::internal(format!("generation failed: {e}"));
                    this.end(sse_event(&err.body_json()))
                }
                None => {
                    this.acct.on_failed();
                    let err = ApiError::internal("the engine dropped the request");
                    this.end(sse_event(&err.body_json()))
                }
            };
            return Poll::Ready(Some(Ok(frame)));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished && self.opening.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn stream_ends_with_usage_and_done() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let served = Served {
            id: "chatcmpl-1".into(),
            created: 0,
            model: "expert-00".into(),
            route: None,
        };
        let metrics = Arc::new(Metrics::default());
        let acct = Accounting::new(
            metrics.clone(),
            Endpoint::Chat,
            Instant::now(),
            "expert-00".into(),
            3,
        );
        tx.send(Event::Text("he".into())).unwrap();
        tx.send(Event::Text("".into())).unwrap();
        tx.send(Event::Text("y".into())).unwrap();
        tx.send(Event::Done {
            stop: StopReason::MaxTokens,
            completion_tokens: 2,
        })
        .unwrap();
        let body = SseBody::new(rx, served, acct)
            .collect()
            .await
            .unwrap()
            .to_bytes();
        let text = String::from_utf8(body.to_vec()).unwrap();
        let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 5, "{text}");
        assert!(events.iter().all(|e| e.starts_with("data: ")));
        assert_eq!(*events.last().unwrap(), "data: [DONE]");
        let last: serde_json::Value = serde_json::from_str(&events[3][6..]).unwrap();
        assert_eq!(last["choices"][0]["finish_reason"], "length");
        assert_eq!(last["usage"]["total_tokens"], 5);
        let content: String = events[1..3]
            .iter()
            .map(|e| {
                serde_json::from_str::<serde_json::Value>(&e[6..]).unwrap()["choices"][0]["delta"]
                    ["content"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(content, "hey");
        assert_eq!(metrics.time_to_first_token.count(), 1);
        assert_eq!(metrics.inter_token.count(), 1);
        assert_eq!(metrics.completion_tokens.get(&["expert-00"]), 2);
        assert_eq!(metrics.disconnects.get(&["/v1/chat/completions"]), 0);
    }

    #[tokio::test]
    async fn dropping_the_body_closes_the_receiver_and_counts_a_disconnect() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let metrics = Arc::new(Metrics::default());
        let served = Served {
            id: "x".into(),
            created: 0,
            model: "m".into(),
            route: None,
        };
        let acct = Accounting::new(
            metrics.clone(),
            Endpoint::Completions,
            Instant::now(),
            "m".into(),
            1,
        );
        let body = SseBody::new(rx, served, acct);
        tx.send(Event::Text("a".into())).unwrap();
        drop(body);
        assert!(tx.is_closed());
        assert_eq!(metrics.disconnects.get(&["/v1/completions"]), 1);
    }
}
