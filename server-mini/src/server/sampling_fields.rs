//! The sampling fields of an OpenAI request (`temperature`, `top_p`,
//! `top_k`, `repetition_penalty`, `frequency_penalty`, `presence_penalty`,
//! `logit_bias`, `seed`), read and range-checked; each error is a 400 naming
//! its field. The semantics are [`crate::sampling`]'s.
//!
//! `logit_bias` arrives in OpenAI's form, token ids as decimal strings:
//!
//! ```text
//!   "logit_bias": {"50256": -100, "15": 2.5}   →   [(15, 2.5), (50256, -100.0)]
//! ```
//!
//! Whether an id is in the vocabulary needs the model: [`check_vocab`] does
//! that where the request meets it (the app, before submitting).

use serde_json::Value;

use super::error::ApiError;
use super::openai::Fields;
use crate::sampling::{SamplingParams, MAX_LOGIT_BIAS, MAX_LOGIT_BIAS_ENTRIES, MAX_PENALTY};

/// OpenAI's range for `temperature`.
pub const MAX_TEMPERATURE: f64 = 2.0;

/// A request's sampling settings (what [`SamplingParams`] takes from the
/// request; the seed, `max_tokens` and `stop` the app settles).
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingFields {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub repetition_penalty: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    /// Sorted by id, each id once.
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: Option<u64>,
}

impl SamplingFields {
    /// The engine's parameters for one choice.
    pub fn params(&self, seed: u64, max_tokens: usize, stop: Vec<String>) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            logit_bias: self.logit_bias.clone(),
            seed,
            max_tokens,
            stop,
        }
    }
}

fn out_of_range(param: &str, range: &str) -> ApiError {
    ApiError::invalid(Some(param), format!("`{param}` must be in {range}"))
}

/// Reads the sampling fields; absent or null ones take OpenAI's defaults
/// (temperature 1, everything else off).
pub(super) fn parse(f: &Fields) -> Result<SamplingFields, ApiError> {
    let temperature = f.number("temperature")?.unwrap_or(1.0);
    if !(0.0..=MAX_TEMPERATURE).contains(&temperature) {
        return Err(out_of_range(
            "temperature",
            &format!("[0, {MAX_TEMPERATURE}]"),
        ));
    }
    let top_p = f.number("top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(out_of_range("top_p", "(0, 1]"));
    }
    let top_k = f.unsigned("top_k")?.unwrap_or(0);
    let repetition_penalty = f.number("repetition_penalty")?.unwrap_or(1.0);
    if repetition_penalty <= 0.0 {
        return Err(ApiError::invalid(
            Some("repetition_penalty"),
            "`repetition_penalty` must be > 0",
        ));
    }
    let penalty = |key: &str| -> Result<f32, ApiError> {
        let v = f.number(key)?.unwrap_or(0.0);
        if !(-f64::from(MAX_PENALTY)..=f64::from(MAX_PENALTY)).contains(&v) {
            return Err(out_of_range(
                key,
                &format!("[-{MAX_PENALTY}, {MAX_PENALTY}]"),
            ));
        }
        Ok(v as f32)
    };
    Ok(SamplingFields {
        temperature: temperature as f32,
        top_p: top_p as f32,
        top_k: usize::try_from(top_k).unwrap_or(usize::MAX),
        repetition_penalty: repetition_penalty as f32,
        frequency_penalty: penalty("frequency_penalty")?,
        presence_penalty: penalty("presence_penalty")?,
        logit_bias: parse_logit_bias(f.get("logit_bias"))?,
        seed: f.unsigned("seed")?,
    })
}

const LOGIT_BIAS: &str = "logit_bias";

fn bad_bias(message: String) -> ApiError {
    ApiError::invalid(Some(LOGIT_BIAS), message)
}

/// `{"id": bias, ..}`: ids are decimal strings (OpenAI's form), biases
/// numbers in [−100, 100], at most 300 entries.
fn parse_logit_bias(v: Option<&Value>) -> Result<Vec<(u32, f32)>, ApiError> {
    let map = match v {
        None => return Ok(Vec::new()),
        Some(Value::Object(map)) => map,
        Some(_) => {
            return Err(bad_bias(
                "`logit_bias` must be an object mapping token ids to biases".into(),
            ))
        }
    };
    if map.len() > MAX_LOGIT_BIAS_ENTRIES {
        return Err(bad_bias(format!(
            "`logit_bias` has {} entries; at most {MAX_LOGIT_BIAS_ENTRIES}",
            map.len()
        )));
    }
    let mut bias = Vec::with_capacity(map.len());
    for (key, value) in map {
        // `u32::from_str` also takes "+7": OpenAI's keys are plain digits.
        let id = Some(key)
            .filter(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|k| k.parse::<u32>().ok())
            .ok_or_else(|| {
                bad_bias(format!(
                    "`logit_bias` key {key:?} is not a token id (a decimal string)"
                ))
            })?;
        let b = value
            .as_f64()
            .filter(|b| (-f64::from(MAX_LOGIT_BIAS)..=f64::from(MAX_LOGIT_BIAS)).contains(b))
            .ok_or_else(|| {
                bad_bias(format!(
                    "`logit_bias` for token {key} must be a number in \
                     [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}]"
                ))
            })?;
        bias.push((id, b as f32));
    }
    bias.sort_by_key(|&(id, _)| id);
    // "7" and "007" are one token: which bias was meant is unclear.
    if let Some(w) = bias.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(bad_bias(format!(
            "`logit_bias` names token {} twice",
            w[0].0
        )));
    }
    Ok(bias)
}

/// A 400 naming `logit_bias` when an id is outside the vocabulary (ids the
/// model can never produce; the sampler would ignore them silently).
pub fn check_vocab(bias: &[(u32, f32)], vocab: usize) -> Result<(), ApiError> {
    match bias.iter().find(|&&(id, _)| id as usize >= vocab) {
        Some((id, _)) => Err(bad_bias(format!(
            "`logit_bias` names token {id}, outside the vocabulary of {vocab} tokens"
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::openai::{parse_request, Endpoint};

    fn with(extra: &str) -> Result<SamplingFields, ApiError> {
        let body = format!(r#"{{"model":"m","prompt":"p"{extra}}}"#);
        parse_request(Endpoint::Completions, body.as_bytes()).map(|r| r.sampling)
    }

    fn param_of(extra: &str) -> Option<String> {
        let e = with(extra).expect_err(extra);
        assert_eq!(e.status.as_u16(), 400, "{extra}");
        e.param
    }

    #[test]
    fn defaults_are_openai_s() {
        let s = with("").unwrap();
        assert_eq!((s.temperature, s.top_p, s.top_k), (1.0, 1.0, 0));
        assert_eq!((s.frequency_penalty, s.presence_penalty), (0.0, 0.0));
        assert_eq!((s.logit_bias.len(), s.seed), (0, None));
        let nulls = with(r#","frequency_penalty":null,"logit_bias":null"#).unwrap();
        assert_eq!(nulls, s);
    }

    #[test]
    fn penalties_take_the_whole_range_and_no_more() {
        let s = with(r#","frequency_penalty":-2,"presence_penalty":1.5"#).unwrap();
        assert_eq!((s.frequency_penalty, s.presence_penalty), (-2.0, 1.5));
        let s = with(r#","frequency_penalty":2.0,"presence_penalty":-2"#).unwrap();
        assert_eq!((s.frequency_penalty, s.presence_penalty), (2.0, -2.0));
        for (extra, param) in [
            (r#","frequency_penalty":2.01"#, "frequency_penalty"),
            (r#","presence_penalty":-3"#, "presence_penalty"),
            (r#","presence_penalty":"1""#, "presence_penalty"),
            (r#","frequency_penalty":true"#, "frequency_penalty"),
        ] {
            assert_eq!(param_of(extra).as_deref(), Some(param), "{extra}");
        }
    }

    #[test]
    fn logit_bias_forms() {
        let s = with(r#","logit_bias":{"50256":-100,"15":2.5,"0":100}"#).unwrap();
        assert_eq!(s.logit_bias, [(0, 100.0), (15, 2.5), (50256, -100.0)]);
        assert_eq!(with(r#","logit_bias":{}"#).unwrap().logit_bias, []);
        let most: Vec<String> = (0..MAX_LOGIT_BIAS_ENTRIES)
            .map(|i| format!(r#""{i}":1"#))
            .collect();
        let s = with(&format!(r#","logit_bias":{{{}}}"#, most.join(","))).unwrap();
        assert_eq!(s.logit_bias.len(), MAX_LOGIT_BIAS_ENTRIES);
        let too_many = format!(r#","logit_bias":{{{},"99999":1}}"#, most.join(","));
        for extra in [
            r#","logit_bias":[1,2]"#,
            r#","logit_bias":"{}""#,
            r#","logit_bias":{"abc":1}"#,
            r#","logit_bias":{"":1}"#,
            r#","logit_bias":{"+7":1}"#,
            r#","logit_bias":{"-7":1}"#,
            r#","logit_bias":{"1.5":1}"#,
            r#","logit_bias":{"4294967296":1}"#,
            r#","logit_bias":{"7":100.5}"#,
            r#","logit_bias":{"7":-101}"#,
            r#","logit_bias":{"7":"1"}"#,
            r#","logit_bias":{"7":null}"#,
            r#","logit_bias":{"7":1,"007":2}"#,
            &too_many,
        ] {
            assert_eq!(param_of(extra).as_deref(), Some(LOGIT_BIAS), "{extra}");
        }
    }

    #[test]
    fn vocab_check_names_the_first_id_past_it() {
        let bias = [(3, 1.0), (9, -1.0), (12, 5.0)];
        assert!(check_vocab(&bias, 13).is_ok());
        let e = check_vocab(&bias, 10).unwrap_err();
        assert_eq!(
            (e.status.as_u16(), e.param.as_deref()),
            (400, Some(LOGIT_BIAS))
        );
        assert!(e.message.contains("12"), "{}", e.message);
    }

    #[test]
    fn params_carry_every_field() {
        let s = with(
            r#","temperature":0.5,"top_p":0.9,"top_k":7,"repetition_penalty":1.2,
            "frequency_penalty":0.3,"presence_penalty":-0.4,"logit_bias":{"5":-1},"seed":8"#,
        )
        .unwrap();
        let p = s.params(11, 20, vec!["x".into()]);
        assert_eq!(
            p,
            SamplingParams {
                temperature: 0.5,
                top_k: 7,
                top_p: 0.9,
                repetition_penalty: 1.2,
                frequency_penalty: 0.3,
                presence_penalty: -0.4,
                logit_bias: vec![(5, -1.0)],
                seed: 11,
                max_tokens: 20,
                stop: vec!["x".into()],
            }
        );
        assert!(p.validate().is_ok());
    }
}
