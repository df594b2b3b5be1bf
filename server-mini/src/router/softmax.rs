//! Multinomial logistic regression: `p = softmax(W·x + b)`, trained by
//! per-example SGD with AdaGrad step sizes and L2 regularisation.
//!
//! Why AdaGrad on single examples: TF-IDF vectors have ~10⁵ dimensions but a
//! few hundred non-zeros each, so each step touches only those coordinates
//! (the L2 term too, applied lazily to the touched weights), and rare
//! n-grams get larger steps than common ones. Dense features (pooled hidden
//! states) use the same code with every index present.

use rand::seq::SliceRandom;
use rand::{rngs::StdRng, SeedableRng};

use super::features::SparseVec;
use super::lbfgs::{self, LbfgsConfig};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainConfig {
    pub epochs: usize,
    pub learning_rate: f32,
    pub l2: f32,
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 20,
            learning_rate: 0.5,
            l2: 1e-5,
            seed: 0,
        }
    }
}

/// Keeps AdaGrad's denominator away from zero on the first step.
const ADAGRAD_EPS: f32 = 1e-8;

#[derive(Clone, Debug, PartialEq)]
pub struct SoftmaxClassifier {
    pub classes: Vec<String>,
    pub dim: usize,
    /// `[n_classes, dim]` row-major.
    pub weights: Vec<f32>,
    pub bias: Vec<f32>,
}

impl SoftmaxClassifier {
    pub fn train(
        classes: &[String],
        dim: usize,
        x: &[SparseVec],
        y: &[usize],
        config: &TrainConfig,
    ) -> SoftmaxClassifier {
        let n = classes.len();
        let mut model = SoftmaxClassifier {
            classes: classes.to_vec(),
            dim,
            weights: vec![0.0; n * dim],
            bias: vec![0.0; n],
        };
        let mut g2_w = vec![0f32; n * dim];
        let mut g2_b = vec![0f32; n];
        let mut order: Vec<usize> = (0..x.len()).collect();
        let mut rng = StdRng::seed_from_u64(config.seed);
        for _ in 0..config.epochs {
            order.shuffle(&mut rng);
            for &i in &order {
                let p = model.probabilities(&x[i]);
                for (c, &pc) in p.iter().enumerate() {
                    let err = pc - if c == y[i] { 1.0 } else { 0.0 };
                    let row = &mut model.weights[c * dim..(c + 1) * dim];
                    let acc = &mut g2_w[c * dim..(c + 1) * dim];
                    for (&j, &v) in x[i].index.iter().zip(&x[i].value) {
                        let j = j as usize;
                        let g = err * v + config.l2 * row[j];
                        acc[j] += g * g;
                        row[j] -= config.learning_rate * g / (acc[j] + ADAGRAD_EPS).sqrt();
                    }
                    g2_b[c] += err * err;
                    model.bias[c] -= config.learning_rate * err / (g2_b[c] + ADAGRAD_EPS).sqrt();
                }
            }
        }
        model
    }

    pub fn probabilities(&self, x: &SparseVec) -> Vec<f32> {
        let logits: Vec<f32> = (0..self.classes.len())
            .map(|c| x.dot(&self.weights[c * self.dim..(c + 1) * self.dim]) + self.bias[c])
            .collect();
        softmax(&logits)
    }

    /// The most probable class and its probability (the router's confidence).
    pub fn predict(&self, x: &SparseVec) -> (usize, f32) {
        let p = self.probabilities(x);
        let (best, &conf) = p
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .expect("at least one class");
        (best, conf)
    }
}

impl SoftmaxClassifier {
    /// Full-batch fit on dense features: minimises the mean cross-entropy
    /// plus `l2/2·‖W‖²` (the bias is not penalised) with L-BFGS, to
    /// convergence; deterministic (no shuffling, starts from zero).
    ///
    /// ```text
    ///   θ = [W [classes, dim] row-major | b [classes]]   (f64 while fitting)
    ///   f = 1/n Σᵢ (logsumexp(W·xᵢ + b) − (W·xᵢ + b)[yᵢ]) + l2/2·‖W‖²
    ///   ∇W = 1/n Σᵢ (pᵢ − onehot(yᵢ)) xᵢᵀ + l2·W     ∇b = 1/n Σᵢ (pᵢ − onehot(yᵢ))
    /// ```
    pub fn fit_dense(
        classes: &[String],
        dim: usize,
        x: &[Vec<f32>],
        y: &[usize],
        l2: f32,
        config: &LbfgsConfig,
    ) -> SoftmaxClassifier {
        let k = classes.len();
        let n = x.len().max(1) as f64;
        let l2 = l2 as f64;
        let objective = |theta: &[f64], grad: &mut [f64]| -> f64 {
            let (w, b) = theta.split_at(k * dim);
            grad.iter_mut().for_each(|g| *g = 0.0);
            let (gw, gb) = grad.split_at_mut(k * dim);
            let mut loss = 0.0;
            let mut z = vec![0f64; k];
            for (xi, &yi) in x.iter().zip(y) {
                for (c, zc) in z.iter_mut().enumerate() {
                    let row = &w[c * dim..(c + 1) * dim];
                    *zc = b[c] + row.iter().zip(xi).map(|(a, &v)| a * v as f64).sum::<f64>();
                }
                let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = z.iter().map(|v| (v - max).exp()).sum();
                loss += max + sum.ln() - z[yi];
                for c in 0..k {
                    let err = ((z[c] - max).exp() / sum - (c == yi) as u8 as f64) / n;
                    gb[c] += err;
                    let grow = &mut gw[c * dim..(c + 1) * dim];
                    grow.iter_mut()
                        .zip(xi)
                        .for_each(|(g, &v)| *g += err * v as f64);
                }
            }
            let mut penalty = 0.0;
            for (g, &wi) in gw.iter_mut().zip(w) {
                *g += l2 * wi;
                penalty += wi * wi;
            }
            loss / n + 0.5 * l2 * penalty
        };
        let (theta, _) = lbfgs::minimize(objective, vec![0.0; k * dim + k], config);
        SoftmaxClassifier {
            classes: classes.to_vec(),
            dim,
            weights: theta[..k * dim].iter().map(|&v| v as f32).collect(),
            bias: theta[k * dim..].iter().map(|&v| v as f32).collect(),
        }
    }
}

pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    /// Three Gaussian blobs in 4-D: a linear classifier must separate them,
    /// and its probabilities must sum to one.
    #[test]
    fn learns_separable_blobs() {
        let mut rng = StdRng::seed_from_u64(3);
        let centres = [
            [2.0, 0.0, 0.0, 1.0],
            [0.0, 2.0, 0.0, -1.0],
            [0.0, 0.0, 2.0, 0.0],
        ];
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for _ in 0..300 {
            let c = rng.random_range(0..3);
            let v: Vec<f32> = centres[c]
                .iter()
                .map(|m| m + rng.random::<f32>() - 0.5)
                .collect();
            x.push(SparseVec::dense(&v));
            y.push(c);
        }
        let classes: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let m = SoftmaxClassifier::train(&classes, 4, &x, &y, &TrainConfig::default());
        let right = x
            .iter()
            .zip(&y)
            .filter(|(v, &t)| m.predict(v).0 == t)
            .count();
        assert_eq!(right, x.len());
        let p = m.probabilities(&x[0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert!(m.predict(&x[0]).1 > 0.5);

        // The full-batch fit separates them too, and its gradient vanishes:
        // the mean error of each class's probability is zero at the optimum
        // (∇b = 0), so the mean predicted probability of class c equals c's
        // share of the labels.
        let dense: Vec<Vec<f32>> = x.iter().map(|v| v.value.clone()).collect();
        let cfg = LbfgsConfig::default();
        let d = SoftmaxClassifier::fit_dense(&classes, 4, &dense, &y, 1e-3, &cfg);
        let right = x
            .iter()
            .zip(&y)
            .filter(|(v, &t)| d.predict(v).0 == t)
            .count();
        assert_eq!(right, x.len());
        for c in 0..3 {
            let share = y.iter().filter(|&&t| t == c).count() as f32 / y.len() as f32;
            let mean_p: f32 = x.iter().map(|v| d.probabilities(v)[c]).sum::<f32>() / x.len() as f32;
            assert!(
                (mean_p - share).abs() < 1e-3,
                "class {c}: {mean_p} vs {share}"
            );
        }
    }
}
