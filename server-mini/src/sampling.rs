//! Token sampling: greedy, temperature, top-k, top-p, repetition penalty,
//! seeded. Applied in llama.cpp's order: repetition penalty on the raw
//! logits, then (unless greedy) top-k, temperature, softmax, top-p.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy (argmax).
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 = off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches
    /// `top_p`; 1 = off.
    pub top_p: f32,
    /// CTRL-style penalty on tokens already in the context: positive logits
    /// are divided by it, negative ones multiplied; 1 = off.
    pub repetition_penalty: f32,
    pub seed: u64,
    /// Most new tokens to generate.
    pub max_tokens: usize,
    /// Generation stops when the text contains one of these (not included
    /// in the output).
    pub stop: Vec<String>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
            max_tokens: 128,
            stop: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("sampling: {0}")]
pub struct SamplingError(String);

impl SamplingParams {
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(SamplingError(format!(
                "temperature {} must be ≥ 0",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError(format!(
                "top_p {} must be in (0, 1]",
                self.top_p
            )));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(SamplingError(format!(
                "repetition_penalty {} must be > 0",
                self.repetition_penalty
            )));
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Sampler, SamplingError> {
        params.validate()?;
        let rng = StdRng::seed_from_u64(params.seed);
        Ok(Sampler { params, rng })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits` (modified in place), given the
    /// tokens of the context so far (for the repetition penalty).
    pub fn sample(&mut self, logits: &mut [f32], context: &[u32]) -> u32 {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            apply_repetition_penalty(logits, context, p.repetition_penalty);
        }
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        let candidates = candidates(logits, p.top_k, p.temperature, p.top_p);
        let total: f64 = candidates.iter().map(|c| c.1).sum();
        let mut u = self.rng.random::<f64>() * total;
        for &(id, prob) in &candidates {
            if u < prob {
                return id;
            }
            u -= prob;
        }
        candidates.last().map_or(0, |c| c.0)
    }
}

/// Index of the largest logit; the lowest index wins a tie (as llama.cpp).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn apply_repetition_penalty(logits: &mut [f32], context: &[u32], penalty: f32) {
    let mut seen = vec![false; logits.len()];
    for &t in context {
        let t = t as usize;
        if t < logits.len() && !seen[t] {
            seen[t] = true;
            let l = &mut logits[t];
            *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
        }
    }
}

/// The tokens that may be drawn and their (unnormalised within top-p)
/// probabilities, most likely first.
fn candidates(logits: &[f32], top_k: usize, temperature: f32, top_p: f32) -> Vec<(u32, f64)> {
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    // Stable sort by logit descending: equal logits keep id order.
    ids.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    if top_k > 0 {
        ids.truncate(top_k);
    }
    let max = logits[ids[0] as usize] as f64;
    let weights: Vec<f64> = ids
        .iter()
        .map(|&i| ((logits[i as usize] as f64 - max) / temperature as f64).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut out = Vec::new();
    let mut mass = 0.0;
    for (&id, w) in ids.iter().zip(weights) {
        let prob = w / total;
        out.push((id, prob));
        mass += prob;
        if mass >= top_p as f64 {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed,
            ..Default::default()
        }
    }

    fn histogram(p: SamplingParams, logits: &[f32], n: usize) -> Vec<usize> {
        let mut s = Sampler::new(p).unwrap();
        let mut h = vec![0; logits.len()];
        for _ in 0..n {
            h[s.sample(&mut logits.to_vec(), &[]) as usize] += 1;
        }
        h
    }

    const LOGITS: [f32; 5] = [1.0, 3.0, 2.0, 0.5, 2.9];

    #[test]
    fn greedy_is_argmax_first_on_ties() {
        let mut s = Sampler::new(params(0.0, 0, 1.0, 0)).unwrap();
        assert_eq!(s.sample(&mut LOGITS.to_vec(), &[]), 1);
        assert_eq!(argmax(&[0.5, 2.0, 2.0]), 1);
    }

    #[test]
    fn temperature_sampling_follows_softmax() {
        let n = 20_000;
        let h = histogram(params(1.0, 0, 1.0, 7), &LOGITS, n);
        let z: f64 = LOGITS.iter().map(|l| (*l as f64).exp()).sum();
        for (i, &count) in h.iter().enumerate() {
            let p = (LOGITS[i] as f64).exp() / z;
            let sd = (n as f64 * p * (1.0 - p)).sqrt();
            assert!(
                (count as f64 - n as f64 * p).abs() < 5.0 * sd,
                "token {i}: {count} vs {p}"
            );
        }
    }

    #[test]
    fn low_temperature_concentrates_high_spreads() {
        let cold = histogram(params(0.01, 0, 1.0, 1), &LOGITS, 2000);
        let hot = histogram(params(10.0, 0, 1.0, 1), &LOGITS, 2000);
        assert!(cold[1] > 1800);
        assert!(hot.iter().all(|&c| c > 200), "{hot:?}");
    }

    #[test]
    fn top_k_only_draws_the_k_best() {
        let h = histogram(params(5.0, 2, 1.0, 3), &LOGITS, 3000);
        assert_eq!(h[0] + h[2] + h[3], 0);
        assert!(h[1] > 0 && h[4] > 0);
    }

    #[test]
    fn top_p_keeps_smallest_set_reaching_p() {
        // Probabilities ≈ [0.05, 0.40, 0.15, 0.03, 0.36]: tokens 1 and 4 reach 0.7.
        let h = histogram(params(1.0, 0, 0.7, 4), &LOGITS, 3000);
        assert_eq!(h[0] + h[2] + h[3], 0, "{h:?}");
        assert!(h[1] > 0 && h[4] > 0);
        let h = histogram(params(1.0, 0, 0.8, 4), &LOGITS, 3000);
        assert!(h[2] > 0, "0.8 needs the third token: {h:?}");
    }

    #[test]
    fn same_seed_same_draws_other_seed_differs() {
        let draw = |seed| {
            let mut s = Sampler::new(params(1.0, 0, 1.0, seed)).unwrap();
            (0..50)
                .map(|_| s.sample(&mut LOGITS.to_vec(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(11), draw(11));
        assert_ne!(draw(11), draw(12));
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        let mut s = Sampler::new(p).unwrap();
        // Token 1 (3.0 -> 1.5) falls below token 4 (2.9): greedy switches.
        assert_eq!(s.sample(&mut LOGITS.to_vec(), &[1, 1]), 4);
        let mut neg = vec![-1.0f32, -1.5];
        apply_repetition_penalty(&mut neg, &[0], 2.0);
        assert_eq!(neg, vec![-2.0, -1.5]);
    }

    #[test]
    fn invalid_params_are_errors() {
        assert!(Sampler::new(params(-1.0, 0, 1.0, 0)).is_err());
        assert!(Sampler::new(params(1.0, 0, 0.0, 0)).is_err());
        assert!(Sampler::new(params(f32::NAN, 0, 1.0, 0)).is_err());
    }
}
