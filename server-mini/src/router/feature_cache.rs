//! Pooled hidden-state statistics of many queries from one pass of the base
//! model, saved to a file so that pooling / layer / classifier choices can be
//! compared (and a router trained) without running the model again.
//!
//! A causal model's rows for the first `c` tokens do not depend on the tokens
//! after them, so one pass over a prompt cut at the largest cut gives the
//! statistics of every smaller cut too.
//!
//! ```text
//!   file = "MSWRFEAT" | u32 LE header length | header JSON | records
//!   header = { "version": 1, "hidden_size", "n_layers", "layers": [..], "cuts": [..],
//!              "prompt_format", "shared_prefix": [token..], "n_queries" }
//!   record (one per query, in the data file's order), all LE:
//!     u32 rows run (after the shared prefix, at most the largest cut)
//!     for each layer: for each cut: mean [hidden] f32, normed_mean [hidden] f32
//!                     first [hidden] f32, last [hidden] f32
//! ```
//! `mean` averages the rows up to the cut; `normed_mean` averages each row
//! divided by its RMS (so one huge-norm row, e.g. the attention-sink first
//! token, cannot dominate); `first` and `last` are single rows of the longest cut.

use std::io::{Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::hidden::{FeatureSpec, Pooling, RouterError};

const MAGIC: &[u8; 8] = b"MSWRFEAT";
pub const CACHE_VERSION: u32 = 1;
/// Keeps the RMS of an all-zero row from dividing by zero.
const RMS_EPS: f32 = 1e-6;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CacheHeader {
    pub version: u32,
    pub hidden_size: usize,
    pub n_layers: usize,
    pub layers: Vec<usize>,
    pub cuts: Vec<usize>,
    pub prompt_format: String,
    pub shared_prefix: Vec<u32>,
    pub n_queries: usize,
}

/// One layer's statistics of one query.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerStats {
    /// Per cut (as in the header), mean of the rows up to it.
    pub mean: Vec<Vec<f32>>,
    /// Per cut, mean of the RMS-normalised rows up to it.
    pub normed_mean: Vec<Vec<f32>>,
    pub first: Vec<f32>,
    pub last: Vec<f32>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct QueryStats {
    pub rows: usize,
    /// Per layer (as in the header).
    pub layers: Vec<LayerStats>,
}

/// Mean of `h [rows, hidden]`'s first `cut` rows, raw and RMS-normalised.
pub fn pooled_means(h: &[f32], hidden: usize, cut: usize) -> (Vec<f32>, Vec<f32>) {
    let mut mean = vec![0f32; hidden];
    let mut normed = vec![0f32; hidden];
    let rows = (h.len() / hidden).min(cut);
    for row in h.chunks_exact(hidden).take(rows) {
        let rms = (row.iter().map(|v| v * v).sum::<f32>() / hidden as f32 + RMS_EPS).sqrt();
        for ((m, n), v) in mean.iter_mut().zip(&mut normed).zip(row) {
            *m += v;
            *n += v / rms;
        }
    }
    let n = rows.max(1) as f32;
    mean.iter_mut().chain(&mut normed).for_each(|v| *v /= n);
    (mean, normed)
}

impl LayerStats {
    pub fn of(h: &[f32], hidden: usize, cuts: &[usize]) -> LayerStats {
        let (mean, normed_mean) = cuts.iter().map(|&c| pooled_means(h, hidden, c)).unzip();
        let rows = h.len() / hidden;
        LayerStats {
            mean,
            normed_mean,
            first: h[..hidden].to_vec(),
            last: h[(rows - 1) * hidden..rows * hidden].to_vec(),
        }
    }
}

fn put(out: &mut Vec<u8>, v: &[f32]) {
    out.extend(v.iter().flat_map(|x| x.to_le_bytes()));
}

pub struct CacheWriter {
    file: std::io::BufWriter<std::fs::File>,
    header: CacheHeader,
    path: String,
}

impl CacheWriter {
    pub fn create(path: &Path, header: CacheHeader) -> Result<CacheWriter, RouterError> {
        let shown = path.display().to_string();
        let io = |source| RouterError::Io {
            path: shown.clone(),
            source,
        };
        let mut file = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
        let json = serde_json::to_vec(&header).expect("plain struct serializes");
        file.write_all(MAGIC).map_err(io)?;
        file.write_all(&(json.len() as u32).to_le_bytes())
            .map_err(io)?;
        file.write_all(&json).map_err(io)?;
        Ok(CacheWriter {
            file,
            header,
            path: shown,
        })
    }

    pub fn push(&mut self, q: &QueryStats) -> Result<(), RouterError> {
        let mut out = Vec::new();
        out.extend((q.rows as u32).to_le_bytes());
        for l in &q.layers {
            for (m, n) in l.mean.iter().zip(&l.normed_mean) {
                put(&mut out, m);
                put(&mut out, n);
            }
            put(&mut out, &l.first);
            put(&mut out, &l.last);
        }
        let _ = &self.header;
        self.file.write_all(&out).map_err(|source| RouterError::Io {
            path: self.path.clone(),
            source,
        })
    }

    pub fn finish(mut self) -> Result<(), RouterError> {
        self.file.flush().map_err(|source| RouterError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

/// Reads a whole cache file.
pub fn read_cache(path: &Path) -> Result<(CacheHeader, Vec<QueryStats>), RouterError> {
    let shown = path.display().to_string();
    let format = |message: String| RouterError::Format {
        path: shown.clone(),
        message,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|source| RouterError::Io {
            path: shown.clone(),
            source,
        })?;
    if bytes.len() < 12 || &bytes[..8] != MAGIC {
        return Err(format("not a router feature cache".into()));
    }
    let n = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
    let json = bytes
        .get(12..12 + n)
        .ok_or_else(|| format("truncated header".into()))?;
    let h: CacheHeader =
        serde_json::from_slice(json).map_err(|e| format(format!("header: {e}")))?;
    if h.version != CACHE_VERSION {
        return Err(format(format!(
            "cache version {}, this build reads {CACHE_VERSION}",
            h.version
        )));
    }
    let hid = h.hidden_size;
    let per_layer = (2 * h.cuts.len() + 2) * hid;
    let record = 4 + 4 * h.layers.len() * per_layer;
    let body = &bytes[12 + n..];
    if body.len() != record * h.n_queries {
        return Err(format(format!(
            "{} bytes of records, expected {} queries of {record}",
            body.len(),
            h.n_queries
        )));
    }
    let floats = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect()
    };
    let mut out = Vec::with_capacity(h.n_queries);
    for rec in body.chunks_exact(record) {
        let rows = u32::from_le_bytes(rec[..4].try_into().expect("4 bytes")) as usize;
        let v = floats(&rec[4..]);
        let layers = v
            .chunks_exact(per_layer)
            .map(|l| {
                let mut it = l.chunks_exact(hid).map(<[f32]>::to_vec);
                let (mut mean, mut normed_mean) = (Vec::new(), Vec::new());
                for _ in &h.cuts {
                    mean.push(it.next().expect("sized"));
                    normed_mean.push(it.next().expect("sized"));
                }
                LayerStats {
                    mean,
                    normed_mean,
                    first: it.next().expect("sized"),
                    last: it.next().expect("sized"),
                }
            })
            .collect();
        if v.iter().any(|x| !x.is_finite()) {
            return Err(format("non-finite feature".into()));
        }
        out.push(QueryStats { rows, layers });
    }
    Ok((h, out))
}

/// The pooled features `spec` gives each cached query, without running the
/// model: `spec` must be one the cache holds (same model shape, prompt format
/// and shared prefix; its layer among the cached ones, its token limit one of
/// the cuts; last-row pooling only at the largest cut).
pub fn cached_features(
    header: &CacheHeader,
    stats: &[QueryStats],
    spec: &FeatureSpec,
) -> Result<Vec<Vec<f32>>, RouterError> {
    let mismatch = |what: &str, cache: String, wanted: String| {
        Err(RouterError::Training(format!(
            "feature cache has {what} {cache}, the router wants {wanted}"
        )))
    };
    if (header.hidden_size, header.n_layers) != (spec.hidden_size, spec.n_layers) {
        return mismatch(
            "model shape",
            format!("{}x{}", header.hidden_size, header.n_layers),
            format!("{}x{}", spec.hidden_size, spec.n_layers),
        );
    }
    if header.prompt_format != spec.prompt_format || header.shared_prefix != spec.shared_prefix {
        return mismatch(
            "prompt format / shared prefix",
            format!("{} {:?}", header.prompt_format, header.shared_prefix),
            format!("{} {:?}", spec.prompt_format, spec.shared_prefix),
        );
    }
    let Some(li) = header.layers.iter().position(|&l| l == spec.layer) else {
        return mismatch(
            "layers",
            format!("{:?}", header.layers),
            spec.layer.to_string(),
        );
    };
    let Some(ci) = header.cuts.iter().position(|&c| c == spec.max_tokens) else {
        return mismatch(
            "token cuts",
            format!("{:?}", header.cuts),
            spec.max_tokens.to_string(),
        );
    };
    let largest = header.cuts.iter().max() == Some(&spec.max_tokens);
    if matches!(spec.pooling, Pooling::Last | Pooling::MeanLast) && !largest {
        return mismatch(
            "the last row only at cut",
            format!("{:?}", header.cuts.iter().max()),
            spec.max_tokens.to_string(),
        );
    }
    Ok(stats
        .iter()
        .map(|q| {
            let l = &q.layers[li];
            match spec.pooling {
                Pooling::Mean => l.mean[ci].clone(),
                Pooling::NormedMean => l.normed_mean[ci].clone(),
                Pooling::Last => l.last.clone(),
                Pooling::MeanLast => [l.mean[ci].as_slice(), &l.last].concat(),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::router::hidden::PROMPT_CHAT;

    const HIDDEN: usize = 6;

    fn header(n_queries: usize) -> CacheHeader {
        CacheHeader {
            version: CACHE_VERSION,
            hidden_size: HIDDEN,
            n_layers: 4,
            layers: vec![1, 3],
            cuts: vec![2, 5],
            prompt_format: PROMPT_CHAT.into(),
            shared_prefix: vec![7, 8],
            n_queries,
        }
    }

    fn spec(layer: usize, pooling: Pooling, max_tokens: usize) -> FeatureSpec {
        FeatureSpec {
            layer,
            pooling,
            max_tokens,
            hidden_size: HIDDEN,
            n_layers: 4,
            shared_prefix: vec![7, 8],
            prompt_format: PROMPT_CHAT.into(),
        }
    }

    /// Rows of varied scale, so mean and normed mean differ.
    fn rows(n: usize, seed: f32) -> Vec<f32> {
        (0..n * HIDDEN)
            .map(|i| ((i as f32 * 0.37 + seed).sin()) * (1 + i / HIDDEN) as f32)
            .collect()
    }

    /// What the cache gives back for a (layer, pooling, cut) is what live
    /// pooling gives on the prompt cut there: one pass serves every cut.
    #[test]
    fn cached_features_match_live_pooling() {
        let queries = [7usize, 3, 5]; // rows run per query (≤ the largest cut)
        let h = header(queries.len());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        let mut w = CacheWriter::create(&path, h.clone()).unwrap();
        let mut hidden = Vec::new();
        for (q, &n) in queries.iter().enumerate() {
            let n = n.min(5);
            let per_layer: Vec<Vec<f32>> = (0..2).map(|l| rows(n, (q * 2 + l) as f32)).collect();
            w.push(&QueryStats {
                rows: n,
                layers: per_layer
                    .iter()
                    .map(|x| LayerStats::of(x, HIDDEN, &h.cuts))
                    .collect(),
            })
            .unwrap();
            hidden.push(per_layer);
        }
        w.finish().unwrap();
        let (back, stats) = read_cache(&path).unwrap();
        assert_eq!(back, h);
        for (li, &layer) in h.layers.iter().enumerate() {
            for &cut in &h.cuts {
                for pooling in Pooling::ALL {
                    let s = spec(layer, pooling, cut);
                    let got = match cached_features(&back, &stats, &s) {
                        Ok(x) => x,
                        Err(e) => {
                            assert!(cut != 5, "{e}");
                            assert!(matches!(pooling, Pooling::Last | Pooling::MeanLast));
                            continue;
                        }
                    };
                    for (q, x) in hidden.iter().enumerate() {
                        let live = &x[li][..x[li].len().min(cut * HIDDEN)];
                        assert_eq!(
                            got[q],
                            pooling.pool(live, HIDDEN),
                            "{layer} {cut} {pooling:?}"
                        );
                    }
                }
            }
        }
        // Not in the cache: a layer, a cut, another prompt format.
        assert!(cached_features(&back, &stats, &spec(2, Pooling::Mean, 5)).is_err());
        assert!(cached_features(&back, &stats, &spec(1, Pooling::Mean, 4)).is_err());
        let mut raw = spec(1, Pooling::Mean, 5);
        raw.prompt_format = "raw".into();
        assert!(cached_features(&back, &stats, &raw).is_err());
    }

    #[test]
    fn damaged_caches_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        let mut w = CacheWriter::create(&path, header(2)).unwrap();
        let stats = QueryStats {
            rows: 2,
            layers: (0..2)
                .map(|l| LayerStats::of(&rows(2, l as f32), HIDDEN, &[2, 5]))
                .collect(),
        };
        w.push(&stats).unwrap();
        w.finish().unwrap(); // one record of the two promised
        assert!(matches!(read_cache(&path), Err(RouterError::Format { .. })));
        std::fs::write(&path, b"MSWRFEAT\xff\xff").unwrap();
        assert!(matches!(read_cache(&path), Err(RouterError::Format { .. })));
    }

    proptest! {
        /// Scaling any one row by a positive factor leaves the normed mean
        /// as it was (the point of normalising), up to `RMS_EPS`: a row of
        /// mean square m is divided by sqrt(m + ε), not sqrt(m), a relative
        /// error of at most ε / 2m on its values (each at most sqrt(HIDDEN)
        /// once normed), and the mean weighs the row 1/n.
        #[test]
        fn normed_mean_ignores_row_scale(
            n in 1usize..6,
            which in 0usize..6,
            scale in 0.01f32..100.0,
            seed in 0.0f32..10.0,
        ) {
            let x = rows(n, seed);
            let mut y = x.clone();
            let r = which % n;
            y[r * HIDDEN..(r + 1) * HIDDEN].iter_mut().for_each(|v| *v *= scale);
            let (_, a) = pooled_means(&x, HIDDEN, n);
            let (_, b) = pooled_means(&y, HIDDEN, n);
            let mean_square = |v: &[f32]| {
                v[r * HIDDEN..(r + 1) * HIDDEN].iter().map(|t| t * t).sum::<f32>() / HIDDEN as f32
            };
            let eps_effect = (HIDDEN as f32).sqrt() * RMS_EPS
                / (2.0 * mean_square(&x).min(mean_square(&y)))
                / n as f32;
            for (p, q) in a.iter().zip(&b) {
                prop_assert!((p - q).abs() <= 1e-4 * (1.0 + p.abs()) + eps_effect, "{a:?} {b:?}");
            }
        }
    }
}
