//! Choosing the router's layer and pooling: hidden states of every query at
//! several layers from one pass of the base model
//! ([`CpuBackend::hidden_states_at`]), then one classifier per
//! (layer, pooling), scored on a held-out split.

use super::dataset::LabelledQuery;
use super::hidden::{
    tokenize_all, FeatureSpec, HiddenRouter, Pooling, RouterError, Solver, Tokenize,
};
use super::metrics::Confusion;
use super::softmax::TrainConfig;
use crate::model::{Backend, CpuBackend};

/// `[mean, last, normed mean]` pooled features of each query at each layer:
/// `features[query][layer index]`, each `3·hidden` long.
pub struct LayerFeatures {
    pub layers: Vec<usize>,
    pub features: Vec<Vec<Vec<f32>>>,
}

impl LayerFeatures {
    /// The features of one (layer index, pooling), cut from the triple.
    pub fn select(&self, layer_index: usize, pooling: Pooling, hidden: usize) -> Vec<Vec<f32>> {
        self.features
            .iter()
            .map(|q| {
                let both = &q[layer_index];
                match pooling {
                    Pooling::Mean => both[..hidden].to_vec(),
                    Pooling::Last => both[hidden..].to_vec(),
                    Pooling::MeanLast => both[..2 * hidden].to_vec(),
                    Pooling::NormedMean => both[2 * hidden..].to_vec(),
                }
            })
            .collect()
    }
}

/// Pooled features of `prompts` at `layers`, cut as `spec` cuts them (its
/// layer and pooling are ignored).
pub fn layer_features(
    backend: &CpuBackend,
    spec: &FeatureSpec,
    prompts: &[Vec<u32>],
    layers: &[usize],
    progress: &mut dyn FnMut(usize),
) -> Result<LayerFeatures, RouterError> {
    let mut features = Vec::with_capacity(prompts.len());
    for (i, p) in prompts.iter().enumerate() {
        let t = spec.tokens_to_run(p);
        if t.is_empty() {
            return Err(RouterError::EmptyPrompt);
        }
        let hs = backend.hidden_states_at(t, layers)?;
        let pool = |h: &Vec<f32>| {
            let mut f = Pooling::MeanLast.pool(h, spec.hidden_size);
            f.extend(Pooling::NormedMean.pool(h, spec.hidden_size));
            f
        };
        features.push(hs.iter().map(pool).collect());
        progress(i + 1);
    }
    Ok(LayerFeatures {
        layers: layers.to_vec(),
        features,
    })
}

/// What a sweep tries.
pub struct SweepSetup {
    pub layers: Vec<usize>,
    pub max_tokens: usize,
    pub prompt_format: String,
    /// Every L2 penalty in `l2s` is tried with these settings.
    pub train: TrainConfig,
    pub l2s: Vec<f32>,
    pub solver: Solver,
}

pub struct SweepResult {
    pub layer: usize,
    pub pooling: Pooling,
    pub l2: f32,
    pub accuracy: f64,
}

/// Features of a train and a dev split at the sweep's layers.
pub struct SweepFeatures {
    pub spec: FeatureSpec,
    pub train: LayerFeatures,
    pub dev: LayerFeatures,
}

/// Runs the model over both splits once; `progress(done, total)` counts queries.
pub fn sweep_features(
    backend: &CpuBackend,
    tokenize: &Tokenize<'_>,
    train: &[LabelledQuery],
    dev: &[LabelledQuery],
    setup: &SweepSetup,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<SweepFeatures, RouterError> {
    let c = backend.config();
    let train_tokens = tokenize_all(tokenize, train)?;
    let dev_tokens = tokenize_all(tokenize, dev)?;
    let spec = FeatureSpec {
        layer: 0,
        pooling: Pooling::MeanLast,
        max_tokens: setup.max_tokens,
        hidden_size: c.hidden_size,
        n_layers: c.num_layers,
        shared_prefix: super::hidden::shared_prefix(&train_tokens),
        prompt_format: setup.prompt_format.clone(),
    };
    let total = train.len() + dev.len();
    let layers = &setup.layers;
    let x_train = layer_features(backend, &spec, &train_tokens, layers, &mut |i| {
        progress(i, total)
    })?;
    let x_dev = layer_features(backend, &spec, &dev_tokens, layers, &mut |i| {
        progress(train.len() + i, total)
    })?;
    Ok(SweepFeatures {
        spec,
        train: x_train,
        dev: x_dev,
    })
}

/// Trains on the train features, scores dev, for every layer × pooling × L2.
pub fn sweep_scores(
    f: &SweepFeatures,
    train: &[LabelledQuery],
    dev: &[LabelledQuery],
    setup: &SweepSetup,
) -> Result<Vec<SweepResult>, RouterError> {
    let (classes, y_train) = super::dataset::label_indices(train);
    let y_dev = labels_in(&classes, dev)?;
    let hidden = f.spec.hidden_size;
    let mut out = Vec::new();
    for (li, &layer) in f.train.layers.iter().enumerate() {
        for &l2 in &setup.l2s {
            for pooling in Pooling::ALL {
                let spec = FeatureSpec {
                    layer,
                    pooling,
                    ..f.spec.clone()
                };
                let config = TrainConfig { l2, ..setup.train };
                let router = HiddenRouter::fit_with(
                    spec,
                    classes.clone(),
                    &f.train.select(li, pooling, hidden),
                    &y_train,
                    &config,
                    setup.solver,
                )?;
                let predicted: Vec<usize> = f
                    .dev
                    .select(li, pooling, hidden)
                    .iter()
                    .map(|x| router.classify_features(x).domain)
                    .collect();
                out.push(SweepResult {
                    layer,
                    pooling,
                    l2,
                    accuracy: Confusion::new(&classes, &y_dev, &predicted).accuracy(),
                });
            }
        }
    }
    Ok(out)
}

/// Each query's index into `classes`; a domain missing from them is an error.
pub fn labels_in(classes: &[String], data: &[LabelledQuery]) -> Result<Vec<usize>, RouterError> {
    data.iter()
        .map(|q| {
            classes.iter().position(|c| c == &q.domain).ok_or_else(|| {
                RouterError::Training(format!(
                    "domain {:?} is not one of the router's {:?}",
                    q.domain, classes
                ))
            })
        })
        .collect()
}
