//! A generation's engine events turned into the response: a whole JSON body,
//! or Server-Sent Events.
//!
//! ```text
//!   data: {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant"}}],...}\n\n
//!   data: {..."choices":[{"index":0,"delta":{"content":"Hel"}}]...}\n\n
//!   data: {..."choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n
//!   data: {..."choices":[],"usage":{...}}\n\n          only with stream_options.include_usage
//!   data: [DONE]\n\n
//! ```
//!
//! The SSE body owns the engine's event receiver: when the client goes away
//! hyper drops the body, the receiver closes, and the engine frees the slot
//! at its next step. (Not streaming, hyper drops the handler's future on a
//! closed connection, with the same effect.) [`Accounting`] dropped before the
//! end counts a disconnect.

use std::collections::VecDeque;
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
use super::openai::Endpoint;
use super::responses::{
    chunk_body, finish_reason, logprobs_json, usage_chunk, ChunkChoice, Served, Usage,
};
use crate::engine::{Event, TokenLogprob};
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

/// The engine channels of a request's `n` choices, read as one stream of
/// `(choice, event)`. Dropping it (or [`Choices::close`]) cancels every
/// choice still running.
struct Choices {
    events: Vec<UnboundedReceiver<Event>>,
    done: Vec<bool>,
    /// The choice polled first next time (round robin: none starves).
    next: usize,
}

impl Choices {
    fn new(events: Vec<UnboundedReceiver<Event>>) -> Choices {
        Choices {
            done: vec![false; events.len()],
            events,
            next: 0,
        }
    }

    /// The next event of a choice not yet done; `Ready(None)` once all are
    /// (or after `close`). A closed channel is `Some((i, None))`.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<(usize, Option<Event>)>> {
        let n = self.events.len();
        let mut waiting = false;
        for k in 0..n {
            let i = (self.next + k) % n;
            if self.done[i] {
                continue;
            }
            waiting = true;
            if let Poll::Ready(e) = self.events[i].poll_recv(cx) {
                self.next = (i + 1) % n;
                return Poll::Ready(Some((i, e)));
            }
        }
        if waiting {
            Poll::Pending
        } else {
            Poll::Ready(None)
        }
    }

    async fn next(&mut self) -> Option<(usize, Option<Event>)> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// Choice `i` sent its last event.
    fn finish(&mut self, i: usize) {
        self.done[i] = true;
    }

    fn all_done(&self) -> bool {
        self.done.iter().all(|&d| d)
    }

    /// Lets go of every channel: the engine frees their slots.
    fn close(&mut self) {
        self.events.clear();
        self.done.clear();
    }
}

/// The end of one choice of a non-streaming generation.
#[derive(Debug, Default)]
pub struct Collected {
    pub text: String,
    /// `Some` once the choice is done: always, in what [`collect_all`] returns.
    pub stop: Option<StopReason>,
    pub completion_tokens: usize,
    pub logprobs: Vec<TokenLogprob>,
}

/// Reads every choice's events to the end (after `Started`), all at once.
/// The first engine-side failure of any choice is a 500 at once, and the
/// other choices are cancelled with it.
pub async fn collect_all(
    events: Vec<UnboundedReceiver<Event>>,
    acct: &mut Accounting,
) -> Result<Vec<Collected>, ApiError> {
    let mut out: Vec<Collected> = events.iter().map(|_| Collected::default()).collect();
    let mut choices = Choices::new(events);
    while let Some((i, event)) = choices.next().await {
        let c = &mut out[i];
        match event {
            Some(Event::Text(t)) => {
                if !t.is_empty() {
                    acct.on_text();
                    c.text.push_str(&t);
                }
            }
            Some(Event::Logprob(l)) => c.logprobs.push(l),
            Some(Event::Done {
                stop,
                completion_tokens,
            }) => {
                c.stop = Some(stop);
                c.completion_tokens = completion_tokens;
                choices.finish(i);
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
    acct.on_done(out.iter().map(|c| c.completion_tokens).sum());
    Ok(out)
}

/// What a streamed choice has sent of its logprobs.
#[derive(Default)]
struct HeldLogprobs {
    /// Logprobs of tokens whose text is not sent yet (held back for a stop
    /// string): they go out with the next text, or with the finish.
    tokens: Vec<TokenLogprob>,
    /// Characters of text whose tokens' logprobs were sent (completions'
    /// `text_offset`).
    sent_chars: usize,
}

/// The SSE response body of `n` choices: chunks of each choice as they come,
/// each carrying its index.
///
/// ```text
///   (chat) a role chunk per choice, then text chunks of any choice in any order,
///   a finish chunk per choice, [a usage chunk with "choices": []], [DONE]
/// ```
///
/// Any choice failing ends the stream with an error event; the other
/// receivers are dropped with it, so the engine frees every slot.
pub struct SseBody {
    choices: Choices,
    held: Vec<HeldLogprobs>,
    served: Served,
    acct: Accounting,
    /// `stream_options.include_usage`: a usage chunk before `[DONE]`.
    include_usage: bool,
    /// Frames ready to send before polling the engine (the openings, the end).
    ready: VecDeque<Bytes>,
    completion_tokens: usize,
    finished: bool,
}

impl SseBody {
    pub fn new(
        events: Vec<UnboundedReceiver<Event>>,
        served: Served,
        acct: Accounting,
        include_usage: bool,
    ) -> SseBody {
        let mut ready = VecDeque::new();
        if acct.endpoint == Endpoint::Chat {
            for index in 0..events.len() {
                let opening = ChunkChoice {
                    index,
                    role: true,
                    text: Some(""),
                    ..Default::default()
                };
                ready.push_back(sse_event(
                    &chunk_body(Endpoint::Chat, &served, opening).to_string(),
                ));
            }
        }
        SseBody {
            held: events.iter().map(|_| HeldLogprobs::default()).collect(),
            choices: Choices::new(events),
            served,
            acct,
            include_usage,
            ready,
            completion_tokens: 0,
            finished: false,
        }
    }

    /// Queues the last frames, `last` then `[DONE]`, and lets go of the
    /// engine's channels.
    fn end(&mut self, last: Option<Bytes>) {
        self.finished = true;
        self.choices.close();
        self.ready.extend(last);
        self.ready.push_back(Bytes::from_static(SSE_DONE));
    }

    fn fail(&mut self, why: ApiError) {
        self.acct.on_failed();
        self.end(Some(sse_event(&why.body_json())));
    }

    /// A chunk of choice `index`: `text` and the logprobs held for it.
    fn chunk(&mut self, index: usize, text: Option<&str>, finish: Option<&str>) -> Bytes {
        let endpoint = self.acct.endpoint;
        let held = &mut self.held[index];
        let logprobs = (!held.tokens.is_empty()).then(|| {
            let tokens = std::mem::take(&mut held.tokens);
            let v = logprobs_json(endpoint, &tokens, held.sent_chars);
            held.sent_chars += tokens
                .iter()
                .map(|t| t.sampled.text.chars().count())
                .sum::<usize>();
            v
        });
        let choice = ChunkChoice {
            index,
            role: false,
            text,
            logprobs,
            finish,
        };
        sse_event(&chunk_body(endpoint, &self.served, choice).to_string())
    }

    /// One engine event of choice `index`: the frame it makes, if any.
    fn on_event(&mut self, index: usize, event: Option<Event>) -> Option<Bytes> {
        match event {
            Some(Event::Text(t)) if t.is_empty() => None,
            Some(Event::Text(t)) => {
                self.acct.on_text();
                Some(self.chunk(index, Some(&t), None))
            }
            Some(Event::Logprob(l)) => {
                self.held[index].tokens.push(l);
                None
            }
            Some(Event::Started { .. }) => None,
            Some(Event::Done {
                stop,
                completion_tokens,
            }) => {
                self.completion_tokens += completion_tokens;
                self.choices.finish(index);
                let frame = self.chunk(index, None, Some(finish_reason(stop)));
                if self.choices.all_done() {
                    self.acct.on_done(self.completion_tokens);
                    let usage = self.include_usage.then(|| {
                        let usage = Usage::new(self.acct.prompt_tokens, self.completion_tokens);
                        let endpoint = self.acct.endpoint;
                        sse_event(&usage_chunk(endpoint, &self.served, usage).to_string())
                    });
                    self.end(usage);
                }
                Some(frame)
            }
            Some(Event::Error(e)) => {
                self.fail(ApiError::internal(format!("generation failed: {e}")));
                None
            }
            None => {
                self.fail(ApiError::internal("the engine dropped the request"));
                None
            }
        }
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
        loop {
            if let Some(b) = this.ready.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(b))));
            }
            if this.finished {
                return Poll::Ready(None);
            }
            let (i, event) = match this.choices.poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(e)) => e,
                // Every choice is done: `on_event` has ended the stream.
                Poll::Ready(None) => return Poll::Ready(None),
            };
            if let Some(b) = this.on_event(i, event) {
                // Before any `end` frames `on_event` queued.
                this.ready.push_front(b);
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished && self.ready.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Candidate;
    use http_body_util::BodyExt;
    use serde_json::Value;
    use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

    fn served() -> Served {
        Served {
            id: "chatcmpl-1".into(),
            created: 0,
            model: "expert-00".into(),
            route: None,
        }
    }

    fn acct(metrics: &Arc<Metrics>, endpoint: Endpoint) -> Accounting {
        Accounting::new(
            metrics.clone(),
            endpoint,
            Instant::now(),
            "expert-00".into(),
            3,
        )
    }

    fn channels(n: usize) -> (Vec<UnboundedSender<Event>>, Vec<UnboundedReceiver<Event>>) {
        (0..n).map(|_| unbounded_channel()).unzip()
    }

    /// The `data:` payloads of a whole body, `[DONE]` checked and dropped.
    async fn chunks(body: SseBody) -> Vec<Value> {
        let body = body.collect().await.unwrap().to_bytes();
        let text = String::from_utf8(body.to_vec()).unwrap();
        let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert!(events.iter().all(|e| e.starts_with("data: ")), "{text}");
        assert_eq!(*events.last().unwrap(), "data: [DONE]");
        events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(&e[6..]).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn stream_ends_with_finish_and_done_and_usage_only_when_asked() {
        for include_usage in [false, true] {
            let (tx, rx) = channels(1);
            let metrics = Arc::new(Metrics::default());
            for t in ["he", "", "y"] {
                tx[0].send(Event::Text(t.into())).unwrap();
            }
            tx[0]
                .send(Event::Done {
                    stop: StopReason::MaxTokens,
                    completion_tokens: 2,
                })
                .unwrap();
            let body = SseBody::new(rx, served(), acct(&metrics, Endpoint::Chat), include_usage);
            let chunks = chunks(body).await;
            assert_eq!(chunks.len(), 4 + include_usage as usize);
            assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
            let content: String = chunks[1..3]
                .iter()
                .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
                .collect();
            assert_eq!(content, "hey");
            assert_eq!(chunks[3]["choices"][0]["finish_reason"], "length");
            assert!(chunks[..4].iter().all(|c| c.get("usage").is_none()));
            if include_usage {
                assert_eq!(chunks[4]["choices"], serde_json::json!([]));
                assert_eq!(chunks[4]["usage"]["total_tokens"], 5);
            }
            assert_eq!(metrics.time_to_first_token.count(), 1);
            assert_eq!(metrics.inter_token.count(), 1);
            assert_eq!(metrics.completion_tokens.get(&["expert-00"]), 2);
            assert_eq!(metrics.disconnects.get(&["/v1/chat/completions"]), 0);
        }
    }

    fn logprob(text: &str) -> TokenLogprob {
        TokenLogprob {
            sampled: Candidate {
                id: 1,
                text: text.into(),
                bytes: None,
                logprob: -1.0,
            },
            top: Vec::new(),
        }
    }

    #[tokio::test]
    async fn choices_interleave_with_their_index_and_usage_sums_them() {
        let (tx, rx) = channels(2);
        let metrics = Arc::new(Metrics::default());
        // Choice 1's logprob is held until its text, which comes at its end.
        tx[1].send(Event::Logprob(logprob("ab"))).unwrap();
        tx[0].send(Event::Logprob(logprob("x"))).unwrap();
        tx[0].send(Event::Text("x".into())).unwrap();
        tx[1].send(Event::Logprob(logprob("c"))).unwrap();
        tx[1].send(Event::Text("abc".into())).unwrap();
        for (t, n) in tx.iter().zip([1, 2]) {
            t.send(Event::Done {
                stop: StopReason::Eos,
                completion_tokens: n,
            })
            .unwrap();
        }
        let body = SseBody::new(rx, served(), acct(&metrics, Endpoint::Completions), true);
        let chunks = chunks(body).await;
        let usage = chunks.last().unwrap();
        assert_eq!(usage["usage"]["prompt_tokens"], 3, "counted once");
        assert_eq!(usage["usage"]["completion_tokens"], 3);
        let of = |i: u64| -> Vec<&Value> {
            chunks
                .iter()
                .filter(|c| c["choices"][0]["index"].as_u64() == Some(i))
                .map(|c| &c["choices"][0])
                .collect()
        };
        for (i, text, tokens) in [(0, "x", vec!["x"]), (1, "abc", vec!["ab", "c"])] {
            let choice = of(i);
            let joined: String = choice.iter().filter_map(|c| c["text"].as_str()).collect();
            assert_eq!(joined, text);
            let sent: Vec<&str> = choice
                .iter()
                .filter_map(|c| c["logprobs"]["tokens"].as_array())
                .flatten()
                .map(|t| t.as_str().unwrap())
                .collect();
            assert_eq!(sent, tokens);
            assert_eq!(choice.last().unwrap()["finish_reason"], "stop");
        }
        let offsets = &of(1)[0]["logprobs"]["text_offset"];
        assert_eq!(*offsets, serde_json::json!([0, 2]));
        assert_eq!(metrics.completion_tokens.get(&["expert-00"]), 3);
    }

    #[tokio::test]
    async fn one_failing_choice_ends_the_stream_and_drops_every_receiver() {
        let (tx, rx) = channels(3);
        let metrics = Arc::new(Metrics::default());
        tx[1].send(Event::Error("boom".into())).unwrap();
        let body = SseBody::new(rx, served(), acct(&metrics, Endpoint::Chat), false);
        let chunks = chunks(body).await;
        assert!(chunks.last().unwrap()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("boom"));
        assert!(tx.iter().all(|t| t.is_closed()), "every slot is freed");
        assert_eq!(metrics.disconnects.get(&["/v1/chat/completions"]), 0);
    }

    #[tokio::test]
    async fn collect_all_reads_choices_together_and_fails_at_the_first_error() {
        let metrics = Arc::new(Metrics::default());
        let (tx, rx) = channels(2);
        tx[1].send(Event::Text("b".into())).unwrap();
        tx[0].send(Event::Logprob(logprob("a"))).unwrap();
        tx[0].send(Event::Text("a".into())).unwrap();
        for t in &tx {
            t.send(Event::Done {
                stop: StopReason::MaxTokens,
                completion_tokens: 1,
            })
            .unwrap();
        }
        let mut a = acct(&metrics, Endpoint::Chat);
        let out = collect_all(rx, &mut a).await.unwrap();
        let texts: Vec<&str> = out.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(texts, ["a", "b"], "in choice order");
        assert_eq!((out[0].logprobs.len(), out[1].logprobs.len()), (1, 0));
        assert_eq!(out[1].stop, Some(StopReason::MaxTokens));
        assert_eq!(metrics.completion_tokens.get(&["expert-00"]), 2);

        // Choice 0 never ends; choice 1's error ends the request at once and
        // cancels choice 0.
        let (tx, rx) = channels(2);
        tx[1].send(Event::Error("boom".into())).unwrap();
        let mut a = acct(&metrics, Endpoint::Chat);
        let waited = std::time::Duration::from_secs(10);
        let e = tokio::time::timeout(waited, collect_all(rx, &mut a))
            .await
            .expect("no wait for choice 0")
            .unwrap_err();
        assert_eq!(e.status.as_u16(), 500);
        assert!(tx[0].is_closed(), "choice 0's slot is freed");
    }

    #[tokio::test]
    async fn dropping_the_body_closes_the_receivers_and_counts_a_disconnect() {
        let (tx, rx) = channels(2);
        let metrics = Arc::new(Metrics::default());
        let body = SseBody::new(rx, served(), acct(&metrics, Endpoint::Completions), false);
        tx[0].send(Event::Text("a".into())).unwrap();
        drop(body);
        assert!(tx.iter().all(|t| t.is_closed()));
        assert_eq!(metrics.disconnects.get(&["/v1/completions"]), 1);
    }
}
