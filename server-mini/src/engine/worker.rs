//! The engine thread. Each turn of its loop:
//!
//! ```text
//!   take from the shared state: new requests, admin commands, finished loads
//!   route new requests (auto), queue them; start loading their experts
//!   admit queued requests in order while a slot, KV budget and the expert
//!     on the device are available (a request whose expert is still on disk
//!     is skipped, not waited for: the loader thread reads it meanwhile)
//!   one forward over every running sequence: a prompt chunk or one token each
//!   sample, stream text, finish; publish stats
//! ```
//!
//! Requests handed in by [`super::Engine::submit`] are counted as queued
//! until admitted, so the queue bound covers both the shared hand-off and
//! this thread's waiting list.

use std::collections::{BTreeSet, VecDeque};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::residency::{LoadJob, Residency};
use super::sequence::Sequence;
use super::shared::{Command, Pending, Shared, SharedState};
use super::{
    EngineConfig, EngineError, EngineStats, Event, ExpertChoice, RouteDecision, Router, Tier,
};
use crate::generate::Detokenize;
use crate::model::{Backend, Expert, ExpertId, LogitsWanted, ModelError, SeqStep};

/// How long an idle engine thread sleeps before looking at its queue again
/// (a queued request whose client left is noticed within this).
const IDLE_POLL: Duration = Duration::from_millis(50);
/// Weight of the newest request in the running mean of request durations
/// (used for Retry-After).
const DURATION_EMA_WEIGHT: f64 = 0.1;

struct Waiting {
    pending: Pending,
    expert: Option<String>,
    route: Option<RouteDecision>,
}

/// How a running sequence leaves the batch.
enum End {
    /// The client is gone: nothing to send.
    Gone,
    Failed(String),
    /// [`Event::Done`].
    Done(Event),
}

struct Running<C> {
    seq: Sequence,
    cache: C,
    expert: Option<String>,
    expert_id: Option<ExpertId>,
    events: UnboundedSender<Event>,
    /// Prompt + max_tokens, held against `max_kv_tokens` while running.
    reserved_kv: usize,
    admitted: Instant,
}

pub(crate) struct Worker<B: Backend> {
    pub backend: B,
    pub detok: Box<dyn Detokenize + Send>,
    pub eos: Vec<u32>,
    pub router: Option<Box<dyn Router<B>>>,
    pub config: EngineConfig,
    pub shared: Arc<Shared>,
    pub residency: Residency,
    pub loader: mpsc::Sender<LoadJob>,
    waiting: VecDeque<Waiting>,
    running: Vec<Running<B::Cache>>,
    stats: EngineStats,
    /// Last events of the sequences that ended this step, sent once the
    /// step's stats are published: a client that has its Done then finds
    /// itself counted in `stats()` (/metrics).
    outbox: Vec<(UnboundedSender<Event>, Event)>,
}

/// Marks the engine as shut down however the thread ends (a panic
/// included), so `submit` stops accepting.
struct ExitGuard(Arc<Shared>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        self.0.lock().shutting_down = true;
        self.0.wake.notify_all();
    }
}

impl<B: Backend> Worker<B> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        backend: B,
        detok: Box<dyn Detokenize + Send>,
        eos: Vec<u32>,
        router: Option<Box<dyn Router<B>>>,
        config: EngineConfig,
        shared: Arc<Shared>,
        residency: Residency,
        loader: mpsc::Sender<LoadJob>,
    ) -> Worker<B> {
        Worker {
            backend,
            detok,
            eos,
            router,
            config,
            shared,
            residency,
            loader,
            waiting: VecDeque::new(),
            running: Vec::new(),
            stats: EngineStats::default(),
            outbox: Vec::new(),
        }
    }

    pub fn run(mut self) {
        let _guard = ExitGuard(self.shared.clone());
        self.publish();
        loop {
            let (incoming, commands, loaded, shutting_down) = {
                let shared = self.shared.clone();
                let mut st = shared.lock();
                let idle = |st: &SharedState| {
                    st.incoming.is_empty()
                        && st.commands.is_empty()
                        && st.loaded.is_empty()
                        && !st.shutting_down
                };
                if self.running.is_empty() && idle(&st) {
                    st = shared
                        .wake
                        .wait_timeout_while(st, IDLE_POLL, |st| idle(st))
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                (
                    std::mem::take(&mut st.incoming),
                    std::mem::take(&mut st.commands),
                    std::mem::take(&mut st.loaded),
                    st.shutting_down,
                )
            };
            if shutting_down {
                self.fail_all(incoming);
                return;
            }
            for c in commands {
                self.command(c);
            }
            for (job, result) in loaded {
                self.on_loaded(job, result);
            }
            for p in incoming {
                self.intake(p);
            }
            self.admit();
            self.step();
            self.publish();
            for (events, event) in self.outbox.drain(..) {
                let _ = events.send(event);
            }
        }
    }

    fn protect(&self) -> BTreeSet<String> {
        self.waiting
            .iter()
            .filter_map(|w| w.expert.clone())
            .collect()
    }

    fn command(&mut self, c: Command) {
        match c {
            Command::Register { src, expert, reply } => {
                let r = self
                    .residency
                    .register_loaded(&src, *expert, &mut self.backend);
                // The caller sees the new expert list once it has the reply.
                self.publish();
                let _ = reply.send(r);
            }
            Command::Unregister { name, reply } => {
                let r = self.residency.unregister(&name, &mut self.backend);
                if r.is_ok() {
                    let why = format!("expert {name:?} was unloaded");
                    self.fail_waiting(|w| w.expert.as_deref() == Some(name.as_str()), &why);
                }
                self.publish();
                let _ = reply.send(r);
            }
        }
    }

    fn on_loaded(&mut self, job: LoadJob, result: Result<Expert, ModelError>) {
        let protect = self.protect();
        if let Err(why) = self.residency.finish_load(&job, result, &protect) {
            let why = format!("expert {:?} could not be loaded: {why}", job.name);
            self.fail_waiting(|w| w.expert.as_deref() == Some(job.name.as_str()), &why);
        }
    }

    /// Ends waiting requests that match with an error.
    fn fail_waiting(&mut self, matches: impl Fn(&Waiting) -> bool, why: &str) {
        let (failed, kept): (VecDeque<Waiting>, VecDeque<Waiting>) =
            std::mem::take(&mut self.waiting)
                .into_iter()
                .partition(|w| matches(w));
        self.waiting = kept;
        for w in failed {
            self.stats.failed_requests += 1;
            self.dequeued(1);
            let _ = w.pending.events.send(Event::Error(why.to_string()));
        }
    }

    fn dequeued(&mut self, n: usize) {
        let mut st = self.shared.lock();
        st.queued = st.queued.saturating_sub(n);
    }

    /// Decides who serves a new request and starts reading its expert.
    fn intake(&mut self, p: Pending) {
        if p.events.is_closed() {
            self.dequeued(1);
            return;
        }
        let (expert, route) = match &p.req.choice {
            ExpertChoice::Base => (None, None),
            ExpertChoice::Named(name) => (Some(name.clone()), None),
            ExpertChoice::Auto => {
                let routed = match &self.router {
                    Some(r) => r.route(&self.backend, &p.req.prompt),
                    None => Err("no router is configured".to_string()),
                };
                match routed {
                    Ok(d) => (d.expert.clone(), Some(d)),
                    Err(why) => {
                        self.stats.failed_requests += 1;
                        self.dequeued(1);
                        let _ = p
                            .events
                            .send(Event::Error(format!("routing failed: {why}")));
                        return;
                    }
                }
            }
        };
        if let Some(name) = &expert {
            if self.residency.get(name).is_none() {
                self.stats.failed_requests += 1;
                self.dequeued(1);
                let _ = p
                    .events
                    .send(Event::Error(format!("unknown expert {name:?}")));
                return;
            }
            self.prefetch(name);
        }
        self.waiting.push_back(Waiting {
            pending: p,
            expert,
            route,
        });
    }

    /// Starts reading an expert that is only on disk.
    fn prefetch(&mut self, name: &str) {
        if let Some(job) = self.residency.start_load(name) {
            // The loader ends only after this worker; a send cannot fail
            // while the worker runs.
            let _ = self.loader.send(job);
        }
    }

    fn reserved_kv(&self) -> usize {
        self.running.iter().map(|r| r.reserved_kv).sum()
    }

    /// Admits waiting requests in order. Stops at the first that lacks a
    /// slot, KV room or device room (first come, first served for
    /// capacity); skips one whose expert is still being read.
    fn admit(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|w| !w.pending.events.is_closed());
        self.dequeued(before - self.waiting.len());
        let mut i = 0;
        while i < self.waiting.len() {
            if self.running.len() >= self.config.max_running {
                break;
            }
            let w = &self.waiting[i];
            let need_kv = w.pending.req.prompt.len() + w.pending.req.params.max_tokens;
            if self.reserved_kv() + need_kv > self.config.max_kv_tokens {
                break;
            }
            let expert_id = match w.expert.clone() {
                None => None,
                Some(name) => match self.residency.get(&name).map(|e| e.tier()) {
                    Some(Tier::Device) => self.residency.device_id(&name),
                    Some(Tier::Host) => {
                        let protect = self.protect();
                        match self.residency.promote(&name, &mut self.backend, &protect) {
                            Ok(Some(id)) => Some(id),
                            Ok(None) => break,
                            Err(e) => {
                                let why = format!("expert {name:?}: {e}");
                                self.fail_waiting(|w| w.expert.as_deref() == Some(&name), &why);
                                continue;
                            }
                        }
                    }
                    Some(Tier::Disk) => {
                        self.prefetch(&name);
                        i += 1;
                        continue;
                    }
                    None => {
                        let why = format!("expert {name:?} was unloaded");
                        self.fail_waiting(|w| w.expert.as_deref() == Some(&name), &why);
                        continue;
                    }
                },
            };
            let w = self.waiting.remove(i).expect("index checked by the loop");
            self.dequeued(1);
            self.start(w, expert_id, need_kv);
        }
    }

    fn start(&mut self, w: Waiting, expert_id: Option<ExpertId>, reserved_kv: usize) {
        let Waiting {
            pending,
            expert,
            route,
        } = w;
        let prompt_tokens = pending.req.prompt.len();
        let req = pending.req;
        let seq = match Sequence::new(req.prompt, req.params, req.logprobs) {
            Ok(s) => s,
            Err(why) => {
                self.stats.failed_requests += 1;
                let _ = pending.events.send(Event::Error(why));
                return;
            }
        };
        let started = Event::Started {
            expert: expert.clone(),
            route,
            prompt_tokens,
        };
        if pending.events.send(started).is_err() {
            return;
        }
        if let Some(name) = &expert {
            self.residency.acquire(name);
        }
        *self
            .stats
            .requests_per_expert
            .entry(expert.clone())
            .or_default() += 1;
        self.stats.prompt_tokens += prompt_tokens as u64;
        self.running.push(Running {
            seq,
            cache: self.backend.new_cache(),
            expert,
            expert_id,
            events: pending.events,
            reserved_kv,
            admitted: Instant::now(),
        });
    }

    /// Tokens each running sequence feeds this step: one per decoding
    /// sequence; prompt chunks of at most `prefill_chunk` each. While some
    /// sequence decodes, all prompt chunks together stay within
    /// `prefill_chunk` (oldest first), so a burst of long prompts adds at
    /// most that many rows to a decode step; with nobody decoding, every
    /// prompt proceeds at once.
    fn step_tokens(&self) -> Vec<usize> {
        let chunk = self.config.prefill_chunk;
        let decoding = self.running.iter().any(|r| !r.seq.prefilling());
        let mut budget = if decoding { chunk } else { usize::MAX };
        self.running
            .iter()
            .map(|r| {
                if !r.seq.prefilling() {
                    return 1;
                }
                let n = r.seq.next_input(chunk).len().min(budget);
                budget -= n;
                n
            })
            .collect()
    }

    /// One forward over the running sequences (all, but prompts beyond the
    /// step's prefill budget).
    fn step(&mut self) {
        let gone: Vec<(usize, End)> = (self.running.iter().enumerate())
            .filter(|(_, r)| r.events.is_closed())
            .map(|(i, _)| (i, End::Gone))
            .collect();
        self.remove(gone);
        if self.running.is_empty() {
            return;
        }
        let fed = self.step_tokens();
        let active: Vec<usize> = (0..fed.len()).filter(|&i| fed[i] > 0).collect();
        let mut batch: Vec<SeqStep<'_, B::Cache>> = (self.running.iter_mut())
            .zip(&fed)
            .filter(|(_, &n)| n > 0)
            .map(|(r, &n)| SeqStep {
                tokens: r.seq.next_input(n),
                cache: &mut r.cache,
                expert: r.expert_id,
                logits: LogitsWanted::Last,
            })
            .collect();
        let result = self.backend.forward(&mut batch);
        drop(batch);
        self.stats.steps += 1;
        let per_seq: Vec<Result<Vec<f32>, String>> = match result {
            Ok(logits) => logits.into_iter().map(Ok).collect(),
            // One bad sequence fails the whole step (the backend restores
            // every cache): run each alone so only that one fails.
            Err(_) => active
                .iter()
                .map(|&i| self.forward_one(i, fed[i]))
                .collect(),
        };
        let mut finished = Vec::new();
        for (&i, logits) in active.iter().zip(per_seq) {
            let end = match logits {
                Ok(mut logits) => self.on_logits(i, &mut logits, fed[i]),
                Err(why) => Some(End::Failed(why)),
            };
            if let Some(end) = end {
                finished.push((i, end));
            }
        }
        self.remove(finished);
    }

    fn forward_one(&mut self, i: usize, n: usize) -> Result<Vec<f32>, String> {
        let r = &mut self.running[i];
        let mut one = [SeqStep {
            tokens: r.seq.next_input(n),
            cache: &mut r.cache,
            expert: r.expert_id,
            logits: LogitsWanted::Last,
        }];
        self.backend
            .forward(&mut one)
            .map(|mut l| l.remove(0))
            .map_err(|e| e.to_string())
    }

    /// Advances sequence `i` past its step; how it ends, if it does.
    fn on_logits(&mut self, i: usize, logits: &mut [f32], fed: usize) -> Option<End> {
        let r = &mut self.running[i];
        if !r.seq.advance(fed) {
            return None;
        }
        let progress = match r.seq.on_logits(logits, self.detok.as_ref(), &self.eos) {
            Ok(p) => p,
            Err(why) => return Some(End::Failed(format!("detokenizing: {why}"))),
        };
        self.stats.generated_tokens += 1;
        if let Some(lp) = progress.logprob {
            if r.events.send(Event::Logprob(lp)).is_err() {
                return Some(End::Gone);
            }
        }
        if let Some(text) = progress.text {
            if r.events.send(Event::Text(text)).is_err() {
                return Some(End::Gone);
            }
        }
        progress.done.map(|stop| {
            End::Done(Event::Done {
                stop,
                completion_tokens: r.seq.generated(),
            })
        })
    }

    /// Ends the sequences at `ends` (indices into `running`), queuing each
    /// its last event in the outbox, and frees their slots, KV and expert use.
    fn remove(&mut self, mut ends: Vec<(usize, End)>) {
        ends.sort_by_key(|e| std::cmp::Reverse(e.0));
        for (i, event) in ends {
            let r = self.running.remove(i);
            if let Some(name) = &r.expert {
                self.residency.release(name);
            }
            match event {
                End::Failed(why) => {
                    self.stats.failed_requests += 1;
                    self.outbox.push((r.events, Event::Error(why)));
                }
                End::Done(done) => {
                    self.stats.finished_requests += 1;
                    let secs = r.admitted.elapsed().as_secs_f64();
                    let mut st = self.shared.lock();
                    st.mean_request_s += DURATION_EMA_WEIGHT * (secs - st.mean_request_s);
                    drop(st);
                    self.outbox.push((r.events, done));
                }
                End::Gone => {}
            }
        }
    }

    fn fail_all(&mut self, incoming: VecDeque<Pending>) {
        let why = EngineError::ShuttingDown.to_string();
        for p in incoming {
            let _ = p.events.send(Event::Error(why.clone()));
        }
        for w in self.waiting.drain(..) {
            let _ = w.pending.events.send(Event::Error(why.clone()));
        }
        for r in self.running.drain(..) {
            let _ = r.events.send(Event::Error(why.clone()));
        }
        self.shared.lock().queued = 0;
    }

    /// Copies stats and expert statuses where the handles read them.
    fn publish(&mut self) {
        let (disk, host, device) = self.residency.tier_bytes();
        let c = self.residency.counters;
        let mut stats = self.stats.clone();
        stats.running = self.running.len();
        stats.kv_tokens = self.running.iter().map(|r| r.seq.context_len()).sum();
        stats.expert_loads = c.device_loads;
        stats.expert_evictions = c.device_evictions;
        stats.host_loads = c.host_loads;
        stats.host_evictions = c.host_evictions;
        stats.disk_bytes = disk;
        stats.host_bytes = host;
        stats.device_bytes = device;
        let experts = self.residency.statuses();
        let mut st = self.shared.lock();
        stats.queued = st.queued;
        st.stats = stats;
        st.experts = experts;
    }
}
