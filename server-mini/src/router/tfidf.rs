//! Character n-gram TF-IDF features (the baseline router).
//!
//! Over the lower-cased text, every character n-gram with
//! `min_n <= n <= max_n` is counted; the vocabulary keeps n-grams seen in at
//! least `min_df` training documents; values are `(1 + ln tf)·idf`, with
//! `idf = ln((1 + N)/(1 + df)) + 1` (smoothed, as scikit-learn computes it),
//! and each vector is scaled to unit L2 norm.

use std::collections::HashMap;

use super::features::SparseVec;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TfidfConfig {
    pub min_n: usize,
    pub max_n: usize,
    pub min_df: usize,
}

impl Default for TfidfConfig {
    /// Character 2–5-grams, as in the baseline the issue quotes.
    fn default() -> Self {
        TfidfConfig {
            min_n: 2,
            max_n: 5,
            min_df: 2,
        }
    }
}

#[derive(Clone, Debug)]
pub struct TfidfVectorizer {
    config: TfidfConfig,
    vocabulary: HashMap<String, u32>,
    idf: Vec<f32>,
}

fn ngram_counts(text: &str, config: &TfidfConfig) -> HashMap<String, u32> {
    let chars: Vec<char> = text.to_lowercase().chars().collect();
    let mut counts = HashMap::new();
    for n in config.min_n..=config.max_n {
        for w in chars.windows(n) {
            *counts.entry(w.iter().collect::<String>()).or_insert(0) += 1;
        }
    }
    counts
}

impl TfidfVectorizer {
    pub fn fit(texts: &[&str], config: TfidfConfig) -> TfidfVectorizer {
        let mut df: HashMap<String, usize> = HashMap::new();
        for t in texts {
            for g in ngram_counts(t, &config).into_keys() {
                *df.entry(g).or_insert(0) += 1;
            }
        }
        let mut kept: Vec<(String, usize)> = df
            .into_iter()
            .filter(|(_, d)| *d >= config.min_df)
            .collect();
        kept.sort();
        let n = texts.len() as f32;
        let idf = kept
            .iter()
            .map(|(_, d)| ((1.0 + n) / (1.0 + *d as f32)).ln() + 1.0)
            .collect();
        let vocabulary = kept
            .into_iter()
            .enumerate()
            .map(|(i, (g, _))| (g, i as u32))
            .collect();
        TfidfVectorizer {
            config,
            vocabulary,
            idf,
        }
    }

    pub fn dim(&self) -> usize {
        self.idf.len()
    }

    pub fn transform(&self, text: &str) -> SparseVec {
        let mut entries: Vec<(u32, f32)> = ngram_counts(text, &self.config)
            .into_iter()
            .filter_map(|(g, tf)| {
                self.vocabulary
                    .get(&g)
                    .map(|&i| (i, (1.0 + (tf as f32).ln()) * self.idf[i as usize]))
            })
            .collect();
        entries.sort_by_key(|e| e.0);
        let mut v = SparseVec {
            index: entries.iter().map(|e| e.0).collect(),
            value: entries.iter().map(|e| e.1).collect(),
        };
        v.normalize();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rare_ngrams_weigh_more_and_vectors_are_unit() {
        let texts = ["the cat", "the dog", "the cow"];
        let v = TfidfVectorizer::fit(
            &texts,
            TfidfConfig {
                min_n: 2,
                max_n: 3,
                min_df: 1,
            },
        );
        let x = v.transform("the cat");
        let norm: f32 = x.value.iter().map(|a| a * a).sum();
        assert!((norm - 1.0).abs() < 1e-5);
        let weight = |g: &str| {
            let i = v.vocabulary[g];
            x.value[x.index.iter().position(|&j| j == i).unwrap()]
        };
        assert!(weight("ca") > weight("th"), "'th' occurs in every document");
        assert!(
            v.transform("zzzz").index.is_empty(),
            "unknown n-grams are dropped"
        );
    }
}
