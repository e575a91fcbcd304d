//! Sampler names: diffusers class names and the A1111 names people know them by.

use burn::tensor::backend::Backend;

use crate::config::SchedulerConfig;
use crate::error::{Result, SchedulerError};
use crate::{
    DdimScheduler, DdpmScheduler, DpmSolverMultistepScheduler, DpmSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler, Kdpm2Scheduler,
    LcmScheduler, LmsDiscreteScheduler, PndmScheduler, Scheduler, UniPcMultistepScheduler,
};

/// The samplers this crate implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplerKind {
    /// [`DdpmScheduler`] ("DDPM"), the sampler of Ho et al. (2020).
    Ddpm,
    /// [`DdimScheduler`] ("DDIM").
    Ddim,
    /// [`PndmScheduler`] ("PNDM", or "PLMS" without the Runge–Kutta warm-up).
    Pndm,
    /// [`EulerDiscreteScheduler`] ("Euler").
    Euler,
    /// [`EulerAncestralDiscreteScheduler`] ("Euler a").
    EulerAncestral,
    /// [`HeunDiscreteScheduler`] ("Heun").
    Heun,
    /// [`LmsDiscreteScheduler`] ("LMS").
    Lms,
    /// [`LcmScheduler`] ("LCM"), for latent consistency models.
    Lcm,
    /// [`Kdpm2Scheduler`] without noise ("DPM2").
    Kdpm2,
    /// [`Kdpm2Scheduler`], ancestral ("DPM2 a").
    Kdpm2Ancestral,
    /// [`DpmSolverMultistepScheduler`] ("DPM++ 2M", "DPM++ 2M SDE").
    DpmSolverMultistep,
    /// [`DpmSolverSinglestepScheduler`] ("DPM++ 2S").
    DpmSolverSinglestep,
    /// [`UniPcMultistepScheduler`] ("UniPC").
    UniPc,
}

/// Every accepted name: (name, sampler, config changes it implies). Matching ignores case.
const NAMES: &[(&str, SamplerKind, &[Tweak])] = &[
    ("DDPMScheduler", SamplerKind::Ddpm, &[]),
    ("DDPM", SamplerKind::Ddpm, &[]),
    ("DDIMScheduler", SamplerKind::Ddim, &[]),
    ("DDIM", SamplerKind::Ddim, &[]),
    ("PNDMScheduler", SamplerKind::Pndm, &[]),
    ("PNDM", SamplerKind::Pndm, &[]),
    ("PLMS", SamplerKind::Pndm, &[Tweak::SkipPrk]),
    ("EulerDiscreteScheduler", SamplerKind::Euler, &[]),
    ("Euler", SamplerKind::Euler, &[]),
    ("Euler Karras", SamplerKind::Euler, &[Tweak::Karras]),
    (
        "EulerAncestralDiscreteScheduler",
        SamplerKind::EulerAncestral,
        &[],
    ),
    ("Euler a", SamplerKind::EulerAncestral, &[]),
    ("Euler Ancestral", SamplerKind::EulerAncestral, &[]),
    ("HeunDiscreteScheduler", SamplerKind::Heun, &[]),
    ("Heun", SamplerKind::Heun, &[]),
    ("Heun Karras", SamplerKind::Heun, &[Tweak::Karras]),
    ("KDPM2DiscreteScheduler", SamplerKind::Kdpm2, &[]),
    ("DPM2", SamplerKind::Kdpm2, &[]),
    ("DPM2 Karras", SamplerKind::Kdpm2, &[Tweak::Karras]),
    (
        "KDPM2AncestralDiscreteScheduler",
        SamplerKind::Kdpm2Ancestral,
        &[],
    ),
    ("DPM2 a", SamplerKind::Kdpm2Ancestral, &[]),
    (
        "DPM2 a Karras",
        SamplerKind::Kdpm2Ancestral,
        &[Tweak::Karras],
    ),
    (
        "DPMSolverSinglestepScheduler",
        SamplerKind::DpmSolverSinglestep,
        &[],
    ),
    ("DPM++ 2S", SamplerKind::DpmSolverSinglestep, &[Tweak::Ode]),
    (
        "DPM++ 2S Karras",
        SamplerKind::DpmSolverSinglestep,
        &[Tweak::Ode, Tweak::Karras],
    ),
    ("UniPCMultistepScheduler", SamplerKind::UniPc, &[]),
    ("UniPC", SamplerKind::UniPc, &[]),
    ("UniPC Karras", SamplerKind::UniPc, &[Tweak::Karras]),
    ("LCMScheduler", SamplerKind::Lcm, &[]),
    ("LCM", SamplerKind::Lcm, &[]),
    ("LMSDiscreteScheduler", SamplerKind::Lms, &[]),
    ("LMS", SamplerKind::Lms, &[]),
    ("LMS Karras", SamplerKind::Lms, &[Tweak::Karras]),
    (
        "DPMSolverMultistepScheduler",
        SamplerKind::DpmSolverMultistep,
        &[],
    ),
    ("DPM++ 2M", SamplerKind::DpmSolverMultistep, &[Tweak::Ode]),
    (
        "DPM++ 2M Karras",
        SamplerKind::DpmSolverMultistep,
        &[Tweak::Ode, Tweak::Karras],
    ),
    (
        "DPM++ 2M SDE",
        SamplerKind::DpmSolverMultistep,
        &[Tweak::Sde],
    ),
    (
        "DPM++ 2M SDE Karras",
        SamplerKind::DpmSolverMultistep,
        &[Tweak::Sde, Tweak::Karras],
    ),
];

#[derive(Debug, Clone, Copy)]
enum Tweak {
    Karras,
    SkipPrk,
    Ode,
    Sde,
}

/// Every name [`from_name`] accepts.
pub fn known_names() -> Vec<&'static str> {
    NAMES.iter().map(|(n, ..)| *n).collect()
}

/// A sampler by diffusers class name or A1111 name ("DPM++ 2M Karras", "Euler a", ...), from a
/// model's scheduler config; the name's implied settings (Karras sigmas, SDE) override it, as
/// `SchedulerClass.from_config(pipe.scheduler.config, use_karras_sigmas=True)` does.
pub fn from_name<B: Backend>(
    name: &str,
    mut config: SchedulerConfig,
) -> Result<Box<dyn Scheduler<B>>> {
    let (_, kind, tweaks) = NAMES
        .iter()
        .find(|(n, ..)| n.eq_ignore_ascii_case(name.trim()))
        .ok_or_else(|| SchedulerError::UnknownScheduler {
            name: name.to_string(),
            known: known_names().join(", "),
        })?;
    for tweak in *tweaks {
        match tweak {
            Tweak::Karras => config.use_karras_sigmas = true,
            Tweak::SkipPrk => config.skip_prk_steps = true,
            Tweak::Ode => config.algorithm_type = Some("dpmsolver++".into()),
            Tweak::Sde => config.algorithm_type = Some("sde-dpmsolver++".into()),
        }
    }
    build(*kind, config)
}

/// The sampler a config's `_class_name` names.
pub fn from_config<B: Backend>(config: SchedulerConfig) -> Result<Box<dyn Scheduler<B>>> {
    let name = config.class_name.clone().unwrap_or_default();
    from_name(&name, config)
}

fn build<B: Backend>(kind: SamplerKind, config: SchedulerConfig) -> Result<Box<dyn Scheduler<B>>> {
    Ok(match kind {
        SamplerKind::Ddpm => Box::new(DdpmScheduler::new(config)?),
        SamplerKind::Ddim => Box::new(DdimScheduler::new(config)?),
        SamplerKind::Pndm => Box::new(PndmScheduler::<B>::new(config)?),
        SamplerKind::Euler => Box::new(EulerDiscreteScheduler::new(config)?),
        SamplerKind::EulerAncestral => Box::new(EulerAncestralDiscreteScheduler::new(config)?),
        SamplerKind::Kdpm2 => Box::new(Kdpm2Scheduler::<B>::new(config, false)?),
        SamplerKind::Kdpm2Ancestral => Box::new(Kdpm2Scheduler::<B>::new(config, true)?),
        SamplerKind::DpmSolverSinglestep => {
            Box::new(DpmSolverSinglestepScheduler::<B>::new(config)?)
        }
        SamplerKind::UniPc => Box::new(UniPcMultistepScheduler::<B>::new(config)?),
        SamplerKind::Lcm => Box::new(LcmScheduler::new(config)?),
        SamplerKind::Lms => Box::new(LmsDiscreteScheduler::<B>::new(config)?),
        SamplerKind::Heun => Box::new(HeunDiscreteScheduler::<B>::new(config)?),
        SamplerKind::DpmSolverMultistep => Box::new(DpmSolverMultistepScheduler::<B>::new(config)?),
    })
}
