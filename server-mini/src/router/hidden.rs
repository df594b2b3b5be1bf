//! The ME-Switch model-level router: a softmax classifier on the base
//! model's hidden states, pooled over the prompt.
//!
//! ```text
//!   prompt tokens ── minus the shared prefix (a chat template's fixed
//!        │             head: the longest prefix of all training prompts)
//!        │── first max_tokens ──▶ base model, layers 0..=layer
//!        ▼
//!   h [tokens, hidden]  (layer == n_layers: after the final RMSNorm)
//!   pool: mean of rows/rms(row) (default) | mean | last row | [mean, last] → x [dim]
//!   z = (x − mean) · inv_std        (standardised on the training set)
//!   p = softmax(W·z + b)            (W [classes, dim]; fitted by L-BFGS)
//! ```
//!
//! Defaults (measured on SmolLM2-135M and the real routing data, see
//! docs/perf.md): layer 6 of 30, normed mean, ≤1024 tokens.
//!
//! The file format is in [`super::hidden_file`].

use thiserror::Error;

use super::dataset::LabelledQuery;
use super::feature_cache::pooled_means;
use super::features::SparseVec;
use super::lbfgs::LbfgsConfig;
use super::softmax::{SoftmaxClassifier, TrainConfig};
use crate::model::{Backend, ModelError};

/// Prompt tokens the router runs at most after the shared prefix (the rest
/// is cut off), so routing latency is bounded whatever the prompt length.
/// The routing data's queries are up to 1500 characters; 115 of the 2416
/// training queries are longer than 512 tokens (scripts that the byte-level
/// tokenizer splits finely), and the longest reach this cut. 5-fold
/// cross-validation on the train split (layer 6, normed mean) scored 0.9801
/// / 0.9834 / 0.9826 / 0.9847 at 128 / 256 / 512 / 1024 tokens: the words
/// the old 64-token cut dropped were most of the router's errors.
pub const DEFAULT_MAX_TOKENS: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    /// Mean over the prompt's rows.
    Mean,
    /// The last row: causal attention has let it read the whole prompt.
    Last,
    /// `[mean, last]`, twice the hidden size.
    MeanLast,
    /// Mean over the prompt's rows, each first divided by its RMS. The
    /// residual stream's first row (the attention sink) has a norm ~10×
    /// the others' (max |x| ≈ 600 on SmolLM2), so in a plain mean it
    /// outweighs whole sentences of a short prompt; normalised, every token
    /// counts the same.
    NormedMean,
}

impl Pooling {
    pub const ALL: [Pooling; 4] = [
        Pooling::Mean,
        Pooling::Last,
        Pooling::MeanLast,
        Pooling::NormedMean,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Pooling::Mean => "mean",
            Pooling::Last => "last",
            Pooling::MeanLast => "mean+last",
            Pooling::NormedMean => "normed-mean",
        }
    }

    pub fn parse(s: &str) -> Option<Pooling> {
        Pooling::ALL.into_iter().find(|p| p.name() == s)
    }

    /// Feature length for a hidden size.
    pub fn dim(self, hidden: usize) -> usize {
        match self {
            Pooling::Mean | Pooling::Last | Pooling::NormedMean => hidden,
            Pooling::MeanLast => 2 * hidden,
        }
    }

    /// Pools `h [rows, hidden]` (at least one row).
    pub fn pool(self, h: &[f32], hidden: usize) -> Vec<f32> {
        let rows = h.len() / hidden;
        let last = &h[(rows - 1) * hidden..rows * hidden];
        // The same sums as the feature cache's, so cached and live features agree.
        let means = || pooled_means(h, hidden, rows);
        match self {
            Pooling::Mean => means().0,
            Pooling::NormedMean => means().1,
            Pooling::Last => last.to_vec(),
            Pooling::MeanLast => {
                let mut m = means().0;
                m.extend_from_slice(last);
                m
            }
        }
    }
}

/// How the classifier is fitted to the standardised features.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Solver {
    /// Per-example AdaGrad SGD for `TrainConfig::epochs` passes (the
    /// TF-IDF baseline's trainer; the demo router was measured with it).
    Sgd,
    /// Full-batch L-BFGS on the same objective, to convergence: on the real
    /// routing data it scores 1–2 points above 20–60 SGD epochs.
    Lbfgs,
}

impl Solver {
    pub fn parse(s: &str) -> Option<Solver> {
        match s {
            "sgd" => Some(Solver::Sgd),
            "lbfgs" => Some(Solver::Lbfgs),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct HiddenRouterSettings {
    /// Hidden state after this decoder layer (0-based; `n_layers` = after
    /// the final norm).
    pub layer: usize,
    pub pooling: Pooling,
    pub max_tokens: usize,
    /// Recorded in the router ([`FeatureSpec::prompt_format`]).
    pub prompt_format: String,
    pub train: TrainConfig,
    pub solver: Solver,
}

/// Default depth as a fraction of the decoder layers, from SmolLM2-135M:
/// with whole prompts, the shallow layers route best. 5-fold
/// cross-validation on the train split at ≤1024 tokens (normed mean):
/// 0.9805 / 0.9801 / 0.9839 / 0.9822 / 0.9847 / 0.9839 / 0.9855 after
/// layers 2–8; on the dev split (cross-validated within it) layers 9–20 all
/// scored under layer 6. Layer 6 of 30 ties the best within two queries at a
/// fifth of the model's cost per token.
pub const DEFAULT_LAYER_FRACTION: f64 = 0.2;

/// L2 penalty of the classifier on standardised hidden-state features
/// (objective: mean cross-entropy + L2/2·‖W‖²). Trained on the train split
/// and scored on cached dev features (layer 6, normed mean, ≤512 tokens),
/// 4e-4 / 1e-3 / 4e-3 gave 0.9901 / 0.9913 / 0.9913.
pub const DEFAULT_L2: f32 = 1e-3;

/// RMS-normalised mean: on layer 6 at ≤512 tokens, trained on train and
/// scored on dev, 0.9913 against 0.9901 for the plain mean (same L2); equal
/// within a query or two in cross-validation, and immune to the attention
/// sink's outsized first row by construction.
pub const DEFAULT_POOLING: Pooling = Pooling::NormedMean;

impl HiddenRouterSettings {
    /// The measured defaults for a model of `n_layers` decoder layers.
    pub fn for_model(n_layers: usize, prompt_format: &str) -> HiddenRouterSettings {
        HiddenRouterSettings {
            layer: ((n_layers as f64 * DEFAULT_LAYER_FRACTION).round() as usize).min(n_layers),
            pooling: DEFAULT_POOLING,
            max_tokens: DEFAULT_MAX_TOKENS,
            prompt_format: prompt_format.to_string(),
            train: TrainConfig {
                l2: DEFAULT_L2,
                ..TrainConfig::default()
            },
            solver: Solver::Lbfgs,
        }
    }
}

/// Turns a query's text into the token ids the router sees.
pub type Tokenize<'a> = dyn Fn(&str) -> Result<Vec<u32>, String> + 'a;

/// What turns a prompt into features: everything but the classifier.
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureSpec {
    pub layer: usize,
    pub pooling: Pooling,
    pub max_tokens: usize,
    /// Of the model the router was trained on; checked before each use.
    pub hidden_size: usize,
    pub n_layers: usize,
    /// Tokens every training prompt began with (e.g. a chat template's
    /// system turn); cut off a prompt that starts with them.
    pub shared_prefix: Vec<u32>,
    /// How training texts became tokens ([`PROMPT_CHAT`] or [`PROMPT_RAW`]);
    /// prompts to classify must be made the same way.
    pub prompt_format: String,
}

/// The text wrapped as one user turn in the model's chat template, with the
/// assistant turn opened: what the server passes to the router.
pub const PROMPT_CHAT: &str = "chat";
/// The text alone.
pub const PROMPT_RAW: &str = "raw";

#[derive(Debug, Error)]
pub enum RouterError {
    #[error("router: {0}")]
    Model(#[from] ModelError),
    #[error("router: tokenizing query {index}: {message}")]
    Tokenize { index: usize, message: String },
    #[error("router: the prompt has no tokens")]
    EmptyPrompt,
    #[error("router: {0}")]
    Training(String),
    #[error("router: this router was trained on a model with {expected}, the backend has {found}")]
    ModelMismatch { expected: String, found: String },
    #[error("router file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("router file {path}: {message}")]
    Format { path: String, message: String },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Classification {
    /// Index into [`HiddenRouter::domains`].
    pub domain: usize,
    pub probabilities: Vec<f32>,
}

/// Smallest standard deviation a feature is divided by: a feature constant
/// over the training set (std 0) must not blow up at test time.
const MIN_STD: f32 = 1e-6;

#[derive(Clone, Debug, PartialEq)]
pub struct HiddenRouter {
    pub(super) spec: FeatureSpec,
    /// Per-feature mean and 1/std of the training set.
    pub(super) mean: Vec<f32>,
    pub(super) inv_std: Vec<f32>,
    pub(super) classifier: SoftmaxClassifier,
}

impl FeatureSpec {
    /// The spec `settings` give for a model of config `c`, with the prefix
    /// shared by the training prompts `tokens`.
    pub fn new(
        c: &crate::model::ModelConfig,
        settings: &HiddenRouterSettings,
        tokens: &[Vec<u32>],
    ) -> FeatureSpec {
        FeatureSpec {
            layer: settings.layer,
            pooling: settings.pooling,
            max_tokens: settings.max_tokens,
            hidden_size: c.hidden_size,
            n_layers: c.num_layers,
            shared_prefix: shared_prefix(tokens),
            prompt_format: settings.prompt_format.clone(),
        }
    }

    pub fn dim(&self) -> usize {
        self.pooling.dim(self.hidden_size)
    }

    /// Errors unless `backend` is a model this router's features fit.
    pub fn check<B: Backend>(&self, backend: &B) -> Result<(), RouterError> {
        let c = backend.config();
        if c.hidden_size != self.hidden_size || c.num_layers != self.n_layers {
            return Err(RouterError::ModelMismatch {
                expected: format!(
                    "hidden size {} and {} layers",
                    self.hidden_size, self.n_layers
                ),
                found: format!("hidden size {} and {} layers", c.hidden_size, c.num_layers),
            });
        }
        Ok(())
    }

    /// The tokens the model runs for `prompt`: without the shared prefix
    /// (a fixed chat-template head says nothing about the domain, and
    /// skipping it saves its cost), then cut to `max_tokens`.
    pub fn tokens_to_run<'p>(&self, prompt: &'p [u32]) -> &'p [u32] {
        let p = &self.shared_prefix;
        let body = if prompt.len() > p.len() && prompt.starts_with(p) {
            &prompt[p.len()..]
        } else {
            prompt
        };
        &body[..body.len().min(self.max_tokens)]
    }

    /// The pooled (not yet standardised) features of one prompt.
    pub fn features<B: Backend>(
        &self,
        backend: &B,
        prompt: &[u32],
    ) -> Result<Vec<f32>, RouterError> {
        let tokens = self.tokens_to_run(prompt);
        if tokens.is_empty() {
            return Err(RouterError::EmptyPrompt);
        }
        let h = backend.hidden_states(tokens, self.layer)?;
        Ok(self.pooling.pool(&h, self.hidden_size))
    }
}

/// Longest prefix shared by every sequence, leaving at least one token of
/// each to pool.
pub fn shared_prefix(seqs: &[Vec<u32>]) -> Vec<u32> {
    let Some(first) = seqs.first() else {
        return Vec::new();
    };
    let mut len = seqs
        .iter()
        .map(|s| s.len().saturating_sub(1))
        .min()
        .unwrap_or(0);
    for s in &seqs[1..] {
        len = first
            .iter()
            .zip(s)
            .take(len)
            .take_while(|(a, b)| a == b)
            .count();
    }
    first[..len].to_vec()
}

impl HiddenRouter {
    pub fn train<B: Backend>(
        backend: &B,
        tokenize: &dyn Fn(&str) -> Result<Vec<u32>, String>,
        data: &[LabelledQuery],
        settings: &HiddenRouterSettings,
    ) -> Result<HiddenRouter, RouterError> {
        Self::train_with_progress(backend, tokenize, data, settings, &mut |_| {})
    }

    /// [`HiddenRouter::train`], calling `progress(done)` after each query's
    /// features.
    pub fn train_with_progress<B: Backend>(
        backend: &B,
        tokenize: &dyn Fn(&str) -> Result<Vec<u32>, String>,
        data: &[LabelledQuery],
        settings: &HiddenRouterSettings,
        progress: &mut dyn FnMut(usize),
    ) -> Result<HiddenRouter, RouterError> {
        let c = backend.config();
        if settings.layer > c.num_layers {
            return Err(ModelError::LayerRange {
                layer: settings.layer,
                n_layers: c.num_layers,
            }
            .into());
        }
        let tokens = tokenize_all(tokenize, data)?;
        let spec = FeatureSpec::new(c, settings, &tokens);
        let mut x = Vec::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            x.push(spec.features(backend, t)?);
            progress(i + 1);
        }
        let (classes, y) = super::dataset::label_indices(data);
        Self::fit_with(spec, classes, &x, &y, &settings.train, settings.solver)
    }

    /// [`HiddenRouter::train`] on features saved by `meswitch router
    /// features` ([`super::feature_cache`]) for the same queries, instead of
    /// running the model; the cache must hold `settings`' layer and token cut.
    pub fn train_from_cache<B: Backend>(
        backend: &B,
        tokenize: &Tokenize<'_>,
        data: &[LabelledQuery],
        settings: &HiddenRouterSettings,
        cache: &std::path::Path,
    ) -> Result<HiddenRouter, RouterError> {
        let tokens = tokenize_all(tokenize, data)?;
        let spec = FeatureSpec::new(backend.config(), settings, &tokens);
        let (header, stats) = super::feature_cache::read_cache(cache)?;
        if stats.len() != data.len() {
            return Err(RouterError::Training(format!(
                "feature cache {} holds {} queries, the data {}",
                cache.display(),
                stats.len(),
                data.len()
            )));
        }
        let x = super::feature_cache::cached_features(&header, &stats, &spec)?;
        let (classes, y) = super::dataset::label_indices(data);
        Self::fit_with(spec, classes, &x, &y, &settings.train, settings.solver)
    }

    /// [`HiddenRouter::fit_with`] by L-BFGS (`train.l2`; epochs unused).
    pub fn fit(
        spec: FeatureSpec,
        classes: Vec<String>,
        x: &[Vec<f32>],
        y: &[usize],
        train: &TrainConfig,
    ) -> Result<HiddenRouter, RouterError> {
        Self::fit_with(spec, classes, x, y, train, Solver::Lbfgs)
    }

    /// Standardises the features and trains the classifier on them.
    pub fn fit_with(
        spec: FeatureSpec,
        classes: Vec<String>,
        x: &[Vec<f32>],
        y: &[usize],
        train: &TrainConfig,
        solver: Solver,
    ) -> Result<HiddenRouter, RouterError> {
        let dim = spec.dim();
        if classes.len() < 2 {
            return Err(RouterError::Training(format!(
                "need at least two domains, got {:?}",
                classes
            )));
        }
        if x.len() != y.len() || x.iter().any(|v| v.len() != dim) {
            return Err(RouterError::Training(format!(
                "{} feature vectors of {dim} values expected for {} labels",
                x.len(),
                y.len()
            )));
        }
        let n = x.len() as f64;
        let mut mean = vec![0f64; dim];
        let mut sq = vec![0f64; dim];
        for v in x {
            for ((m, s), &a) in mean.iter_mut().zip(&mut sq).zip(v) {
                *m += a as f64;
                *s += a as f64 * a as f64;
            }
        }
        let mean: Vec<f32> = mean.iter().map(|m| (m / n) as f32).collect();
        let inv_std: Vec<f32> = sq
            .iter()
            .zip(&mean)
            .map(|(s, &m)| {
                let var = (s / n - (m as f64) * (m as f64)).max(0.0);
                1.0 / (var.sqrt() as f32).max(MIN_STD)
            })
            .collect();
        let mut router = HiddenRouter {
            spec,
            mean,
            inv_std,
            classifier: SoftmaxClassifier {
                classes: classes.clone(),
                dim,
                weights: Vec::new(),
                bias: Vec::new(),
            },
        };
        let z: Vec<Vec<f32>> = x.iter().map(|v| router.standardize(v)).collect();
        router.classifier = match solver {
            Solver::Sgd => {
                let z: Vec<SparseVec> = z.iter().map(|v| SparseVec::dense(v)).collect();
                SoftmaxClassifier::train(&classes, dim, &z, y, train)
            }
            Solver::Lbfgs => SoftmaxClassifier::fit_dense(
                &classes,
                dim,
                &z,
                y,
                train.l2,
                &LbfgsConfig::default(),
            ),
        };
        Ok(router)
    }

    fn standardize(&self, x: &[f32]) -> Vec<f32> {
        x.iter()
            .zip(&self.mean)
            .zip(&self.inv_std)
            .map(|((v, m), s)| (v - m) * s)
            .collect()
    }

    /// Classifies pooled features (from [`FeatureSpec::features`]).
    pub fn classify_features(&self, x: &[f32]) -> Classification {
        let probabilities = self
            .classifier
            .probabilities(&SparseVec::dense(&self.standardize(x)));
        let domain = probabilities
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i);
        Classification {
            domain,
            probabilities,
        }
    }

    pub fn classify<B: Backend>(
        &self,
        backend: &B,
        prompt: &[u32],
    ) -> Result<Classification, RouterError> {
        self.spec.check(backend)?;
        Ok(self.classify_features(&self.spec.features(backend, prompt)?))
    }

    pub fn domains(&self) -> &[String] {
        &self.classifier.classes
    }

    pub fn spec(&self) -> &FeatureSpec {
        &self.spec
    }
}

/// Tokenizes every query (errors name the query).
pub fn tokenize_all(
    tokenize: &dyn Fn(&str) -> Result<Vec<u32>, String>,
    data: &[LabelledQuery],
) -> Result<Vec<Vec<u32>>, RouterError> {
    data.iter()
        .enumerate()
        .map(|(index, q)| {
            let t =
                tokenize(&q.text).map_err(|message| RouterError::Tokenize { index, message })?;
            if t.is_empty() {
                return Err(RouterError::Tokenize {
                    index,
                    message: "no tokens".into(),
                });
            }
            Ok(t)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_of_known_rows() {
        let h = [1.0, 2.0, 3.0, 4.0, 8.0, 0.0]; // 3 rows of hidden 2
        assert_eq!(Pooling::Mean.pool(&h, 2), vec![4.0, 2.0]);
        assert_eq!(Pooling::Last.pool(&h, 2), vec![8.0, 0.0]);
        assert_eq!(Pooling::MeanLast.pool(&h, 2), vec![4.0, 2.0, 8.0, 0.0]);
        // Rows of RMS 3.5355 and 35.355: normalised, both are [0.8485, 1.1314].
        let normed = Pooling::NormedMean.pool(&[3.0, 4.0, 30.0, 40.0], 2);
        let want = [3.0 / 12.5f32.sqrt(), 4.0 / 12.5f32.sqrt()];
        assert!(
            normed.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-5),
            "{normed:?}"
        );
        for p in Pooling::ALL {
            assert_eq!(Pooling::parse(p.name()), Some(p));
            assert_eq!(p.pool(&h, 2).len(), p.dim(2));
        }
    }

    #[test]
    fn shared_prefix_leaves_a_token_to_pool() {
        let seqs = vec![vec![1, 2, 3, 9], vec![1, 2, 3, 7, 7], vec![1, 2, 4]];
        assert_eq!(shared_prefix(&seqs), vec![1, 2]);
        assert_eq!(shared_prefix(&[vec![5, 6], vec![5, 6, 1]]), vec![5]);
        assert_eq!(shared_prefix(&[vec![4, 5]]), vec![4]);
        assert!(shared_prefix(&[]).is_empty());
    }

    #[test]
    fn prompts_lose_the_prefix_then_are_cut() {
        let spec = FeatureSpec {
            layer: 0,
            pooling: Pooling::Mean,
            max_tokens: 3,
            hidden_size: 2,
            n_layers: 1,
            shared_prefix: vec![1, 2],
            prompt_format: PROMPT_CHAT.into(),
        };
        assert_eq!(spec.tokens_to_run(&[1, 2, 5, 6, 7, 8]), &[5, 6, 7]);
        assert_eq!(
            spec.tokens_to_run(&[1, 2]),
            &[1, 2],
            "nothing left: keep it"
        );
        assert_eq!(spec.tokens_to_run(&[9, 1, 2, 3]), &[9, 1, 2]);
    }

    #[test]
    fn fit_rejects_bad_input() {
        let spec = FeatureSpec {
            layer: 0,
            pooling: Pooling::Mean,
            max_tokens: 3,
            hidden_size: 2,
            n_layers: 1,
            shared_prefix: vec![],
            prompt_format: PROMPT_RAW.into(),
        };
        let cfg = TrainConfig::default();
        let one = HiddenRouter::fit(spec.clone(), vec!["a".into()], &[vec![0.0; 2]], &[0], &cfg);
        assert!(matches!(one, Err(RouterError::Training(_))));
        let two = vec!["a".to_string(), "b".to_string()];
        let short = HiddenRouter::fit(spec, two, &[vec![0.0; 3]], &[0], &cfg);
        assert!(matches!(short, Err(RouterError::Training(_))));
    }
}
