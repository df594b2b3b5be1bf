//! Admin endpoints (`GET /admin/experts`, `POST /admin/experts/load`
//! `{"name","file"}`, `POST /admin/experts/unload` `{"name"}`) and their
//! guard: a bearer token fixed at start, and expert files confined to one
//! models folder.
//!
//! Without a configured token the admin endpoints do not exist (404), so a
//! server started without one cannot be reconfigured over HTTP at all.

use std::path::{Component, Path, PathBuf};

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::AUTHORIZATION;
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use serde_json::{json, Value};

use super::app::{json_response, read_body, tier_name, AppState, ResponseBody, AUTO_MODEL};
use super::error::ApiError;
use crate::engine::{EngineError, ExpertSource};

#[derive(Clone)]
pub struct AdminConfig {
    token: String,
    /// Canonical (symlinks resolved, absolute) models folder.
    models_dir: PathBuf,
}

impl std::fmt::Debug for AdminConfig {
    // The token stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConfig")
            .field("models_dir", &self.models_dir)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdminConfigError {
    #[error("admin token file {path}: {error}")]
    TokenFile { path: String, error: std::io::Error },
    #[error("admin token file {0} is empty")]
    EmptyToken(String),
    #[error("models folder {path}: {error}")]
    ModelsDir { path: String, error: std::io::Error },
}

impl AdminConfig {
    pub fn new(token: &str, models_dir: &Path) -> Result<AdminConfig, AdminConfigError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AdminConfigError::EmptyToken("(inline)".into()));
        }
        let models_dir =
            std::fs::canonicalize(models_dir).map_err(|error| AdminConfigError::ModelsDir {
                path: models_dir.display().to_string(),
                error,
            })?;
        Ok(AdminConfig {
            token: token.to_string(),
            models_dir,
        })
    }

    /// Reads the token from a file (surrounding whitespace trimmed).
    pub fn from_token_file(
        file: &Path,
        models_dir: &Path,
    ) -> Result<AdminConfig, AdminConfigError> {
        let shown = file.display().to_string();
        let text = std::fs::read_to_string(file).map_err(|error| AdminConfigError::TokenFile {
            path: shown.clone(),
            error,
        })?;
        if text.trim().is_empty() {
            return Err(AdminConfigError::EmptyToken(shown));
        }
        AdminConfig::new(&text, models_dir)
    }

    pub fn models_dir(&self) -> &Path {
        &self.models_dir
    }

    /// 401 without `Authorization: Bearer ...`, 403 with the wrong token.
    pub fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let given = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                ApiError::unauthorized("admin endpoints need `Authorization: Bearer <token>`")
            })?;
        if constant_time_eq(given.trim().as_bytes(), self.token.as_bytes()) {
            Ok(())
        } else {
            Err(ApiError::forbidden("wrong admin token"))
        }
    }

    /// The canonical path of `file` (relative to the models folder, or
    /// absolute), which must be a regular file inside the models folder after
    /// every symlink is resolved. `..` is refused outright.
    pub fn resolve(&self, file: &str) -> Result<PathBuf, ApiError> {
        let p = Path::new(file);
        if file.is_empty() {
            return Err(ApiError::invalid(Some("file"), "`file` must not be empty"));
        }
        if p.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(ApiError::forbidden("`file` must not contain `..`"));
        }
        let joined = if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.models_dir.join(p)
        };
        let canonical = std::fs::canonicalize(&joined).map_err(|e| {
            let mut err = ApiError::invalid(Some("file"), format!("cannot open {file}: {e}"));
            if e.kind() == std::io::ErrorKind::NotFound {
                err.code = Some("file_not_found");
            }
            err
        })?;
        if !canonical.starts_with(&self.models_dir) {
            return Err(ApiError::forbidden(format!(
                "{file} is outside the models folder"
            )));
        }
        if !canonical.is_file() {
            return Err(ApiError::invalid(
                Some("file"),
                format!("{file} is not a file"),
            ));
        }
        Ok(canonical)
    }
}

/// Equality whose time does not depend on where the first difference is
/// (the token length still shows).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

// ---- the endpoints ----

fn engine_error(e: EngineError) -> ApiError {
    match e {
        EngineError::UnknownExpert(name) => ApiError::not_found(format!("unknown expert {name:?}")),
        EngineError::DuplicateExpert(_)
        | EngineError::ExpertInUse(_)
        | EngineError::ExpertPinned(_) => ApiError::conflict(e.to_string()),
        EngineError::ExpertLoad { .. } | EngineError::Model(_) => {
            ApiError::invalid(Some("file"), e.to_string())
        }
        EngineError::ShuttingDown => ApiError::shutting_down(),
        EngineError::Config(_) => ApiError::internal(e.to_string()),
    }
}

fn expert_names_valid(name: &str) -> bool {
    // Names travel in headers and Prometheus labels: keep them to a plain alphabet.
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
}

pub(super) async fn handle(
    state: &Arc<AppState>,
    req: Request<Incoming>,
    path: &str,
) -> Result<Response<ResponseBody>, ApiError> {
    let Some(admin) = &state.admin else {
        return Err(ApiError::not_found(
            "admin endpoints are off (start the server with --admin-token-file)",
        ));
    };
    admin.authorize(req.headers())?;
    let method = req.method().clone();
    if path == "/admin/experts" {
        if method != Method::GET {
            return Err(ApiError::method_not_allowed(path));
        }
        let experts: Vec<Value> = state
            .engine
            .experts()
            .iter()
            .map(|e| json!({"name": e.name, "tier": tier_name(e.tier), "pinned": e.pinned, "bytes": e.bytes, "in_use": e.in_use}))
            .collect();
        return Ok(json_response(StatusCode::OK, &json!({"experts": experts})));
    }
    if method != Method::POST {
        return Err(ApiError::method_not_allowed(path));
    }
    let body = read_body(state, req).await?;
    let v: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(None, format!("the body is not valid JSON: {e}")))?;
    let field = |k: &str| -> Result<String, ApiError> {
        v.get(k)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| ApiError::invalid(Some(k), format!("`{k}` (a string) is required")))
    };
    let name = field("name")?;
    if !expert_names_valid(&name) || name == state.base_name || name == AUTO_MODEL {
        return Err(ApiError::invalid(
            Some("name"),
            "`name` must be 1-128 of [A-Za-z0-9-_.:] and not the base model's name or `auto`",
        ));
    }
    let engine = state.engine.clone();
    if path == "/admin/experts/load" {
        let file = admin.resolve(&field("file")?)?;
        let src = ExpertSource {
            name: name.clone(),
            path: file,
        };
        // Loading reads and checks the file: keep it off the async workers.
        tokio::task::spawn_blocking(move || engine.load_expert(src))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map_err(engine_error)?;
        Ok(json_response(StatusCode::OK, &json!({"loaded": name})))
    } else {
        tokio::task::spawn_blocking(move || engine.unload_expert(&name))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map_err(engine_error)?;
        Ok(json_response(
            StatusCode::OK,
            &json!({"unloaded": v["name"]}),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn setup() -> (tempfile::TempDir, AdminConfig) {
        let root = tempfile::tempdir().unwrap();
        let models = root.path().join("models");
        std::fs::create_dir_all(models.join("sub")).unwrap();
        std::fs::write(models.join("a.safetensors"), b"x").unwrap();
        std::fs::write(models.join("sub/b.safetensors"), b"x").unwrap();
        std::fs::write(root.path().join("secret.safetensors"), b"x").unwrap();
        let cfg = AdminConfig::new(" tok3n\n", &models).unwrap();
        (root, cfg)
    }

    #[test]
    fn files_must_stay_inside_the_models_folder() {
        let (root, cfg) = setup();
        assert!(cfg
            .resolve("a.safetensors")
            .unwrap()
            .ends_with("a.safetensors"));
        assert!(cfg.resolve("sub/b.safetensors").is_ok());
        let inside_abs = cfg.models_dir().join("a.safetensors");
        assert!(cfg.resolve(inside_abs.to_str().unwrap()).is_ok());
        let outside = root.path().join("secret.safetensors");
        for bad in [
            "../secret.safetensors",
            "sub/../../secret.safetensors",
            outside.to_str().unwrap(),
        ] {
            assert_eq!(cfg.resolve(bad).unwrap_err().status.as_u16(), 403, "{bad}");
        }
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(&outside, cfg.models_dir().join("link.safetensors"))
                .unwrap();
            assert_eq!(
                cfg.resolve("link.safetensors").unwrap_err().status.as_u16(),
                403
            );
        }
        assert_eq!(
            cfg.resolve("missing.safetensors")
                .unwrap_err()
                .status
                .as_u16(),
            400
        );
        assert_eq!(cfg.resolve("sub").unwrap_err().status.as_u16(), 400);
        assert_eq!(cfg.resolve("").unwrap_err().status.as_u16(), 400);
    }

    #[test]
    fn bearer_token_is_required_and_checked() {
        let (_root, cfg) = setup();
        let mut h = HeaderMap::new();
        assert_eq!(cfg.authorize(&h).unwrap_err().status.as_u16(), 401);
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer wrong"));
        assert_eq!(cfg.authorize(&h).unwrap_err().status.as_u16(), 403);
        h.insert(AUTHORIZATION, HeaderValue::from_static("Basic tok3n"));
        assert_eq!(cfg.authorize(&h).unwrap_err().status.as_u16(), 401);
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer tok3n"));
        assert!(cfg.authorize(&h).is_ok());
        assert!(AdminConfig::new("  ", cfg.models_dir()).is_err());
    }
}
