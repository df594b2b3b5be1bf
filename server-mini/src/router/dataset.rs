//! Labelled queries for training and scoring a router.

use std::path::Path;

use serde::Deserialize;
use thiserror::Error;

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct LabelledQuery {
    pub text: String,
    pub domain: String,
}

#[derive(Debug, Error)]
pub enum DatasetError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}, line {line}: {message}")]
    Parse {
        path: String,
        line: usize,
        message: String,
    },
    #[error("{path}: no examples")]
    Empty { path: String },
}

/// Reads a JSON Lines file of `{"text": ..., "domain": ...}` (other fields ignored;
/// blank lines skipped).
pub fn read_jsonl(path: &Path) -> Result<Vec<LabelledQuery>, DatasetError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| DatasetError::Io {
        path: shown.clone(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let q: LabelledQuery = serde_json::from_str(line).map_err(|e| DatasetError::Parse {
            path: shown.clone(),
            line: i + 1,
            message: e.to_string(),
        })?;
        out.push(q);
    }
    if out.is_empty() {
        return Err(DatasetError::Empty { path: shown });
    }
    Ok(out)
}

/// Sorted distinct domains, and each query's index into them.
pub fn label_indices(queries: &[LabelledQuery]) -> (Vec<String>, Vec<usize>) {
    let mut classes: Vec<String> = queries.iter().map(|q| q.domain.clone()).collect();
    classes.sort();
    classes.dedup();
    let labels = queries
        .iter()
        .map(|q| {
            classes
                .binary_search(&q.domain)
                .expect("domain collected above")
        })
        .collect();
    (classes, labels)
}
