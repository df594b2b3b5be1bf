//! Typed errors of the reference crate. Every message names what is wrong
//! with which value, so the command line can print it as one line.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LayoutError {
    #[error("unsupported bit width {0} (expected 1, 2 or 4)")]
    UnsupportedBits(u32),
    #[error("empty shape [{out_features}, {in_features}]")]
    EmptyShape {
        out_features: usize,
        in_features: usize,
    },
    #[error("shape [{out_features}, {in_features}] exceeds the largest supported dimension")]
    TooLarge {
        out_features: usize,
        in_features: usize,
    },
    #[error(
        "unsupported group size {group_size} (expected 32, 64, 128 or in_features = {in_features})"
    )]
    UnsupportedGroup {
        group_size: usize,
        in_features: usize,
    },
    #[error("{salient} salient channels for only {in_features} input channels")]
    TooManySalient { salient: usize, in_features: usize },
}

/// A packed delta whose arrays disagree with its layout.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DeltaError {
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("{array} has {found} elements, layout needs {expected}")]
    Length {
        array: &'static str,
        expected: usize,
        found: usize,
    },
    #[error(
        "salient index {index} at position {position} is out of range or not strictly increasing"
    )]
    SalientIndex { position: usize, index: u32 },
    #[error("nonzero padding bits in row {row}")]
    Padding { row: usize },
    #[error("non-finite or negative scale/offset in row {row}, group {group}")]
    GroupParam { row: usize, group: usize },
}

/// Wrong shapes handed to a numeric operation.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ShapeError {
    #[error("{what}: expected {expected} elements, got {found}")]
    Length {
        what: &'static str,
        expected: usize,
        found: usize,
    },
    #[error("row {row} names expert {expert}, but only {n_experts} experts were given")]
    UnknownExpert {
        row: usize,
        expert: u32,
        n_experts: usize,
    },
    #[error("expert {expert} has shape [{out_features}, {in_features}], base has [{base_out}, {base_in}]")]
    ExpertShape {
        expert: usize,
        out_features: usize,
        in_features: usize,
        base_out: usize,
        base_in: usize,
    },
}

impl ShapeError {
    /// `Ok` when a buffer holds exactly the elements a shape needs.
    pub fn check_len(what: &'static str, expected: usize, found: usize) -> Result<(), ShapeError> {
        if expected == found {
            Ok(())
        } else {
            Err(ShapeError::Length {
                what,
                expected,
                found,
            })
        }
    }

    /// `Ok` when expert number `expert`, of shape `shape` = (out, in), has the base's shape.
    pub fn check_expert_shape(
        expert: usize,
        shape: (usize, usize),
        base: (usize, usize),
    ) -> Result<(), ShapeError> {
        if shape == base {
            Ok(())
        } else {
            Err(ShapeError::ExpertShape {
                expert,
                out_features: shape.0,
                in_features: shape.1,
                base_out: base.0,
                base_in: base.1,
            })
        }
    }

    /// `Ok` when every row names no expert or one of the `n_experts` given.
    pub fn check_row_experts(
        row_expert: &[Option<u32>],
        n_experts: usize,
    ) -> Result<(), ShapeError> {
        match row_expert
            .iter()
            .enumerate()
            .find(|(_, e)| e.is_some_and(|e| e as usize >= n_experts))
        {
            Some((row, e)) => Err(ShapeError::UnknownExpert {
                row,
                expert: e.expect("found above"),
                n_experts,
            }),
            None => Ok(()),
        }
    }
}
