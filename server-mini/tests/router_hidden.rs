//! The hidden-state router on the real routing data (../shared/data/router)
//! and the real SmolLM2-135M GGUF, against the char 2–5-gram TF-IDF baseline
//! trained and scored on the same queries in the same run.
//!
//! MET (measured by hand on the full splits, CPU, this machine, 2026-11-25):
//! with the defaults (layer 6 of 30, RMS-normalised mean pooling, ≤1024
//! chat-templated tokens, L-BFGS-fitted softmax) `meswitch router eval` scored
//! 0.9901 (797/805) on the full dev split against the TF-IDF baseline's
//! 0.9876 (795/805) in the same run, trained on all 2416 train queries (from
//! the feature cache of `meswitch router features`; the cached features
//! equal live ones to 1e-6). The margin is two queries. This test, on a
//! subset, asserts what holds there with room for noise: far above chance,
//! and not under the baseline by more than MAX_GAP (measured: hidden 0.9317,
//! TF-IDF 0.8820 on this subset; 132 s on this machine under load ≈ 2).
//!
//! Runtime: the base model runs every query on CPU, so the test uses a
//! stratified subset (every TRAIN_EVERY-th train query, every DEV_EVERY-th
//! dev query; both files are sorted by nothing that correlates with the
//! step). The full-split figures come from `meswitch router eval`.

use std::path::Path;
use std::time::Instant;

use meswitch_server::chat::{ChatMessage, ChatTemplate};
use meswitch_server::gguf::GgufFile;
use meswitch_server::model::{load_cpu, Backend, LoadedModel};
use meswitch_server::router::dataset::{label_indices, read_jsonl, LabelledQuery};
use meswitch_server::router::hidden::{
    FeatureSpec, HiddenRouter, HiddenRouterSettings, Pooling, RouterError, PROMPT_CHAT,
};
use meswitch_server::router::hidden_sweep::labels_in;
use meswitch_server::router::metrics::Confusion;
use meswitch_server::router::softmax::{SoftmaxClassifier, TrainConfig};
use meswitch_server::router::tfidf::{TfidfConfig, TfidfVectorizer};
use meswitch_server::testdata;

const TRAIN_EVERY: usize = 10;
const DEV_EVERY: usize = 5;
/// Accuracy the router must reach on the dev subset: 7 domains, the largest
/// 19% of the queries; broken features land near that. Measured 0.9317 (11
/// of 161 wrong); this allows three more misses.
const MIN_ACCURACY: f64 = 0.91;
/// How far under the TF-IDF baseline the router may score on the subset
/// (measured: 0.050 *above* it; one dev query is 0.0062, so this allows
/// two queries of bad luck, not a lost margin).
const MAX_GAP: f64 = 0.0125;

fn every(v: Vec<LabelledQuery>, n: usize) -> Vec<LabelledQuery> {
    v.into_iter().step_by(n).collect()
}

/// The chat-templated prompt the server routes, as token ids.
fn chat_tokenizer<'m>(
    gguf: &Path,
    m: &'m LoadedModel,
) -> impl Fn(&str) -> Result<Vec<u32>, String> + 'm {
    let template = ChatTemplate::from_gguf(&GgufFile::open(gguf).unwrap())
        .unwrap()
        .expect("SmolLM2 has a chat template");
    move |text: &str| {
        let prompt = template
            .render(&[ChatMessage::new("user", text)], true)
            .map_err(|e| e.to_string())?;
        m.tokenizer.encode(&prompt, true).map_err(|e| e.to_string())
    }
}

fn tfidf_accuracy(train: &[LabelledQuery], dev: &[LabelledQuery]) -> (f64, f64) {
    let (classes, y) = label_indices(train);
    let texts: Vec<&str> = train.iter().map(|q| q.text.as_str()).collect();
    let v = TfidfVectorizer::fit(&texts, TfidfConfig::default());
    let x: Vec<_> = texts.iter().map(|t| v.transform(t)).collect();
    let model = SoftmaxClassifier::train(&classes, v.dim(), &x, &y, &TrainConfig::default());
    let started = Instant::now();
    let predicted: Vec<usize> = dev
        .iter()
        .map(|q| model.predict(&v.transform(&q.text)).0)
        .collect();
    let ms = started.elapsed().as_secs_f64() * 1e3 / dev.len() as f64;
    let truth = labels_in(&classes, dev).unwrap();
    (Confusion::new(&classes, &truth, &predicted).accuracy(), ms)
}

#[test]
fn hidden_router_against_tfidf_on_real_data() {
    let Some(dir) = testdata::require("router data", testdata::shared_data("router")) else {
        return;
    };
    let Some(gguf) = testdata::require("SmolLM2 GGUF", testdata::smollm2_gguf()) else {
        return;
    };
    let train = every(read_jsonl(&dir.join("train.jsonl")).unwrap(), TRAIN_EVERY);
    let dev = every(read_jsonl(&dir.join("dev.jsonl")).unwrap(), DEV_EVERY);
    let m = load_cpu(&gguf).unwrap();
    let tokenize = chat_tokenizer(&gguf, &m);
    let settings = HiddenRouterSettings::for_model(m.backend.config().num_layers, PROMPT_CHAT);

    let started = Instant::now();
    let router = HiddenRouter::train(&m.backend, &tokenize, &train, &settings).unwrap();
    let trained = started.elapsed();
    assert!(
        !router.spec().shared_prefix.is_empty(),
        "the chat template's head is shared"
    );

    let truth = labels_in(router.domains(), &dev).unwrap();
    let started = Instant::now();
    let mut predicted = Vec::new();
    for q in &dev {
        let c = router
            .classify(&m.backend, &tokenize(&q.text).unwrap())
            .unwrap();
        assert!((c.probabilities.iter().sum::<f32>() - 1.0).abs() < 1e-4);
        predicted.push(c.domain);
    }
    let ms = started.elapsed().as_secs_f64() * 1e3 / dev.len() as f64;
    let confusion = Confusion::new(router.domains(), &truth, &predicted);
    let hidden = confusion.accuracy();
    let (tfidf, tfidf_ms) = tfidf_accuracy(&train, &dev);
    eprintln!(
        "{} train / {} dev queries; hidden-state router (layer {}, {} pooling, ≤{} tokens): \
         accuracy {hidden:.4}, {ms:.1} ms/query, trained in {:.1} s; \
         TF-IDF baseline: accuracy {tfidf:.4}, {tfidf_ms:.3} ms/query\n{}",
        train.len(),
        dev.len(),
        settings.layer,
        settings.pooling.name(),
        settings.max_tokens,
        trained.as_secs_f64(),
        confusion.table()
    );
    assert!(hidden >= MIN_ACCURACY, "hidden-state router {hidden:.4}");
    assert!(
        hidden >= tfidf - MAX_GAP,
        "hidden-state router {hidden:.4} vs TF-IDF {tfidf:.4}"
    );

    // The saved router answers the same.
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("router.safetensors");
    router.save(&path).unwrap();
    let back = HiddenRouter::load(&path).unwrap();
    let prompt = tokenize(&dev[0].text).unwrap();
    assert_eq!(
        back.classify(&m.backend, &prompt).unwrap(),
        router.classify(&m.backend, &prompt).unwrap()
    );
}

/// A router made for another model is refused before it runs.
#[test]
fn router_for_another_model_is_an_error() {
    let Some(gguf) = testdata::require("SmolLM2 GGUF", testdata::smollm2_gguf()) else {
        return;
    };
    let m = load_cpu(&gguf).unwrap();
    let spec = FeatureSpec {
        layer: 1,
        pooling: Pooling::Mean,
        max_tokens: 8,
        hidden_size: 8,
        n_layers: 2,
        shared_prefix: vec![],
        prompt_format: PROMPT_CHAT.into(),
    };
    let x = vec![vec![0.0; 8], vec![1.0; 8]];
    let classes = vec!["a".to_string(), "b".to_string()];
    let r = HiddenRouter::fit(spec, classes, &x, &[0, 1], &TrainConfig::default()).unwrap();
    let err = r.classify(&m.backend, &[1, 2, 3]).unwrap_err();
    assert!(matches!(err, RouterError::ModelMismatch { .. }), "{err}");
    assert!(err.to_string().contains("hidden size 8"), "{err}");
}
