//! The cheap baseline router on the real routing data (../shared/data/router):
//! character 2–5-gram TF-IDF + logistic regression, trained on train, scored
//! on dev. The issue quotes 97.5% for this baseline; a router on the base
//! model's hidden states must beat it.

use meswitch_server::router::dataset::{label_indices, read_jsonl};
use meswitch_server::router::metrics::Confusion;
use meswitch_server::router::softmax::{SoftmaxClassifier, TrainConfig};
use meswitch_server::router::tfidf::{TfidfConfig, TfidfVectorizer};
use meswitch_server::testdata;

#[test]
fn tfidf_baseline_on_real_routing_data() {
    let Some(dir) = testdata::require("router data", testdata::shared_data("router")) else {
        return;
    };
    let train = read_jsonl(&dir.join("train.jsonl")).unwrap();
    let dev = read_jsonl(&dir.join("dev.jsonl")).unwrap();
    let (classes, y_train) = label_indices(&train);
    assert_eq!(classes.len(), 7);
    let texts: Vec<&str> = train.iter().map(|q| q.text.as_str()).collect();
    let started = std::time::Instant::now();
    let vectorizer = TfidfVectorizer::fit(&texts, TfidfConfig::default());
    let x_train: Vec<_> = texts.iter().map(|t| vectorizer.transform(t)).collect();
    let model = SoftmaxClassifier::train(
        &classes,
        vectorizer.dim(),
        &x_train,
        &y_train,
        &TrainConfig::default(),
    );
    let trained = started.elapsed();
    let started = std::time::Instant::now();
    let truth: Vec<usize> = dev
        .iter()
        .map(|q| {
            classes
                .binary_search(&q.domain)
                .expect("dev domain seen in train")
        })
        .collect();
    let predicted: Vec<usize> = dev
        .iter()
        .map(|q| model.predict(&vectorizer.transform(&q.text)).0)
        .collect();
    let per_query = started.elapsed() / dev.len() as u32;
    let confusion = Confusion::new(&classes, &truth, &predicted);
    eprintln!(
        "tfidf char2-5 + logistic regression: dev accuracy {:.4} ({} features, train {:?}, {:?}/query)\n{}",
        confusion.accuracy(),
        vectorizer.dim(),
        trained,
        per_query,
        confusion.table()
    );
    // Far above the 1/7 of chance and the 19% of the largest class; the
    // issue's independent run of this baseline scored 97.5%.
    assert!(
        confusion.accuracy() > 0.95,
        "accuracy {}",
        confusion.accuracy()
    );
}
