//! One request's generation state, independent of the batch it runs in:
//! which tokens it feeds next (a prompt chunk or its last sampled token),
//! sampling, the end conditions and the text that became final. The order
//! of checks is `generate::generate`'s, so a sequence produces the same ids,
//! text and stop reason there and here.
//!
//! ```text
//!   prompt:  p0 p1 p2 p3 p4 p5 p6      prefill_chunk = 3
//!   step 1:  [p0 p1 p2]                 logits ignored
//!   step 2:           [p3 p4 p5]        logits ignored
//!   step 3:                    [p6]     logits -> t0
//!   step 4:                        [t0] logits -> t1   (decode)
//! ```

use super::logprobs::{log_softmax_top, Candidate, TokenLogprob};
use crate::generate::{safe_prefix_len, Detokenize, StopReason};
use crate::sampling::{Sampler, SamplingParams};

pub(crate) struct Sequence {
    prompt: Vec<u32>,
    /// Prompt tokens already in the KV cache.
    prefilled: usize,
    sampler: Sampler,
    /// Prompt + generated ids (the repetition penalty's context).
    context: Vec<u32>,
    /// Generated ids, eos included.
    ids: Vec<u32>,
    text: String,
    /// Bytes of `text` already sent.
    emitted: usize,
    /// `Some(n)`: report each token's logprob and the `n` most likely.
    logprobs: Option<usize>,
}

/// What one step's logits did to a sequence.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Progress {
    /// Text that became final in this step.
    pub text: Option<String>,
    pub done: Option<StopReason>,
    /// The sampled token's logprob, when the request asked (never for an
    /// end-of-sequence token: it is not part of the text).
    pub logprob: Option<TokenLogprob>,
}

impl Sequence {
    /// `params` must be valid (checked at submit).
    pub fn new(
        prompt: Vec<u32>,
        params: SamplingParams,
        logprobs: Option<usize>,
    ) -> Result<Sequence, String> {
        let sampler = Sampler::new(params).map_err(|e| e.to_string())?;
        Ok(Sequence {
            context: prompt.clone(),
            prompt,
            prefilled: 0,
            sampler,
            ids: Vec::new(),
            text: String::new(),
            emitted: 0,
            logprobs,
        })
    }

    /// Prompt tokens remain to be fed.
    pub fn prefilling(&self) -> bool {
        self.prefilled < self.prompt.len()
    }

    pub fn generated(&self) -> usize {
        self.ids.len()
    }

    /// Tokens in the KV cache between steps (the last sampled id is not
    /// fed yet).
    pub fn context_len(&self) -> usize {
        self.prefilled + self.ids.len().saturating_sub(1)
    }

    /// The tokens of this sequence's next step: up to `chunk` prompt tokens
    /// while prefilling, else the last sampled token.
    pub fn next_input(&self, chunk: usize) -> &[u32] {
        if self.prefilled < self.prompt.len() {
            let end = (self.prefilled + chunk.max(1)).min(self.prompt.len());
            &self.prompt[self.prefilled..end]
        } else {
            let last = self.ids.len() - 1;
            &self.ids[last..]
        }
    }

    /// Records that `fed` tokens (the last `next_input`) went through the
    /// model; true when this step's logits are to be sampled (the prompt is
    /// complete).
    pub fn advance(&mut self, fed: usize) -> bool {
        if self.prefilled < self.prompt.len() {
            self.prefilled += fed;
            self.prefilled == self.prompt.len()
        } else {
            true
        }
    }

    /// Samples the next token from the logits of the sequence's last fed
    /// position and applies `generate`'s end conditions in its order.
    pub fn on_logits(
        &mut self,
        logits: &mut [f32],
        detok: &dyn Detokenize,
        eos: &[u32],
    ) -> Result<Progress, String> {
        if let Some(v) = detok.vocab_size() {
            logits
                .iter_mut()
                .skip(v)
                .for_each(|l| *l = f32::NEG_INFINITY);
        }
        // The sampler edits the logits in place (penalty): keep what it saw.
        let seen = self.logprobs.map(|top| (logits.to_vec(), top));
        let token = self.sampler.sample(logits, &self.context);
        self.ids.push(token);
        self.context.push(token);
        let logprob = match seen {
            Some((seen, top)) if !eos.contains(&token) => {
                Some(token_logprob(&seen, token, top, detok)?)
            }
            _ => None,
        };
        let mut progress = self.progress(token, detok, eos)?;
        progress.logprob = logprob;
        Ok(progress)
    }

    /// The end conditions after `token`, in `generate`'s order, and the
    /// text that became final.
    fn progress(
        &mut self,
        token: u32,
        detok: &dyn Detokenize,
        eos: &[u32],
    ) -> Result<Progress, String> {
        if eos.contains(&token) {
            let visible: Vec<u32> = self
                .ids
                .iter()
                .copied()
                .filter(|t| !eos.contains(t))
                .collect();
            self.text = detok.detokenize(&visible)?;
            return Ok(self.finish(StopReason::Eos));
        }
        self.text = detok.detokenize(&self.ids)?;
        let stops = &self.sampler.params().stop;
        if let Some(at) = stops
            .iter()
            .filter_map(|s| self.text.find(s.as_str()))
            .min()
        {
            self.text.truncate(at);
            return Ok(self.finish(StopReason::StopString));
        }
        if self.ids.len() >= self.sampler.params().max_tokens {
            return Ok(self.finish(StopReason::MaxTokens));
        }
        let safe = safe_prefix_len(&self.text, stops);
        let mut progress = Progress::default();
        if safe > self.emitted && self.text.is_char_boundary(self.emitted) {
            progress.text = Some(self.text[self.emitted..safe].to_string());
            self.emitted = safe;
        }
        Ok(progress)
    }

    /// The rest of the text (nothing is held back any more).
    fn finish(&mut self, stop: StopReason) -> Progress {
        let mut progress = Progress {
            done: Some(stop),
            ..Progress::default()
        };
        if self.text.len() > self.emitted && self.text.is_char_boundary(self.emitted) {
            progress.text = Some(self.text[self.emitted..].to_string());
            self.emitted = self.text.len();
        }
        progress
    }
}

fn token_logprob(
    logits: &[f32],
    token: u32,
    top: usize,
    detok: &dyn Detokenize,
) -> Result<TokenLogprob, String> {
    let (logprob, best) = log_softmax_top(logits, token, top);
    let candidate = |id: u32, logprob: f32| {
        detok.detokenize(&[id]).map(|text| Candidate {
            id,
            text,
            bytes: detok.token_bytes(id),
            logprob,
        })
    };
    Ok(TokenLogprob {
        sampled: candidate(token, logprob)?,
        top: best
            .into_iter()
            .map(|(id, l)| candidate(id, l))
            .collect::<Result<_, _>>()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each id is one character: 'a' + id.
    struct Letters;
    impl Detokenize for Letters {
        fn detokenize(&self, ids: &[u32]) -> Result<String, String> {
            Ok(ids.iter().map(|&i| (b'a' + i as u8) as char).collect())
        }
    }

    fn one_hot(vocab: usize, id: usize) -> Vec<f32> {
        let mut l = vec![0.0; vocab];
        l[id] = 1.0;
        l
    }

    #[test]
    fn chunks_the_prompt_then_decodes() {
        let params = SamplingParams {
            max_tokens: 3,
            ..Default::default()
        };
        let mut s = Sequence::new(vec![1, 2, 3, 4, 5], params, None).unwrap();
        assert_eq!(s.next_input(2), &[1, 2]);
        assert!(!s.advance(2));
        assert_eq!(s.next_input(2), &[3, 4]);
        assert!(!s.advance(2));
        assert_eq!(s.next_input(2), &[5]);
        assert!(s.advance(1));
        assert_eq!(s.context_len(), 5);
        let p = s.on_logits(&mut one_hot(26, 7), &Letters, &[]).unwrap();
        assert_eq!(p.text.as_deref(), Some("h"));
        assert_eq!(s.next_input(2), &[7]);
        assert_eq!(s.context_len(), 5);
        assert!(s.advance(1));
        s.on_logits(&mut one_hot(26, 8), &Letters, &[]).unwrap();
        assert_eq!(s.context_len(), 6);
        let p = s.on_logits(&mut one_hot(26, 9), &Letters, &[]).unwrap();
        assert_eq!(p.done, Some(StopReason::MaxTokens));
        assert_eq!(p.text.as_deref(), Some("j"));
        assert_eq!(s.generated(), 3);
    }

    #[test]
    fn holds_back_a_stop_prefix_and_cuts_at_the_stop() {
        let params = SamplingParams {
            max_tokens: 10,
            stop: vec!["cd".to_string()],
            ..Default::default()
        };
        let mut s = Sequence::new(vec![0], params, None).unwrap();
        s.advance(1);
        let mut texts = String::new();
        let mut done = None;
        for id in [0, 1, 2, 3, 4] {
            let p = s.on_logits(&mut one_hot(26, id), &Letters, &[]).unwrap();
            texts.push_str(p.text.as_deref().unwrap_or(""));
            if p.done.is_some() {
                done = p.done;
                break;
            }
            // "c" alone may start the stop string: never sent before "d".
            assert!(!texts.ends_with('c'));
        }
        assert_eq!(done, Some(StopReason::StopString));
        assert_eq!(texts, "ab");
    }

    #[test]
    fn eos_is_counted_but_not_shown() {
        let params = SamplingParams::default();
        let mut s = Sequence::new(vec![0], params, None).unwrap();
        s.advance(1);
        s.on_logits(&mut one_hot(26, 4), &Letters, &[25]).unwrap();
        let p = s.on_logits(&mut one_hot(26, 25), &Letters, &[25]).unwrap();
        assert_eq!(p.done, Some(StopReason::Eos));
        assert_eq!(p.text, None, "'e' was already final");
        assert_eq!(s.generated(), 2);
    }

    #[test]
    fn logprobs_are_of_the_logits_before_the_penalty_and_only_when_asked() {
        let params = SamplingParams {
            repetition_penalty: 4.0,
            ..Default::default()
        };
        let logits = [0.0f32, 2.0, 1.5, -1.0];
        let mut asked = Sequence::new(vec![1], params.clone(), Some(2)).unwrap();
        asked.advance(1);
        // Token 1 is in the context: 2.0 / 4 falls under token 2's 1.5.
        let p = asked
            .on_logits(&mut logits.to_vec(), &Letters, &[])
            .unwrap();
        let lp = p.logprob.unwrap();
        assert_eq!(lp.sampled.id, 2);
        assert_eq!(lp.sampled.text, "c");
        assert_eq!(lp.sampled.bytes.as_deref(), Some(&b"c"[..]));
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        let want = |id: usize| ((logits[id] as f64).exp() / z).ln() as f32;
        assert!((lp.sampled.logprob - want(2)).abs() < 1e-6);
        let top: Vec<u32> = lp.top.iter().map(|c| c.id).collect();
        assert_eq!(top, [1, 2], "ranked by the unpenalised logits");
        assert!((lp.top[0].logprob - want(1)).abs() < 1e-6);
        let mut quiet = Sequence::new(vec![1], params, None).unwrap();
        quiet.advance(1);
        let p = quiet
            .on_logits(&mut logits.to_vec(), &Letters, &[])
            .unwrap();
        assert_eq!(p.logprob, None);
        let eos = asked
            .on_logits(&mut one_hot(26, 25), &Letters, &[25])
            .unwrap();
        assert_eq!((eos.done, eos.logprob), (Some(StopReason::Eos), None));
    }

    /// Token 0 is the first byte of "é" (C3 A9), token 1 the second.
    struct HalfChars;
    impl Detokenize for HalfChars {
        fn detokenize(&self, ids: &[u32]) -> Result<String, String> {
            let bytes: Vec<u8> = ids.iter().map(|&i| [0xC3, 0xA9][i as usize]).collect();
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        }
        fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
            Some(vec![[0xC3, 0xA9][id as usize]])
        }
    }

    #[test]
    fn logprob_candidates_carry_raw_bytes_of_partial_characters() {
        let mut s = Sequence::new(vec![0], SamplingParams::default(), Some(2)).unwrap();
        s.advance(1);
        let p = s.on_logits(&mut [1.0, 0.0], &HalfChars, &[]).unwrap();
        let lp = p.logprob.unwrap();
        assert_eq!(lp.sampled.text, "\u{FFFD}");
        assert_eq!(lp.sampled.bytes, Some(vec![0xC3]));
        assert_eq!(lp.top[1].bytes, Some(vec![0xA9]));
        // The default: whole characters give their text's bytes; a partial
        // one (U+FFFD has lost them) gives none.
        let lossy = |ids: &[u32]| HalfChars.detokenize(ids);
        assert_eq!(lossy.token_bytes(0), None);
        assert_eq!(Letters.token_bytes(2), Some(b"c".to_vec()));
    }
}
