//! ControlNet in the pipeline (diffusers' `StableDiffusionControlNetPipeline` and the SDXL one):
//! which ControlNets steer a generation, with which conditioning image, how strongly and over
//! which part of the schedule; their residuals summed for the U-Net at each step.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use sd_core::weights::SafetensorsFile;
use sd_unet::{
    ControlNetConfig, ControlNetExtras, ControlNetModel, ControlResiduals, TextTimeConditioning,
    UNetConditioning,
};

use crate::error::{Result, SdError, model_error};
use crate::model::Model;

/// A ControlNet on disk: a diffusers folder (`config.json` +
/// `diffusion_pytorch_model.safetensors`) or a single file in the original layout
/// (`control_*.safetensors`), whose shape is the base model's U-Net's.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlNetSource {
    path: PathBuf,
    config: ControlNetConfig,
    single_file: bool,
}

impl ControlNetSource {
    /// Opens a ControlNet folder, or a single file shaped as `model`'s U-Net (its config then
    /// comes from the model, with the conditioning encoder of the released ControlNets sized to
    /// the model's VAE).
    pub fn open(path: impl AsRef<Path>, model: &Model) -> Result<Self> {
        let path = path.as_ref();
        if path.is_dir() {
            let config = ControlNetConfig::from_file(path.join("config.json"))?;
            return Ok(Self {
                path: path.to_path_buf(),
                config,
                single_file: false,
            });
        }
        // A single file carries no config: the copied half is the model's U-Net, and the
        // conditioning encoder's widths are read off its `input_hint_block` convolutions.
        let file = SafetensorsFile::open(path)?;
        let (image_channels, widths) = hint_widths(&file)?;
        let config = ControlNetConfig {
            unet: model.unet_config().clone(),
            extras: ControlNetExtras {
                conditioning_channels: image_channels,
                conditioning_embedding_out_channels: widths,
                ..ControlNetExtras::default()
            },
        };
        Ok(Self {
            path: path.to_path_buf(),
            config,
            single_file: true,
        })
    }

    /// The folder or file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The ControlNet's configuration.
    pub fn config(&self) -> &ControlNetConfig {
        &self.config
    }

    /// The name A1111 records: the file or folder name.
    pub fn name(&self) -> String {
        let stem = if self.single_file {
            self.path.file_stem()
        } else {
            self.path.file_name()
        };
        stem.map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Checks that the ControlNet was made for `model`: the same latent channels, widths,
    /// ResNets per block, text width and SDXL conditioning, and an image encoder that reaches
    /// the latent's resolution.
    pub fn check_fits(&self, model: &Model) -> Result<()> {
        let (c, u) = (&self.config.unet, model.unet_config());
        let unet_in = u.out_channels;
        let mismatch = |what: &str, ours: String, theirs: String| {
            Err(model_error(
                &self.path,
                format!(
                    "this ControlNet has {what} {ours}, the model's U-Net {theirs}: it was made \
                     for another model family"
                ),
            ))
        };
        if c.in_channels != unet_in {
            return mismatch(
                "in_channels",
                c.in_channels.to_string(),
                unet_in.to_string(),
            );
        }
        if c.block_out_channels != u.block_out_channels {
            return mismatch(
                "block_out_channels",
                format!("{:?}", c.block_out_channels),
                format!("{:?}", u.block_out_channels),
            );
        }
        let n = u.block_out_channels.len();
        if c.layers_per_block.expand(n) != u.layers_per_block.expand(n) {
            return mismatch(
                "layers_per_block",
                per_block(&c.layers_per_block, n),
                per_block(&u.layers_per_block, n),
            );
        }
        if c.cross_attention_dim.expand(n) != u.cross_attention_dim.expand(n) {
            return mismatch(
                "cross_attention_dim",
                per_block(&c.cross_attention_dim, n),
                per_block(&u.cross_attention_dim, n),
            );
        }
        if c.addition_embed_type != u.addition_embed_type {
            return mismatch(
                "addition_embed_type",
                format!("{:?}", c.addition_embed_type),
                format!("{:?}", u.addition_embed_type),
            );
        }
        if self.config.image_factor() != model.vae_scale_factor() {
            return Err(model_error(
                &self.path,
                format!(
                    "this ControlNet's image encoder shrinks by {} ({} entries in \
                     conditioning_embedding_out_channels), the model's VAE by {}",
                    self.config.image_factor(),
                    self.config.extras.conditioning_embedding_out_channels.len(),
                    model.vae_scale_factor()
                ),
            ));
        }
        Ok(())
    }

    /// Loads the weights in the model's dtype.
    pub fn load<B: Backend>(
        &self,
        model: &Model,
        device: &B::Device,
    ) -> Result<ControlNetModel<B>> {
        let net = ControlNetModel::new(&self.config, device)?;
        let options = model.weight_load_options();
        if self.single_file {
            let file = SafetensorsFile::open(&self.path)?;
            return Ok(net.load_single_file(&file, &self.config, options)?);
        }
        let file =
            SafetensorsFile::open(sd_core::weights::diffusers_weights_path(&self.path, None)?)?;
        Ok(net.load_weights(&file, options)?)
    }
}

/// The conditioning image's channels and the encoder's widths of an original-layout ControlNet:
/// `input_hint_block` is conv, (conv, stride-2 conv) × steps, conv at even indices; the widths
/// are the first conv's outputs and each stride-2 conv's.
fn hint_widths(file: &SafetensorsFile) -> Result<(usize, Vec<usize>)> {
    let mut convs: Vec<(usize, &[usize])> = file
        .entries()
        .iter()
        .filter_map(|e| {
            let key = e.key.strip_prefix("control_model.").unwrap_or(&e.key);
            let index = key
                .strip_prefix("input_hint_block.")?
                .strip_suffix(".weight")?
                .parse()
                .ok()?;
            (e.shape.len() == 4).then_some((index, e.shape.as_slice()))
        })
        .collect();
    convs.sort_by_key(|(i, _)| *i);
    let not_controlnet = || {
        model_error(
            file.path(),
            "not a ControlNet in the original layout: no `control_model.input_hint_block` \
             convolutions (conv, then pairs of convs, then the output conv)",
        )
    };
    if convs.len() < 2 || !convs.len().is_multiple_of(2) {
        return Err(not_controlnet());
    }
    let image_channels = convs[0].1[1];
    let mut widths = vec![convs[0].1[0]];
    // The stride-2 convs: the 2nd of each pair, i.e. the 3rd, 5th, … conv.
    widths.extend(
        convs[..convs.len() - 1]
            .iter()
            .skip(2)
            .step_by(2)
            .map(|(_, s)| s[0]),
    );
    Ok((image_channels, widths))
}

/// A per-block value as a list for `n` blocks.
fn per_block(value: &sd_unet::PerBlock, n: usize) -> String {
    match value.expand(n) {
        Some(v) => format!("{v:?}"),
        None => format!("{value:?} (not {n} blocks)"),
    }
}

/// One ControlNet of a generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Control {
    /// The ControlNet.
    pub net: ControlNetSource,
    /// The conditioning image `[1, channels, H, W]` in `[0, 1]`, at the output size.
    pub image: TensorData,
    /// `controlnet_conditioning_scale`: every residual is multiplied by it.
    pub scale: f64,
    /// `control_guidance_start`: the fraction of the steps before the ControlNet starts.
    pub start: f64,
    /// `control_guidance_end`: the fraction of the steps after which it stops.
    pub end: f64,
    /// What made the conditioning image from the user's (`canny`, or `none`), recorded in the
    /// PNG's parameters as A1111's ControlNet extension does.
    pub preprocessor: String,
}

impl Control {
    /// A ControlNet at full strength over every step.
    pub fn new(net: ControlNetSource, image: TensorData) -> Self {
        Self {
            net,
            image,
            scale: 1.0,
            start: 0.0,
            end: 1.0,
            preprocessor: "none".into(),
        }
    }

    /// Checks the scale, the step range and the image against the model and output size.
    pub(crate) fn check(&self, model: &Model, (w, h): (usize, usize)) -> Result<()> {
        let name = self.net.path.display();
        if !self.scale.is_finite() || self.scale.abs() > 100.0 {
            return Err(SdError::InvalidOptions(format!(
                "ControlNet {name}: scale {} is outside [-100, 100]",
                self.scale
            )));
        }
        if !(0.0..=1.0).contains(&self.start) || !(0.0..=1.0).contains(&self.end) {
            return Err(SdError::InvalidOptions(format!(
                "ControlNet {name}: start {} and end {} must lie in [0, 1]",
                self.start, self.end
            )));
        }
        if self.start >= self.end {
            return Err(SdError::InvalidOptions(format!(
                "ControlNet {name}: start {} is not before end {}",
                self.start, self.end
            )));
        }
        let channels = self.net.config.extras.conditioning_channels;
        if self.image.shape.as_slice() != [1, channels, h, w] {
            return Err(SdError::InvalidOptions(format!(
                "ControlNet {name}: the conditioning image has shape {:?}; the {w}×{h} output \
                 needs [1, {channels}, {h}, {w}]",
                self.image.shape.as_slice()
            )));
        }
        if crate::finite::non_finite_values(&self.image) > 0 {
            return Err(SdError::InvalidOptions(format!(
                "ControlNet {name}: the conditioning image holds NaN or infinite values"
            )));
        }
        self.net.check_fits(model)
    }
}

/// One loaded ControlNet with its batched image, scale and step range.
struct LoadedControl<B: Backend> {
    net: ControlNetModel<B>,
    image: Tensor<B, 4>,
    scale: f64,
    start: f64,
    end: f64,
}

/// The loaded ControlNets of one generation and what the loop needs to run them.
pub struct ControlStack<B: Backend> {
    nets: Vec<LoadedControl<B>>,
    guess_mode: bool,
}

impl<B: Backend> ControlStack<B> {
    /// Loads every ControlNet of `controls` and batches its image for `n` images (twice when
    /// guided outside guess mode). Guess mode is on when asked, or when a ControlNet pools its
    /// residuals (`global_pool_conditions`), as diffusers decides.
    pub fn load(
        model: &Model,
        controls: &[Control],
        guess_mode: bool,
        n: usize,
        guided: bool,
        device: &B::Device,
    ) -> Result<Option<Self>> {
        if controls.is_empty() {
            return Ok(None);
        }
        let mut nets = Vec::with_capacity(controls.len());
        let mut guess = guess_mode;
        for control in controls {
            let net = control.net.load::<B>(model, device)?;
            guess |= net.pools();
            nets.push((net, control));
        }
        let copies = if guided && !guess { 2 * n } else { n };
        let nets = nets
            .into_iter()
            .map(|(net, c)| {
                let image = Tensor::<B, 4>::from_data(c.image.clone(), device).cast(model.dtype());
                LoadedControl {
                    net,
                    image: Tensor::cat(vec![image; copies], 0),
                    scale: c.scale,
                    start: c.start,
                    end: c.end,
                }
            })
            .collect();
        Ok(Some(Self {
            nets,
            guess_mode: guess,
        }))
    }

    /// The summed residuals for step `i` of `total` (counted from the first step run):
    /// `input` is the U-Net's latent input (both halves when guided), `cond` its conditioning.
    /// `None` when every ControlNet is outside its step range.
    #[allow(clippy::too_many_arguments)]
    pub fn residuals(
        &self,
        i: usize,
        total: usize,
        input: Tensor<B, 4>,
        t: f64,
        cond: &UNetConditioning<'_, B>,
        guided: bool,
    ) -> Result<Option<ControlResiduals<B>>> {
        // Guess mode under guidance: the ControlNet sees the conditional half only.
        let half = guided && self.guess_mode;
        let n = input.dims()[0] / if guided { 2 } else { 1 };
        let text_time_half;
        let (input, control_cond) = if half {
            text_time_half = cond.text_time.map(|tt| TextTimeConditioning {
                text_embeds: tt.text_embeds.clone().narrow(0, n, n),
                time_ids: tt.time_ids[n..].to_vec(),
            });
            (
                input.narrow(0, n, n),
                UNetConditioning {
                    context: cond.context.clone().narrow(0, n, n),
                    text_time: text_time_half.as_ref(),
                    class_labels: cond.class_labels.map(|l| &l[n..]),
                    control: None,
                    image_prompt: None,
                },
            )
        } else {
            (input, cond.clone())
        };
        let mut sum: Option<ControlResiduals<B>> = None;
        for c in &self.nets {
            // diffusers' `controlnet_keep`: off before `start` and after `end`.
            let (begin, finish) = (i as f64 / total as f64, (i + 1) as f64 / total as f64);
            if begin < c.start || finish > c.end {
                continue;
            }
            let r = c.net.forward(
                input.clone(),
                &[t],
                &control_cond,
                c.image.clone(),
                c.scale,
                self.guess_mode,
            )?;
            sum = Some(match sum {
                Some(s) => s.sum(r)?,
                None => r,
            });
        }
        Ok(sum.map(|s| if half { s.behind_zeros() } else { s }))
    }
}

/// `[1, 3, H, W]` in [0, 1] from 8-bit RGB, as diffusers' control image processor
/// (`do_normalize=False`) makes it.
pub fn control_image_data(image: &image::RgbImage) -> TensorData {
    let (w, h) = image.dimensions();
    let (w, h) = (w as usize, h as usize);
    let mut values = vec![0f32; 3 * h * w];
    for (x, y, p) in image.enumerate_pixels() {
        for c in 0..3 {
            values[c * h * w + y as usize * w + x as usize] = p[c] as f32 / 255.0;
        }
    }
    TensorData::new(values, [1, 3, h, w])
}

/// Canny edges (Canny 1986) as a ControlNet's conditioning image: white edges on black in all
/// three channels, what the released "canny" ControlNets were trained on (their annotator ran
/// OpenCV's Canny at thresholds 100 and 200). imageproc smooths with a Gaussian of σ 1.4 first
/// and thresholds the gradient magnitude, so edges can differ from OpenCV's by a pixel.
pub fn canny_edges(image: &image::RgbImage, low: f32, high: f32) -> image::RgbImage {
    let gray = image::imageops::grayscale(image);
    let edges = imageproc::edges::canny(&gray, low, high);
    image::DynamicImage::ImageLuma8(edges).to_rgb8()
}
