//! The `sd` command.

mod generate;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use sd_conditioner::{ClipTokenizer, Padding, tokenize_prompt};

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
    /// Print a prompt's tokens as the text encoder sees them: the count, the 77-id chunks
    /// (75 tokens each, a new one at BREAK) and the A1111 attention weight of each id, as JSON.
    Tokenize {
        /// A `tokenizer/` folder with vocab.json and merges.txt (default: the built-in CLIP
        /// vocabulary, the same for SD 1.x, 2.x and XL).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// The padding token: `eos` (SD 1.x) or `bang` (`!`, SD 2.x).
        #[arg(long, value_enum, default_value_t = PaddingArg::Eos)]
        padding: PaddingArg,
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
        Command::Tokenize {
            tokenizer,
            padding,
            prompt,
        } => {
            let padding = match padding {
                PaddingArg::Eos => Padding::EndOfText,
                PaddingArg::Bang => Padding::Exclamation,
            };
            let tokenizer = match tokenizer {
                Some(dir) => ClipTokenizer::from_folder(dir, padding),
                None => ClipTokenizer::embedded(padding),
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

fn main() -> ExitCode {
    // Layers free and allocate buffers of tens of MiB: keep them for reuse (fewer page faults).
    sd_core::allocator::reuse_freed_memory();
    match run(Cli::parse()) {
        Ok(out) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sd: {e}");
            ExitCode::FAILURE
        }
    }
}
