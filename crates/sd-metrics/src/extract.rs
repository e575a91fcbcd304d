//! Images to Inception features, batch by batch.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use image::RgbImage;

use crate::error::{MetricsError, Result};
use crate::inception::{INPUT_SIZE, InceptionV3};
use crate::preprocess::{Preprocess, inception_input};

/// Features of a batch of images, row-major.
#[derive(Debug, Clone, Default)]
pub struct BatchFeatures {
    /// Pool3 features, 2048 per image.
    pub pool3: Vec<f32>,
    /// `logits_unbiased`, 1008 per image.
    pub logits: Vec<f32>,
}

/// The Inception with one package's input preparation.
#[derive(Debug)]
pub struct FeatureExtractor<B: Backend> {
    model: InceptionV3<B>,
    device: B::Device,
    preprocess: Preprocess,
}

impl<B: Backend> FeatureExtractor<B> {
    /// `model` fed as `preprocess` says.
    pub fn new(model: InceptionV3<B>, device: B::Device, preprocess: Preprocess) -> Self {
        Self {
            model,
            device,
            preprocess,
        }
    }

    /// The features of `images` (any sizes; one forward pass for all of them: callers batch).
    pub fn features(&self, images: &[RgbImage]) -> Result<BatchFeatures> {
        if images.is_empty() {
            return Ok(BatchFeatures::default());
        }
        let n = INPUT_SIZE;
        let mut input = Vec::with_capacity(images.len() * 3 * n * n);
        for image in images {
            let (w, h) = image.dimensions();
            if w == 0 || h == 0 {
                return Err(MetricsError::Shape("an image of 0 pixels".into()));
            }
            input.extend(inception_input(
                image.as_raw(),
                w as usize,
                h as usize,
                self.preprocess,
            ));
        }
        let x = Tensor::<B, 4>::from_data(
            TensorData::new(input, [images.len(), 3, n, n]),
            &self.device,
        );
        self.features_of_input(x)
    }

    /// The features of an input already prepared (`[batch, 3, h, w]` in `[-1, 1]`).
    pub fn features_of_input(&self, x: Tensor<B, 4>) -> Result<BatchFeatures> {
        let out = self.model.forward(x);
        let read = |t: Tensor<B, 2>| {
            t.into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .map_err(|e| MetricsError::NotFinite(format!("reading features: {e:?}")))
        };
        Ok(BatchFeatures {
            pool3: read(out.pool3)?,
            logits: read(out.logits_unbiased)?,
        })
    }
}
