//! Continuous batching must not change outputs: requests of mixed experts
//! (and none, and routed), prompts of many lengths, prefilled in chunks and
//! decoded together, give exactly what `generate` gives each alone. Plus
//! admission limits, cancellation and request validation.

mod engine_support;

use std::collections::BTreeMap;

use engine_support::{collect, family, greedy, next_event, EngineStart, Family, Outcome};
use meswitch_server::engine::{
    Engine, EngineConfig, Event, ExpertChoice, GenRequest, RouteDecision, Router, SubmitError,
    MAX_TOP_LOGPROBS,
};
use meswitch_server::generate::{generate, Generation};
use meswitch_server::model::{Backend, CpuBackend, ExpertId, LogitsWanted, SeqStep};
use meswitch_server::sampling::SamplingParams;
use rand::{Rng, SeedableRng};

/// Sends prompts whose first token is even to expert e1, odd ones to the
/// base: a stand-in for the hidden-state router with a known answer.
struct ParityRouter;

impl Router<CpuBackend> for ParityRouter {
    fn route(&self, _: &CpuBackend, prompt: &[u32]) -> Result<RouteDecision, String> {
        let even = prompt[0] % 2 == 0;
        Ok(RouteDecision {
            expert: even.then(|| "e1".to_string()),
            domain: if even { "even" } else { "odd" }.to_string(),
            confidence: 0.9,
        })
    }
}

fn routed(prompt: &[u32]) -> Option<String> {
    (prompt[0] % 2 == 0).then(|| "e1".to_string())
}

/// A mixed set of requests: base, named experts, auto; greedy and seeded
/// sampling; with and without stop strings; prompts of 1 to 40 tokens.
fn requests(vocab: u32, n_experts: usize) -> Vec<GenRequest> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    (0..14)
        .map(|i| {
            let len = [1, 3, 7, 12, 23, 40][i % 6];
            let prompt = (0..len).map(|_| rng.random_range(0..vocab)).collect();
            let choice = match i % 4 {
                0 => ExpertChoice::Base,
                3 if i > 4 => ExpertChoice::Auto,
                _ => ExpertChoice::Named(format!("e{}", i % n_experts)),
            };
            let mut params = SamplingParams {
                max_tokens: 6 + (i * 5) % 17,
                ..Default::default()
            };
            if i % 5 == 4 {
                params.temperature = 0.8;
                params.top_k = 40;
                params.repetition_penalty = 1.1;
                params.seed = i as u64;
            }
            GenRequest {
                prompt,
                choice,
                params,
                logprobs: None,
            }
        })
        .collect()
}

/// Each request alone through `generate` on a backend with every expert.
fn sequential(fam: &Family, reqs: &[GenRequest], eos: &[u32]) -> Vec<(Option<String>, Generation)> {
    let model = fam.model();
    let mut backend = model.backend;
    let ids: BTreeMap<String, ExpertId> = fam
        .experts
        .iter()
        .map(|e| (e.name.clone(), backend.load_expert(&e.path).unwrap()))
        .collect();
    reqs.iter()
        .map(|r| {
            let expert = match &r.choice {
                ExpertChoice::Base => None,
                ExpertChoice::Named(n) => Some(n.clone()),
                ExpertChoice::Auto => routed(&r.prompt),
            };
            let id = expert.as_ref().map(|n| ids[n]);
            let mut streamed = String::new();
            let g = generate(
                &backend,
                &model.tokenizer,
                eos,
                &r.prompt,
                id,
                r.params.clone(),
                |t| streamed.push_str(t),
            )
            .unwrap();
            assert_eq!(streamed, g.text);
            (expert, g)
        })
        .collect()
}

fn engine(fam: &Family, eos: &[u32], config: EngineConfig) -> Engine {
    EngineStart {
        eos: eos.to_vec(),
        router: Some(Box::new(ParityRouter)),
        config,
        ..fam.engine_start()
    }
    .start()
    .unwrap()
}

/// Gives every third request a stop string its own output contains, and a
/// stop string that never occurs to another.
fn add_stops(reqs: &mut [GenRequest], outputs: &[(Option<String>, Generation)]) {
    for (i, (r, (_, g))) in reqs.iter_mut().zip(outputs).enumerate() {
        let chars: Vec<char> = g.text.chars().collect();
        if i % 3 == 1 && chars.len() >= 4 {
            let at = chars.len() / 2;
            r.params.stop = vec![chars[at..at + 2].iter().collect()];
        } else if i % 3 == 2 {
            r.params.stop = vec!["\u{1F600}never".to_string()];
        }
    }
}

#[test]
fn batched_equals_sequential_for_any_prefill_chunk() {
    let fam = family(3, 21);
    let vocab = fam.model().backend.config().vocab_size as u32;
    let mut reqs = requests(vocab, 3);
    // An eos id that request 3 (greedy, no stop string) meets.
    let plain = sequential(&fam, &reqs, &[]);
    let eos = vec![plain[3].1.ids[plain[3].1.ids.len() / 2]];
    let plain = sequential(&fam, &reqs, &eos);
    add_stops(&mut reqs, &plain);
    let want = sequential(&fam, &reqs, &eos);
    let stops_seen: Vec<_> = want.iter().map(|(_, g)| g.stop).collect();
    for reason in [
        meswitch_server::generate::StopReason::Eos,
        meswitch_server::generate::StopReason::StopString,
        meswitch_server::generate::StopReason::MaxTokens,
    ] {
        assert!(
            stops_seen.contains(&reason),
            "no request ends by {reason:?}: {stops_seen:?}"
        );
    }
    for chunk in [1, 5, 64] {
        let config = EngineConfig {
            max_running: 5,
            prefill_chunk: chunk,
            ..Default::default()
        };
        let engine = engine(&fam, &eos, config);
        let mut handles: Vec<_> = reqs
            .iter()
            .map(|r| engine.submit(r.clone()).unwrap())
            .collect();
        let got: Vec<Outcome> = handles.iter_mut().map(collect).collect();
        for (i, ((expert, g), o)) in want.iter().zip(&got).enumerate() {
            let ctx = format!("request {i} (chunk {chunk}): {:?}", reqs[i].choice);
            assert_eq!(o.error, None, "{ctx}");
            assert_eq!(&o.expert, expert, "{ctx}");
            assert_eq!(o.text, g.text, "{ctx}");
            assert_eq!(o.stop, Some(g.stop), "{ctx}");
            assert_eq!(o.completion_tokens, g.ids.len(), "{ctx}");
            assert_eq!(o.prompt_tokens, reqs[i].prompt.len(), "{ctx}");
            assert_eq!(
                o.route.is_some(),
                reqs[i].choice == ExpertChoice::Auto,
                "{ctx}"
            );
        }
        let stats = engine.stats();
        assert_eq!(stats.finished_requests, reqs.len() as u64);
        assert_eq!(stats.running, 0);
        assert_eq!(stats.kv_tokens, 0);
        let total: usize = want.iter().map(|(_, g)| g.ids.len()).sum();
        assert_eq!(stats.generated_tokens, total as u64);
        engine.shutdown();
    }
}

fn long_request(choice: ExpertChoice, max_tokens: usize) -> GenRequest {
    greedy(vec![3, 4, 5], choice, max_tokens)
}

#[test]
fn a_full_queue_refuses_with_a_retry_hint() {
    let fam = family(1, 5);
    let config = EngineConfig {
        max_running: 1,
        max_queued: 2,
        ..Default::default()
    };
    let engine = engine(&fam, &[], config);
    let results: Vec<_> = (0..5)
        .map(|_| engine.submit(long_request(ExpertChoice::Base, 1500)))
        .collect();
    let accepted = results.iter().filter(|r| r.is_ok()).count();
    assert!(
        accepted <= 3,
        "1 running + 2 queued at most, got {accepted}"
    );
    let full: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(!full.is_empty());
    for e in full {
        let SubmitError::QueueFull { retry_after_s } = e else {
            panic!("expected QueueFull, got {e:?}");
        };
        assert!(*retry_after_s >= 1);
    }
    engine.shutdown();
    assert_eq!(
        engine
            .submit(long_request(ExpertChoice::Base, 1))
            .unwrap_err(),
        SubmitError::ShuttingDown
    );
}

#[test]
fn a_dropped_receiver_frees_its_slot_and_kv() {
    let fam = family(1, 5);
    let config = EngineConfig {
        max_running: 1,
        max_kv_tokens: 2000,
        ..Default::default()
    };
    let engine = engine(&fam, &[], config);
    let mut a = engine
        .submit(long_request(ExpertChoice::Named("e0".into()), 1900))
        .unwrap();
    assert!(matches!(next_event(&mut a), Some(Event::Started { .. })));
    // The slot and the whole KV budget are A's; B waits until A is gone.
    let mut b = engine.submit(long_request(ExpertChoice::Base, 10)).unwrap();
    drop(a);
    let out = collect(&mut b);
    assert_eq!(out.error, None);
    assert_eq!(out.completion_tokens, 10);
    let stats = engine.stats();
    assert_eq!(stats.finished_requests, 1, "A was cancelled, not finished");
    assert!(stats.generated_tokens < 1900, "A stopped early: {stats:?}");
    assert_eq!((stats.running, stats.kv_tokens, stats.queued), (0, 0, 0));
    let e0 = engine
        .experts()
        .into_iter()
        .find(|e| e.name == "e0")
        .unwrap();
    assert_eq!(e0.in_use, 0);
}

#[test]
fn bad_requests_are_refused_at_submit() {
    let fam = family(1, 5);
    let config = EngineConfig {
        max_context: 100,
        ..Default::default()
    };
    let start = fam.engine_start();
    let vocab = start.backend.config().vocab_size as u32;
    let engine = EngineStart { config, ..start }.start().unwrap();
    let ok = long_request(ExpertChoice::Base, 10);
    let with = |f: &dyn Fn(&mut GenRequest)| {
        let mut r = ok.clone();
        f(&mut r);
        engine.submit(r).unwrap_err()
    };
    assert_eq!(
        with(&|r| r.choice = ExpertChoice::Named("nope".into())),
        SubmitError::UnknownExpert("nope".into())
    );
    assert_eq!(
        with(&|r| r.choice = ExpertChoice::Auto),
        SubmitError::UnknownExpert("auto".into()),
        "no router configured"
    );
    assert_eq!(with(&|r| r.prompt.clear()), SubmitError::EmptyPrompt);
    assert_eq!(
        with(&|r| r.params.max_tokens = 98),
        SubmitError::PromptTooLong {
            tokens: 101,
            limit: 100
        }
    );
    assert!(matches!(
        with(&|r| r.params.temperature = -1.0),
        SubmitError::InvalidParams(_)
    ));
    assert!(matches!(
        with(&|r| r.params.max_tokens = 0),
        SubmitError::InvalidParams(_)
    ));
    assert!(matches!(
        with(&|r| r.prompt.push(vocab)),
        SubmitError::InvalidParams(_)
    ));
    assert!(matches!(
        with(&|r| r.logprobs = Some(MAX_TOP_LOGPROBS + 1)),
        SubmitError::InvalidParams(_)
    ));
    // The engine still serves.
    let out = collect(&mut engine.submit(ok.clone()).unwrap());
    assert_eq!(out.completion_tokens, 10);
}

/// A sequence whose step fails (here: the backend's own context limit,
/// set below the engine's) ends with an error; the others in its batch
/// go on and give what they give alone.
#[test]
fn a_failing_sequence_does_not_disturb_its_batch() {
    let fam = family(1, 5);
    let mut start = fam.engine_start();
    start.backend.set_max_context(40);
    let reference = {
        let r = long_request(ExpertChoice::Base, 20);
        generate(
            &start.backend,
            &start.tokenizer,
            &[],
            &r.prompt,
            None,
            r.params,
            |_| {},
        )
        .unwrap()
    };
    let engine = start.start().unwrap();
    // 30 prompt tokens: fails at its 11th token, while `good` still runs.
    let mut bad = long_request(ExpertChoice::Named("e0".into()), 60);
    bad.prompt = (0..30).collect();
    let mut bad = engine.submit(bad).unwrap();
    let mut good = engine.submit(long_request(ExpertChoice::Base, 20)).unwrap();
    let bad = collect(&mut bad);
    assert!(
        bad.error.unwrap().contains("context"),
        "the backend's error"
    );
    assert_eq!(bad.prompt_tokens, 30);
    let good = collect(&mut good);
    assert_eq!(good.error, None);
    assert_eq!(good.text, reference.text);
    let stats = engine.stats();
    assert_eq!((stats.failed_requests, stats.finished_requests), (1, 1));
    assert_eq!(
        engine.experts()[0].in_use,
        0,
        "the failed request released e0"
    );
}

/// One family for every proptest case (building it is the slow part).
fn shared_family() -> &'static Family {
    static FAMILY: std::sync::OnceLock<Family> = std::sync::OnceLock::new();
    FAMILY.get_or_init(|| family(2, 33))
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(12))]

    /// Whatever the mix, the limits and the prefill chunk, greedy batched
    /// generation gives each request what `generate` gives it alone.
    #[test]
    fn any_mix_batches_like_sequential(
        shapes in proptest::collection::vec((1usize..30, 0usize..3, 1usize..12), 1..10),
        chunk in 1usize..20,
        max_running in 1usize..6,
    ) {
        let fam = shared_family();
        let reqs: Vec<GenRequest> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(len, expert, max_tokens))| greedy(
                (0..len).map(|t| ((i * 37 + t * 11) % 500) as u32).collect(),
                match expert {
                    0 => ExpertChoice::Base,
                    e => ExpertChoice::Named(format!("e{}", e - 1)),
                },
                max_tokens,
            ))
            .collect();
        let want = sequential(fam, &reqs, &[]);
        let config = EngineConfig {
            max_running,
            prefill_chunk: chunk,
            ..Default::default()
        };
        let engine = engine(fam, &[], config);
        let mut handles: Vec<_> = reqs.iter().map(|r| engine.submit(r.clone()).unwrap()).collect();
        for (h, (_, g)) in handles.iter_mut().zip(&want) {
            let o = collect(h);
            proptest::prop_assert_eq!(&o.text, &g.text);
            proptest::prop_assert_eq!(o.completion_tokens, g.ids.len());
        }
    }
}

/// CpuBackend that records the token count of each sequence in each step.
struct Recording {
    inner: CpuBackend,
    steps: std::sync::Arc<std::sync::Mutex<Vec<Vec<usize>>>>,
}

impl Backend for Recording {
    type Cache = <CpuBackend as Backend>::Cache;
    fn config(&self) -> &meswitch_server::model::ModelConfig {
        self.inner.config()
    }
    fn new_cache(&self) -> Self::Cache {
        self.inner.new_cache()
    }
    fn add_expert(&mut self, e: meswitch_server::model::Expert) -> ExpertId {
        self.inner.add_expert(e)
    }
    fn expert_names(&self) -> Vec<String> {
        self.inner.expert_names()
    }
    fn remove_expert(
        &mut self,
        id: ExpertId,
    ) -> Result<meswitch_server::model::Expert, meswitch_server::model::ModelError> {
        self.inner.remove_expert(id)
    }
    fn expert_parser(&self) -> meswitch_server::model::ExpertParser {
        self.inner.expert_parser()
    }
    fn hidden_states(
        &self,
        tokens: &[u32],
        layer: usize,
    ) -> Result<Vec<f32>, meswitch_server::model::ModelError> {
        self.inner.hidden_states(tokens, layer)
    }
    fn forward(
        &self,
        batch: &mut [meswitch_server::model::SeqStep<'_, Self::Cache>],
    ) -> Result<Vec<Vec<f32>>, meswitch_server::model::ModelError> {
        let sizes = batch.iter().map(|s| s.tokens.len()).collect();
        self.steps.lock().unwrap().push(sizes);
        self.inner.forward(batch)
    }
}

/// While a sequence decodes, newly arrived long prompts together add at
/// most `prefill_chunk` rows to a step, so decoding is not stalled.
#[test]
fn long_prompts_enter_in_chunks_beside_decoding() {
    const CHUNK: usize = 16;
    let fam = family(1, 5);
    let steps = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let config = EngineConfig {
        prefill_chunk: CHUNK,
        ..Default::default()
    };
    let engine = EngineStart {
        config,
        ..fam.engine_start()
    }
    .on(|inner| Recording {
        inner,
        steps: steps.clone(),
    })
    .start()
    .unwrap();
    let mut a = engine
        .submit(long_request(ExpertChoice::Base, 200))
        .unwrap();
    assert!(matches!(next_event(&mut a), Some(Event::Started { .. })));
    while !matches!(next_event(&mut a), Some(Event::Text(_))) {}
    let long = |e: &str| greedy((0..100).collect(), ExpertChoice::Named(e.to_string()), 3);
    let mut b = engine.submit(long("e0")).unwrap();
    let mut c = engine.submit(long("e0")).unwrap();
    assert_eq!(collect(&mut b).completion_tokens, 3);
    assert_eq!(collect(&mut c).completion_tokens, 3);
    loop {
        match next_event(&mut a) {
            Some(Event::Text(_)) => {}
            Some(Event::Done {
                completion_tokens, ..
            }) => break assert_eq!(completion_tokens, 200),
            e => panic!("unexpected {e:?}"),
        }
    }
    let steps = steps.lock().unwrap();
    let mut prefill_steps_beside_decoding = 0;
    for s in steps.iter().filter(|s| s.len() > 1) {
        let prefill: usize = s.iter().filter(|&&n| n > 1).sum();
        assert!(
            prefill <= CHUNK,
            "step {s:?} carries more than {CHUNK} prompt rows"
        );
        prefill_steps_beside_decoding += (prefill > 0) as usize;
    }
    assert!(prefill_steps_beside_decoding >= 2 * 100 / CHUNK);
}

/// `ln softmax(logits)[id]` for every id, in f64, written out here rather
/// than taken from the engine.
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    logits.iter().map(|&l| l as f64 - max - z.ln()).collect()
}

/// The engine's logprobs are the log-softmax of the logits the backend
/// gives for the same tokens, taken before the sampler's penalty and
/// temperature (the request uses both), and top lists are the most likely
/// ids by those logits.
#[test]
fn logprobs_are_the_log_softmax_of_the_backends_logits() {
    const TOP: usize = 4;
    let fam = family(1, 5);
    let engine = fam.start_engine(EngineConfig::default());
    let mut req = greedy(vec![9, 40, 41, 9], ExpertChoice::Named("e0".into()), 12);
    req.params.temperature = 0.9;
    req.params.repetition_penalty = 3.0;
    req.params.top_k = 8;
    req.params.seed = 17;
    req.logprobs = Some(TOP);
    let out = collect(&mut engine.submit(req.clone()).unwrap());
    assert_eq!(out.error, None);
    assert_eq!(out.logprobs.len(), out.completion_tokens, "no eos here");
    let mut quiet = req.clone();
    quiet.logprobs = None;
    let plain = collect(&mut engine.submit(quiet).unwrap());
    assert_eq!(plain.text, out.text, "asking for logprobs changes no token");
    assert!(plain.logprobs.is_empty());

    let model = fam.model();
    let mut backend = model.backend;
    let e0 = backend.load_expert(&fam.experts[0].path).unwrap();
    let known = model.tokenizer.vocab_size();
    let mut cache = backend.new_cache();
    let mut feed = req.prompt.clone();
    for (k, lp) in out.logprobs.iter().enumerate() {
        let mut step = [SeqStep {
            tokens: &feed,
            cache: &mut cache,
            expert: Some(e0),
            logits: LogitsWanted::Last,
        }];
        let mut logits = backend.forward(&mut step).unwrap().remove(0);
        logits
            .iter_mut()
            .skip(known)
            .for_each(|l| *l = f32::NEG_INFINITY);
        let want = log_softmax(&logits);
        let id = lp.sampled.id as usize;
        assert!(
            (lp.sampled.logprob as f64 - want[id]).abs() < 1e-4,
            "token {k}: {} vs {}",
            lp.sampled.logprob,
            want[id]
        );
        let mut ranked: Vec<usize> = (0..want.len()).collect();
        ranked.sort_by(|&a, &b| want[b].total_cmp(&want[a]));
        let top: Vec<usize> = lp.top.iter().map(|c| c.id as usize).collect();
        assert_eq!(top, ranked[..TOP], "token {k}");
        for c in &lp.top {
            assert!((c.logprob as f64 - want[c.id as usize]).abs() < 1e-4);
        }
        feed = vec![lp.sampled.id];
    }
}
