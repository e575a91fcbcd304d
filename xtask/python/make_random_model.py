"""Writes a diffusers folder with random weights and the published Stable Diffusion 1.5 shapes
(U-Net, VAE, CLIP ViT-L/14 text encoder, PNDM scheduler), for memory and speed measurements of
whole generations. Weights are saved in float16 to halve the disk space; the loaders upcast.
No tokenizer folder: the Rust side falls back to its built-in CLIP vocabulary."""

import argparse
import json
import pathlib

import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=pathlib.Path, required=True)
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    UNet2DConditionModel(cross_attention_dim=768, sample_size=64).half().save_pretrained(out / "unet")
    AutoencoderKL(
        block_out_channels=[128, 256, 512, 512],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=2,
        sample_size=512,
    ).half().save_pretrained(out / "vae")
    text = CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
        hidden_act="quick_gelu",
    )
    CLIPTextModel(text).half().save_pretrained(out / "text_encoder")
    PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
        skip_prk_steps=True, steps_offset=1,
    ).save_pretrained(out / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
