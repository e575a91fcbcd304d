"""Writes the reference data the parity tests compare against.

Run through `cargo xtask fixtures`, which makes the virtual environment. Every case is a folder
under tests/fixtures/<kind>/<case>/ holding the model in diffusers layout (f16 weights, to keep
the repository small), `reference.safetensors` (f32 inputs and outputs computed by the
reference implementation from the f16 weights upcast to f32) and `manifest.json`.
"""

import argparse
import json
import pathlib
import shutil

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler
from diffusers.training_utils import compute_snr
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import save_file

# Tiny AutoencoderKL shapes: different depths, widths, group counts and options, so that a
# wrong channel flow, group split or optional layer shows up as a numeric mismatch.
VAE_CASES = {
    "tiny_2block": dict(
        config=dict(
            block_out_channels=[32, 64],
            down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2,
            layers_per_block=1,
            norm_num_groups=8,
            latent_channels=4,
            sample_size=32,
        ),
        image_size=(32, 32),
        tiled_latent=(40, 28),
    ),
    "tiny_3block_sdxl_scaling": dict(
        config=dict(
            block_out_channels=[16, 24, 32],
            down_block_types=["DownEncoderBlock2D"] * 3,
            up_block_types=["UpDecoderBlock2D"] * 3,
            layers_per_block=2,
            norm_num_groups=4,
            latent_channels=4,
            sample_size=64,
            scaling_factor=0.13025,
        ),
        image_size=(48, 64),
        tiled_latent=(26, 37),
    ),
    "tiny_4block_no_quant_no_mid_attention": dict(
        config=dict(
            block_out_channels=[8, 16, 16, 32],
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            layers_per_block=1,
            norm_num_groups=8,
            latent_channels=3,
            in_channels=3,
            out_channels=3,
            sample_size=64,
            use_quant_conv=False,
            use_post_quant_conv=False,
            mid_block_add_attention=False,
            shift_factor=0.0609,
            scaling_factor=1.5035,
        ),
        image_size=(64, 40),
        tiled_latent=(11, 9),
    ),
}


def randomise_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    """GroupNorm/LayerNorm start at weight 1, bias 0; random values make a swap visible."""
    for module in model.modules():
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            with torch.no_grad():
                shape = module.weight.shape
                module.weight.copy_(1.0 + 0.3 * torch.randn(shape, generator=generator))
                module.bias.copy_(0.3 * torch.randn(shape, generator=generator))


def write_vae_case(root: pathlib.Path, name: str, spec: dict, seed: int) -> None:
    case = root / "vae" / name
    if case.exists():
        shutil.rmtree(case)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vae = AutoencoderKL(**spec["config"])
    randomise_norms(vae, generator)
    # Store f16 weights; compute the references from exactly those values, upcast.
    vae = vae.half()
    vae.save_pretrained(case / "vae", safe_serialization=True)
    vae = vae.float().eval()

    h, w = spec["image_size"]
    image = torch.rand(2, 3, h, w, generator=generator) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(image).latent_dist
        noise_seed = seed + 1
        noise = randn_tensor(posterior.mean.shape, generator=torch.Generator().manual_seed(noise_seed))
        sample = posterior.sample(generator=torch.Generator().manual_seed(noise_seed))
        latents = torch.randn(posterior.mean.shape, generator=generator)
        decoded = vae.decode(latents).sample
        forward = vae(image).sample
        lh, lw = spec["tiled_latent"]
        tiled_latents = torch.randn(1, vae.config.latent_channels, lh, lw, generator=generator)
        tiled_decoded = vae.tiled_decode(tiled_latents).sample
        vae.enable_tiling()
        auto_tiled = vae.decode(tiled_latents).sample
        assert torch.equal(auto_tiled, tiled_decoded)

    tensors = {
        "image": image,
        "posterior_mean": posterior.mean,
        "posterior_logvar": posterior.logvar,
        "posterior_std": posterior.std,
        "noise": noise,
        "posterior_sample": sample,
        "latents": latents,
        "decoded": decoded,
        "forward": forward,
        "tiled_latents": tiled_latents,
        "tiled_decoded": tiled_decoded,
    }
    save_file({k: v.contiguous().float() for k, v in tensors.items()}, case / "reference.safetensors")
    manifest = {
        "kind": "vae",
        "reference": f"diffusers {diffusers.__version__} AutoencoderKL, torch {torch.__version__}",
        "seed": seed,
        "tolerance": 1e-4,
        "tiling": {
            "tile_latent_min_size": vae.tile_latent_min_size,
            "tile_sample_min_size": vae.tile_sample_min_size,
            "tile_overlap_factor": vae.tile_overlap_factor,
        },
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
    }
    (case / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {case}")


# Training noise schedules: each beta schedule, and zero-terminal-SNR rescaling.
DIFFUSION_CASES = {
    "linear_default": dict(),
    "scaled_linear_sd": dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
    "scaled_linear_zero_snr": dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", rescale_betas_zero_snr=True
    ),
    "linear_short_500": dict(num_train_timesteps=500, beta_start=0.0002, beta_end=0.03),
}


def write_diffusion_case(root: pathlib.Path, name: str, config: dict, seed: int) -> None:
    case = root / "diffusion" / name
    case.mkdir(parents=True, exist_ok=True)
    scheduler = DDPMScheduler(**config)
    n = scheduler.config.num_train_timesteps
    generator = torch.Generator().manual_seed(seed)
    timesteps = torch.tensor([0, 1, n // 2, n - 1, 137, n - 2], dtype=torch.long)
    x0 = torch.randn(len(timesteps), 4, 8, 8, generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    snr = compute_snr(scheduler, timesteps)
    gamma = 5.0
    clipped = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    tensors = {
        "betas": scheduler.betas,
        "alphas_cumprod": scheduler.alphas_cumprod,
        "x0": x0,
        "noise": noise,
        "noisy": scheduler.add_noise(x0, noise, timesteps),
        "velocity": scheduler.get_velocity(x0, noise, timesteps),
        "snr": snr,
        "min_snr_epsilon": clipped / snr,
        "min_snr_v_prediction": clipped / (snr + 1),
        "min_snr_sample": clipped,
    }
    save_file({k: v.contiguous().float() for k, v in tensors.items()}, case / "reference.safetensors")
    manifest = {
        "kind": "diffusion",
        "reference": f"diffusers {diffusers.__version__} DDPMScheduler and training_utils.compute_snr",
        "config": dict(scheduler.config),
        "timesteps": timesteps.tolist(),
        "min_snr_gamma": gamma,
        "tolerance": 1e-5,
    }
    (case / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    print(f"wrote {case}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=pathlib.Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for i, (name, spec) in enumerate(sorted(VAE_CASES.items())):
        write_vae_case(args.out, name, spec, seed=1000 + i)
    for i, (name, config) in enumerate(sorted(DIFFUSION_CASES.items())):
        write_diffusion_case(args.out, name, config, seed=2000 + i)


if __name__ == "__main__":
    main()
