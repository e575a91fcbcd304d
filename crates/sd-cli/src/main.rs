//! The `sd` command.

mod convert;
mod dataset;
mod eval;
mod eval_grid;
mod eval_metrics;
mod generate;
mod prompt_file;
mod train;
mod upscale;

use std::io::{ErrorKind, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use sd_conditioner::{ClipTokenizer, Padding, padding_of, tokenize_prompt};

/// A progress bar on standard error with `template` (indicatif's), or a hidden one with `-q`.
pub(crate) fn progress_bar(quiet: bool, len: u64, template: &str) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

#[derive(Parser)]
#[command(name = "sd", version, about = "Stable Diffusion in Rust")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images from a prompt and write them as PNGs (with the generation parameters in
    /// an A1111-style `parameters` text chunk).
    Generate(Box<generate::GenerateArgs>),
    /// Write a model (a single-file .safetensors checkpoint or a diffusers folder) as a
    /// diffusers folder that diffusers' `from_pretrained` opens, or as a single file in the
    /// original layout (an output ending in .safetensors).
    Convert(convert::ConvertArgs),
    /// Train on a folder of captioned images: `sd train unet` fine-tunes a diffusers folder's
    /// U-Net (or trains one from scratch with --init; a LoRA with --lora-rank), `sd train vae`
    /// the autoencoder; with checkpoints, exact resume and a loss log.
    Train(Box<train::TrainArgs>),
    /// Write a synthetic captioned dataset (`sd dataset shapes`: coloured shapes on white).
    Dataset(dataset::DatasetArgs),
    /// Measure images and models: `fid`, `kid`, `is`, `clip-score`, `stats` (Inception
    /// statistics to .npz) as the reference packages compute them; `shapes` (prompt adherence
    /// by the shapes checker).
    Eval(eval::EvalArgs),
    /// Enlarge an image: with a Real-ESRGAN file (RRDBNet ×4/×2 or the compact SRVGGNet), tile
    /// by tile, or with the Stable Diffusion x4 upscaler (a folder, guided by --prompt).
    Upscale(upscale::UpscaleArgs),
    /// Print a prompt's tokens as the text encoder sees them: the count, the 77-id chunks
    /// (75 tokens each, a new one at BREAK) and the A1111 attention weight of each id, as JSON.
    Tokenize {
        /// A `tokenizer/` folder with vocab.json and merges.txt (default: the built-in CLIP
        /// vocabulary, the same for SD 1.x, 2.x and XL).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Override the padding token: `eos` (SD 1.x) or `bang` (`!`, SD 2.x). By default a
        /// `--tokenizer` folder decides, as in the pipeline (`pad_token` in its
        /// special_tokens_map.json or tokenizer_config.json); the built-in vocabulary pads with
        /// `eos`.
        #[arg(long, value_enum)]
        padding: Option<PaddingArg>,
        prompt: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum PaddingArg {
    Eos,
    Bang,
}

fn run(cli: Cli) -> Result<String, String> {
    match cli.command {
        Command::Generate(args) => generate::run(*args),
        Command::Convert(args) => convert::run(args),
        Command::Train(args) => train::run(*args),
        Command::Dataset(args) => dataset::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Upscale(args) => upscale::run(args),
        Command::Tokenize {
            tokenizer,
            padding,
            prompt,
        } => {
            let padding = padding.map(|p| match p {
                PaddingArg::Eos => Padding::EndOfText,
                PaddingArg::Bang => Padding::Exclamation,
            });
            // The folder's own pad token unless overridden, as the pipeline reads it, so the ids
            // shown are the ids the text encoder gets.
            let tokenizer = match tokenizer {
                Some(dir) => {
                    let padding = padding.unwrap_or_else(|| padding_of(&dir));
                    ClipTokenizer::from_folder(dir, padding)
                }
                None => ClipTokenizer::embedded(padding.unwrap_or(Padding::EndOfText)),
            }
            .map_err(|e| e.to_string())?;
            let tokens = tokenize_prompt(&tokenizer, &prompt).map_err(|e| e.to_string())?;
            let json = serde_json::json!({
                "token_count": tokens.token_count,
                "chunk_count": tokens.chunks.len(),
                "chunks": tokens.chunks,
                "weights": tokens.weights,
            });
            serde_json::to_string_pretty(&json).map_err(|e| e.to_string())
        }
    }
}

/// When the process started (as near as `main` can tell), for `sd generate --verbose`.
static PROCESS_START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// See [`PROCESS_START`].
fn process_start() -> std::time::Instant {
    *PROCESS_START.get_or_init(std::time::Instant::now)
}

fn main() -> ExitCode {
    process_start();
    // Layers free and allocate buffers of tens of MiB: keep them for reuse (fewer page faults).
    sd_kernels::allocator::reuse_freed_memory();
    // CUDA builds: kernels compiled on one run are loaded on the next (`~/.cache/sd/kernels`,
    // under `$SD_CACHE` where set) instead of compiled again for minutes.
    #[cfg(feature = "cuda")]
    sd_core::kernel_cache::keep_gpu_kernels(&sd_shapes::model::default_cache().join("kernels"));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Help and version go to stdout as clap prints them.
        Err(e) if !e.use_stderr() => e.exit(),
        // A usage error is one line, as every other error (clap's own has a blank line and a
        // hint after it), with exit code 2 as usage errors conventionally have.
        Err(e) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            let first = first.strip_prefix("error: ").unwrap_or(first);
            let _ = writeln!(std::io::stderr().lock(), "sd: {first} (see sd --help)");
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(out) => {
            let mut stdout = std::io::stdout().lock();
            match writeln!(stdout, "{out}").and_then(|()| stdout.flush()) {
                Ok(()) => ExitCode::SUCCESS,
                // The reader stopped reading (`sd tokenize … | head`): nothing is wrong, so end
                // quietly and successfully, as ripgrep does. (Rust ignores SIGPIPE, so the
                // write fails instead of killing us; `println!` would panic on it.)
                Err(e) if e.kind() == ErrorKind::BrokenPipe => ExitCode::SUCCESS,
                Err(e) => fail(&format!("stdout: {e}")),
            }
        }
        Err(e) => fail(&e),
    }
}

/// Prints `sd: message` on stderr and fails. A closed stderr is no reason to panic either.
fn fail(message: &str) -> ExitCode {
    let _ = writeln!(std::io::stderr().lock(), "sd: {message}");
    ExitCode::FAILURE
}
