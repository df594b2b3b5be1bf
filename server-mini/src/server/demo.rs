//! The demo family `meswitch serve` builds when given no model: the
//! synthetic base + experts of `meswitch synth`, each compressed as
//! `meswitch compress` does (INT2, group 128, 1 % salient channels), a small
//! labelled query set written here (one domain per expert, templated
//! queries), and a router trained on it. Weights are synthetic: generated
//! text is noise; what the demo shows is the serving path.
//!
//! ```text
//!   CACHE/demo-v1/family/base/          synthetic base (HF folder)
//!   CACHE/demo-v1/compressed/expert-NN.safetensors
//!   CACHE/demo-v1/router-train.jsonl    {"text", "domain"} per line
//!   CACHE/demo-v1/router.safetensors    the router trained on it (first start)
//!   CACHE/demo-v1/demo.json             written last: the build is complete
//! ```

use std::path::{Path, PathBuf};

use meswitch_reference::{Bits, SalientSpec};

use crate::checkpoint::{Checkpoint, FloatDtype};
use crate::compress::{compress_expert, CompressOptions, Fit};
use crate::engine::ExpertSource;
use crate::router::dataset::LabelledQuery;
use crate::synth::{write_family, SynthSettings, SynthShape};

/// Bumped when the demo's contents change, so old caches are rebuilt.
const DEMO_VERSION: u32 = 1;
/// The synthetic shape: the smallest preset keeps the build to seconds.
pub const DEMO_SHAPE: &str = "tiny";
pub const DEMO_EXPERTS: usize = 16;
const DEMO_SEED: u64 = 0;
/// Compression of every demo expert: 2 bits, groups of 128, 1 % salient input channels.
const DEMO_BITS: u32 = 2;
const DEMO_GROUP: usize = 128;
const DEMO_SALIENT_FRACTION: f64 = 0.01;

/// One domain per demo expert, with topic words for templated queries.
pub const DEMO_DOMAINS: [(&str, [&str; 6]); 16] = [
    (
        "math",
        [
            "integrals",
            "prime numbers",
            "matrices",
            "probability",
            "derivatives",
            "geometry proofs",
        ],
    ),
    (
        "code",
        [
            "Rust lifetimes",
            "Python decorators",
            "SQL joins",
            "git rebase",
            "recursion",
            "hash maps",
        ],
    ),
    (
        "medicine",
        [
            "blood pressure",
            "vaccines",
            "migraines",
            "antibiotics",
            "diabetes",
            "heart rate",
        ],
    ),
    (
        "law",
        [
            "contracts",
            "tenant rights",
            "copyright",
            "patents",
            "wills",
            "court appeals",
        ],
    ),
    (
        "finance",
        [
            "index funds",
            "mortgages",
            "inflation",
            "bonds",
            "tax returns",
            "compound interest",
        ],
    ),
    (
        "cooking",
        [
            "sourdough bread",
            "risotto",
            "knife skills",
            "spices",
            "baking cakes",
            "soup stock",
        ],
    ),
    (
        "travel",
        [
            "visas",
            "cheap flights",
            "packing lists",
            "train passes",
            "jet lag",
            "hostels",
        ],
    ),
    (
        "sports",
        [
            "marathon training",
            "football tactics",
            "tennis serves",
            "swimming drills",
            "cycling",
            "stretching",
        ],
    ),
    (
        "music",
        [
            "guitar chords",
            "music theory",
            "piano scales",
            "jazz harmony",
            "songwriting",
            "drum rhythms",
        ],
    ),
    (
        "history",
        [
            "the Roman empire",
            "the French revolution",
            "medieval castles",
            "ancient Egypt",
            "the cold war",
            "the silk road",
        ],
    ),
    (
        "biology",
        [
            "cell division",
            "DNA replication",
            "evolution",
            "photosynthesis",
            "enzymes",
            "ecosystems",
        ],
    ),
    (
        "chemistry",
        [
            "chemical bonds",
            "acids and bases",
            "the periodic table",
            "reaction rates",
            "oxidation",
            "polymers",
        ],
    ),
    (
        "physics",
        [
            "quantum mechanics",
            "relativity",
            "thermodynamics",
            "electromagnetism",
            "friction",
            "momentum",
        ],
    ),
    (
        "astronomy",
        [
            "black holes",
            "exoplanets",
            "the moon phases",
            "galaxies",
            "comets",
            "telescopes",
        ],
    ),
    (
        "geography",
        [
            "mountain ranges",
            "river deltas",
            "capital cities",
            "climate zones",
            "deserts",
            "plate tectonics",
        ],
    ),
    (
        "literature",
        [
            "Shakespeare",
            "poetry meter",
            "novel plots",
            "literary symbolism",
            "short stories",
            "Greek myths",
        ],
    ),
];

/// Query templates; `{}` is a topic word.
const TEMPLATES: [&str; 6] = [
    "Can you explain {} to me?",
    "What is the most important thing to know about {}?",
    "I have a question about {}.",
    "Give me a short summary of {}.",
    "How do beginners usually learn {}?",
    "Tell me something surprising about {}.",
];

/// Expert name of demo expert `i` (as `meswitch synth` names its folders).
pub fn demo_expert_name(i: usize) -> String {
    format!("expert-{i:02}")
}

/// The labelled set: every template × topic of each domain (36 queries per domain).
pub fn demo_queries(domains: usize) -> Vec<LabelledQuery> {
    DEMO_DOMAINS
        .iter()
        .take(domains)
        .flat_map(|(domain, topics)| {
            topics.iter().flat_map(move |topic| {
                TEMPLATES.iter().map(move |t| LabelledQuery {
                    text: t.replace("{}", topic),
                    domain: domain.to_string(),
                })
            })
        })
        .collect()
}

/// A built demo family.
#[derive(Clone, Debug)]
pub struct DemoFamily {
    pub base: PathBuf,
    pub experts: Vec<ExpertSource>,
    /// (expert name, domain), one per expert.
    pub domains: Vec<(String, String)>,
    pub train: Vec<LabelledQuery>,
    /// Where the router trained on `train` is kept between runs.
    pub router_file: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo cache {path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("building the demo family: {0}")]
    Build(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DemoError + '_ {
    move |error| DemoError::Io {
        path: path.display().to_string(),
        error,
    }
}

/// The default cache folder: `$MESWITCH_CACHE`, `$XDG_CACHE_HOME/meswitch`,
/// `$HOME/.cache/meswitch`, else `./.meswitch-cache`.
pub fn default_cache_dir() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("MESWITCH_CACHE")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("meswitch")))
        .or_else(|| env("HOME").map(|d| d.join(".cache").join("meswitch")))
        .unwrap_or_else(|| PathBuf::from(".meswitch-cache"))
}

fn marker(experts: usize) -> serde_json::Value {
    serde_json::json!({"version": DEMO_VERSION, "shape": DEMO_SHAPE, "experts": experts, "seed": DEMO_SEED,
                       "bits": DEMO_BITS, "group": DEMO_GROUP, "salient_fraction": DEMO_SALIENT_FRACTION})
}

fn family_at(dir: &Path, experts: usize) -> DemoFamily {
    let names: Vec<String> = (0..experts).map(demo_expert_name).collect();
    DemoFamily {
        base: dir.join("family").join("base"),
        experts: names
            .iter()
            .map(|n| ExpertSource {
                name: n.clone(),
                path: dir.join("compressed").join(format!("{n}.safetensors")),
            })
            .collect(),
        domains: names
            .iter()
            .zip(DEMO_DOMAINS.iter())
            .map(|(n, (d, _))| (n.clone(), d.to_string()))
            .collect(),
        train: demo_queries(experts),
        router_file: dir.join("router.safetensors"),
    }
}

/// Builds the demo family under `cache/demo-v1-eNN` (or reuses a complete
/// earlier build). `experts` ≤ 16 (one domain each). `progress` gets a line
/// per stage.
pub fn build_demo_family(
    cache: &Path,
    experts: usize,
    mut progress: impl FnMut(&str),
) -> Result<DemoFamily, DemoError> {
    if experts == 0 || experts > DEMO_DOMAINS.len() {
        return Err(DemoError::Build(format!(
            "the demo has 1 to {} experts, not {experts}",
            DEMO_DOMAINS.len()
        )));
    }
    let dir = cache.join(format!("demo-v{DEMO_VERSION}-e{experts:02}"));
    let done = dir.join("demo.json");
    if std::fs::read_to_string(&done)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v == marker(experts))
    {
        progress(&format!("reusing the demo family in {}", dir.display()));
        return Ok(family_at(&dir, experts));
    }
    // Build next to the final folder, then rename: a killed build leaves no half cache.
    let partial = cache.join(format!(
        "demo-v{DEMO_VERSION}-e{experts:02}.partial-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).map_err(io(&partial))?;
    let shape =
        SynthShape::named(DEMO_SHAPE).ok_or_else(|| DemoError::Build("unknown shape".into()))?;
    let settings = SynthSettings {
        shape,
        experts,
        seed: DEMO_SEED,
        dtype: FloatDtype::F16,
    };
    progress(&format!(
        "writing the synthetic base + {experts} experts ({DEMO_SHAPE} shape)"
    ));
    let (base_dir, expert_dirs) = write_family(&partial.join("family"), &settings, |_| {})
        .map_err(|e| DemoError::Build(e.to_string()))?;
    let base = Checkpoint::open(&base_dir).map_err(|e| DemoError::Build(e.to_string()))?;
    let out_dir = partial.join("compressed");
    std::fs::create_dir_all(&out_dir).map_err(io(&out_dir))?;
    for (i, expert_dir) in expert_dirs.iter().enumerate() {
        let name = demo_expert_name(i);
        progress(&format!(
            "compressing {name} (INT{DEMO_BITS}, group {DEMO_GROUP}, 1% salient)"
        ));
        let expert = Checkpoint::open(expert_dir).map_err(|e| DemoError::Build(e.to_string()))?;
        let options = CompressOptions {
            bits: Bits::from_count(DEMO_BITS).map_err(|e| DemoError::Build(e.to_string()))?,
            group_size: DEMO_GROUP,
            salient: SalientSpec::Fraction(DEMO_SALIENT_FRACTION),
            fit: Fit::Mse,
            compress_embeddings: false,
            expert_name: name.clone(),
            max_shard_bytes: None,
        };
        compress_expert(
            &base,
            &expert,
            None,
            &options,
            &out_dir.join(format!("{name}.safetensors")),
            |_| {},
        )
        .map_err(|e| DemoError::Build(format!("{name}: {e}")))?;
        // The uncompressed expert is only an input to compression.
        std::fs::remove_dir_all(expert_dir).map_err(io(expert_dir))?;
    }
    let train_path = partial.join("router-train.jsonl");
    let mut jsonl = String::new();
    for q in demo_queries(experts) {
        jsonl.push_str(&serde_json::json!({"text": q.text, "domain": q.domain}).to_string());
        jsonl.push('\n');
    }
    std::fs::write(&train_path, jsonl).map_err(io(&train_path))?;
    let partial_done = partial.join("demo.json");
    std::fs::write(&partial_done, marker(experts).to_string()).map_err(io(&partial_done))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&partial, &dir).map_err(io(&dir))?;
    Ok(family_at(&dir, experts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_cover_each_domain_evenly() {
        let q = demo_queries(4);
        assert_eq!(q.len(), 4 * 36);
        for (d, _) in &DEMO_DOMAINS[..4] {
            assert_eq!(q.iter().filter(|x| x.domain == *d).count(), 36);
        }
        assert!(q.iter().all(|x| !x.text.contains("{}")));
    }
}
