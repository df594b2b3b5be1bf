//! `meswitch serve`: the OpenAI-compatible server. With no model arguments
//! it builds and serves the synthetic demo family (see `server::demo`).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

use super::generate::Device;
use super::Run;
use crate::engine::EngineConfig;
use crate::model::cuda::CudaBackend;
use crate::model::load::load_cuda;
use crate::model::{Backend, CpuBackend, ModelError};
use crate::server::admin::AdminConfig;
use crate::server::app::AppState;
use crate::server::demo::{build_demo_family, default_cache_dir, DEMO_EXPERTS};
use crate::server::serving::{
    build_state, build_state_on, experts_from_files, parse_bytes, parse_domains, MakeRouter,
    ServeConfig, ServeError,
};
use crate::server::{policy, Limits, RunningServer};
use crate::tokenizer::Tokenizer;

/// Serve a base model and its experts over an OpenAI-compatible HTTP API
/// (on a CUDA device when one is present, else on the CPU; see --device).
#[derive(Parser, Debug)]
#[command(name = "serve")]
pub struct ServeArgs {
    /// Address to listen on (loopback by default).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Base model: HF checkpoint folder or .gguf. Without it the demo family is served.
    #[arg(long)]
    base: Option<PathBuf>,
    /// Name of the base model in requests (default: folder name or file stem).
    #[arg(long)]
    base_name: Option<String>,
    /// Compressed expert files (comma-separated); each is named by its file stem.
    #[arg(long, value_delimiter = ',')]
    experts: Vec<PathBuf>,
    /// Trained router (`meswitch router train`), enables `model: "auto"`.
    #[arg(long)]
    router: Option<PathBuf>,
    /// Which expert serves which router domain: `expert=domain,...` (`base=domain` for the base).
    #[arg(long)]
    domains: Option<String>,
    /// Routed queries under this confidence go to --route-default.
    #[arg(long, default_value_t = 0.5)]
    route_threshold: f32,
    /// Expert for low-confidence or unmapped queries (default: the base model).
    #[arg(long)]
    route_default: Option<String>,
    /// Bytes of experts resident in the compute backend, e.g. 60GiB.
    #[arg(long)]
    gpu_budget: Option<String>,
    /// Bytes of expert files held in host memory, e.g. 32GiB.
    #[arg(long)]
    host_budget: Option<String>,
    /// Experts never evicted (comma-separated names).
    #[arg(long, value_delimiter = ',')]
    pin: Vec<String>,
    /// File holding the bearer token of the admin endpoints (off without it).
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// Folder admin loads may read expert files from (required with --admin-token-file,
    /// except for the demo, where it is the demo's compressed experts).
    #[arg(long)]
    models_dir: Option<PathBuf>,
    /// Concurrent sequences in the decode batch.
    #[arg(long, default_value_t = 32)]
    max_running: usize,
    /// Requests waiting beyond those; more get 429.
    #[arg(long, default_value_t = 256)]
    max_queued: usize,
    /// Prompt + max_tokens limit per request.
    #[arg(long, default_value_t = 2048)]
    max_context: usize,
    /// Demo: where the family is built (default: $MESWITCH_CACHE, else ~/.cache/meswitch).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Demo: number of experts (1-16).
    #[arg(long, default_value_t = DEMO_EXPERTS)]
    demo_experts: usize,
    /// Where the model computes: auto = CUDA device 0 when one can be opened, else the CPU.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
}

impl ServeArgs {
    fn engine_config(&self) -> anyhow::Result<EngineConfig> {
        let mut c = EngineConfig {
            max_running: self.max_running,
            max_queued: self.max_queued,
            max_context: self.max_context,
            pinned: self.pin.clone(),
            ..EngineConfig::default()
        };
        c.max_kv_tokens = c.max_running * c.max_context;
        if let Some(b) = &self.gpu_budget {
            c.device_budget_bytes = parse_bytes(b)?;
        }
        if let Some(b) = &self.host_budget {
            c.host_budget_bytes = parse_bytes(b)?;
        }
        Ok(c)
    }

    fn admin(
        &self,
        default_models_dir: Option<&std::path::Path>,
    ) -> anyhow::Result<Option<AdminConfig>> {
        let Some(token_file) = &self.admin_token_file else {
            return Ok(None);
        };
        let dir = self
            .models_dir
            .as_deref()
            .or(default_models_dir)
            .context("--admin-token-file needs --models-dir")?;
        Ok(Some(AdminConfig::from_token_file(token_file, dir)?))
    }
}

impl Run for ServeArgs {
    fn run(self) -> anyhow::Result<()> {
        let engine = self.engine_config()?;
        let limits = Limits {
            max_context: self.max_context,
            ..Limits::default()
        };
        let (config, routing) = match &self.base {
            None => {
                if !self.experts.is_empty() || self.router.is_some() {
                    anyhow::bail!("--experts and --router need --base");
                }
                let cache = self.cache_dir.clone().unwrap_or_else(default_cache_dir);
                let family = build_demo_family(&cache, self.demo_experts, |line| {
                    eprintln!("[demo] {line}")
                })?;
                let models_dir = family.experts[0].path.parent().map(PathBuf::from);
                let config = ServeConfig {
                    base: family.base.clone(),
                    base_name: Some("demo-base".into()),
                    experts: family.experts.clone(),
                    engine,
                    limits,
                    admin: self.admin(models_dir.as_deref())?,
                };
                (config, Routing::Demo(Box::new(family)))
            }
            Some(base) => {
                let config = ServeConfig {
                    base: base.clone(),
                    base_name: self.base_name.clone(),
                    experts: experts_from_files(&self.experts),
                    engine,
                    limits,
                    admin: self.admin(None)?,
                };
                let base_name = config
                    .base_name
                    .clone()
                    .unwrap_or_else(|| crate::server::serving::model_name(base));
                let domains = parse_domains(self.domains.as_deref().unwrap_or(""), &base_name)?;
                let routing = match self.router.clone() {
                    None => Routing::None,
                    Some(path) => Routing::File {
                        path,
                        domains,
                        default: self.route_default.clone(),
                    },
                };
                (config, routing)
            }
        };
        let state = start_on_device(self.device, config, routing, self.route_threshold)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the tokio runtime")?;
        runtime.block_on(async move {
            let server = RunningServer::bind(self.listen, state.clone())
                .await
                .with_context(|| format!("binding {}", self.listen))?;
            let url = format!("http://{}", server.addr);
            let example = state
                .engine
                .experts()
                .first()
                .map(|e| e.name.clone())
                .unwrap_or_else(|| state.base_name.clone());
            let model = if state.routing { "auto" } else { example.as_str() };
            println!("meswitch serving {} + {} experts on {url}", state.base_name, state.engine.experts().len());
            if self.base.is_none() {
                println!("(demo: synthetic weights; the text is noise, the serving path is real)");
            }
            println!("models:  curl {url}/v1/models");
            println!(
                "example: curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n  -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Can you explain integrals to me?\"}}], \"max_tokens\": 32}}'"
            );
            println!("metrics: curl {url}/metrics   (Ctrl-C stops)");
            stop_signal().await?;
            eprintln!("shutting down");
            server.shutdown().await;
            anyhow::Ok(())
        })
    }
}

/// Where `model: "auto"` requests go.
enum Routing {
    None,
    /// The demo's router, trained on its own labelled queries.
    Demo(Box<crate::server::demo::DemoFamily>),
    File {
        path: PathBuf,
        domains: std::collections::BTreeMap<String, Option<String>>,
        default: Option<String>,
    },
}

impl Routing {
    /// The router builder for an engine on backend `B` (the router runs on
    /// the same backend, between steps).
    fn into_maker<'a, B: Backend + 'static>(self, threshold: f32) -> MakeRouter<'a, B> {
        match self {
            Routing::None => Box::new(|_, _| Ok(None)),
            Routing::Demo(family) => Box::new(move |backend: &B, tokenizer: &Tokenizer| {
                eprintln!(
                    "[demo] training the router on {} labelled queries",
                    family.train.len()
                );
                policy::train_demo_router(backend, tokenizer, &family, threshold)
            }),
            Routing::File {
                path,
                domains,
                default,
            } => Box::new(move |_, _| {
                policy::load_router_file(&path, domains, threshold, default).map(Some)
            }),
        }
    }
}

/// Loads the base on `device` (auto: CUDA when a device opens, else the
/// CPU, said on stderr) and starts the engine there.
fn start_on_device(
    device: Device,
    config: ServeConfig,
    routing: Routing,
    threshold: f32,
) -> anyhow::Result<std::sync::Arc<AppState>> {
    let cuda = match device {
        Device::Cpu => None,
        Device::Cuda => Some(load_cuda(&config.base)),
        Device::Auto => match load_cuda(&config.base) {
            Err(ModelError::NoDevice(why)) => {
                eprintln!("[device: cpu (no CUDA device: {why})]");
                None
            }
            other => Some(other),
        },
    };
    let Some(loaded) = cuda else {
        let make: MakeRouter<'_, CpuBackend> = routing.into_maker(threshold);
        return Ok(build_state(config, make)?);
    };
    let (backend, tokenizer): (CudaBackend, Tokenizer) = loaded.map_err(|e| ServeError::Base {
        path: config.base.display().to_string(),
        why: e.to_string(),
    })?;
    eprintln!("[device: cuda ({})]", backend.gpu().name());
    let context = backend.max_context();
    let make: MakeRouter<'_, CudaBackend> = routing.into_maker(threshold);
    Ok(build_state_on(config, backend, tokenizer, context, make)?)
}

/// Ctrl-C, or SIGTERM (what service managers and `docker stop` send).
async fn stop_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    Ok(())
}
