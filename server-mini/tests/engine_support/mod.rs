//! A tiny synthetic family (base + experts compressed to INT2) in a
//! tempdir, an engine started on it ([`EngineStart`]: one place for
//! `Engine::start`'s arguments), and helpers to drain a request's events.

#![allow(dead_code)] // each test binary uses a part

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use meswitch_reference::{Bits, SalientSpec};
use meswitch_server::checkpoint::{Checkpoint, FloatDtype};
use meswitch_server::compress::{compress_expert, CompressOptions, Fit};
use meswitch_server::engine::{
    Engine, EngineConfig, EngineError, Event, ExpertChoice, ExpertSource, GenRequest,
    RequestHandle, Router, TokenLogprob,
};
use meswitch_server::generate::StopReason;
use meswitch_server::model::{load_cpu, Backend, CpuBackend, LoadedModel};
use meswitch_server::sampling::SamplingParams;
use meswitch_server::synth::{write_family, SynthSettings, SynthShape};
use meswitch_server::tokenizer::Tokenizer;

pub struct Family {
    _dir: tempfile::TempDir,
    pub base: PathBuf,
    pub experts: Vec<ExpertSource>,
}

impl Family {
    pub fn model(&self) -> LoadedModel {
        load_cpu(&self.base).expect("the synthetic base loads")
    }

    /// `Engine::start`'s arguments on this family's CPU model: all its
    /// experts, no eos ids, no router, the default config. Tests change
    /// what they need with struct update syntax.
    pub fn engine_start(&self) -> EngineStart<CpuBackend> {
        let model = self.model();
        EngineStart {
            backend: model.backend,
            tokenizer: model.tokenizer,
            eos: Vec::new(),
            experts: self.experts.clone(),
            router: None,
            config: EngineConfig::default(),
        }
    }

    /// An engine on this family with `config` (else as [`Family::engine_start`]).
    pub fn start_engine(&self, config: EngineConfig) -> Engine {
        EngineStart {
            config,
            ..self.engine_start()
        }
        .start()
        .expect("the engine starts")
    }
}

/// Everything `Engine::start` takes.
pub struct EngineStart<B: Backend> {
    pub backend: B,
    pub tokenizer: Tokenizer,
    pub eos: Vec<u32>,
    pub experts: Vec<ExpertSource>,
    pub router: Option<Box<dyn Router<B>>>,
    pub config: EngineConfig,
}

impl<B: Backend + Send + 'static> EngineStart<B> {
    pub fn start(self) -> Result<Engine, EngineError> {
        Engine::start(
            self.backend,
            Box::new(self.tokenizer),
            self.eos,
            self.experts,
            self.router,
            self.config,
        )
    }

    /// The same start on a backend made from this one (a wrapper); the
    /// router, written for `B`, is left out.
    pub fn on<C: Backend>(self, wrap: impl FnOnce(B) -> C) -> EngineStart<C> {
        EngineStart {
            backend: wrap(self.backend),
            tokenizer: self.tokenizer,
            eos: self.eos,
            experts: self.experts,
            router: None,
            config: self.config,
        }
    }
}

/// A greedy request without logprobs.
pub fn greedy(prompt: Vec<u32>, choice: ExpertChoice, max_tokens: usize) -> GenRequest {
    GenRequest {
        prompt,
        choice,
        params: SamplingParams {
            max_tokens,
            ..Default::default()
        },
        logprobs: None,
    }
}

/// Tiny base + `n` experts, each compressed to one INT2 expert file.
pub fn family(n: usize, seed: u64) -> Family {
    family_of("tiny", n, seed)
}

pub fn family_of(shape: &str, n: usize, seed: u64) -> Family {
    let dir = tempfile::tempdir().unwrap();
    let settings = SynthSettings {
        shape: SynthShape::named(shape).unwrap(),
        experts: n,
        seed,
        dtype: FloatDtype::F16,
    };
    let (base, expert_dirs) = write_family(dir.path(), &settings, |_| {}).unwrap();
    let base_ckpt = Checkpoint::open(&base).unwrap();
    let experts = expert_dirs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let name = format!("e{i}");
            let path = dir.path().join(format!("{name}.safetensors"));
            let options = CompressOptions {
                bits: Bits::Two,
                group_size: 32,
                salient: SalientSpec::Count(2),
                fit: Fit::Rtn,
                compress_embeddings: false,
                expert_name: name.clone(),
                max_shard_bytes: None,
            };
            let expert = Checkpoint::open(d).unwrap();
            compress_expert(&base_ckpt, &expert, None, &options, &path, |_| {}).unwrap();
            ExpertSource { name, path }
        })
        .collect();
    Family {
        _dir: dir,
        base,
        experts,
    }
}

pub fn file_size(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

/// Everything a finished request sent.
#[derive(Debug, Default)]
pub struct Outcome {
    pub expert: Option<String>,
    pub route: Option<meswitch_server::engine::RouteDecision>,
    pub prompt_tokens: usize,
    pub text: String,
    pub stop: Option<StopReason>,
    pub completion_tokens: usize,
    pub error: Option<String>,
    pub logprobs: Vec<TokenLogprob>,
}

/// Longest a test waits for one event.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Next event, polling (the test has no tokio runtime).
pub fn next_event(h: &mut RequestHandle) -> Option<Event> {
    let until = Instant::now() + EVENT_TIMEOUT;
    loop {
        match h.events.try_recv() {
            Ok(e) => return Some(e),
            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => return None,
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {
                assert!(Instant::now() < until, "no event in {EVENT_TIMEOUT:?}");
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
}

/// Reads events to the end, checking their order: Started first (unless
/// the request failed first), then Text, then one Done or Error.
pub fn collect(h: &mut RequestHandle) -> Outcome {
    let mut out = Outcome::default();
    let mut started = false;
    while let Some(e) = next_event(h) {
        match e {
            Event::Started {
                expert,
                route,
                prompt_tokens,
            } => {
                assert!(!started, "Started twice");
                started = true;
                out.expert = expert;
                out.route = route;
                out.prompt_tokens = prompt_tokens;
            }
            Event::Text(t) => {
                assert!(started, "Text before Started");
                out.text.push_str(&t);
            }
            Event::Logprob(l) => {
                assert!(started, "Logprob before Started");
                out.logprobs.push(l);
            }
            Event::Done {
                stop,
                completion_tokens,
            } => {
                assert!(started, "Done before Started");
                out.stop = Some(stop);
                out.completion_tokens = completion_tokens;
                return out;
            }
            Event::Error(e) => {
                out.error = Some(e);
                return out;
            }
        }
    }
    panic!("the event channel closed before Done or Error: {out:?}");
}
