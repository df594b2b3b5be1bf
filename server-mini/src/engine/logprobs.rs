//! Per-token log-probabilities, computed only for requests that ask
//! (`GenRequest::logprobs`).
//!
//! Which distribution: log-softmax of the logits the sampler receives, that
//! is the model's raw logits with ids past the tokenizer's vocabulary masked
//! to -inf, *before* the repetition penalty, top-k, temperature and top-p.
//! So the figure is the model's own probability of the token, the same
//! whatever the sampling settings, `logit_bias` and the frequency and
//! presence penalties included (OpenAI does not say which it reports; vLLM
//! reports this one by default).

use serde::Serialize;

/// Most alternatives a request may ask for per token (OpenAI's chat limit;
/// the completions API allows 5).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// One token and its log-probability.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Candidate {
    pub id: u32,
    /// The token detokenized on its own (a partial UTF-8 character shows as
    /// U+FFFD, as the tokenizer decodes it).
    pub text: String,
    /// The token's raw bytes (`Detokenize::token_bytes`): a partial UTF-8
    /// character's real bytes, where `text` has U+FFFD. None: unknown.
    pub bytes: Option<Vec<u8>>,
    pub logprob: f32,
}

/// A generated token's log-probability and the most likely tokens at its
/// position.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TokenLogprob {
    pub sampled: Candidate,
    /// At most the number asked for, most likely first (equal logits: lower
    /// id first, as `sampling::argmax`).
    pub top: Vec<Candidate>,
}

/// `ln Σ exp(l)` over the logits, in f64 (a 150k-entry sum in f32 loses
/// the small terms).
fn log_sum_exp(logits: &[f32]) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max as f64;
    }
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max as f64).exp()).sum();
    max as f64 + sum.ln()
}

/// The log-probability of `sampled` and the `top` most likely ids with
/// theirs, under softmax(`logits`).
pub fn log_softmax_top(logits: &[f32], sampled: u32, top: usize) -> (f32, Vec<(u32, f32)>) {
    let lse = log_sum_exp(logits);
    let logprob = |id: u32| {
        logits
            .get(id as usize)
            .map_or(f32::NEG_INFINITY, |&l| (l as f64 - lse) as f32)
    };
    let top = top.min(logits.len());
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    // Logit descending, then id ascending: a total order, so the first
    // `top` are well defined whatever the ties.
    let order = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    if top > 0 && top < ids.len() {
        ids.select_nth_unstable_by(top - 1, order);
    }
    ids.truncate(top);
    ids.sort_unstable_by(order);
    let best = ids.into_iter().map(|id| (id, logprob(id))).collect();
    (logprob(sampled), best)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn uniform_logits_give_minus_ln_vocab() {
        let (lp, top) = log_softmax_top(&[3.0; 8], 5, 3);
        assert!((lp - -(8f32).ln()).abs() < 1e-6);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), [0, 1, 2]);
    }

    #[test]
    fn masked_ids_have_no_probability() {
        let logits = [0.0, 1.0, f32::NEG_INFINITY];
        let (lp, top) = log_softmax_top(&logits, 2, 3);
        assert_eq!(lp, f32::NEG_INFINITY);
        assert_eq!(top[0].0, 1);
        let z = 1.0 + 1f64.exp();
        assert!((top[0].1 as f64 - (1f64.exp() / z).ln()).abs() < 1e-6);
        assert!((top[1].1 as f64 - (1.0 / z).ln()).abs() < 1e-6);
    }

    proptest! {
        /// Probabilities sum to one, the top list is the sorted head of all
        /// ids by logprob, and the sampled id's entry matches.
        #[test]
        fn top_is_the_head_of_the_sorted_distribution(
            logits in proptest::collection::vec(-30f32..30.0, 1..200),
            top in 0usize..25,
            pick in any::<proptest::sample::Index>(),
        ) {
            let sampled = pick.index(logits.len()) as u32;
            let (lp, best) = log_softmax_top(&logits, sampled, top);
            let all: Vec<f32> = (0..logits.len() as u32)
                .map(|i| log_softmax_top(&logits, i, 0).0)
                .collect();
            let mass: f64 = all.iter().map(|&l| (l as f64).exp()).sum();
            prop_assert!((mass - 1.0).abs() < 1e-4, "mass {mass}");
            prop_assert_eq!(lp, all[sampled as usize]);
            prop_assert_eq!(best.len(), top.min(logits.len()));
            let mut sorted: Vec<u32> = (0..logits.len() as u32).collect();
            sorted.sort_by(|&a, &b| all[b as usize].total_cmp(&all[a as usize]));
            for (k, &(id, l)) in best.iter().enumerate() {
                prop_assert_eq!(l, all[id as usize]);
                prop_assert_eq!(l, all[sorted[k] as usize], "rank {}", k);
            }
        }
    }
}
