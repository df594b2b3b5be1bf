//! `meswitch router train | eval | sweep | features`: the domain router on
//! the base model's hidden states (CPU), and the TF-IDF baseline it has to
//! beat. `features` saves pooled hidden states of a data file once
//! (router::feature_cache); `train --features` and `eval --features` reuse
//! them instead of running the model.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};

use super::Run;
use crate::chat::{ChatMessage, ChatTemplate};
use crate::model::load::is_gguf;
use crate::model::{load_cpu, Backend, LoadedModel};
use crate::router::dataset::{label_indices, read_jsonl, LabelledQuery};
use crate::router::hidden::{
    HiddenRouter, HiddenRouterSettings, Pooling, Solver, Tokenize, DEFAULT_L2, DEFAULT_MAX_TOKENS,
    PROMPT_CHAT, PROMPT_RAW,
};
use crate::router::hidden_sweep::{labels_in, sweep_features, sweep_scores, SweepSetup};
use crate::router::metrics::Confusion;
use crate::router::softmax::{SoftmaxClassifier, TrainConfig};
use crate::router::tfidf::{TfidfConfig, TfidfVectorizer};

/// Domain router on the base model's hidden states (train, evaluate, choose a layer).
#[derive(Parser, Debug)]
#[command(name = "router")]
pub struct RouterArgs {
    #[command(subcommand)]
    command: RouterCommand,
}

#[derive(Subcommand, Debug)]
enum RouterCommand {
    Train(TrainArgs),
    Eval(EvalArgs),
    Sweep(SweepArgs),
    Features(FeaturesArgs),
}

/// Runs the model once over labelled queries and saves pooled hidden-state
/// statistics at several layers and token cuts (router::feature_cache).
#[derive(Parser, Debug)]
struct FeaturesArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    data: PathBuf,
    #[arg(short, long)]
    output: PathBuf,
    /// Comma-separated layers (n_layers = after the final norm).
    #[arg(long, value_delimiter = ',', required = true)]
    layers: Vec<usize>,
    /// Comma-separated token cuts; the model runs up to the largest.
    #[arg(long, value_delimiter = ',', default_values_t = [64, 128, 256, 512])]
    cuts: Vec<usize>,
    #[arg(long)]
    raw: bool,
}

/// Trains a router on labelled queries (JSON Lines {"text","domain"}) and writes it.
#[derive(Parser, Debug)]
struct TrainArgs {
    /// Base model: a .gguf file or an HF checkpoint folder.
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    data: PathBuf,
    #[arg(short, long)]
    output: PathBuf,
    /// Hidden state after this decoder layer (0-based; n_layers = after the
    /// final norm). Default: the measured choice (HiddenRouterSettings::for_model).
    #[arg(long)]
    layer: Option<usize>,
    /// mean | last | mean+last | normed-mean. Default: the measured choice.
    #[arg(long, value_parser = parse_pooling)]
    pooling: Option<Pooling>,
    /// Prompt tokens run at most (bounds routing latency).
    #[arg(long, default_value_t = DEFAULT_MAX_TOKENS)]
    max_tokens: usize,
    /// Train on the bare text instead of the chat-templated prompt the server routes.
    #[arg(long)]
    raw: bool,
    /// Take the features from a cache written by `router features` over the
    /// same --data (same prompt format; it must hold the layer and the
    /// --max-tokens cut) instead of running the model.
    #[arg(long)]
    features: Option<PathBuf>,
    #[command(flatten)]
    fit: FitArgs,
}

/// Classifier training knobs.
#[derive(clap::Args, Debug)]
struct FitArgs {
    #[arg(long, default_value_t = 20)]
    epochs: usize,
    /// L2 penalty on the classifier weights.
    #[arg(long, default_value_t = DEFAULT_L2)]
    l2: f32,
    /// lbfgs (full batch, to convergence) | sgd (AdaGrad, --epochs passes).
    #[arg(long, default_value = "lbfgs", value_parser = parse_solver)]
    solver: Solver,
}

fn parse_solver(s: &str) -> Result<Solver, String> {
    Solver::parse(s).ok_or_else(|| format!("unknown solver {s:?} (lbfgs, sgd)"))
}

impl FitArgs {
    fn config(&self) -> TrainConfig {
        TrainConfig {
            epochs: self.epochs,
            l2: self.l2,
            ..TrainConfig::default()
        }
    }
}

/// Scores a router on labelled queries: accuracy, confusion, latency per query.
#[derive(Parser, Debug)]
struct EvalArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    router: PathBuf,
    #[arg(long)]
    data: PathBuf,
    /// Also train the char 2–5-gram TF-IDF baseline on this file and score it on --data.
    #[arg(long)]
    baseline_train: Option<PathBuf>,
    /// Score on features cached by `router features` over --data instead of
    /// running the model (a quick look: no latency is measured).
    #[arg(long)]
    features: Option<PathBuf>,
}

/// Dev accuracy for each layer × pooling (one pass of the model per query).
#[derive(Parser, Debug)]
struct SweepArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    train: PathBuf,
    #[arg(long)]
    dev: PathBuf,
    /// Comma-separated layers (n_layers = after the final norm).
    #[arg(long, value_delimiter = ',', default_values_t = [2, 4, 6, 8, 11, 15, 23, 30])]
    layers: Vec<usize>,
    #[arg(long, default_value_t = DEFAULT_MAX_TOKENS)]
    max_tokens: usize,
    #[arg(long)]
    raw: bool,
    /// Use only every n-th query of each split (a quick look).
    #[arg(long, default_value_t = 1)]
    every: usize,
    /// Comma-separated L2 penalties to try (default: --l2).
    #[arg(long, value_delimiter = ',')]
    l2s: Vec<f32>,
    #[command(flatten)]
    fit: FitArgs,
}

fn parse_pooling(s: &str) -> Result<Pooling, String> {
    Pooling::parse(s).ok_or_else(|| {
        let names: Vec<&str> = Pooling::ALL.iter().map(|p| p.name()).collect();
        format!("unknown pooling {s:?} ({})", names.join(", "))
    })
}

impl Run for RouterArgs {
    fn run(self) -> anyhow::Result<()> {
        match self.command {
            RouterCommand::Train(a) => a.run(),
            RouterCommand::Eval(a) => a.run(),
            RouterCommand::Sweep(a) => a.run(),
            RouterCommand::Features(a) => a.run(),
        }
    }
}

/// How a query's text becomes the router's tokens: the chat-templated
/// prompt (what the server routes) or the bare text.
fn tokenizer_for<'m>(
    model: &Path,
    m: &'m LoadedModel,
    format: &str,
) -> anyhow::Result<Box<Tokenize<'m>>> {
    if format == PROMPT_RAW {
        return Ok(Box::new(|text: &str| {
            m.tokenizer.encode(text, false).map_err(|e| e.to_string())
        }));
    }
    anyhow::ensure!(format == PROMPT_CHAT, "unknown prompt format {format:?}");
    let template = if is_gguf(model) {
        ChatTemplate::from_gguf(&crate::gguf::GgufFile::open(model)?)?
    } else {
        ChatTemplate::from_tokenizer_config(&model.join("tokenizer_config.json"))?
    }
    .ok_or_else(|| anyhow::anyhow!("{} has no chat template (use --raw)", model.display()))?;
    Ok(Box::new(move |text: &str| {
        let prompt = template
            .render(&[ChatMessage::new("user", text)], true)
            .map_err(|e| e.to_string())?;
        let mut ids = m
            .tokenizer
            .encode(&prompt, true)
            .map_err(|e| e.to_string())?;
        // Chat templates write the BOS text themselves (as `meswitch generate --chat`).
        if let (true, Some(b), [first, second, ..]) =
            (m.tokenizer.add_bos(), m.tokenizer.bos_id(), ids.as_slice())
        {
            if *first == b && *second == b {
                ids.remove(0);
            }
        }
        Ok(ids)
    }))
}

fn load_model(path: &Path) -> anyhow::Result<LoadedModel> {
    load_cpu(path).with_context(|| format!("loading {}", path.display()))
}

fn read(path: &Path) -> anyhow::Result<Vec<LabelledQuery>> {
    Ok(read_jsonl(path)?)
}

fn prompt_format(raw: bool) -> &'static str {
    if raw {
        PROMPT_RAW
    } else {
        PROMPT_CHAT
    }
}

impl TrainArgs {
    fn run(self) -> anyhow::Result<()> {
        let data = read(&self.data)?;
        let m = load_model(&self.model)?;
        let format = prompt_format(self.raw);
        let tokenize = tokenizer_for(&self.model, &m, format)?;
        let defaults = HiddenRouterSettings::for_model(m.backend.config().num_layers, format);
        let settings = HiddenRouterSettings {
            layer: self.layer.unwrap_or(defaults.layer),
            pooling: self.pooling.unwrap_or(defaults.pooling),
            max_tokens: self.max_tokens,
            prompt_format: format.to_string(),
            train: self.fit.config(),
            solver: self.fit.solver,
        };
        let bar = super::progress_bar(data.len() as u64);
        let started = Instant::now();
        let router = match &self.features {
            Some(cache) => {
                HiddenRouter::train_from_cache(&m.backend, &*tokenize, &data, &settings, cache)?
            }
            None => HiddenRouter::train_with_progress(
                &m.backend,
                &*tokenize,
                &data,
                &settings,
                &mut |i| bar.set_position(i as u64),
            )?,
        };
        bar.finish_and_clear();
        let took = started.elapsed();
        router.save(&self.output)?;
        println!(
            "trained on {} queries ({} domains), layer {}, {} pooling, ≤{} {} tokens{}: {:.1} s ({:.1} ms/query); wrote {}",
            data.len(),
            router.domains().len(),
            settings.layer,
            settings.pooling.name(),
            self.max_tokens,
            format,
            if self.features.is_some() {
                ", features from the cache"
            } else {
                ""
            },
            took.as_secs_f64(),
            ms(took) / data.len() as f64,
            self.output.display()
        );
        Ok(())
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl EvalArgs {
    fn run(self) -> anyhow::Result<()> {
        let data = read(&self.data)?;
        let router = HiddenRouter::load(&self.router)?;
        let m = load_model(&self.model)?;
        router.spec().check(&m.backend)?;
        let tokenize = tokenizer_for(&self.model, &m, &router.spec().prompt_format)?;
        let classes = router.domains().to_vec();
        let truth = labels_in(&classes, &data)?;
        let mut predicted = Vec::with_capacity(data.len());
        let mut routing = Duration::ZERO;
        if let Some(cache) = &self.features {
            let (header, stats) = crate::router::feature_cache::read_cache(cache)?;
            anyhow::ensure!(stats.len() == data.len(), "cache and data differ in length");
            let x = crate::router::feature_cache::cached_features(&header, &stats, router.spec())?;
            predicted.extend(x.iter().map(|v| router.classify_features(v).domain));
        } else {
            let bar = super::progress_bar(data.len() as u64);
            for (i, q) in data.iter().enumerate() {
                // Latency = tokenizing + the model's layers + pooling + classifier.
                let started = Instant::now();
                let tokens = tokenize(&q.text).map_err(|e| anyhow::anyhow!("query {i}: {e}"))?;
                predicted.push(router.classify(&m.backend, &tokens)?.domain);
                routing += started.elapsed();
                bar.set_position(i as u64 + 1);
            }
            bar.finish_and_clear();
        }
        let confusion = Confusion::new(&classes, &truth, &predicted);
        let s = router.spec();
        println!(
            "hidden-state router: layer {} of {}, {} pooling, ≤{} {} tokens",
            s.layer,
            s.n_layers,
            s.pooling.name(),
            s.max_tokens,
            s.prompt_format
        );
        println!("accuracy: {:.4}", confusion.accuracy());
        if self.features.is_some() {
            println!("(features from the cache: latency not measured)");
        } else {
            println!(
                "latency per query: {:.2} ms (CPU, {} queries)",
                ms(routing) / data.len() as f64,
                data.len()
            );
        }
        println!("{}", confusion.table());
        if let Some(path) = &self.baseline_train {
            println!("baseline trained on {}", path.display());
            baseline(&read(path)?, &data)?;
        }
        Ok(())
    }
}

/// Char 2–5-gram TF-IDF + logistic regression, trained on `train`, scored
/// on `data`.
fn baseline(train: &[LabelledQuery], data: &[LabelledQuery]) -> anyhow::Result<()> {
    let (classes, y) = label_indices(train);
    let started = Instant::now();
    let texts: Vec<&str> = train.iter().map(|q| q.text.as_str()).collect();
    let vectorizer = TfidfVectorizer::fit(&texts, TfidfConfig::default());
    let x: Vec<_> = texts.iter().map(|t| vectorizer.transform(t)).collect();
    let model =
        SoftmaxClassifier::train(&classes, vectorizer.dim(), &x, &y, &TrainConfig::default());
    let trained = started.elapsed();
    let truth = labels_in(&classes, data)?;
    let started = Instant::now();
    let predicted: Vec<usize> = data
        .iter()
        .map(|q| model.predict(&vectorizer.transform(&q.text)).0)
        .collect();
    let per_query = ms(started.elapsed()) / data.len() as f64;
    let confusion = Confusion::new(&classes, &truth, &predicted);
    println!(
        "baseline (char 2-5-gram TF-IDF + logistic regression, trained on {} queries: {} features, {:.1} s)",
        train.len(),
        vectorizer.dim(),
        trained.as_secs_f64()
    );
    println!("baseline accuracy: {:.4}", confusion.accuracy());
    println!("baseline latency per query: {per_query:.3} ms (CPU)");
    println!("{}", confusion.table());
    Ok(())
}

impl SweepArgs {
    fn run(self) -> anyhow::Result<()> {
        let every = |v: Vec<LabelledQuery>| -> Vec<LabelledQuery> {
            v.into_iter().step_by(self.every.max(1)).collect()
        };
        let train = every(read(&self.train)?);
        let dev = every(read(&self.dev)?);
        let m = load_model(&self.model)?;
        let format = prompt_format(self.raw);
        let tokenize = tokenizer_for(&self.model, &m, format)?;
        let setup = SweepSetup {
            layers: self.layers.clone(),
            max_tokens: self.max_tokens,
            prompt_format: format.to_string(),
            train: self.fit.config(),
            solver: self.fit.solver,
            l2s: if self.l2s.is_empty() {
                vec![self.fit.l2]
            } else {
                self.l2s.clone()
            },
        };
        let bar = super::progress_bar((train.len() + dev.len()) as u64);
        let started = Instant::now();
        let features =
            sweep_features(&m.backend, &*tokenize, &train, &dev, &setup, &mut |i, _| {
                bar.set_position(i as u64)
            })?;
        bar.finish_and_clear();
        println!(
            "{} train / {} dev queries, <={} {} tokens, model {:.0} s",
            train.len(),
            dev.len(),
            self.max_tokens,
            format,
            started.elapsed().as_secs_f64()
        );
        let rows = sweep_scores(&features, &train, &dev, &setup)?;
        println!(
            "| layer | l2 | {} |",
            Pooling::ALL.map(Pooling::name).join(" | ")
        );
        println!("|---|---|{}", "---|".repeat(Pooling::ALL.len()));
        for chunk in rows.chunks(Pooling::ALL.len()) {
            let accs: Vec<String> = chunk.iter().map(|r| format!("{:.4}", r.accuracy)).collect();
            println!(
                "| {} | {:e} | {} |",
                chunk[0].layer,
                chunk[0].l2,
                accs.join(" | ")
            );
        }
        baseline(&train, &dev)?;
        Ok(())
    }
}

impl FeaturesArgs {
    fn run(self) -> anyhow::Result<()> {
        use crate::router::feature_cache::{CacheHeader, CacheWriter, LayerStats, QueryStats};
        let data = read(&self.data)?;
        let m = load_model(&self.model)?;
        let format = prompt_format(self.raw);
        let tokenize = tokenizer_for(&self.model, &m, format)?;
        let tokens = crate::router::hidden::tokenize_all(&*tokenize, &data)?;
        let c = m.backend.config();
        let max_cut = *self.cuts.iter().max().context("no cuts")?;
        let spec = crate::router::hidden::FeatureSpec {
            layer: 0,
            pooling: Pooling::Mean,
            max_tokens: max_cut,
            hidden_size: c.hidden_size,
            n_layers: c.num_layers,
            shared_prefix: crate::router::hidden::shared_prefix(&tokens),
            prompt_format: format.to_string(),
        };
        let total: usize = tokens.iter().map(|t| spec.tokens_to_run(t).len()).sum();
        println!(
            "{} queries, {} tokens to run (shared prefix of {})",
            data.len(),
            total,
            spec.shared_prefix.len()
        );
        let mut w = CacheWriter::create(
            &self.output,
            CacheHeader {
                version: crate::router::feature_cache::CACHE_VERSION,
                hidden_size: c.hidden_size,
                n_layers: c.num_layers,
                layers: self.layers.clone(),
                cuts: self.cuts.clone(),
                prompt_format: format.to_string(),
                shared_prefix: spec.shared_prefix.clone(),
                n_queries: data.len(),
            },
        )?;
        let bar = super::progress_bar(total as u64);
        let started = Instant::now();
        let mut done = 0;
        for t in &tokens {
            let run = spec.tokens_to_run(t);
            let hs = m.backend.hidden_states_at(run, &self.layers)?;
            w.push(&QueryStats {
                rows: run.len(),
                layers: hs
                    .iter()
                    .map(|h| LayerStats::of(h, c.hidden_size, &self.cuts))
                    .collect(),
            })?;
            done += run.len();
            bar.set_position(done as u64);
        }
        bar.finish_and_clear();
        w.finish()?;
        println!(
            "{:.0} s, {:.2} ms/token; wrote {}",
            started.elapsed().as_secs_f64(),
            ms(started.elapsed()) / total as f64,
            self.output.display()
        );
        Ok(())
    }
}
