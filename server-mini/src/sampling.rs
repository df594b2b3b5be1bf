//! Token sampling: logit bias, penalties, greedy, temperature, top-k,
//! top-p, seeded. Applied in llama.cpp's sampler-chain order:
//!
//! ```text
//!   raw logits ─ logit_bias ─ repetition ─ frequency/presence ─┬─ argmax                 (temperature 0)
//!                             penalty      penalty              └─ top-k, temperature,
//!                                                                  softmax, top-p, draw
//! ```
//!
//! The bias comes first so that −100 bans a token and +100 forces it
//! whatever the penalties do; the penalties act on the biased logits
//! together, before any truncation, as llama.cpp's `penalties` sampler.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// OpenAI's range for `frequency_penalty` and `presence_penalty`: [−2, 2].
pub const MAX_PENALTY: f32 = 2.0;
/// OpenAI's range for a `logit_bias` value: [−100, 100]. A logit moved by
/// 100 is out of reach of any other (model logits span tens), so the ends
/// ban or force a token in practice.
pub const MAX_LOGIT_BIAS: f32 = 100.0;
/// OpenAI's limit on `logit_bias` entries.
pub const MAX_LOGIT_BIAS_ENTRIES: usize = 300;

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
    /// OpenAI's `frequency_penalty` (in [−2, 2]; 0 = off): `logit[t] -=
    /// frequency_penalty · count(t)`, where count(t) is how often `t` was
    /// GENERATED so far in this sequence (OpenAI's definition: the prompt
    /// does not count, unlike `repetition_penalty`).
    pub frequency_penalty: f32,
    /// OpenAI's `presence_penalty` (in [−2, 2]; 0 = off): `logit[t] -=
    /// presence_penalty` once `t` was generated at least once (same count as
    /// `frequency_penalty`).
    pub presence_penalty: f32,
    /// OpenAI's `logit_bias`: (token id, bias in [−100, 100]) added to the
    /// raw logit before every other step; at most
    /// [`MAX_LOGIT_BIAS_ENTRIES`]. Ids past the logits are ignored here (the
    /// server rejects them against the vocabulary first).
    pub logit_bias: Vec<(u32, f32)>,
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
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: Vec::new(),
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
        for (name, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if !(-MAX_PENALTY..=MAX_PENALTY).contains(&v) {
                return Err(SamplingError(format!(
                    "{name} {v} must be in [-{MAX_PENALTY}, {MAX_PENALTY}]"
                )));
            }
        }
        if self.logit_bias.len() > MAX_LOGIT_BIAS_ENTRIES {
            return Err(SamplingError(format!(
                "logit_bias has {} entries; at most {MAX_LOGIT_BIAS_ENTRIES}",
                self.logit_bias.len()
            )));
        }
        if let Some((id, b)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-MAX_LOGIT_BIAS..=MAX_LOGIT_BIAS).contains(b))
        {
            return Err(SamplingError(format!(
                "logit_bias for token {id} is {b}; must be in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}]"
            )));
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// How often each id was returned by [`Sampler::sample`]: the tokens
    /// generated so far (the frequency and presence penalties' count).
    generated: HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Sampler, SamplingError> {
        params.validate()?;
        let rng = StdRng::seed_from_u64(params.seed);
        Ok(Sampler {
            params,
            rng,
            generated: HashMap::new(),
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits` (modified in place), given the
    /// tokens of the context so far (prompt and generated, for the
    /// repetition penalty). The token is counted as generated (for the
    /// frequency and presence penalties of the next calls).
    pub fn sample(&mut self, logits: &mut [f32], context: &[u32]) -> u32 {
        let token = self.pick(logits, context);
        *self.generated.entry(token).or_default() += 1;
        token
    }

    fn pick(&mut self, logits: &mut [f32], context: &[u32]) -> u32 {
        let p = &self.params;
        apply_logit_bias(logits, &p.logit_bias);
        if p.repetition_penalty != 1.0 {
            apply_repetition_penalty(logits, context, p.repetition_penalty);
        }
        apply_frequency_presence(
            logits,
            &self.generated,
            p.frequency_penalty,
            p.presence_penalty,
        );
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

fn apply_logit_bias(logits: &mut [f32], bias: &[(u32, f32)]) {
    for &(id, b) in bias {
        if let Some(l) = logits.get_mut(id as usize) {
            *l += b;
        }
    }
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

/// OpenAI's penalties: `logit[t] -= frequency · count(t) + presence ·
/// [count(t) > 0]` over the generated counts.
fn apply_frequency_presence(
    logits: &mut [f32],
    generated: &HashMap<u32, u32>,
    frequency: f32,
    presence: f32,
) {
    if frequency == 0.0 && presence == 0.0 {
        return;
    }
    for (&id, &count) in generated {
        if let Some(l) = logits.get_mut(id as usize) {
            *l -= frequency * count as f32 + presence;
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

    fn greedy_with(f: impl FnOnce(&mut SamplingParams)) -> Sampler {
        let mut p = SamplingParams::default();
        f(&mut p);
        Sampler::new(p).unwrap()
    }

    #[test]
    fn frequency_penalty_grows_with_each_generated_copy() {
        let counts = HashMap::from([(1u32, 3u32), (2, 1)]);
        let mut l = LOGITS.to_vec();
        apply_frequency_presence(&mut l, &counts, 0.5, 0.0);
        assert_eq!(l, [1.0, 1.5, 1.5, 0.5, 2.9]);
        let mut l = LOGITS.to_vec();
        apply_frequency_presence(&mut l, &counts, -0.5, 0.0);
        assert_eq!(l, [1.0, 4.5, 2.5, 0.5, 2.9], "negative: promoted");
    }

    #[test]
    fn presence_penalty_is_once_whatever_the_count() {
        let counts = HashMap::from([(1u32, 3u32), (2, 1)]);
        let mut l = LOGITS.to_vec();
        apply_frequency_presence(&mut l, &counts, 0.0, 0.75);
        assert_eq!(l, [1.0, 2.25, 1.25, 0.5, 2.9]);
        let mut l = LOGITS.to_vec();
        apply_frequency_presence(&mut l, &counts, 0.25, 0.75);
        assert_eq!(l, [1.0, 1.5, 1.0, 0.5, 2.9], "both: 0.25·count + 0.75");
    }

    #[test]
    fn penalties_count_generated_tokens_not_the_prompt() {
        // The prompt is full of token 1, but only generated copies count.
        let prompt = [1u32; 10];
        let mut s = greedy_with(|p| p.frequency_penalty = 0.2);
        let draws: Vec<u32> = (0..4)
            .map(|_| s.sample(&mut LOGITS.to_vec(), &prompt))
            .collect();
        // 3.0 vs 2.9: one copy of 1 (2.8) hands over to 4; then 2.8 vs 2.7.
        assert_eq!(draws, [1, 4, 1, 4]);
        let mut plain = greedy_with(|_| {});
        assert!((0..4).all(|_| plain.sample(&mut LOGITS.to_vec(), &prompt) == 1));
    }

    #[test]
    fn penalties_come_before_top_k() {
        // top_k = 1 keeps the best token after the penalty: the same draws
        // as greedy with the penalty, which leave token 1 once it is seen.
        let mut top1 = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 1,
            presence_penalty: 1.0,
            seed: 5,
            ..Default::default()
        })
        .unwrap();
        let mut greedy = greedy_with(|p| p.presence_penalty = 1.0);
        let draws = |s: &mut Sampler| -> Vec<u32> {
            (0..6)
                .map(|_| s.sample(&mut LOGITS.to_vec(), &[]))
                .collect()
        };
        let d = draws(&mut top1);
        assert_eq!(d, draws(&mut greedy));
        // 1 (3.0), then 4 (2.9 > 3.0 − 1), then 1 again (2.0 ≥ 2.9 − 1).
        assert_eq!(d[..3], [1, 4, 1]);
    }

    #[test]
    fn logit_bias_bans_and_forces_even_when_sampling() {
        let mut ban = greedy_with(|p| p.logit_bias = vec![(1, -MAX_LOGIT_BIAS)]);
        assert_eq!(ban.sample(&mut LOGITS.to_vec(), &[]), 4);
        let h = histogram(
            SamplingParams {
                temperature: MAX_TEMPERATURE_FOR_TESTS,
                logit_bias: vec![(3, MAX_LOGIT_BIAS)],
                seed: 9,
                ..Default::default()
            },
            &LOGITS,
            500,
        );
        assert_eq!(h[3], 500, "{h:?}");
        // Ids past the logits are ignored, not a panic.
        let mut off = greedy_with(|p| p.logit_bias = vec![(99, 5.0)]);
        assert_eq!(off.sample(&mut LOGITS.to_vec(), &[]), 1);
    }

    #[test]
    fn logit_bias_comes_before_the_repetition_penalty() {
        // Bias first: (1.0 + 2.0) / 2 = 1.5 < 1.6. Bias last would give
        // 1.0 / 2 + 2.0 = 2.5 and pick token 0.
        let mut s = greedy_with(|p| {
            p.repetition_penalty = 2.0;
            p.logit_bias = vec![(0, 2.0)];
        });
        assert_eq!(s.sample(&mut [1.0, 1.6], &[0]), 1);
    }

    #[test]
    fn out_of_range_penalties_and_biases_are_errors() {
        let bad = [
            SamplingParams {
                frequency_penalty: 2.5,
                ..Default::default()
            },
            SamplingParams {
                presence_penalty: -2.01,
                ..Default::default()
            },
            SamplingParams {
                frequency_penalty: f32::NAN,
                ..Default::default()
            },
            SamplingParams {
                logit_bias: vec![(0, 100.5)],
                ..Default::default()
            },
            SamplingParams {
                logit_bias: vec![(0, f32::NEG_INFINITY)],
                ..Default::default()
            },
            SamplingParams {
                logit_bias: (0..=MAX_LOGIT_BIAS_ENTRIES as u32)
                    .map(|i| (i, 1.0))
                    .collect(),
                ..Default::default()
            },
        ];
        for p in bad {
            assert!(Sampler::new(p.clone()).is_err(), "{p:?}");
        }
        let edges = SamplingParams {
            frequency_penalty: -MAX_PENALTY,
            presence_penalty: MAX_PENALTY,
            logit_bias: vec![(0, -MAX_LOGIT_BIAS), (1, MAX_LOGIT_BIAS)],
            ..Default::default()
        };
        assert!(Sampler::new(edges).is_ok());
    }

    /// OpenAI's top temperature: the flattest distribution a request can ask.
    const MAX_TEMPERATURE_FOR_TESTS: f32 = 2.0;

    proptest::proptest! {
        /// Every logit moves by exactly −(f·count + p·[count > 0]).
        #[test]
        fn penalties_shift_each_logit_by_its_count(
            logits in proptest::collection::vec(-20f32..20.0, 1..40),
            counts in proptest::collection::vec(0u32..5, 1..40),
            f in -MAX_PENALTY..MAX_PENALTY,
            p in -MAX_PENALTY..MAX_PENALTY,
        ) {
            let generated: HashMap<u32, u32> = counts
                .iter()
                .enumerate()
                .filter(|(_, &c)| c > 0)
                .map(|(i, &c)| (i as u32, c))
                .collect();
            let mut out = logits.clone();
            apply_frequency_presence(&mut out, &generated, f, p);
            for (i, (&before, &after)) in logits.iter().zip(&out).enumerate() {
                let c = generated.get(&(i as u32)).copied().unwrap_or(0);
                let want = before - (f * c as f32 + if c > 0 { p } else { 0.0 });
                proptest::prop_assert!((after - want).abs() <= 1e-4, "{} {} {}", i, after, want);
            }
        }
    }
}
