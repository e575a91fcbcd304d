//! `--cache-text-embeddings`: a frozen text encoder's output for each caption, computed once
//! and kept as a safetensors file named by the token ids and the encoder's weights (kohya's
//! `--cache_text_encoder_outputs_to_disk`), so that later steps, epochs and resumed runs skip
//! the encoder. Entries are made as captions are first met (a list caption's alternatives
//! and the empty caption of caption dropout each get their own), and each is computed alone,
//! so a value does not depend on which batch first asked for it: a resumed run reads back
//! exactly what an uninterrupted one computed. An entry is trusted only if it reads back whole
//! with the expected shape and finite values; anything else is recomputed and rewritten.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use sd_conditioner::{ClipConditioner, ClipTextModel, Conditioner};
use sha2::Digest;

use crate::error::{Result, TrainError};

/// The cached outputs of one frozen text encoder, by token ids.
#[derive(Debug)]
pub struct TextCache {
    dir: PathBuf,
    encoder_hash: String,
    /// `[tokens, width]` of every entry.
    shape: [usize; 2],
    entries: HashMap<Vec<u32>, Vec<f32>>,
}

fn io(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Io(format!("{}: {e}", path.display()))
}

impl TextCache {
    /// A cache under `dir` for the encoder whose weights hash to `encoder_hash`, with outputs
    /// of `width` per token.
    pub fn new(dir: &Path, encoder_hash: &str, tokens: usize, width: usize) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            encoder_hash: encoder_hash.to_string(),
            shape: [tokens, width],
            entries: HashMap::new(),
        })
    }

    fn path(&self, ids: &[u32]) -> PathBuf {
        let mut hasher = sha2::Sha256::new();
        for id in ids {
            hasher.update(id.to_le_bytes());
        }
        let hex: String = hasher
            .finalize()
            .iter()
            .take(16)
            .map(|b| format!("{b:02x}"))
            .collect();
        self.dir
            .join(format!("{hex}-{}.safetensors", self.encoder_hash))
    }

    fn read(&self, path: &Path, ids: &[u32]) -> Option<Vec<f32>> {
        let bytes = std::fs::read(path).ok()?;
        let file = safetensors::SafeTensors::deserialize(&bytes).ok()?;
        // The ids are kept beside the output: two captions whose names collided would
        // otherwise share an entry.
        let stored = file.tensor("input_ids").ok()?;
        let same_ids = stored.dtype() == safetensors::Dtype::U32
            && stored.shape() == [ids.len()]
            && stored
                .data()
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .eq(ids.iter().copied());
        if !same_ids {
            return None;
        }
        read_f32(&file, "last_hidden_state", &self.shape)
    }

    fn write(&self, path: &Path, ids: &[u32], values: &[f32]) -> Result<()> {
        let ids_bytes: Vec<u8> = ids.iter().flat_map(|x| x.to_le_bytes()).collect();
        write_tensors(
            path,
            &[
                (
                    "input_ids",
                    safetensors::Dtype::U32,
                    vec![ids.len()],
                    ids_bytes,
                ),
                (
                    "last_hidden_state",
                    safetensors::Dtype::F32,
                    self.shape.to_vec(),
                    f32_bytes(values),
                ),
            ],
        )
    }

    /// `[batch, tokens, width]`: the encoder's last hidden state for each row of `ids`, from
    /// memory, from its file, or computed (alone) and written.
    pub fn context<B: Backend>(
        &mut self,
        model: &ClipTextModel<B>,
        ids: &[Vec<u32>],
        device: &B::Device,
    ) -> Result<Tensor<B, 3>> {
        let [tokens, width] = self.shape;
        let mut values = Vec::with_capacity(ids.len() * tokens * width);
        for row in ids {
            if !self.entries.contains_key(row) {
                let path = self.path(row);
                let entry = match self.read(&path, row) {
                    Some(entry) => entry,
                    None => {
                        let out = model.forward(std::slice::from_ref(row))?.last_hidden_state;
                        let dims = out.dims();
                        if dims != [1, tokens, width] {
                            return Err(TrainError::Config(format!(
                                "the text encoder gave {dims:?}, not [1, {tokens}, {width}]"
                            )));
                        }
                        let entry: Vec<f32> = out
                            .into_data()
                            .convert::<f32>()
                            .to_vec()
                            .map_err(|e| TrainError::Io(format!("{e:?}")))?;
                        self.write(&path, row, &entry)?;
                        entry
                    }
                };
                self.entries.insert(row.clone(), entry);
            }
            values.extend_from_slice(&self.entries[row]);
        }
        Ok(Tensor::from_data(
            TensorData::new(values, [ids.len(), tokens, width]),
            device,
        ))
    }
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes named tensors (dtype, shape, little-endian bytes) as one safetensors file,
/// atomically.
pub(crate) fn write_tensors(
    path: &Path,
    tensors: &[(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)],
) -> Result<()> {
    let mut views = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes);
        views.push((*name, view.map_err(|e| io(path, e))?));
    }
    let bytes = safetensors::serialize(views, None).map_err(|e| io(path, e))?;
    sd_core::files::write_atomic(path, |out| {
        use std::io::Write;
        out.write_all(&bytes).map_err(|e| e.to_string())
    })?;
    Ok(())
}

/// A tensor of `file` as f32 values, if it is there in f32 with `shape` and every value is
/// finite.
fn read_f32(file: &safetensors::SafeTensors<'_>, name: &str, shape: &[usize]) -> Option<Vec<f32>> {
    let view = file.tensor(name).ok()?;
    if view.dtype() != safetensors::Dtype::F32 || view.shape() != shape {
        return None;
    }
    let values: Vec<f32> = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    values.iter().all(|v| v.is_finite()).then_some(values)
}

/// SDXL's cached conditioning, by caption: both frozen encoders' context and the second
/// one's pooled embedding, as the conditioner computes them, each caption alone. The caption
/// is kept in the file beside them (a collision of names is then a miss, not a wrong entry).
#[derive(Debug)]
pub struct ConditioningCache {
    dir: PathBuf,
    encoders_hash: String,
    /// `([tokens, width], pooled width)`, learnt from the first caption computed.
    shapes: Option<([usize; 2], usize)>,
    entries: HashMap<String, (Vec<f32>, Vec<f32>)>,
}

impl ConditioningCache {
    /// A cache under `dir` for the encoders whose weights hash to `encoders_hash`.
    pub fn new(dir: &Path, encoders_hash: &str) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            encoders_hash: encoders_hash.to_string(),
            shapes: None,
            entries: HashMap::new(),
        })
    }

    fn path(&self, caption: &str) -> PathBuf {
        let digest = sha2::Sha256::digest(caption.as_bytes());
        let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
        self.dir
            .join(format!("{hex}-{}.safetensors", self.encoders_hash))
    }

    fn read(&self, path: &Path, caption: &str) -> Option<(Vec<f32>, Vec<f32>)> {
        let ([tokens, width], pooled) = self.shapes?;
        let bytes = std::fs::read(path).ok()?;
        let file = safetensors::SafeTensors::deserialize(&bytes).ok()?;
        let stored = file.tensor("caption").ok()?;
        if stored.dtype() != safetensors::Dtype::U8 || stored.data() != caption.as_bytes() {
            return None;
        }
        Some((
            read_f32(&file, "context", &[tokens, width])?,
            read_f32(&file, "pooled", &[pooled])?,
        ))
    }

    /// Each caption's `[tokens, width]` context and `[pooled]` embedding, as batches
    /// `[n, tokens, width]` and `[n, pooled]`: from memory, from its file, or computed alone
    /// and written.
    pub fn conditioning<B: Backend>(
        &mut self,
        conditioner: &ClipConditioner<B>,
        captions: &[String],
        device: &B::Device,
    ) -> Result<(Tensor<B, 3>, Tensor<B, 2>)> {
        let mut contexts = Vec::new();
        let mut pooled_all = Vec::new();
        for caption in captions {
            if !self.entries.contains_key(caption) {
                let path = self.path(caption);
                let entry = match self.read(&path, caption) {
                    Some(entry) => entry,
                    None => {
                        let c = conditioner.encode(&[caption.as_str()])?;
                        let pooled = c.pooled.ok_or_else(|| {
                            TrainError::Config("the text encoders gave no pooled embedding".into())
                        })?;
                        let [_, tokens, width] = c.context.dims();
                        let [_, p] = pooled.dims();
                        if self.shapes.is_some_and(|s| s != ([tokens, width], p)) {
                            return Err(TrainError::Config(format!(
                                "the text encoders gave [{tokens}, {width}] and [{p}], not \
                                 {:?}",
                                self.shapes
                            )));
                        }
                        self.shapes = Some(([tokens, width], p));
                        let flat = |t: TensorData| -> Result<Vec<f32>> {
                            t.convert::<f32>()
                                .to_vec()
                                .map_err(|e| TrainError::Io(format!("{e:?}")))
                        };
                        let entry = (flat(c.context.into_data())?, flat(pooled.into_data())?);
                        write_tensors(
                            &path,
                            &[
                                (
                                    "caption",
                                    safetensors::Dtype::U8,
                                    vec![caption.len()],
                                    caption.as_bytes().to_vec(),
                                ),
                                (
                                    "context",
                                    safetensors::Dtype::F32,
                                    vec![tokens, width],
                                    f32_bytes(&entry.0),
                                ),
                                (
                                    "pooled",
                                    safetensors::Dtype::F32,
                                    vec![p],
                                    f32_bytes(&entry.1),
                                ),
                            ],
                        )?;
                        entry
                    }
                };
                self.entries.insert(caption.clone(), entry);
            }
            let (context, pooled) = &self.entries[caption];
            contexts.extend_from_slice(context);
            pooled_all.extend_from_slice(pooled);
        }
        let ([tokens, width], p) = self
            .shapes
            .ok_or_else(|| TrainError::Config("no captions to encode".into()))?;
        let n = captions.len();
        Ok((
            Tensor::from_data(TensorData::new(contexts, [n, tokens, width]), device),
            Tensor::from_data(TensorData::new(pooled_all, [n, p]), device),
        ))
    }
}
