//! Streaming writer of expert files.
//!
//! A safetensors file puts its JSON header (which lists every tensor's byte
//! range) before the data, but the header is only known once every tensor
//! has been added. So tensor bytes are spooled to temporary files next to
//! the output as they are added, and on closing a shard the header is
//! written followed by a copy of the spools. Memory stays about one tensor
//! (plus a fixed copy buffer), never the model.
//!
//! ```text
//!   shard file = u64 LE header length | JSON header, space-padded to 8n | wide spool | narrow spool
//!   wide spool   : every U32 array (codes; salient_index when in > 65536)
//!   narrow spool : every U16/F16 array
//! ```
//!
//! Putting all 4-byte arrays first keeps each of them 4-byte aligned in the
//! file (the header is padded to a multiple of 8), so a reader that maps the
//! file can view codes as `&[u32]` without copying.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::error::FormatError;
use super::schema::{self, keys, StoredDtype, StoredSpec, TensorMeta, MAX_DENSE_RANK};
use super::{BaseIdentity, ExpertHeader, ExpertTensor, FORMAT_VERSION};
use crate::layout::MAX_DIM;

/// Bytes converted to little-endian per write call; bounds the writer's
/// working memory independently of the tensor size.
const CHUNK_BYTES: usize = 1 << 16;

/// safetensors data starts right after the header; padding the header to a
/// multiple of this keeps every U32 array aligned.
const HEADER_ALIGN: usize = 8;

/// Writes one expert, tensor by tensor. See the module docs.
pub struct ExpertWriter {
    path: PathBuf,
    header: ExpertHeader,
    max_shard_bytes: Option<u64>,
    /// Shards already written, under temporary names until `finish`.
    closed: Vec<ClosedShard>,
    current: Option<ShardSpool>,
    hf_names: BTreeSet<String>,
    stored_names: BTreeSet<String>,
    /// Set when an I/O error left a spool half-written: the output would
    /// not be a valid file, so `finish` refuses.
    poisoned: Option<String>,
    finished: bool,
}

struct ClosedShard {
    temp: PathBuf,
    stored: Vec<String>,
    data_bytes: u64,
}

/// One temporary data file.
struct Spool {
    path: PathBuf,
    out: BufWriter<File>,
    len: u64,
}

struct SpoolEntry {
    spec: StoredSpec,
    len: u64,
}

/// The shard being filled.
struct ShardSpool {
    wide: Spool,
    narrow: Spool,
    wide_entries: Vec<SpoolEntry>,
    narrow_entries: Vec<SpoolEntry>,
    tensors_meta: BTreeMap<String, Value>,
    checksums: BTreeMap<String, String>,
    data_bytes: u64,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> FormatError + '_ {
    move |source| FormatError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Spool {
    fn create(path: PathBuf) -> Result<Spool, FormatError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io_error(&path))?;
        Ok(Spool {
            path,
            out: BufWriter::new(file),
            len: 0,
        })
    }

    /// Appends `items` as little-endian bytes; returns (bytes, CRC32C).
    fn append<const N: usize>(
        &mut self,
        items: impl Iterator<Item = [u8; N]>,
    ) -> Result<(u64, u32), FormatError> {
        let mut buffer = Vec::with_capacity(CHUNK_BYTES);
        let (mut crc, mut written) = (0u32, 0u64);
        let mut flush = |buffer: &mut Vec<u8>, out: &mut BufWriter<File>| {
            crc = crc32c::crc32c_append(crc, buffer);
            written += buffer.len() as u64;
            let result = out.write_all(buffer);
            buffer.clear();
            result
        };
        for item in items {
            buffer.extend_from_slice(&item);
            if buffer.len() >= CHUNK_BYTES {
                flush(&mut buffer, &mut self.out).map_err(io_error(&self.path))?;
            }
        }
        flush(&mut buffer, &mut self.out).map_err(io_error(&self.path))?;
        self.len += written;
        Ok((written, crc))
    }

    /// Copies the spooled bytes to `dest` and deletes the spool.
    fn drain_into(self, dest: &mut impl Write) -> Result<(), FormatError> {
        let path = self.path;
        let mut file = self.out.into_inner().map_err(|e| FormatError::Io {
            path: path.clone(),
            source: e.into_error(),
        })?;
        file.seek(SeekFrom::Start(0)).map_err(io_error(&path))?;
        std::io::copy(&mut file, dest).map_err(io_error(&path))?;
        drop(file);
        std::fs::remove_file(&path).map_err(io_error(&path))
    }
}

impl ExpertWriter {
    /// Starts an expert at `path` (conventionally `NAME.safetensors`). With
    /// `max_shard_bytes`, tensors go to a new shard whenever the current one
    /// would grow past it (a delta's five arrays always share a shard; one
    /// tensor larger than the limit gets a shard of its own).
    pub fn create(
        path: &Path,
        header: ExpertHeader,
        max_shard_bytes: Option<u64>,
    ) -> Result<Self, FormatError> {
        if !BaseIdentity::is_well_formed(&header.base.digest) {
            return Err(FormatError::Writer {
                problem: format!(
                    "base identity {:?} is not 64 lowercase hex digits",
                    header.base.digest
                ),
            });
        }
        if header.expert_name.is_empty() {
            return Err(FormatError::Writer {
                problem: "empty expert name".into(),
            });
        }
        let mut writer = ExpertWriter {
            path: path.to_owned(),
            header,
            max_shard_bytes,
            closed: Vec::new(),
            current: None,
            hf_names: BTreeSet::new(),
            stored_names: BTreeSet::new(),
            poisoned: None,
            finished: false,
        };
        // Opening the first spools now reports an unwritable folder here
        // rather than at the first tensor.
        writer.current = Some(writer.open_shard()?);
        Ok(writer)
    }

    /// Adds one tensor under its Hugging Face name; its bytes go to disk now.
    pub fn add(&mut self, name: &str, tensor: &ExpertTensor) -> Result<(), FormatError> {
        if let Some(problem) = &self.poisoned {
            return Err(FormatError::Writer {
                problem: problem.clone(),
            });
        }
        let reject = |problem: String| FormatError::Write {
            tensor: name.to_owned(),
            problem,
        };
        schema::check_tensor_name(name).map_err(reject)?;
        if self.hf_names.contains(name) {
            return Err(reject("added twice".into()));
        }
        let meta = describe(tensor).map_err(reject)?;
        let specs = meta.stored(name);
        if let Some(clash) = specs.iter().find(|s| self.stored_names.contains(&s.name)) {
            return Err(reject(format!(
                "stored name `{}` is already taken by another tensor",
                clash.name
            )));
        }
        let bytes: u64 = specs
            .iter()
            .map(|s| (s.shape.iter().product::<usize>() * s.dtype.size()) as u64)
            .sum();
        let full = self.current.as_ref().is_some_and(|shard| {
            shard.data_bytes > 0
                && self
                    .max_shard_bytes
                    .is_some_and(|max| shard.data_bytes + bytes > max)
        });
        // Past this point a failure leaves a partial shard behind.
        self.spool(name, tensor, meta, specs, full)
            .inspect_err(|e| {
                self.poisoned = Some(format!("an earlier write failed: {e}"));
            })
    }

    fn spool(
        &mut self,
        name: &str,
        tensor: &ExpertTensor,
        meta: TensorMeta,
        specs: Vec<StoredSpec>,
        start_new_shard: bool,
    ) -> Result<(), FormatError> {
        if start_new_shard {
            self.close_shard()?;
        }
        if self.current.is_none() {
            self.current = Some(self.open_shard()?);
        }
        let shard = self.current.as_mut().expect("opened just above");
        for spec in specs {
            let spool_is_wide = spec.dtype == StoredDtype::U32;
            let spool = if spool_is_wide {
                &mut shard.wide
            } else {
                &mut shard.narrow
            };
            let (len, crc) = write_array(spool, tensor, &spec)?;
            shard
                .checksums
                .insert(spec.name.clone(), schema::crc_hex(crc));
            self.stored_names.insert(spec.name.clone());
            let entry = SpoolEntry { spec, len };
            if spool_is_wide {
                shard.wide_entries.push(entry);
            } else {
                shard.narrow_entries.push(entry);
            }
            shard.data_bytes += len;
        }
        shard.tensors_meta.insert(name.to_owned(), meta.to_json());
        self.hf_names.insert(name.to_owned());
        Ok(())
    }

    /// Writes the header(s) and moves the files into place. Returns the
    /// files written: `[path]`, or the shards followed by
    /// `path.index.json` (shards are named `STEM-00001-of-0000N.safetensors`).
    pub fn finish(mut self) -> Result<Vec<PathBuf>, FormatError> {
        if let Some(problem) = self.poisoned.take() {
            return Err(FormatError::Writer { problem });
        }
        if self.current.is_none() && self.closed.is_empty() {
            self.current = Some(self.open_shard()?);
        }
        if self.current.is_some() {
            self.close_shard()?;
        }
        let closed = std::mem::take(&mut self.closed);
        self.finished = true;
        if closed.len() == 1 {
            std::fs::rename(&closed[0].temp, &self.path).map_err(io_error(&self.path))?;
            return Ok(vec![self.path.clone()]);
        }
        let file_name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "expert.safetensors".into());
        let stem = file_name
            .strip_suffix(".safetensors")
            .unwrap_or(&file_name)
            .to_owned();
        let dir = self.path.parent().unwrap_or(Path::new("")).to_owned();
        let n = closed.len();
        let mut written = Vec::with_capacity(n + 1);
        let mut weight_map = BTreeMap::new();
        let mut total_size = 0u64;
        for (i, shard) in closed.iter().enumerate() {
            let shard_name = format!("{stem}-{:05}-of-{n:05}.safetensors", i + 1);
            let shard_path = dir.join(&shard_name);
            std::fs::rename(&shard.temp, &shard_path).map_err(io_error(&shard_path))?;
            for stored in &shard.stored {
                weight_map.insert(stored.clone(), shard_name.clone());
            }
            total_size += shard.data_bytes;
            written.push(shard_path);
        }
        let index = json!({
            "metadata": {
                keys::FORMAT: schema::FORMAT_NAME,
                keys::FORMAT_VERSION: FORMAT_VERSION.to_string(),
                keys::BASE_IDENTITY: self.header.base.digest,
                keys::EXPERT_NAME: self.header.expert_name,
                keys::SETTINGS: self.header.settings.to_string(),
                "total_size": total_size,
            },
            "weight_map": weight_map,
        });
        let index_path = PathBuf::from(format!("{}.index.json", self.path.display()));
        let text = serde_json::to_string_pretty(&index).expect("JSON values always serialize");
        std::fs::write(&index_path, text).map_err(io_error(&index_path))?;
        written.push(index_path);
        Ok(written)
    }

    fn temp_path(&self, shard: usize, what: &str) -> PathBuf {
        let file_name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = format!(".{file_name}.{}.{shard}.{what}.tmp", std::process::id());
        self.path.parent().unwrap_or(Path::new("")).join(name)
    }

    fn open_shard(&self) -> Result<ShardSpool, FormatError> {
        let shard = self.closed.len();
        Ok(ShardSpool {
            wide: Spool::create(self.temp_path(shard, "wide"))?,
            narrow: Spool::create(self.temp_path(shard, "narrow"))?,
            wide_entries: Vec::new(),
            narrow_entries: Vec::new(),
            tensors_meta: BTreeMap::new(),
            checksums: BTreeMap::new(),
            data_bytes: 0,
        })
    }

    /// Writes the current shard's header and data to its temporary file.
    fn close_shard(&mut self) -> Result<(), FormatError> {
        let Some(shard) = self.current.take() else {
            return Ok(());
        };
        let temp = self.temp_path(self.closed.len(), "shard");
        let mut metadata = BTreeMap::new();
        let mut put = |key: &str, value: String| {
            metadata.insert(key.to_owned(), value);
        };
        put(keys::FORMAT, schema::FORMAT_NAME.into());
        put(keys::FORMAT_VERSION, FORMAT_VERSION.to_string());
        put(keys::BASE_IDENTITY, self.header.base.digest.clone());
        put(keys::EXPERT_NAME, self.header.expert_name.clone());
        put(keys::SETTINGS, self.header.settings.to_string());
        put(
            keys::TENSORS,
            Value::from_iter(shard.tensors_meta).to_string(),
        );
        put(keys::CHECKSUMS, json!(shard.checksums).to_string());
        let checksum = schema::metadata_checksum(&metadata);
        metadata.insert(keys::METADATA_CHECKSUM.to_owned(), checksum);

        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!(metadata));
        let mut offset = 0u64;
        let mut stored = Vec::new();
        for entry in shard.wide_entries.iter().chain(&shard.narrow_entries) {
            let dtype = entry.spec.dtype.safetensors().to_string();
            header.insert(
                entry.spec.name.clone(),
                json!({
                    "dtype": dtype,
                    "shape": entry.spec.shape,
                    "data_offsets": [offset, offset + entry.len],
                }),
            );
            offset += entry.len;
            stored.push(entry.spec.name.clone());
        }
        let mut header_text = Value::Object(header).to_string();
        while (header_text.len() + 8) % HEADER_ALIGN != 0 {
            header_text.push(' ');
        }

        let leftovers = [
            temp.clone(),
            shard.wide.path.clone(),
            shard.narrow.path.clone(),
        ];
        let written = (|| {
            let file = File::create(&temp).map_err(io_error(&temp))?;
            let mut out = BufWriter::new(file);
            out.write_all(&(header_text.len() as u64).to_le_bytes())
                .and_then(|_| out.write_all(header_text.as_bytes()))
                .map_err(io_error(&temp))?;
            shard.wide.drain_into(&mut out)?;
            shard.narrow.drain_into(&mut out)?;
            out.flush().map_err(io_error(&temp))
        })();
        if let Err(e) = written {
            // The shard is lost either way; leave no temporaries behind.
            for path in &leftovers {
                let _ = std::fs::remove_file(path);
            }
            return Err(e);
        }
        self.closed.push(ClosedShard {
            temp,
            stored,
            data_bytes: shard.data_bytes,
        });
        Ok(())
    }
}

impl Drop for ExpertWriter {
    /// An unfinished writer leaves no temporary files behind.
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if let Some(shard) = self.current.take() {
            let _ = std::fs::remove_file(&shard.wide.path);
            let _ = std::fs::remove_file(&shard.narrow.path);
        }
        for shard in &self.closed {
            let _ = std::fs::remove_file(&shard.temp);
        }
    }
}

/// Validates a tensor for writing and describes it for the metadata. The
/// checks are those the reader applies, so a written file always reads.
fn describe(tensor: &ExpertTensor) -> Result<TensorMeta, String> {
    match tensor {
        ExpertTensor::Delta(delta) => {
            if delta.salient_values().iter().any(|v| !v.is_finite()) {
                return Err("non-finite salient value".into());
            }
            Ok(TensorMeta::Delta(*delta.layout()))
        }
        ExpertTensor::Dense { shape, values } => {
            if shape.is_empty() || shape.len() > MAX_DENSE_RANK {
                return Err(format!(
                    "dense rank {} not in 1..={MAX_DENSE_RANK}",
                    shape.len()
                ));
            }
            if shape.iter().any(|&d| d == 0 || d > MAX_DIM) {
                return Err(format!(
                    "dense shape {shape:?} has a dimension outside 1..={MAX_DIM}"
                ));
            }
            let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            if n != Some(values.len()) {
                return Err(format!(
                    "dense shape {shape:?} does not match {} values",
                    values.len()
                ));
            }
            if values.iter().any(|v| !v.is_finite()) {
                return Err("non-finite dense value".into());
            }
            Ok(TensorMeta::Dense {
                shape: shape.clone(),
            })
        }
    }
}

/// Writes the array `spec` names (one of a delta's five, or a dense tensor).
fn write_array(
    spool: &mut Spool,
    tensor: &ExpertTensor,
    spec: &StoredSpec,
) -> Result<(u64, u32), FormatError> {
    match tensor {
        ExpertTensor::Dense { values, .. } => spool.append(f16s(values)),
        ExpertTensor::Delta(delta) => {
            let suffix = spec.name.rsplit('.').next().unwrap_or_default();
            match suffix {
                "codes" => spool.append(delta.codes().iter().map(|w| w.to_le_bytes())),
                "scales" => spool.append(f16s(delta.scales())),
                "offsets" => spool.append(f16s(delta.offsets())),
                "salient_values" => spool.append(f16s(delta.salient_values())),
                _ if spec.dtype == StoredDtype::U16 => spool.append(
                    // Every index < in <= 65536 (checked by the layout), so it fits.
                    delta
                        .salient_index()
                        .iter()
                        .map(|&i| (i as u16).to_le_bytes()),
                ),
                _ => spool.append(delta.salient_index().iter().map(|i| i.to_le_bytes())),
            }
        }
    }
}

fn f16s(values: &[half::f16]) -> impl Iterator<Item = [u8; 2]> + '_ {
    values.iter().map(|v| v.to_bits().to_le_bytes())
}
