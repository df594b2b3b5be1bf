//! Model-level routing (ME-Switch): classify a query's domain, then map the
//! domain to an expert.
//!
//! - [`dataset`]: labelled queries (JSON Lines `{"text", "domain"}`).
//! - [`features`]: sparse feature vectors shared by every featurizer.
//! - [`softmax`]: multinomial logistic regression over those features.
//! - [`tfidf`]: character n-gram TF-IDF, the cheap baseline a router on the
//!   base model's hidden states has to beat to be worth its cost.
//! - [`metrics`]: accuracy and confusion matrix.
//! - [`hidden`]: the router on the base model's hidden states
//!   ([`hidden::HiddenRouter`]), its file ([`hidden_file`]) and the layer /
//!   pooling sweep that chose its defaults ([`hidden_sweep`]).
//! - [`feature_cache`]: pooled hidden-state statistics of many queries at
//!   several layers and token cuts from one pass, saved to a file
//!   (`meswitch router features`), to compare settings and train without
//!   running the model again.
//! - [`lbfgs`]: the full-batch optimiser the hidden-state classifier is
//!   fitted with.

pub mod dataset;
pub mod feature_cache;
pub mod features;
pub mod hidden;
pub mod hidden_file;
pub mod hidden_sweep;
pub mod lbfgs;
pub mod metrics;
pub mod softmax;
pub mod tfidf;
