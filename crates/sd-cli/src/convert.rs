//! `sd convert`: a model to a diffusers folder ([`sd::Model::save`]) or to a single-file
//! checkpoint in the original layout ([`sd::Model::save_single_file`]); with `--inception`, the
//! FID Inception's pickled PyTorch weights to a `.safetensors` with the same keys.

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::DType;
use clap::{Args, ValueEnum};
use sd::Model;

#[derive(Args)]
pub struct ConvertArgs {
    /// The model to read: a single-file .safetensors checkpoint or a diffusers folder.
    input: PathBuf,
    /// What to write: a diffusers folder (must not exist yet, or be empty), or, for a path
    /// ending in `.safetensors`, a single-file checkpoint in the original layout (A1111,
    /// ComfyUI, stable-diffusion.cpp); an existing file there is replaced.
    output: PathBuf,
    /// For a single-file checkpoint: a diffusers folder whose component configs and tokenizers
    /// to use (as with `sd generate --config`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The dtype of the written weights (default: the source's).
    #[arg(long, value_enum)]
    dtype: Option<DTypeArg>,
    /// The input is the FID Inception's weights (pytorch-fid's
    /// pt_inception-2015-12-05-6726825d.pth or torch-fidelity's
    /// weights-inception-2015-12-05-6726825d.pth, read without running pickled code): checked
    /// key for key and written as a .safetensors with the same keys, which `sd eval
    /// --inception` reads.
    #[arg(long)]
    inception: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DTypeArg {
    F32,
    F16,
    Bf16,
}

/// The backend the weights pass through: a CPU one where compiled in, as nothing is computed
/// and the weights go from file to file through host memory.
#[cfg(feature = "flex")]
type SaveBackend = sd::backend::Flex;
#[cfg(all(not(feature = "flex"), feature = "ndarray"))]
type SaveBackend = sd::backend::NdArray;
#[cfg(not(any(feature = "flex", feature = "ndarray")))]
type SaveBackend = sd::backend::DefaultBackend;

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "f32",
    }
}

pub fn run(args: ConvertArgs) -> Result<String, String> {
    if args.inception {
        return convert_inception(&args);
    }
    // Everything that needs no weights is checked first: a bad output costs no loading time.
    let writes_single_file = args
        .output
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    let input = &args.input;
    let meta = std::fs::metadata(input)
        .map_err(|e| format!("{}: cannot read the model: {e}", input.display()))?;
    if meta.is_dir() && args.config.is_some() {
        return Err(format!(
            "{}: --config is for single-file checkpoints; a diffusers folder has its own configs",
            input.display()
        ));
    }
    if writes_single_file {
        sd_core::files::check_output_path(&args.output).map_err(|e| e.to_string())?;
    } else {
        sd::check_model_output(&args.output).map_err(|e| e.to_string())?;
    }
    let model = if meta.is_dir() {
        Model::from_folder(input, None)
    } else {
        Model::from_single_file(input, args.config.as_deref())
    }
    .map_err(|e| e.to_string())?;
    let dtype = match args.dtype {
        Some(DTypeArg::F32) => DType::F32,
        Some(DTypeArg::F16) => DType::F16,
        Some(DTypeArg::Bf16) => DType::BF16,
        None => model
            .stored_dtype()
            .filter(|d| matches!(d, DType::F16 | DType::BF16))
            .unwrap_or(DType::F32),
    };
    let started = Instant::now();
    let what = if writes_single_file {
        model.save_single_file::<SaveBackend>(&args.output, dtype, &Default::default())
    } else {
        model.save::<SaveBackend>(&args.output, dtype, &Default::default())
    };
    what.map_err(|e| e.to_string())?;
    Ok(format!(
        "wrote {} ({} {}, {} weights) in {:.1} s",
        args.output.display(),
        model.family().name(),
        if writes_single_file {
            "single-file checkpoint"
        } else {
            "diffusers folder"
        },
        dtype_name(dtype),
        started.elapsed().as_secs_f64()
    ))
}

/// `sd convert --inception IN OUT.safetensors`: the weights go through [`InceptionV3::load`]
/// (every key with its shape, nothing else) and out under the same keys.
///
/// [`InceptionV3::load`]: sd_metrics::InceptionV3::load
fn convert_inception(args: &ConvertArgs) -> Result<String, String> {
    let output = &args.output;
    if !output
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
    {
        return Err(format!(
            "{}: --inception writes a .safetensors file; name the output *.safetensors",
            output.display()
        ));
    }
    if args.config.is_some() {
        return Err("--config is for Stable Diffusion checkpoints, not with --inception".into());
    }
    sd_core::files::check_output_path(output).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let model = sd_metrics::InceptionV3::<SaveBackend>::load(&args.input, &Default::default())
        .map_err(|e| e.to_string())?;
    let dtype = match args.dtype {
        Some(DTypeArg::F16) => DType::F16,
        Some(DTypeArg::Bf16) => DType::BF16,
        Some(DTypeArg::F32) | None => DType::F32,
    };
    let keys = |k: &str| Some(k.to_string());
    sd_core::weights::save_safetensors(&model, output, &keys, dtype, None)
        .map_err(|e| e.to_string())?;
    Ok(format!(
        "wrote {} (the FID Inception, {} weights) in {:.1} s",
        output.display(),
        dtype_name(dtype),
        started.elapsed().as_secs_f64()
    ))
}
