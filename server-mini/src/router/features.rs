//! Sparse feature vectors: TF-IDF n-grams are sparse, pooled hidden states are
//! dense; both go through the same classifier as (index, value) pairs.

#[derive(Clone, Debug, Default, PartialEq)]
pub struct SparseVec {
    /// Strictly increasing feature indices.
    pub index: Vec<u32>,
    pub value: Vec<f32>,
}

impl SparseVec {
    pub fn dense(values: &[f32]) -> SparseVec {
        SparseVec {
            index: (0..values.len() as u32).collect(),
            value: values.to_vec(),
        }
    }

    pub fn dot(&self, weights: &[f32]) -> f32 {
        self.index
            .iter()
            .zip(&self.value)
            .map(|(&i, &v)| weights[i as usize] * v)
            .sum()
    }

    /// Scales to unit L2 norm (no-op for the zero vector).
    pub fn normalize(&mut self) {
        let norm = self.value.iter().map(|v| v * v).sum::<f32>().sqrt();
        if norm > 0.0 {
            self.value.iter_mut().for_each(|v| *v /= norm);
        }
    }
}
