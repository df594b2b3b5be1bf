//! Building a server from paths: load the base model (CPU, or a backend
//! the caller loaded, e.g. CUDA), its tokenizer and chat template, an
//! optional router, and start the engine.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::admin::AdminConfig;
use super::app::{AppState, Limits, AUTO_MODEL};
use super::prompt::{chat_template_for, Prompter};
use crate::engine::{Engine, EngineConfig, EngineError, ExpertSource, Router};
use crate::model::{load_cpu, Backend, CpuBackend};
use crate::tokenizer::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("loading the base model {path}: {why}")]
    Base { path: String, why: String },
    #[error("chat template of {path}: {why}")]
    Template { path: String, why: String },
    #[error("expert {0:?}: a name must be unique and not the base model's name or `auto`")]
    ExpertName(String),
    #[error("router: {0}")]
    Router(String),
    #[error("engine: {0}")]
    Engine(#[from] EngineError),
    #[error("{0}")]
    Config(String),
}

/// What to serve.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Base model: HF checkpoint folder or `.gguf`.
    pub base: PathBuf,
    /// Name of the base model in requests (default: the folder or file stem).
    pub base_name: Option<String>,
    pub experts: Vec<ExpertSource>,
    pub engine: EngineConfig,
    pub limits: Limits,
    pub admin: Option<AdminConfig>,
}

/// The default name of a model path: folder name, or file name without extension.
pub fn model_name(path: &Path) -> String {
    let stem = if path.is_file() {
        path.file_stem()
    } else {
        path.file_name()
    };
    stem.map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "base".into())
}

/// Experts named by their file stems (`math.safetensors` → `math`).
pub fn experts_from_files(files: &[PathBuf]) -> Vec<ExpertSource> {
    files
        .iter()
        .map(|f| ExpertSource {
            name: f
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            path: f.clone(),
        })
        .collect()
}

/// Builds the router once the base model is loaded (it may need the model's
/// hidden states and tokenizer, e.g. to train). `B` is the backend the
/// engine computes on (and the router runs on).
pub type MakeRouter<'a, B = CpuBackend> =
    Box<dyn FnOnce(&B, &Tokenizer) -> Result<Option<Box<dyn Router<B>>>, ServeError> + 'a>;

/// Loads the model on the CPU, builds the router, starts the engine.
pub fn build_state(
    cfg: ServeConfig,
    make_router: MakeRouter<'_>,
) -> Result<Arc<AppState>, ServeError> {
    let loaded = load_cpu(&cfg.base).map_err(|e| ServeError::Base {
        path: cfg.base.display().to_string(),
        why: e.to_string(),
    })?;
    let context = loaded.backend.max_context();
    build_state_on(cfg, loaded.backend, loaded.tokenizer, context, make_router)
}

/// Builds the router and starts the engine on an already loaded backend
/// (CPU or CUDA) whose context limit is `backend_context`.
pub fn build_state_on<B: Backend + Send + 'static>(
    mut cfg: ServeConfig,
    backend: B,
    tokenizer: Tokenizer,
    backend_context: usize,
    make_router: MakeRouter<'_, B>,
) -> Result<Arc<AppState>, ServeError> {
    let shown = cfg.base.display().to_string();
    let template = chat_template_for(&cfg.base).map_err(|e| ServeError::Template {
        path: shown,
        why: e.to_string(),
    })?;
    let base_name = cfg
        .base_name
        .clone()
        .unwrap_or_else(|| model_name(&cfg.base));
    let mut seen = BTreeMap::new();
    for e in &cfg.experts {
        if e.name.is_empty()
            || e.name == base_name
            || e.name == AUTO_MODEL
            || seen.insert(e.name.clone(), ()).is_some()
        {
            return Err(ServeError::ExpertName(e.name.clone()));
        }
    }
    let router = make_router(&backend, &tokenizer)?;
    let context = cfg.engine.max_context.min(backend_context);
    if context < 2 {
        return Err(ServeError::Config(format!(
            "context limit {context} leaves no room for a prompt and a token"
        )));
    }
    cfg.engine.max_context = context;
    cfg.limits.max_context = context;
    if cfg.limits.max_tokens >= context {
        cfg.limits.max_tokens = context - 1;
    }
    let vocab = backend.config().vocab_size;
    let eos = tokenizer.eos_ids().to_vec();
    let prompter = Prompter::new(tokenizer, template, vocab);
    let routing = router.is_some();
    let engine = Engine::start(
        backend,
        Box::new(prompter.tokenizer().clone()),
        eos,
        cfg.experts,
        router,
        cfg.engine,
    )?;
    Ok(Arc::new(AppState::new(
        engine, prompter, base_name, routing, cfg.limits, cfg.admin,
    )))
}

/// Parses `expert=domain,expert=domain,...` (an expert may appear with several domains;
/// `base` as the expert routes that domain to the base model).
pub fn parse_domains(
    spec: &str,
    base_name: &str,
) -> Result<BTreeMap<String, Option<String>>, ServeError> {
    let mut map = BTreeMap::new();
    for pair in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (expert, domain) = pair.split_once('=').ok_or_else(|| {
            ServeError::Config(format!("--domains entry {pair:?} is not expert=domain"))
        })?;
        let (expert, domain) = (expert.trim(), domain.trim());
        if expert.is_empty() || domain.is_empty() {
            return Err(ServeError::Config(format!(
                "--domains entry {pair:?} is not expert=domain"
            )));
        }
        let target = (expert != "base" && expert != base_name).then(|| expert.to_string());
        if map.insert(domain.to_string(), target).is_some() {
            return Err(ServeError::Config(format!(
                "domain {domain:?} is mapped twice in --domains"
            )));
        }
    }
    Ok(map)
}

/// Parses a byte size: `60GiB`, `512MiB`, `1.5GB`, `4096` (bytes). Binary
/// (`KiB`, `MiB`, `GiB`, `TiB`) and decimal (`KB`, `MB`, `GB`, `TB`) units.
pub fn parse_bytes(s: &str) -> Result<u64, ServeError> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => {
            return Err(ServeError::Config(format!(
                "bad byte size {s:?} (e.g. 60GiB, 512MiB)"
            )))
        }
    };
    let n: f64 = num
        .parse()
        .map_err(|_| ServeError::Config(format!("bad byte size {s:?} (e.g. 60GiB, 512MiB)")))?;
    let bytes = n * scale as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(ServeError::Config(format!(
            "byte size {s:?} is out of range"
        )));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_spec_parses_and_rejects_duplicates() {
        let m = parse_domains("math=algebra, math=geometry,base=chat", "mistral").unwrap();
        assert_eq!(m["algebra"].as_deref(), Some("math"));
        assert_eq!(m["geometry"].as_deref(), Some("math"));
        assert_eq!(m["chat"], None);
        assert!(parse_domains("a=x,b=x", "m").is_err());
        assert!(parse_domains("novalue", "m").is_err());
        assert!(parse_domains("=x", "m").is_err());
    }

    #[test]
    fn expert_names_come_from_file_stems() {
        let e = experts_from_files(&[PathBuf::from("/m/math.safetensors")]);
        assert_eq!(e[0].name, "math");
    }

    #[test]
    fn byte_sizes_parse() {
        assert_eq!(parse_bytes("60GiB").unwrap(), 60 << 30);
        assert_eq!(parse_bytes("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_bytes("512 MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("5XB").is_err());
    }
}
