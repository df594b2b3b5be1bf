//! Request routing and handlers.
//!
//! ```text
//!   POST /v1/chat/completions   POST /v1/completions    OpenAI-compatible, `stream: true` → SSE
//!   GET  /v1/models             GET  /health            GET /metrics (Prometheus text)
//!   GET  /admin/experts         POST /admin/experts/load {"name","file"}
//!                               POST /admin/experts/unload {"name"}       (bearer token)
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};

use super::admin::AdminConfig;
use super::error::ApiError;
use super::metrics::{self, Metrics};
use super::openai::{self, Endpoint};
use super::prompt::Prompter;
use super::responses::{self, ChoiceOut, RouteInfo, Served, Usage};
use super::sampling_fields;
use super::stream::{self, Accounting, SseBody};
use crate::engine::{
    Engine, Event, ExpertChoice, GenRequest, RequestHandle, RouteDecision, SubmitError, Tier,
};
use crate::generate::Detokenize;

pub type ResponseBody = BoxBody<Bytes, std::convert::Infallible>;

/// Header naming the expert (or base model) that served a generation.
pub const EXPERT_HEADER: &str = "x-meswitch-expert";
/// For `model: "auto"`: the router's top-class probability and domain.
pub const ROUTE_CONFIDENCE_HEADER: &str = "x-meswitch-route-confidence";
pub const ROUTE_DOMAIN_HEADER: &str = "x-meswitch-route-domain";
/// The model name that asks the router to choose.
pub const AUTO_MODEL: &str = "auto";

/// Request-size and generation-length limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// Prompt + max_tokens must fit (the engine's `max_context`).
    pub max_context: usize,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens: usize,
    /// `max_tokens` when the request gives none (cut to what the context allows).
    pub default_max_tokens: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            // Chat requests are text; 1 MiB is ~250k tokens of prompt, far past any context here.
            max_body_bytes: 1 << 20,
            max_context: 2048,
            max_tokens: 1024,
            default_max_tokens: 128,
        }
    }
}

/// Everything a request handler needs.
pub struct AppState {
    pub engine: Engine,
    pub prompter: Prompter,
    /// The name under which the base model is served (`model` field, /v1/models).
    pub base_name: String,
    /// Whether `model: "auto"` is available (a router is configured).
    pub routing: bool,
    pub limits: Limits,
    pub admin: Option<AdminConfig>,
    pub metrics: Arc<Metrics>,
    shutting_down: AtomicBool,
    next_id: AtomicU64,
    started: Instant,
}

impl AppState {
    pub fn new(
        engine: Engine,
        prompter: Prompter,
        base_name: String,
        routing: bool,
        limits: Limits,
        admin: Option<AdminConfig>,
    ) -> AppState {
        AppState {
            engine,
            prompter,
            base_name,
            routing,
            limits,
            admin,
            metrics: Arc::new(Metrics::default()),
            shutting_down: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            started: Instant::now(),
        }
    }

    /// New generation requests get 503 from now on.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }
}

fn full(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<ResponseBody> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

pub(super) fn json_response(status: StatusCode, v: &Value) -> Response<ResponseBody> {
    full(status, "application/json", v.to_string())
}

pub fn error_response(e: &ApiError) -> Response<ResponseBody> {
    let mut r = full(e.status, "application/json", e.body_json());
    if let Some(s) = e.retry_after_s {
        r.headers_mut().insert(RETRY_AFTER, HeaderValue::from(s));
    }
    r
}

/// Route label for metrics: known paths, everything else one bucket (no
/// unbounded label values from scanners).
fn route_label(path: &str) -> &'static str {
    match path {
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/completions" => "/v1/completions",
        "/v1/models" => "/v1/models",
        "/health" => "/health",
        "/metrics" => "/metrics",
        "/admin/experts" => "/admin/experts",
        "/admin/experts/load" => "/admin/experts/load",
        "/admin/experts/unload" => "/admin/experts/unload",
        _ => "other",
    }
}

/// The service: dispatch, then count the response by endpoint and status.
pub async fn handle(
    state: Arc<AppState>,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, std::convert::Infallible> {
    let label = route_label(req.uri().path());
    let response = match dispatch(&state, req).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    };
    state
        .metrics
        .requests
        .add(&[label, response.status().as_str()], 1);
    Ok(response)
}

async fn dispatch(
    state: &Arc<AppState>,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, ApiError> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let expect = |m: Method| {
        if method == m {
            Ok(())
        } else {
            Err(ApiError::method_not_allowed(&path))
        }
    };
    match path.as_str() {
        "/v1/chat/completions" => {
            expect(Method::POST)?;
            generate(state, Endpoint::Chat, req).await
        }
        "/v1/completions" => {
            expect(Method::POST)?;
            generate(state, Endpoint::Completions, req).await
        }
        "/v1/models" => {
            expect(Method::GET)?;
            Ok(models(state))
        }
        "/health" => {
            expect(Method::GET)?;
            Ok(health(state))
        }
        "/metrics" => {
            expect(Method::GET)?;
            Ok(full(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                render_metrics(state),
            ))
        }
        "/admin/experts" | "/admin/experts/load" | "/admin/experts/unload" => {
            super::admin::handle(state, req, &path).await
        }
        _ => Err(ApiError::not_found(format!("no route for {path}"))),
    }
}

/// Reads the body up to the size limit (413 beyond, at once when
/// Content-Length says so).
pub(super) async fn read_body(state: &AppState, req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let limit = state.limits.max_body_bytes;
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::payload_too_large(limit));
    }
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::payload_too_large(limit))
        }
        Err(e) => Err(ApiError::invalid(
            None,
            format!("could not read the body: {e}"),
        )),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn choice_for(state: &AppState, model: &str) -> Result<ExpertChoice, ApiError> {
    if model == AUTO_MODEL {
        if !state.routing {
            return Err(ApiError::invalid(
                Some("model"),
                "`auto` needs a router; this server was started without one",
            ));
        }
        return Ok(ExpertChoice::Auto);
    }
    if model == state.base_name {
        return Ok(ExpertChoice::Base);
    }
    if state.engine.experts().iter().any(|e| e.name == model) {
        return Ok(ExpertChoice::Named(model.to_string()));
    }
    Err(ApiError::model_not_found(model))
}

fn submit_error(e: SubmitError, prompt_param: &str) -> ApiError {
    match e {
        SubmitError::QueueFull { retry_after_s } => ApiError::queue_full(retry_after_s),
        SubmitError::ShuttingDown => ApiError::shutting_down(),
        SubmitError::UnknownExpert(name) => ApiError::model_not_found(&name),
        SubmitError::PromptTooLong { .. } => ApiError::context_length(prompt_param, e.to_string()),
        SubmitError::EmptyPrompt => ApiError::invalid(Some(prompt_param), e.to_string()),
        SubmitError::InvalidParams(m) => ApiError::invalid(None, m),
    }
}

/// Waits for a request's `Started`: who serves it, how it was routed, its
/// prompt length.
async fn started(
    handle: &mut RequestHandle,
) -> Result<(Option<String>, Option<RouteDecision>, usize), ApiError> {
    match handle.events.recv().await {
        Some(Event::Started {
            expert,
            route,
            prompt_tokens,
        }) => Ok((expert, route, prompt_tokens)),
        Some(Event::Error(e)) => Err(ApiError::internal(format!("generation failed: {e}"))),
        Some(_) => Err(ApiError::internal("the engine sent text before starting")),
        None => Err(ApiError::internal("the engine dropped the request")),
    }
}

async fn generate(
    state: &Arc<AppState>,
    endpoint: Endpoint,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, ApiError> {
    let arrived = Instant::now();
    if state.is_shutting_down() {
        return Err(ApiError::shutting_down());
    }
    let body = read_body(state, req).await?;
    let r = openai::parse_request(endpoint, &body)?;
    let prompt_param = match endpoint {
        Endpoint::Chat => "messages",
        Endpoint::Completions => "prompt",
    };
    let choice = choice_for(state, &r.model)?;
    let prompt = state.prompter.encode(&r.input)?;
    let limits = &state.limits;
    if prompt.len() >= limits.max_context {
        return Err(ApiError::context_length(
            prompt_param,
            format!(
                "the prompt has {} tokens; the context holds {}",
                prompt.len(),
                limits.max_context
            ),
        ));
    }
    let room = limits.max_context - prompt.len();
    let max_tokens = match r.max_tokens {
        Some(m) if m > limits.max_tokens => {
            return Err(ApiError::invalid(
                Some("max_tokens"),
                format!("`max_tokens` must be at most {}", limits.max_tokens),
            ))
        }
        Some(m) if m > room => {
            return Err(ApiError::context_length(
                "max_tokens",
                format!(
                    "the prompt has {} tokens and max_tokens is {m}: over the context of {}",
                    prompt.len(),
                    limits.max_context
                ),
            ))
        }
        Some(m) => m,
        None => limits.default_max_tokens.min(room),
    };
    // Ids past the tokenizer's vocabulary are never sampled (the engine
    // masks them): a bias on one is a mistake to report, not to ignore.
    if let Some(vocab) = Detokenize::vocab_size(state.prompter.tokenizer()) {
        sampling_fields::check_vocab(&r.sampling.logit_bias, vocab)?;
    }
    // One id per choice: an unseeded request's choices draw with seeds
    // id..id+n, distinct from every other request's.
    let id = state.next_id.fetch_add(r.n as u64, Ordering::Relaxed);
    let seed = r.sampling.seed.unwrap_or(id);
    // The n choices are n engine requests; dropping `handles` (an error
    // return, a client gone) cancels every one of them.
    let submit = |i: usize, choice: ExpertChoice| {
        let params = r
            .sampling
            .params(seed.wrapping_add(i as u64), max_tokens, r.stop.clone());
        let request = GenRequest {
            prompt: prompt.clone(),
            choice,
            params,
            logprobs: r.logprobs,
        };
        (state.engine.submit(request)).map_err(|e| submit_error(e, prompt_param))
    };
    let mut handles = vec![submit(0, choice.clone())?];
    let (expert, route, prompt_tokens) = started(&mut handles[0]).await?;
    // `auto` routes once: the other choices go where the first went.
    let rest = match choice {
        ExpertChoice::Auto => expert
            .clone()
            .map_or(ExpertChoice::Base, ExpertChoice::Named),
        c => c,
    };
    for i in 1..r.n {
        handles.push(submit(i, rest.clone())?);
    }
    for handle in &mut handles[1..] {
        started(handle).await?;
    }
    let model = expert.unwrap_or_else(|| state.base_name.clone());
    let served = Served {
        id: format!("{}-{id}", endpoint.id_prefix()),
        created: unix_now(),
        model: model.clone(),
        route: route.map(|d| RouteInfo {
            domain: d.domain,
            confidence: d.confidence,
            expert: model.clone(),
        }),
    };
    // Usage counts the prompt once whatever `n`, as OpenAI does.
    let mut acct = Accounting::new(
        state.metrics.clone(),
        endpoint,
        arrived,
        model,
        prompt_tokens,
    );
    let mut response = if r.stream {
        let events = handles.into_iter().map(|h| h.events).collect();
        let body = SseBody::new(events, served.clone(), acct, r.include_usage);
        let mut resp = Response::new(body.boxed());
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        resp
    } else {
        let events = handles.into_iter().map(|h| h.events).collect();
        let done = stream::collect_all(events, &mut acct).await?;
        let completion_tokens = done.iter().map(|c| c.completion_tokens).sum();
        let choices: Vec<ChoiceOut> = done
            .into_iter()
            .map(|c| ChoiceOut {
                text: c.text,
                finish: c.stop.map_or("stop", responses::finish_reason),
                logprobs: r.logprobs.is_some().then_some(c.logprobs),
            })
            .collect();
        let usage = Usage::new(prompt_tokens, completion_tokens);
        let body = responses::completion_body(endpoint, &served, &choices, usage);
        json_response(StatusCode::OK, &body)
    };
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&served.model) {
        h.insert(EXPERT_HEADER, v);
    }
    if let Some(route) = &served.route {
        if let Ok(v) = HeaderValue::from_str(&format!("{:.4}", route.confidence)) {
            h.insert(ROUTE_CONFIDENCE_HEADER, v);
        }
        if let Ok(v) = HeaderValue::from_str(&route.domain) {
            h.insert(ROUTE_DOMAIN_HEADER, v);
        }
    }
    Ok(response)
}

fn models(state: &AppState) -> Response<ResponseBody> {
    let created = unix_now();
    let entry = |id: &str, kind: &str| json!({"id": id, "object": "model", "created": created, "owned_by": "meswitch", "meswitch_kind": kind});
    let mut data = vec![entry(&state.base_name, "base")];
    data.extend(
        state
            .engine
            .experts()
            .iter()
            .map(|e| entry(&e.name, "expert")),
    );
    if state.routing {
        data.push(entry(AUTO_MODEL, "router"));
    }
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}

fn health(state: &AppState) -> Response<ResponseBody> {
    let stats = state.engine.stats();
    let (status, word) = if state.is_shutting_down() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting_down")
    } else {
        (StatusCode::OK, "ok")
    };
    json_response(
        status,
        &json!({
            "status": word,
            "uptime_s": state.started.elapsed().as_secs(),
            "experts": state.engine.experts().len(),
            "queued": stats.queued,
            "running": stats.running,
        }),
    )
}

pub(super) fn tier_name(t: Tier) -> &'static str {
    match t {
        Tier::Disk => "disk",
        Tier::Host => "host",
        Tier::Device => "device",
    }
}

/// The HTTP layer's metrics followed by the engine's.
pub fn render_metrics(state: &AppState) -> String {
    let mut out = String::new();
    state.metrics.render(&mut out);
    let s = state.engine.stats();
    let gauges: [(&str, &str, f64); 3] = [
        (
            "meswitch_queue_depth",
            "Requests waiting for a slot.",
            s.queued as f64,
        ),
        (
            "meswitch_running_sequences",
            "Sequences in the decode batch.",
            s.running as f64,
        ),
        (
            "meswitch_kv_tokens",
            "Context tokens held in KV caches.",
            s.kv_tokens as f64,
        ),
    ];
    for (name, help, v) in gauges {
        metrics::scalar(&mut out, name, help, "gauge", v);
    }
    let counters: [(&str, &str, u64); 9] = [
        (
            "meswitch_engine_steps_total",
            "Engine forward steps.",
            s.steps,
        ),
        (
            "meswitch_expert_loads_total",
            "Expert loads into the device tier.",
            s.expert_loads,
        ),
        (
            "meswitch_expert_evictions_total",
            "Expert evictions from the device tier.",
            s.expert_evictions,
        ),
        (
            "meswitch_expert_host_loads_total",
            "Expert reads from disk into the host tier.",
            s.host_loads,
        ),
        (
            "meswitch_expert_host_evictions_total",
            "Expert evictions from the host tier.",
            s.host_evictions,
        ),
        (
            "meswitch_engine_prompt_tokens_total",
            "Prompt tokens admitted by the engine.",
            s.prompt_tokens,
        ),
        (
            "meswitch_engine_generated_tokens_total",
            "Tokens generated by the engine.",
            s.generated_tokens,
        ),
        (
            "meswitch_engine_finished_requests_total",
            "Requests the engine finished.",
            s.finished_requests,
        ),
        (
            "meswitch_engine_failed_requests_total",
            "Requests that failed after acceptance.",
            s.failed_requests,
        ),
    ];
    for (name, help, v) in counters {
        metrics::scalar(&mut out, name, help, "counter", v as f64);
    }
    let name = "meswitch_expert_bytes";
    metrics::header(
        &mut out,
        name,
        "Bytes of expert weights per residency tier.",
        "gauge",
    );
    for (tier, v) in [
        ("disk", s.disk_bytes),
        ("host", s.host_bytes),
        ("device", s.device_bytes),
    ] {
        metrics::sample(&mut out, name, &[("tier", tier)], v as f64);
    }
    let name = "meswitch_expert_requests_total";
    metrics::header(
        &mut out,
        name,
        "Requests admitted per expert (the base model by its name).",
        "counter",
    );
    for (expert, n) in &s.requests_per_expert {
        let e = expert.as_deref().unwrap_or(&state.base_name);
        metrics::sample(&mut out, name, &[("expert", e)], *n as f64);
    }
    let name = "meswitch_expert_resident";
    metrics::header(
        &mut out,
        name,
        "1 for the tier each expert is in now.",
        "gauge",
    );
    for e in state.engine.experts() {
        metrics::sample(
            &mut out,
            name,
            &[("expert", &e.name), ("tier", tier_name(e.tier))],
            1.0,
        );
    }
    out
}
