//! Where tests find the shared real data (`../shared/data`: SmolLM2 GGUF and goldens, real
//! deltas, routing data).
//!
//! Lookup order for the GGUF: `$MESWITCH_SMOLLM2_GGUF`, then `../shared/data/smollm2/`, then
//! `.data/` in the repository root. Tests that need it call [`require`]: when the file is missing
//! they skip (return None), except under `CI=true`, where a missing file is a failure.

use std::path::{Path, PathBuf};

/// File name of the SmolLM2 model fetched by `shared/data/smollm2/fetch.sh`.
pub const SMOLLM2_GGUF_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The repository root (this crate lives one level below it).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The shared data folder `../shared/data` next to the repository, if present.
pub fn shared_data_dir() -> Option<PathBuf> {
    let d = repo_root().parent()?.join("shared").join("data");
    d.is_dir().then_some(d)
}

/// A folder of the shared data (`deltas`, `router`, `smollm2`, ...), if present.
pub fn shared_data(sub: &str) -> Option<PathBuf> {
    let d = shared_data_dir()?.join(sub);
    d.is_dir().then_some(d)
}

/// Folder with the SmolLM2 goldens (`tokenizer_goldens.jsonl`, ...), if present.
pub fn smollm2_dir() -> Option<PathBuf> {
    shared_data("smollm2")
}

/// Path of the SmolLM2 GGUF, if it can be found.
pub fn smollm2_gguf() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MESWITCH_SMOLLM2_GGUF") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let candidates = [
        smollm2_dir().map(|d| d.join(SMOLLM2_GGUF_NAME)),
        Some(repo_root().join(".data").join(SMOLLM2_GGUF_NAME)),
    ];
    candidates.into_iter().flatten().find(|p| p.is_file())
}

/// For tests: `Some(path)` when present; None (with a note on stderr) when missing; panics with
/// the reason when missing and `CI=true`, so CI cannot silently skip.
pub fn require(what: &str, found: Option<PathBuf>) -> Option<PathBuf> {
    if found.is_some() {
        return found;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{what} not found and CI=true (see ../shared/data/README.md)");
    }
    eprintln!("SKIP: {what} not found (see ../shared/data/README.md)");
    None
}
