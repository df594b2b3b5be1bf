//! Generation (prefill, then decode with a [`Sampler`]) and perplexity by
//! llama.cpp's convention, over any [`Backend`].

use crate::model::{Backend, ExpertId, LogitsWanted, ModelError, SeqStep};
use crate::sampling::{Sampler, SamplingError, SamplingParams};

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error("the prompt is empty (no tokens)")]
    EmptyPrompt,
    #[error("{0}")]
    Text(String),
    #[error("perplexity needs ctx ≥ 4 and at least one full window of {ctx} tokens; the text has {tokens}")]
    TooShort { ctx: usize, tokens: usize },
}

/// Turns ids back into text (the tokenizer, seen from the generation loop).
pub trait Detokenize {
    fn detokenize(&self, ids: &[u32]) -> Result<String, String>;
    /// Ids at or past this are never sampled (models often pad their
    /// embedding past the tokenizer's vocabulary).
    fn vocab_size(&self) -> Option<usize> {
        None
    }
    /// The raw bytes token `id` adds to the text, a piece of a UTF-8
    /// character included (OpenAI's logprob `bytes`); None when unknown.
    /// By default the token decoded alone, unless that is a partial
    /// character (decoded as U+FFFD, which has lost the bytes).
    fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        self.detokenize(&[id])
            .ok()
            .filter(|t| !t.contains('\u{FFFD}'))
            .map(String::into_bytes)
    }
}

impl Detokenize for crate::tokenizer::Tokenizer {
    fn detokenize(&self, ids: &[u32]) -> Result<String, String> {
        self.decode(ids, true).map_err(|e| e.to_string())
    }
    fn vocab_size(&self) -> Option<usize> {
        Some(crate::tokenizer::Tokenizer::vocab_size(self))
    }
    fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        crate::tokenizer::Tokenizer::token_bytes(self, id)
    }
}

impl<F: Fn(&[u32]) -> Result<String, String>> Detokenize for F {
    fn detokenize(&self, ids: &[u32]) -> Result<String, String> {
        self(ids)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// An end-of-generation token (included in `ids`, not in `text`).
    Eos,
    MaxTokens,
    StopString,
}

#[derive(Clone, Debug)]
pub struct Generation {
    pub ids: Vec<u32>,
    pub text: String,
    pub stop: StopReason,
    pub prompt_tokens: usize,
    /// Wall time of the prompt's forward step (first token's logits).
    pub prefill_time: std::time::Duration,
    /// Wall time of the forward steps after it (one per further token).
    pub decode_time: std::time::Duration,
}

/// Bytes of text held back while they could still be the start of a stop
/// string or an incomplete UTF-8 sequence (the detokenizer renders a
/// partial character as U+FFFD).
pub(crate) fn safe_prefix_len(text: &str, stops: &[String]) -> usize {
    let mut end = text.len();
    if text.ends_with('\u{FFFD}') {
        end = text.trim_end_matches('\u{FFFD}').len();
    }
    for s in stops {
        for k in (1..s.len()).rev() {
            if s.is_char_boundary(k) && text[..end].ends_with(&s[..k]) {
                end = end.min(text[..end].len() - k);
                break;
            }
        }
    }
    end
}

/// Greedy/sampled generation of one sequence. `on_text` receives the text
/// as it becomes final (stop strings and partial characters held back).
pub fn generate<B: Backend>(
    backend: &B,
    detok: &dyn Detokenize,
    eos: &[u32],
    prompt: &[u32],
    expert: Option<ExpertId>,
    params: SamplingParams,
    mut on_text: impl FnMut(&str),
) -> Result<Generation, GenerateError> {
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    let mut sampler = Sampler::new(params.clone())?;
    let mut cache = backend.new_cache();
    let mut context: Vec<u32> = prompt.to_vec();
    let mut ids = Vec::new();
    let mut emitted = 0;
    let mut text = String::new();
    let mut next_input: Vec<u32> = prompt.to_vec();
    let mut prefill_time = std::time::Duration::ZERO;
    let mut decode_time = std::time::Duration::ZERO;
    let stop = loop {
        if ids.len() >= params.max_tokens {
            break StopReason::MaxTokens;
        }
        let mut step = [SeqStep {
            tokens: &next_input,
            cache: &mut cache,
            expert,
            logits: LogitsWanted::Last,
        }];
        let started = std::time::Instant::now();
        let mut logits = backend.forward(&mut step)?.remove(0);
        if ids.is_empty() {
            prefill_time = started.elapsed();
        } else {
            decode_time += started.elapsed();
        }
        if let Some(v) = detok.vocab_size() {
            logits
                .iter_mut()
                .skip(v)
                .for_each(|l| *l = f32::NEG_INFINITY);
        }
        let token = sampler.sample(&mut logits, &context);
        ids.push(token);
        context.push(token);
        if eos.contains(&token) {
            break StopReason::Eos;
        }
        text = detok.detokenize(&ids).map_err(GenerateError::Text)?;
        if let Some(at) = params
            .stop
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            text.truncate(at);
            break StopReason::StopString;
        }
        let safe = safe_prefix_len(&text, &params.stop);
        if safe > emitted && text.is_char_boundary(emitted) {
            on_text(&text[emitted..safe]);
            emitted = safe;
        }
        next_input = vec![token];
    };
    if stop == StopReason::Eos {
        let visible: Vec<u32> = ids.iter().copied().filter(|t| !eos.contains(t)).collect();
        text = detok.detokenize(&visible).map_err(GenerateError::Text)?;
    }
    if text.len() > emitted && text.is_char_boundary(emitted) {
        on_text(&text[emitted..]);
    }
    Ok(Generation {
        ids,
        text,
        stop,
        prompt_tokens: prompt.len(),
        prefill_time,
        decode_time,
    })
}

/// Per-window result of [`perplexity`].
#[derive(Clone, Debug, PartialEq)]
pub struct WindowNll {
    /// Sum of −log p(token) over the scored tokens of the window.
    pub nll_sum: f64,
    pub scored: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Perplexity {
    pub windows: Vec<WindowNll>,
    pub ppl: f64,
}

/// llama.cpp's `llama-perplexity` convention: `floor(n / ctx)`
/// non-overlapping windows, each evaluated from an empty cache; in each,
/// positions `ctx/2 .. ctx−2` predict the next token (`ctx/2 − 1` scores),
/// and PPL = exp(mean NLL over all scored tokens).
///
/// ```text
///   window: t_0 ........ t_{ctx/2} ........ t_{ctx-1}
///                         ^ logits here predict t_{ctx/2+1} ... t_{ctx-1}
/// ```
pub fn perplexity<B: Backend>(
    backend: &B,
    tokens: &[u32],
    ctx: usize,
    expert: Option<ExpertId>,
    mut on_window: impl FnMut(usize, &WindowNll),
) -> Result<Perplexity, GenerateError> {
    let n_windows = if ctx >= 4 { tokens.len() / ctx } else { 0 };
    if n_windows == 0 {
        return Err(GenerateError::TooShort {
            ctx,
            tokens: tokens.len(),
        });
    }
    let vocab = backend.config().vocab_size;
    let first = ctx / 2;
    let mut windows = Vec::with_capacity(n_windows);
    for w in 0..n_windows {
        let window = &tokens[w * ctx..(w + 1) * ctx];
        let mut cache = backend.new_cache();
        let mut step = [SeqStep {
            tokens: window,
            cache: &mut cache,
            expert,
            logits: LogitsWanted::From(first),
        }];
        let logits = backend.forward(&mut step)?.remove(0);
        let mut nll_sum = 0f64;
        for (j, row) in logits.chunks(vocab).take(ctx - 1 - first).enumerate() {
            let target = window[first + j + 1] as usize;
            nll_sum += log_sum_exp(row) - row[target] as f64;
        }
        let result = WindowNll {
            nll_sum,
            scored: ctx - 1 - first,
        };
        on_window(w, &result);
        windows.push(result);
    }
    let total: f64 = windows.iter().map(|w| w.nll_sum).sum();
    let count: usize = windows.iter().map(|w| w.scored).sum();
    Ok(Perplexity {
        ppl: (total / count as f64).exp(),
        windows,
    })
}

pub fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    max + row
        .iter()
        .map(|&v| (v as f64 - max).exp())
        .sum::<f64>()
        .ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_partial_stop_strings_and_chars() {
        let stops = vec!["###".to_string()];
        assert_eq!(safe_prefix_len("hello ##", &stops), 6);
        assert_eq!(safe_prefix_len("hello #", &stops), 6);
        assert_eq!(safe_prefix_len("hello", &stops), 5);
        assert_eq!(safe_prefix_len("ab\u{FFFD}", &[]), 2);
    }

    #[test]
    fn log_sum_exp_matches_direct() {
        let row = [0.5f32, -1.0, 2.0];
        let direct: f64 = row.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
        assert!((log_sum_exp(&row) - direct).abs() < 1e-12);
    }
}
