//! LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3):
//! a weight `W` is used as `W + (α / r) · w · B A`, with `A` (down, `[r, in]`) and `B` (up,
//! `[out, r]`) the factors a file holds, `α` its alpha (the rank when absent), `w` the user's
//! weight.
//!
//! Files come in the layouts users download, told apart by their keys
//! ([`LoraFormat`]): kohya's / A1111's (`lora_unet_…​.lora_down.weight`, `.alpha`), LoCon's 3×3
//! convolutions in the same layout, diffusers' (`unet.….lora.down.weight`, or PEFT's
//! `lora_A`/`lora_B` behind a `unet.` / `text_encoder.` prefix) and PEFT's own state dicts.
//! [`LoraFile::open`] reads and checks one; [`merge`] adds its products into any Burn module
//! whose parameters carry checkpoint key names, and hands back what it replaced so that the
//! model can be switched back without reloading ([`Merged::restore`]). [`attach`] keeps the
//! factors beside the weights instead and adds them at forward time (PEFT's unfused form),
//! switchable per generation by dropping what it returns.
//!
//! [`LoraFile::save_kohya`] writes any of them in kohya's layout, [`LoraFile::save_diffusers`]
//! in diffusers'. [`LoraTargets`] and [`LoraNetwork`] train one: factors beside a frozen model.
//!
//! Every unmatched key and every shape that does not fit is reported by name, all at once;
//! nothing is skipped unless the caller asks for it ([`MergeOptions::ignore_unmatched`]).

mod error;
mod file;
mod hash;
mod merge;
mod network;
mod prompt;
mod save;

pub use error::{LoraError, Result};
pub use file::{Component, LoraFile, LoraFormat, LoraLayer, ModuleName};
pub use hash::addnet_hash;
pub use merge::{Attached, MergeOptions, Merged, Rename, attach, merge};
pub use network::{LoraInit, LoraNetwork, LoraTarget, LoraTargets, TargetSet};
pub use prompt::{LoraSpec, extract_prompt_loras, parse_lora_arg};
