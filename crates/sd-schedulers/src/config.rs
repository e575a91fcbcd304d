//! `scheduler_config.json`: diffusers' scheduler configuration, with its field names and
//! defaults. One struct serves every sampler; each reads the fields it uses.

use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use sd_core::config_checks as checks;
use sd_diffusion::{BetaSchedule, NoiseScheduleConfig, PredictionType};
use serde::Deserialize;

use crate::error::{Result, SchedulerError};

/// How inference timesteps are spread over the training timesteps (Lin et al. 2023, table 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalSigmasType {
    Zero,
    SigmaMin,
}

/// diffusers' scheduler configuration. Unknown fields are ignored, as diffusers ignores them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    /// The diffusers class the file was written for, e.g. `PNDMScheduler`.
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    pub timestep_spacing: Option<TimestepSpacing>,
    pub steps_offset: usize,
    pub rescale_betas_zero_snr: bool,
    /// Clamp x̂₀ to `±clip_sample_range`. DDIM and DDPM default to true, the others to false.
    pub clip_sample: Option<bool>,
    pub clip_sample_range: f64,
    /// DDIM's default is true, PNDM's false: each sampler applies its own when absent.
    pub set_alpha_to_one: Option<bool>,
    /// PNDM: go straight to PLMS without the Runge–Kutta warm-up (Stable Diffusion 1.x).
    pub skip_prk_steps: bool,
    /// Dynamic thresholding of x̂₀ (Saharia et al. 2022, sec. 2.3): clamp to the
    /// `dynamic_thresholding_ratio` quantile of |x̂₀| (at least 1, at most `sample_max_value`)
    /// and rescale. DDPM, DDIM, DPM-Solver++, UniPC and LCM support it.
    pub thresholding: bool,
    pub dynamic_thresholding_ratio: f64,
    pub sample_max_value: f64,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub final_sigmas_type: Option<FinalSigmasType>,
    pub interpolation_type: Option<String>,
    pub timestep_type: Option<String>,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub solver_order: usize,
    pub algorithm_type: Option<String>,
    pub solver_type: Option<String>,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    pub lambda_min_clipped: Option<f64>,
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

impl SchedulerConfig {
    /// The most training timesteps a schedule may have (every published model has 1000).
    pub const MAX_TRAIN_TIMESTEPS: usize = 100_000;

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
