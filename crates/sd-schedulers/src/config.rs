//! `scheduler_config.json`: diffusers' scheduler configuration, with its field names and
//! defaults. One struct serves every sampler; each reads the fields it uses.

use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use sd_core::config_checks as checks;
use sd_core::noise_schedule::{BetaSchedule, NoiseScheduleConfig, PredictionType};
use serde::{Deserialize, Serialize};

use crate::error::{Result, SchedulerError};

/// How inference timesteps are spread over the training timesteps (Lin et al. 2023, table 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// Evenly from `T − 1` down to 0.
    Linspace,
    /// Multiples of `T / n` from 0, plus `steps_offset` (Stable Diffusion 1.x's choice).
    Leading,
    /// Multiples of `T / n` down from `T`, minus one: always starts at `T − 1`.
    Trailing,
}

/// What the last sigma of a k-diffusion style schedule is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalSigmasType {
    /// The last sigma is 0: the final step lands on the clean sample (diffusers' default).
    Zero,
    /// The last sigma is the smallest of the training schedule.
    SigmaMin,
}

/// diffusers' scheduler configuration. Unknown fields are ignored, as diffusers ignores them.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct SchedulerConfig {
    /// The diffusers class the file was written for, e.g. `PNDMScheduler`.
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    /// The number of training timesteps `T` (1000 in Stable Diffusion).
    pub num_train_timesteps: usize,
    /// β at the first training timestep.
    pub beta_start: f64,
    /// β at the last training timestep.
    pub beta_end: f64,
    /// How the betas grow from `beta_start` to `beta_end`.
    pub beta_schedule: BetaSchedule,
    /// Explicit betas, one per training timestep, overriding the schedule.
    pub trained_betas: Option<Vec<f64>>,
    /// What the model predicts: ε, v or x₀.
    pub prediction_type: PredictionType,
    /// How inference timesteps are spread; `None`: the sampler's own default.
    pub timestep_spacing: Option<TimestepSpacing>,
    /// Added to every timestep of `leading` spacing (1 in Stable Diffusion 1.x).
    pub steps_offset: usize,
    /// Rescale the betas to zero terminal SNR (Lin et al. 2023, Algorithm 1).
    pub rescale_betas_zero_snr: bool,
    /// Clamp x̂₀ to `±clip_sample_range`. DDIM and DDPM default to true, the others to false.
    pub clip_sample: Option<bool>,
    /// The bound x̂₀ is clamped to under `clip_sample`; positive.
    pub clip_sample_range: f64,
    /// DDIM's default is true, PNDM's false: each sampler applies its own when absent.
    pub set_alpha_to_one: Option<bool>,
    /// PNDM: go straight to PLMS without the Runge–Kutta warm-up (Stable Diffusion 1.x).
    pub skip_prk_steps: bool,
    /// Dynamic thresholding of x̂₀ (Saharia et al. 2022, sec. 2.3): clamp to the
    /// `dynamic_thresholding_ratio` quantile of |x̂₀| (at least 1, at most `sample_max_value`)
    /// and rescale. DDPM, DDIM, DPM-Solver++, UniPC and LCM support it.
    pub thresholding: bool,
    /// The quantile of |x̂₀| dynamic thresholding clamps to, in (0, 1).
    pub dynamic_thresholding_ratio: f64,
    /// The largest threshold dynamic thresholding uses; positive.
    pub sample_max_value: f64,
    /// Karras et al. (2022) sigmas in place of the training schedule's, in the samplers that
    /// take them.
    pub use_karras_sigmas: bool,
    /// Sigmas evenly spaced in log between `sigma_max` and `sigma_min`.
    pub use_exponential_sigmas: bool,
    /// Beta-distributed sigmas; refused, as not implemented.
    pub use_beta_sigmas: bool,
    /// Flow-matching sigmas (`σ = 1 − t`, SD3 and Flux-style models); refused, as not
    /// implemented: read and ignored, they would sample a flow model on the wrong schedule.
    pub use_flow_sigmas: bool,
    /// What the last sigma is; `None`: zero.
    pub final_sigmas_type: Option<FinalSigmasType>,
    /// How sigmas between training timesteps are found; only `linear` is supported.
    pub interpolation_type: Option<String>,
    /// What the model is given as its timestep; only `discrete` is supported.
    pub timestep_type: Option<String>,
    /// The smallest sigma of a Karras or exponential schedule; `None` (and always, in the
    /// DPM-Solvers and UniPC): the training schedule's.
    pub sigma_min: Option<f64>,
    /// The largest sigma of a Karras or exponential schedule; `None` (and always, in the
    /// DPM-Solvers and UniPC): the training schedule's.
    pub sigma_max: Option<f64>,
    /// The solvers' order (DPM-Solver, UniPC), 1 to 3; DPM-Solver multistep takes at most 2.
    pub solver_order: usize,
    /// DPM-Solver's algorithm: `dpmsolver++` (the default) or `sde-dpmsolver++`.
    pub algorithm_type: Option<String>,
    /// DPM-Solver's second-order update, `midpoint` (the default) or `heun`; UniPC's `bh1` or
    /// `bh2`.
    pub solver_type: Option<String>,
    /// Fall back to lower orders over the last steps (in DPM-Solver multistep, only below 15
    /// steps).
    pub lower_order_final: bool,
    /// DPM-Solver multistep: take the last step with Euler's method.
    pub euler_at_final: bool,
    /// DPM-Solver: drop the training timesteps whose log-SNR λ is below this.
    pub lambda_min_clipped: Option<f64>,
    /// DDPM's variance: `fixed_small` (the default) or `fixed_large`; the learned ones are refused.
    pub variance_type: Option<String>,
    /// UniPC: solve on data predictions (x̂₀, the default) rather than noise predictions.
    pub predict_x0: Option<bool>,
    /// UniPC: the step indices after which no corrector runs.
    pub disable_corrector: Vec<usize>,
    /// LCM: the teacher's step count the consistency model was distilled on.
    pub original_inference_steps: usize,
    /// LCM: scales the timestep in the boundary-condition scalings.
    pub timestep_scaling: f64,
    /// DDIM's η (not a diffusers config field: a `step` argument there).
    #[serde(skip)]
    pub eta: f64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            class_name: None,
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: None,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            clip_sample: None,
            clip_sample_range: 1.0,
            set_alpha_to_one: None,
            skip_prk_steps: false,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_flow_sigmas: false,
            final_sigmas_type: None,
            interpolation_type: None,
            timestep_type: None,
            sigma_min: None,
            sigma_max: None,
            solver_order: 2,
            algorithm_type: None,
            solver_type: None,
            lower_order_final: true,
            euler_at_final: false,
            lambda_min_clipped: None,
            variance_type: None,
            predict_x0: None,
            disable_corrector: Vec::new(),
            original_inference_steps: 50,
            timestep_scaling: 10.0,
            eta: 0.0,
        }
    }
}

/// The fields every scheduler class takes: what is written for a class not in
/// [`CLASS_FIELDS`].
const COMMON_FIELDS: &[&str] = &[
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
];

/// The fields whose diffusers default is `None`: written as `null` when unset, as diffusers
/// writes them. Any other unset field is left out, so that diffusers takes its own default
/// (which is the one the sampler here applies when the field is absent); `null` there would
/// be read as the value `None`, which those fields do not take.
const NULLABLE_FIELDS: &[&str] = &["trained_betas", "sigma_min", "sigma_max"];

/// The arguments of each scheduler class's `__init__` (its `register_to_config` fields) in
/// diffusers 0.42, among the fields [`SchedulerConfig`] models, for the classes
/// [`crate::from_name`] knows. Checked against the configs diffusers 0.42.1 wrote for the
/// scheduler fixtures.
const CLASS_FIELDS: &[(&str, &[&str])] = &[
    (
        "DDPMScheduler",
        &[
            "num_train_timesteps",
            "beta_start",
            "beta_end",
            "beta_schedule",
            "trained_betas",
            "variance_type",
            "clip_sample",
            "prediction_type",
            "thresholding",
            "dynamic_thresholding_ratio",
            "clip_sample_range",
            "sample_max_value",
            "timestep_spacing",
            "steps_offset",
            "rescale_betas_zero_snr",
        ],
    ),
    (
        "DDIMScheduler",
        &[
            "num_train_timesteps",
            "beta_start",
            "beta_end",
            "beta_schedule",
            "trained_betas",
            "clip_sample",
            "set_alpha_to_one",
            "steps_offset",
            "prediction_type",
            "thresholding",
            "dynamic_thresholding_ratio",
            "clip_sample_range",
            "sample_max_value",
            "timestep_spacing",
            "rescale_betas_zero_snr",
        ],
    ),
    (
        "PNDMScheduler",
        &[
            "num_train_timesteps",
            "beta_start",
            "beta_end",
            "beta_schedule",
            "trained_betas",
            "skip_prk_steps",
            "set_alpha_to_one",
            "prediction_type",
            "timestep_spacing",
            "steps_offset",
        ],
    ),
    (
        "EulerDiscreteScheduler",
        &[
            "num_train_timesteps",
            "beta_start",
            "beta_end",
            "beta_schedule",
            "trained_betas",
            "prediction_type",
            "interpolation_type",
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "sigma_min",
            "sigma_max",
            "timestep_spacing",
            "timestep_type",
            "steps_offset",
            "rescale_betas_zero_snr",
            "final_sigmas_type",
        ],
    ),
    (
        "EulerAncestralDiscreteScheduler",
        &[
            "num_train_timesteps",
            "beta_start",
            "beta_end",
            "beta_schedule",
            "trained_betas",
            "prediction_type",
            "timestep_spacing",
            "steps_offset",
            "rescale_betas_zero_snr",
        ],
    ),
    (
        "HeunDiscreteScheduler",
        &[
            "num_train_timesteps",
            "beta_start",
            "beta_end",
            "beta_schedule",
            "trained_betas",
            "prediction_type",
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "clip_sample",
            "clip_sample_range",
            "timestep_spacing",
            "steps_offset",
        ],
    ),
    ("KDPM2DiscreteScheduler", K_DIFFUSION_FIELDS),
    ("KDPM2AncestralDiscreteScheduler", K_DIFFUSION_FIELDS),
    ("LMSDiscreteScheduler", K_DIFFUSION_FIELDS),
    (
        "DPMSolverMultistepScheduler",
        &[
            "num_train_timesteps",
            "beta_start",
            "beta_end",
            "beta_schedule",
            "trained_betas",
            "solver_order",
            "prediction_type",
            "thresholding",
            "dynamic_thresholding_ratio",
            "sample_max_value",
            "algorithm_type",
            "solver_type",
            "lower_order_final",
            "euler_at_final",
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "final_sigmas_type",
            "lambda_min_clipped",
            "variance_type",
            "timestep_spacing",
            "steps_offset",
            "rescale_betas_zero_snr",
        ],
    ),
    (
        "DPMSolverSinglestepScheduler",
        &[
            "num_train_timesteps",
            "beta_start",
            "beta_end",
            "beta_schedule",
            "trained_betas",
            "solver_order",
            "prediction_type",
            "thresholding",
            "dynamic_thresholding_ratio",
            "sample_max_value",
            "algorithm_type",
            "solver_type",
            "lower_order_final",
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "final_sigmas_type",
            "lambda_min_clipped",
            "variance_type",
        ],
    ),
    (
        "UniPCMultistepScheduler",
        &[
            "num_train_timesteps",
            "beta_start",
            "beta_end",
            "beta_schedule",
            "trained_betas",
            "solver_order",
            "prediction_type",
            "thresholding",
            "dynamic_thresholding_ratio",
            "sample_max_value",
            "predict_x0",
            "solver_type",
            "lower_order_final",
            "disable_corrector",
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "timestep_spacing",
            "steps_offset",
            "final_sigmas_type",
            "rescale_betas_zero_snr",
            "sigma_min",
            "sigma_max",
        ],
    ),
    (
        "LCMScheduler",
        &[
            "num_train_timesteps",
            "beta_start",
            "beta_end",
            "beta_schedule",
            "trained_betas",
            "original_inference_steps",
            "clip_sample",
            "clip_sample_range",
            "set_alpha_to_one",
            "steps_offset",
            "prediction_type",
            "thresholding",
            "dynamic_thresholding_ratio",
            "sample_max_value",
            "timestep_spacing",
            "timestep_scaling",
            "rescale_betas_zero_snr",
        ],
    ),
];

/// KDPM2, KDPM2 ancestral and LMS take the same fields.
const K_DIFFUSION_FIELDS: &[&str] = &[
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "prediction_type",
    "timestep_spacing",
    "steps_offset",
];

impl SchedulerConfig {
    /// The most training timesteps a schedule may have (every published model has 1000).
    pub const MAX_TRAIN_TIMESTEPS: usize = 100_000;

    /// The fields `class`'s `__init__` takes in diffusers 0.42 (among those modelled here), or
    /// `None` for a class this crate does not know.
    pub fn class_fields(class: &str) -> Option<&'static [&'static str]> {
        CLASS_FIELDS
            .iter()
            .find(|(name, _)| *name == class)
            .map(|(_, fields)| *fields)
    }

    /// The `scheduler_config.json` diffusers writes for this config, so that `from_pretrained`
    /// opens it: `_class_name`, `_diffusers_version`, and the fields the class takes
    /// ([`SchedulerConfig::class_fields`]; the fields every class takes, for one not known here).
    /// An unset field is left out (diffusers then applies the class's default, as the sampler
    /// here does), except those whose default is `None`, written `null`.
    ///
    /// A field the class does not take is written too when it holds something other than the
    /// default, as diffusers keeps such keys of the file it read (SD 1.5's PNDM config carries
    /// `clip_sample: false`): swapping the sampler for one that reads it (DDIM) then works as
    /// it did on the original folder. Reading the result back gives this config again.
    pub fn to_json(&self) -> serde_json::Value {
        let fields = self
            .class_name
            .as_deref()
            .and_then(Self::class_fields)
            .unwrap_or(COMMON_FIELDS);
        let as_map = |config: &Self| match serde_json::to_value(config) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        };
        let defaults = as_map(&Self::default());
        let mut out = serde_json::Map::new();
        for (key, value) in as_map(self) {
            let keep = if key.starts_with('_') {
                false
            } else if fields.contains(&key.as_str()) {
                !value.is_null() || NULLABLE_FIELDS.contains(&key.as_str())
            } else {
                !value.is_null() && defaults.get(&key) != Some(&value)
            };
            if keep {
                out.insert(key, value);
            }
        }
        if let Some(class) = &self.class_name {
            out.insert("_class_name".into(), class.clone().into());
        }
        out.insert(
            "_diffusers_version".into(),
            sd_core::DIFFUSERS_VERSION.into(),
        );
        serde_json::Value::Object(out)
    }

    /// Reads and validates a `scheduler_config.json` (see [`SchedulerConfig::from_json`]).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        // A regular file only: a FIFO would block the read forever.
        let text = sd_core::files::read_regular(path)
            .map_err(|e| SchedulerError::Config {
                path: path.display().to_string(),
                reason: match e {
                    sd_core::CoreError::Io { source, .. } => source.to_string(),
                    other => other.to_string(),
                },
            })
            .and_then(|bytes| {
                String::from_utf8(bytes).map_err(|e| SchedulerError::Config {
                    path: path.display().to_string(),
                    reason: format!("not UTF-8 text: {e}"),
                })
            })?;
        Self::from_json(&text).map_err(|e| match e {
            SchedulerError::Config { reason, .. } => SchedulerError::Config {
                path: path.display().to_string(),
                reason,
            },
            other => other,
        })
    }

    /// Parses the JSON text of a `scheduler_config.json` and validates it
    /// ([`SchedulerConfig::validate`]). diffusers writes Python's non-finite floats
    /// (`"lambda_min_clipped": -Infinity`), which are not JSON; they are read as absent, which
    /// for every field that takes them means the same default.
    pub fn from_json(text: &str) -> Result<Self> {
        let config = |reason: String| SchedulerError::Config {
            path: "<json>".into(),
            reason,
        };
        let parsed: Self = checks::parse(&without_non_finite(text), &[]).map_err(config)?;
        parsed.validate().map_err(config)?;
        Ok(parsed)
    }

    /// Checks every field against its meaning and bounds; returns the first problem found,
    /// naming the field:
    ///
    /// - `num_train_timesteps`: 2 to [`Self::MAX_TRAIN_TIMESTEPS`]; `steps_offset` below it;
    /// - `beta_start` < `beta_end`, both above 0 and below 1; `trained_betas`, when given, one
    ///   per training timestep, each above 0 and below 1;
    /// - `clip_sample_range`, `sample_max_value`, `timestep_scaling`, `sigma_min` and
    ///   `sigma_max` finite and above 0 (`sigma_min` < `sigma_max`);
    /// - `dynamic_thresholding_ratio` above 0 and at most 1;
    /// - `solver_order` 1 to 3; `original_inference_steps` 1 to [`Self::MAX_TRAIN_TIMESTEPS`];
    /// - `lambda_min_clipped` finite when given (absent is −∞).
    pub fn validate(&self) -> std::result::Result<(), String> {
        let t = self.num_train_timesteps;
        checks::size("num_train_timesteps", t, Self::MAX_TRAIN_TIMESTEPS)?;
        // A schedule interpolates between neighbouring training steps: it needs two.
        if t < 2 {
            return Err(format!(
                "field `num_train_timesteps` is {t}; it must be at least 2"
            ));
        }
        if self.steps_offset >= t {
            return Err(format!(
                "field `steps_offset` is {}; it must be below num_train_timesteps ({t})",
                self.steps_offset
            ));
        }
        checks::open_unit("beta_start", self.beta_start)?;
        checks::open_unit("beta_end", self.beta_end)?;
        if self.beta_start >= self.beta_end {
            return Err(format!(
                "field `beta_start` is {}; it must be below beta_end ({})",
                self.beta_start, self.beta_end
            ));
        }
        if let Some(betas) = &self.trained_betas {
            if betas.len() != t {
                return Err(format!(
                    "field `trained_betas` has {} values; it needs one per training timestep \
                     ({t})",
                    betas.len()
                ));
            }
            for (i, &b) in betas.iter().enumerate() {
                checks::open_unit(&format!("trained_betas[{i}]"), b)?;
            }
        }
        let positive =
            |field: &str, v: f64| checks::number(field, v, (0.0, true), (f64::MAX, false));
        positive("clip_sample_range", self.clip_sample_range)?;
        positive("sample_max_value", self.sample_max_value)?;
        positive("timestep_scaling", self.timestep_scaling)?;
        checks::number(
            "dynamic_thresholding_ratio",
            self.dynamic_thresholding_ratio,
            (0.0, true),
            (1.0, false),
        )?;
        if let Some(v) = self.sigma_min {
            positive("sigma_min", v)?;
        }
        if let Some(v) = self.sigma_max {
            positive("sigma_max", v)?;
        }
        if let (Some(lo), Some(hi)) = (self.sigma_min, self.sigma_max)
            && lo >= hi
        {
            return Err(format!(
                "field `sigma_min` is {lo}; it must be below sigma_max ({hi})"
            ));
        }
        if let Some(v) = self.lambda_min_clipped {
            checks::number(
                "lambda_min_clipped",
                v,
                (f64::MIN, false),
                (f64::MAX, false),
            )?;
        }
        checks::size("solver_order", self.solver_order, 3)?;
        checks::size(
            "original_inference_steps",
            self.original_inference_steps,
            Self::MAX_TRAIN_TIMESTEPS,
        )?;
        Ok(())
    }

    /// The training noise schedule these fields describe.
    pub fn noise_schedule(&self) -> NoiseScheduleConfig {
        NoiseScheduleConfig {
            num_train_timesteps: self.num_train_timesteps,
            beta_start: self.beta_start,
            beta_end: self.beta_end,
            beta_schedule: self.beta_schedule,
            trained_betas: self.trained_betas.clone(),
            rescale_betas_zero_snr: self.rescale_betas_zero_snr,
        }
    }

    /// The spacing, or the sampler's own default when the file names none.
    pub(crate) fn spacing_or(&self, default: TimestepSpacing) -> TimestepSpacing {
        self.timestep_spacing.unwrap_or(default)
    }

    /// x̂₀ limited as the config says: dynamic thresholding when on, else clipping to
    /// `±clip_sample_range` when `clip_sample` (or, when absent, the sampler's `clip_default`).
    pub(crate) fn limit_x0<B: Backend>(
        &self,
        x0: Tensor<B, 4>,
        clip_default: bool,
    ) -> Tensor<B, 4> {
        if self.thresholding {
            self.threshold(x0)
        } else if self.clip_sample.unwrap_or(clip_default) {
            x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        } else {
            x0
        }
    }

    /// Dynamic thresholding when on (the multistep solvers apply it to their data predictions).
    pub(crate) fn threshold<B: Backend>(&self, x0: Tensor<B, 4>) -> Tensor<B, 4> {
        if !self.thresholding {
            return x0;
        }
        let [b, c, h, w] = x0.dims();
        let n = c * h * w;
        let values = x0
            .clone()
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .unwrap_or_default();
        // Per sample: the ratio-quantile of |x̂₀| with linear interpolation, as torch.quantile.
        let limits: Vec<f32> = values
            .chunks(n.max(1))
            .map(|sample| {
                let mut abs: Vec<f64> = sample.iter().map(|v| f64::from(v.abs())).collect();
                abs.sort_by(f64::total_cmp);
                let rank = self.dynamic_thresholding_ratio * (abs.len().max(1) - 1) as f64;
                let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
                let q = abs.get(lo).copied().unwrap_or(1.0)
                    + (abs.get(hi).copied().unwrap_or(1.0) - abs.get(lo).copied().unwrap_or(1.0))
                        * (rank - lo as f64);
                q.clamp(1.0, self.sample_max_value.max(1.0)) as f32
            })
            .collect();
        let s = Tensor::<B, 4>::from_data(TensorData::new(limits, [b, 1, 1, 1]), &x0.device());
        (x0 / s).clamp(-1.0, 1.0)
    }

    /// Rejects fields whose behaviour this port does not implement, rather than ignoring them.
    pub(crate) fn reject_unsupported(&self, scheduler: &'static str) -> Result<()> {
        let unsupported = |field: &'static str, value: String| SchedulerError::Unsupported {
            scheduler,
            field,
            value,
        };
        const THRESHOLDING: [&str; 6] = [
            "DDPMScheduler",
            "DDIMScheduler",
            "DPMSolverMultistepScheduler",
            "DPMSolverSinglestepScheduler",
            "UniPCMultistepScheduler",
            "LCMScheduler",
        ];
        if self.thresholding && !THRESHOLDING.contains(&scheduler) {
            return Err(unsupported("thresholding", "true".into()));
        }
        if self.use_exponential_sigmas && self.use_karras_sigmas {
            return Err(unsupported(
                "sigma schedule",
                "both use_karras_sigmas and use_exponential_sigmas".into(),
            ));
        }
        if self.use_beta_sigmas {
            return Err(unsupported("use_beta_sigmas", "true".into()));
        }
        if self.use_flow_sigmas {
            return Err(unsupported("use_flow_sigmas", "true".into()));
        }
        if let Some(t) = self.timestep_type.as_deref().filter(|t| *t != "discrete") {
            return Err(unsupported("timestep_type", t.into()));
        }
        if let Some(t) = self
            .interpolation_type
            .as_deref()
            .filter(|t| *t != "linear")
        {
            return Err(unsupported("interpolation_type", t.into()));
        }
        if let Some(v) = self
            .variance_type
            .as_deref()
            .filter(|v| v.starts_with("learned"))
        {
            return Err(unsupported("variance_type", v.into()));
        }
        Ok(())
    }
}

/// Replaces the bare tokens `NaN`, `Infinity` and `-Infinity` outside strings with `null`.
fn without_non_finite(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_string = true;
        }
        if let Some(token) = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t))
        {
            out.push_str("null");
            rest = &rest[token.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `steps_offset` that pushes `leading`-spaced steps past the training schedule is refused
    /// by every sampler's `set_timesteps`, naming it, instead of sampling into NaN (diffusers
    /// fails indexing `alphas_cumprod` there).
    #[test]
    fn leading_steps_past_the_schedule_are_refused_by_every_sampler() {
        type B = sd_core::backend::Flex;
        let config = SchedulerConfig::from_json(
            r#"{"timestep_spacing": "leading", "steps_offset": 999, "skip_prk_steps": true}"#,
        )
        .unwrap();
        let mut checked = 0;
        for name in crate::known_names() {
            let Ok(mut scheduler) = crate::from_name::<B>(name, config.clone()) else {
                continue;
            };
            checked += 1;
            match scheduler.set_timesteps(4) {
                Err(e) => assert!(e.to_string().contains("steps_offset 999"), "{name}: {e}"),
                Ok(()) => assert!(
                    scheduler.timesteps().iter().all(|&t| t < 1000.0),
                    "{name}: {:?}",
                    scheduler.timesteps()
                ),
            }
        }
        assert!(checked >= 13, "{checked}");
    }

    /// Schedules this port does not implement are refused by every sampler, naming the field,
    /// rather than read and ignored (which would sample on the wrong sigmas).
    #[test]
    fn unimplemented_sigma_schedules_are_refused_by_name() {
        type B = sd_core::backend::Flex;
        for field in ["use_flow_sigmas", "use_beta_sigmas"] {
            let config = SchedulerConfig::from_json(&format!(r#"{{"{field}": true}}"#)).unwrap();
            for name in [
                "EulerDiscreteScheduler",
                "DPMSolverMultistepScheduler",
                "UniPCMultistepScheduler",
                "DDIMScheduler",
            ] {
                let err = crate::from_name::<B>(name, config.clone())
                    .err()
                    .unwrap_or_else(|| panic!("{name} took {field}"))
                    .to_string();
                assert!(err.contains(field) && err.contains(name), "{err}");
            }
        }
    }

    /// Every scheduler config diffusers wrote for the fixtures: the pipelines'
    /// `scheduler_config.json` files and the configs in the scheduler fixtures' manifests, as
    /// (where, JSON text).
    fn fixture_configs() -> Vec<(String, String)> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
        let mut found = Vec::new();
        let mut stack = vec![root];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                if path.is_dir() {
                    stack.push(path);
                } else if name == "scheduler_config.json" {
                    found.push((
                        path.display().to_string(),
                        std::fs::read_to_string(&path).unwrap(),
                    ));
                } else if name == "manifest.json" {
                    let manifest: serde_json::Value =
                        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
                    if manifest["scheduler_config"].is_object() {
                        found.push((
                            path.display().to_string(),
                            manifest["scheduler_config"].to_string(),
                        ));
                    }
                }
            }
        }
        found.sort();
        found
    }

    #[test]
    fn configs_write_back_as_diffusers_wrote_them() {
        let configs = fixture_configs();
        assert!(configs.len() >= 40, "{}", configs.len());
        let mut classes = std::collections::BTreeSet::new();
        for (at, text) in configs {
            let theirs: serde_json::Value = serde_json::from_str(&text).unwrap();
            let config = SchedulerConfig::from_json(&text).unwrap();
            let class = config.class_name.clone().unwrap();
            let fields = SchedulerConfig::class_fields(&class)
                .unwrap_or_else(|| panic!("{at}: unknown class {class}"));
            classes.insert(class.clone());
            let ours = config.to_json();
            assert_eq!(ours["_class_name"], class.as_str(), "{at}");
            assert_eq!(
                ours["_diffusers_version"],
                sd_core::DIFFUSERS_VERSION,
                "{at}"
            );
            let back = SchedulerConfig::from_json(&ours.to_string()).unwrap();
            assert_eq!(back, config, "{at}");
            let same = |a: &serde_json::Value, b: &serde_json::Value| match (a.as_f64(), b.as_f64())
            {
                (Some(x), Some(y)) => x == y,
                _ => a == b,
            };
            for (key, value) in ours.as_object().unwrap() {
                if key.starts_with('_') {
                    continue;
                }
                // Only the class's fields, and others only as the file had them.
                assert!(
                    fields.contains(&key.as_str()) || theirs.get(key).is_some(),
                    "{at}: `{key}` is not a {class} field"
                );
                if let Some(theirs) = theirs.get(key) {
                    assert!(same(value, theirs), "{at}: `{key}` {value} vs {theirs}");
                }
            }
            // Every class field the file gave a value is written.
            for key in fields {
                if theirs.get(*key).is_some_and(|v| !v.is_null()) {
                    assert!(ours.get(*key).is_some(), "{at}: `{key}` left out");
                }
            }
        }
        assert!(classes.len() >= 13, "{classes:?}");
    }

    #[test]
    fn unknown_classes_write_the_common_fields_and_what_was_set() {
        let config = SchedulerConfig::from_json(
            r#"{"_class_name": "FancyScheduler", "beta_schedule": "scaled_linear",
                "use_karras_sigmas": true, "solver_order": 2}"#,
        )
        .unwrap();
        let json = config.to_json();
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(
            keys,
            [
                "_class_name",
                "_diffusers_version",
                "beta_end",
                "beta_schedule",
                "beta_start",
                "num_train_timesteps",
                "prediction_type",
                "trained_betas",
                "use_karras_sigmas",
            ]
        );
        assert_eq!(
            SchedulerConfig::from_json(&json.to_string()).unwrap(),
            config
        );
        // No class at all: no `_class_name` is made up.
        let json = SchedulerConfig::default().to_json();
        assert!(json.get("_class_name").is_none());
    }

    #[test]
    fn reads_what_diffusers_writes() {
        let text = r#"{
            "_class_name": "DPMSolverMultistepScheduler",
            "_diffusers_version": "0.42.1",
            "beta_schedule": "scaled_linear",
            "lambda_min_clipped": -Infinity,
            "note": "a \"NaN\" in a string stays",
            "sigma_max": NaN,
            "timestep_spacing": "leading",
            "steps_offset": 1
        }"#;
        let config = SchedulerConfig::from_json(text).unwrap();
        assert_eq!(
            config.class_name.as_deref(),
            Some("DPMSolverMultistepScheduler")
        );
        assert_eq!(config.lambda_min_clipped, None);
        assert_eq!(config.sigma_max, None);
        assert_eq!(config.timestep_spacing, Some(TimestepSpacing::Leading));
        assert_eq!(config.steps_offset, 1);
        assert!(without_non_finite(text).contains(r#""a \"NaN\" in a string stays""#));
    }

    #[test]
    fn out_of_range_values_name_the_field() {
        let err = |text: &str| SchedulerConfig::from_json(text).unwrap_err().to_string();
        assert!(
            err(r#"{"num_train_timesteps": 1000000000}"#)
                .contains("field `num_train_timesteps` is 1000000000; it must be at most 100000"),
        );
        assert!(
            err(r#"{"steps_offset": 1000}"#)
                .contains("field `steps_offset` is 1000; it must be below num_train_timesteps"),
        );
        assert!(err(r#"{"beta_start": 0.02, "beta_end": 0.01}"#).contains("below beta_end"));
        assert!(err(r#"{"beta_end": 0}"#).contains("field `beta_end` is 0"));
        assert!(err(r#"{"steps_offset": "x"}"#).contains("field `steps_offset`: invalid type"));
        assert!(err(r#"{"trained_betas": [0.5]}"#).contains("one per training timestep"));
        SchedulerConfig::from_json(r#"{"steps_offset": 0}"#).unwrap();
    }

    #[test]
    fn bad_values_name_the_field() {
        let err = SchedulerConfig::from_json(r#"{"timestep_spacing": "sideways"}"#).unwrap_err();
        assert!(err.to_string().contains("sideways"), "{err}");
        let err = SchedulerConfig::from_json(r#"{"prediction_type": "noise"}"#).unwrap_err();
        assert!(err.to_string().contains("noise"), "{err}");
    }
}
