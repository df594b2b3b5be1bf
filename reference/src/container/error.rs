//! Typed errors of the expert container. Every variant names the file (or
//! `<memory>`) and, where one is involved, the stored tensor, so the command
//! line can print the error as one self-explanatory line.

use std::path::PathBuf;

use thiserror::Error;

use crate::error::DeltaError;

/// Name used in errors for a file parsed from memory.
pub const MEMORY_FILE: &str = "<memory>";

#[derive(Debug, Error)]
pub enum FormatError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: not a valid safetensors file: {source}")]
    Safetensors {
        file: String,
        source: safetensors::SafeTensorError,
    },
    #[error("{file}: metadata `{key}`: {problem}")]
    Metadata {
        file: String,
        key: String,
        problem: String,
    },
    #[error(
        "{file}: format version {found:?} is not supported (this build reads version {supported})"
    )]
    Version {
        file: String,
        found: String,
        supported: u32,
    },
    #[error("{file}: metadata describes tensor `{tensor}`, but the file does not contain it")]
    MissingTensor { file: String, tensor: String },
    #[error("{file}: the file contains tensor `{tensor}`, which the metadata does not describe")]
    UnexpectedTensor { file: String, tensor: String },
    #[error("{file}: tensor `{tensor}` has dtype {found}, expected {expected}")]
    Dtype {
        file: String,
        tensor: String,
        expected: String,
        found: String,
    },
    #[error("{file}: tensor `{tensor}` has shape {found:?}, expected {expected:?}")]
    Shape {
        file: String,
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{file}: tensor `{tensor}`: checksum mismatch (metadata says {expected}, bytes give {found}): the file is corrupted")]
    Checksum {
        file: String,
        tensor: String,
        expected: String,
        found: String,
    },
    #[error("{file}: tensor `{tensor}`: {source}")]
    Delta {
        file: String,
        tensor: String,
        source: DeltaError,
    },
    #[error("{file}: tensor `{tensor}`: {problem}")]
    Values {
        file: String,
        tensor: String,
        problem: String,
    },
    #[error("{file}: shard index: {problem}")]
    Index { file: String, problem: String },
    #[error("expert `{expert}` was compressed against base {found}, but this base is {expected}")]
    BaseMismatch {
        expert: String,
        expected: String,
        found: String,
    },
    #[error("tensor `{tensor}`: expert has shape {expert:?}, base has {base:?}")]
    BaseShape {
        tensor: String,
        expert: Vec<usize>,
        base: Vec<usize>,
    },
    #[error("tensor `{tensor}` is in the expert but not in the base model")]
    NotInBase { tensor: String },
    #[error("writing expert: {problem}")]
    Writer { problem: String },
    #[error("writing tensor `{tensor}`: {problem}")]
    Write { tensor: String, problem: String },
}
