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
use sd_conditioner::ClipTextModel;
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
        let view = file.tensor("last_hidden_state").ok()?;
        if !same_ids || view.dtype() != safetensors::Dtype::F32 || view.shape() != self.shape {
            return None;
        }
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        values.iter().all(|v| v.is_finite()).then_some(values)
    }

    fn write(&self, path: &Path, ids: &[u32], values: &[f32]) -> Result<()> {
        let ids_bytes: Vec<u8> = ids.iter().flat_map(|x| x.to_le_bytes()).collect();
        let value_bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        let tensors = [
            (
                "input_ids",
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::U32,
                    vec![ids.len()],
                    &ids_bytes,
                ),
            ),
            (
                "last_hidden_state",
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    self.shape.to_vec(),
                    &value_bytes,
                ),
            ),
        ];
        let mut views = Vec::new();
        for (name, view) in tensors {
            views.push((name, view.map_err(|e| io(path, e))?));
        }
        let bytes = safetensors::serialize(views, None).map_err(|e| io(path, e))?;
        sd_core::files::write_atomic(path, |out| {
            use std::io::Write;
            out.write_all(&bytes).map_err(|e| e.to_string())
        })?;
        Ok(())
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
