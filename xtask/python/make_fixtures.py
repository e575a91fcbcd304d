"""Writes the reference data the parity tests compare against.

Run through `cargo xtask fixtures`, which makes the virtual environment. Every case is a folder
under tests/fixtures/<kind>/<case>/ holding the model in diffusers layout (f16 weights, to keep
the repository small), `reference.safetensors` (f32 inputs and outputs computed by the
reference implementation from the f16 weights upcast to f32) and `manifest.json`.
"""

import argparse
import gzip
import importlib
import importlib.util
import inspect
import json
import zlib
import math
import pathlib
import shutil

import diffusers
import transformers
import torch
from diffusers import (
    AutoencoderKL,
    UNet2DConditionModel,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
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
        "config": finite_json(dict(scheduler.config)),
        "timesteps": timesteps.tolist(),
        "min_snr_gamma": gamma,
        "tolerance": 1e-5,
    }
    (case / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    print(f"wrote {case}")


# Samplers, stepped on a stand-in model so that no U-Net is needed (see stand_in_model).
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SAMPLERS = {
    "ddpm": (DDPMScheduler, dict(clip_sample=False), {}),
    # Stable Diffusion 1.x's own scheduler: PLMS without the Runge-Kutta warm-up.
    "pndm_plms": (PNDMScheduler, dict(skip_prk_steps=True), {}),
    "pndm_prk": (PNDMScheduler, {}, {}),
    "ddim": (DDIMScheduler, dict(clip_sample=False, set_alpha_to_one=False), {}),
    "ddim_eta": (DDIMScheduler, dict(clip_sample=False, set_alpha_to_one=False), dict(eta=0.7)),
    "euler": (EulerDiscreteScheduler, {}, {}),
    "euler_karras": (EulerDiscreteScheduler, dict(use_karras_sigmas=True), {}),
    "euler_exponential": (EulerDiscreteScheduler, dict(use_exponential_sigmas=True), {}),
    "euler_ancestral": (EulerAncestralDiscreteScheduler, {}, {}),
    "heun": (HeunDiscreteScheduler, {}, {}),
    "heun_karras": (HeunDiscreteScheduler, dict(use_karras_sigmas=True), {}),
    "kdpm2": (KDPM2DiscreteScheduler, {}, {}),
    "kdpm2_karras": (KDPM2DiscreteScheduler, dict(use_karras_sigmas=True), {}),
    "kdpm2_ancestral": (KDPM2AncestralDiscreteScheduler, {}, {}),
    "dpmpp_2s": (DPMSolverSinglestepScheduler, {}, {}),
    "dpmpp_2s_sde_karras_heun": (
        DPMSolverSinglestepScheduler,
        dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True, solver_type="heun"),
        {},
    ),
    "unipc": (UniPCMultistepScheduler, {}, {}),
    # Dynamic thresholding (Saharia et al. 2022) on the samplers that have it.
    "ddim_thresholding": (DDIMScheduler, dict(clip_sample=False, thresholding=True, sample_max_value=1.5), {}),
    "dpmpp_2m_thresholding": (DPMSolverMultistepScheduler, dict(thresholding=True, sample_max_value=1.5), {}),
    "unipc_thresholding": (UniPCMultistepScheduler, dict(thresholding=True, sample_max_value=1.5), {}),
    # bh1 with a final σ of 0 gives NaN in diffusers (B(h) = h = −∞ times a zero residual),
    # so this case ends at σ_min.
    "unipc_bh1_order3_karras": (
        UniPCMultistepScheduler,
        dict(solver_type="bh1", solver_order=3, use_karras_sigmas=True, final_sigmas_type="sigma_min"),
        {},
    ),
    "lcm": (LCMScheduler, {}, {}),
    "lms": (LMSDiscreteScheduler, {}, {}),
    "lms_karras": (LMSDiscreteScheduler, dict(use_karras_sigmas=True), {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}, {}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, dict(use_karras_sigmas=True), {}),
    "dpmpp_2m_exponential": (DPMSolverMultistepScheduler, dict(use_exponential_sigmas=True), {}),
    "dpmpp_2m_sde_karras": (
        DPMSolverMultistepScheduler,
        dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True),
        {},
    ),
}
SPACINGS = {
    # Stable Diffusion 1.x's scheduler_config: leading spacing with steps_offset 1.
    "leading": dict(timestep_spacing="leading", steps_offset=1),
    "linspace": dict(timestep_spacing="linspace"),
    "trailing": dict(timestep_spacing="trailing"),
}
STEP_COUNTS = [1, 4, 20, 50]


def stand_in_model(x: torch.Tensor, t: float, num_train_timesteps: int) -> torch.Tensor:
    """A deterministic, nonlinear denoiser the Rust tests compute the same way. Close to the
    identity, so that as an ε- or v-prediction it keeps x̂₀ and the samples of order one, where
    float32 resolves 1e-5."""
    return x * (0.9 + 0.1 * torch.tanh(x)) * (0.9 + 0.1 * float(t) / num_train_timesteps)


def run_sampler(cls, config: dict, steps: int, step_kwargs: dict, latents: torch.Tensor, seed: int):
    scheduler = cls(**config)
    scheduler.set_timesteps(steps)
    sample = latents * scheduler.init_noise_sigma
    generator = torch.Generator().manual_seed(seed)
    trace, inputs = [], []
    # Record every draw the sampler makes, in order, so that the Rust side can replay them.
    module = importlib.import_module(cls.__module__)
    original_randn = getattr(module, "randn_tensor", None)
    noises = []
    kwargs = dict(step_kwargs)
    if "generator" in inspect.signature(cls.step).parameters:
        kwargs["generator"] = generator

    def recording_randn(*args, **kwargs):
        noise = original_randn(*args, **kwargs)
        noises.append(noise.clone())
        return noise

    if original_randn is not None:
        module.randn_tensor = recording_randn
    try:
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(sample, t)
            output = stand_in_model(model_input, t, scheduler.config.num_train_timesteps)
            sample = scheduler.step(output, t, sample, **kwargs).prev_sample
            inputs.append(model_input)
            trace.append(sample)
    finally:
        if original_randn is not None:
            module.randn_tensor = original_randn
    sigmas = getattr(scheduler, "sigmas", None)
    info = {
        "timesteps": [float(t) for t in scheduler.timesteps],
        "init_noise_sigma": float(scheduler.init_noise_sigma),
        "sigmas": [float(s) for s in sigmas] if sigmas is not None and cls is not DDIMScheduler else None,
    }
    tensors = {
        f"steps_{steps}_trace": torch.stack(trace),
        f"steps_{steps}_model_inputs": torch.stack(inputs),
    }
    if noises:
        tensors[f"steps_{steps}_noise"] = torch.stack(noises)
    return info, tensors


def finite_json(value):
    """Non-finite floats as null: manifests stay standard JSON (diffusers writes -Infinity).
    diffusers' `_use_default_values` is a set in no fixed order: left out."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items() if k != "_use_default_values"}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


# With zero terminal SNR diffusers' k-diffusion samplers put ᾱ = 2⁻²⁴ last, so σ_max = √(2²⁴ − 1),
# which lies a hair below a float32 rounding midpoint: IEEE sqrt rounds it to 4095.99976, PyTorch's
# vectorised sqrt to 4096. Euler's first step then cancels terms of 10⁴, so that one ulp moves the
# samples by about 3e-5. A known, documented difference, not drift.
TOLERANCE_OVERRIDES = {
    "euler_v_prediction_zero_snr": (3e-4, "sigma_max 4096 is a float32 rounding tie (see make_fixtures.py)"),
}


def write_scheduler_case(root: pathlib.Path, name: str, cls, config: dict, step_kwargs: dict, seed: int) -> None:
    case = root / "schedulers" / name
    case.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 4, 4, generator=generator)
    tensors = {"latents": latents}
    runs = {}
    # diffusers' PRK warm-up needs four steps (it fails on fewer).
    counts = [n for n in STEP_COUNTS if n >= 4] if name.startswith("pndm_prk") else STEP_COUNTS
    for steps in counts:
        info, t = run_sampler(cls, config, steps, step_kwargs, latents, seed + steps)
        runs[str(steps)] = info
        tensors.update(t)
    save_file({k: v.contiguous().float() for k, v in tensors.items()}, case / "reference.safetensors")
    saved = cls(**config).config
    manifest = {
        "kind": "scheduler",
        "reference": f"diffusers {diffusers.__version__} {cls.__name__}",
        "scheduler_config": {**dict(saved), "_class_name": cls.__name__},
        "step_kwargs": step_kwargs,
        "model": "x * (0.9 + 0.1 * tanh(x)) * (0.9 + 0.1 * t / num_train_timesteps)",
        "runs": runs,
        "tolerance": TOLERANCE_OVERRIDES.get(name, (1e-5,))[0],
    }
    if name in TOLERANCE_OVERRIDES:
        manifest["tolerance_reason"] = TOLERANCE_OVERRIDES[name][1]
    manifest = finite_json(manifest)
    (case / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str, allow_nan=False) + "\n")
    print(f"wrote {case}")


def scheduler_cases():
    cases = {}
    for sampler, (cls, extra, step_kwargs) in SAMPLERS.items():
        # The single-step solver has no timestep_spacing: it always spaces evenly.
        spacings = {"linspace": {}} if cls is DPMSolverSinglestepScheduler else SPACINGS
        for prediction in ["epsilon", "v_prediction"]:
            for spacing, spacing_config in spacings.items():
                config = {**SD_BETAS, **extra, **spacing_config, "prediction_type": prediction}
                cases[f"{sampler}_{prediction}_{spacing}"] = (cls, config, step_kwargs)
    # SD 2.x-style zero terminal SNR with trailing spacing and v-prediction.
    for sampler in ["ddim", "euler", "dpmpp_2m"]:
        cls, extra, step_kwargs = SAMPLERS[sampler]
        config = {
            **SD_BETAS,
            **extra,
            "timestep_spacing": "trailing",
            "prediction_type": "v_prediction",
            "rescale_betas_zero_snr": True,
        }
        cases[f"{sampler}_v_prediction_zero_snr"] = (cls, config, step_kwargs)
    return cases


# Tiny UNet2DConditionModel shapes like SD 1.x (conv projections, one head count), SD 2.x
# (linear projections, per-block heads, upcast attention), SDXL (two transformer layers, text_time
# add-embeddings, wide context) and inpainting (9 input channels).
UNET_CASES = {
    "sd1_like": dict(
        config=dict(
            block_out_channels=[32, 64],
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
            layers_per_block=2,
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
            sample_size=16,
        ),
        latent=(16, 16),
        context=(7, 32),
    ),
    "sd2_like_odd_size": dict(
        config=dict(
            block_out_channels=[16, 32, 32],
            down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            layers_per_block=1,
            cross_attention_dim=24,
            attention_head_dim=[2, 4, 4],
            use_linear_projection=True,
            upcast_attention=True,
            norm_num_groups=8,
            sample_size=16,
        ),
        latent=(12, 10),
        context=(9, 24),
    ),
    "sdxl_like": dict(
        config=dict(
            block_out_channels=[16, 32, 32],
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            layers_per_block=1,
            transformer_layers_per_block=[1, 2, 2],
            cross_attention_dim=32,
            attention_head_dim=[2, 4, 4],
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=16 + 6 * 8,
            norm_num_groups=8,
            sample_size=16,
        ),
        latent=(16, 16),
        context=(11, 32),
        pooled=16,
    ),
    # The x4 upscaler's shape: 7 input channels (latents + the low-resolution image), the noise
    # level as a class label, and blocks whose first attention attends to the text too.
    "upscaler_like": dict(
        config=dict(
            block_out_channels=[16, 32, 32],
            in_channels=7,
            out_channels=4,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            only_cross_attention=[True, True, False],
            num_class_embeds=1000,
            layers_per_block=1,
            cross_attention_dim=24,
            attention_head_dim=8,
            use_linear_projection=True,
            norm_num_groups=8,
            sample_size=16,
        ),
        latent=(12, 12),
        context=(7, 24),
        class_labels=[20, 350],
        single_file=False,
    ),
    "inpainting_like": dict(
        config=dict(
            in_channels=9,
            block_out_channels=[32, 64],
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
            layers_per_block=1,
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=8,
            sample_size=16,
        ),
        latent=(16, 16),
        context=(7, 32),
    ),
}
UNET_TIMESTEPS = [[0.0, 1.0], [500.0, 999.0], [377.5, 999.0]]


def diffusers_to_ldm_unet(state: dict, config) -> dict:
    """The original single-file layout (`model.diffusion_model.*`) of a diffusers U-Net state
    dict. Proven below by diffusers' own converter mapping it back."""
    per = config["layers_per_block"] + 1
    has_attention = {i: "CrossAttn" in t for i, t in enumerate(config["up_block_types"])}
    fixed = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "add_embedding.linear_1.": "label_emb.0.0.",
        "add_embedding.linear_2.": "label_emb.0.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
    }

    def resnet(rest: str) -> str:
        for new, old in [
            ("norm1", "in_layers.0"),
            ("conv1", "in_layers.2"),
            ("norm2", "out_layers.0"),
            ("conv2", "out_layers.3"),
            ("time_emb_proj", "emb_layers.1"),
            ("conv_shortcut", "skip_connection"),
        ]:
            rest = rest.replace(new, old)
        return rest

    out = {}
    for key, value in state.items():
        prefix = next((p for p in fixed if key.startswith(p)), None)
        parts = key.split(".")
        if prefix is not None:
            ldm = fixed[prefix] + key[len(prefix):]
        elif parts[0] == "down_blocks":
            b, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                ldm = f"input_blocks.{1 + b * per + j}.0.{resnet(rest)}"
            elif kind == "attentions":
                ldm = f"input_blocks.{1 + b * per + j}.1.{rest}"
            else:
                ldm = f"input_blocks.{1 + b * per + per - 1}.0.op.{rest.removeprefix('conv.')}"
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            ldm = f"middle_block.{2 * j}.{resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
        else:
            b, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                ldm = f"output_blocks.{b * per + j}.0.{resnet(rest)}"
            elif kind == "attentions":
                ldm = f"output_blocks.{b * per + j}.1.{rest}"
            else:
                ldm = f"output_blocks.{b * per + per - 1}.{2 if has_attention[b] else 1}.{rest}"
        out["model.diffusion_model." + ldm] = value
    return out


def write_unet_case(root: pathlib.Path, name: str, spec: dict, seed: int) -> None:
    case = root / "unet" / name
    if case.exists():
        shutil.rmtree(case)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**spec["config"])
    randomise_norms(unet, generator)
    unet = unet.half()
    unet.save_pretrained(case / "unet", safe_serialization=True)
    state = {k: v.contiguous() for k, v in unet.state_dict().items()}
    if spec.get("single_file", True):
        ldm = diffusers_to_ldm_unet(state, unet.config)
        back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
        assert back.keys() == state.keys(), set(back) ^ set(state)
        assert all(torch.equal(back[k], state[k]) for k in state)
        save_file(ldm, case / "unet_single_file.safetensors")
    unet = unet.float().eval()
    h, w = spec["latent"]
    latents = torch.randn(2, unet.config.in_channels, h, w, generator=generator)
    tokens, width = spec["context"]
    context = torch.randn(2, tokens, width, generator=generator)
    tensors = {"latents": latents, "context": context}
    kwargs = {}
    if "pooled" in spec:
        text_embeds = torch.randn(2, spec["pooled"], generator=generator)
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0], [48.0, 40.0, 4.0, 2.0, 64.0, 64.0]])
        tensors.update(text_embeds=text_embeds, time_ids=time_ids)
        kwargs["added_cond_kwargs"] = dict(text_embeds=text_embeds, time_ids=time_ids)
    if "class_labels" in spec:
        labels = torch.tensor(spec["class_labels"])
        tensors["class_labels"] = labels.float()
        kwargs["class_labels"] = labels
    with torch.no_grad():
        for i, t in enumerate(UNET_TIMESTEPS):
            out = unet(latents, torch.tensor(t), encoder_hidden_states=context, **kwargs).sample
            tensors[f"output_{i}"] = out
    save_file({k: v.contiguous().float() for k, v in tensors.items()}, case / "reference.safetensors")
    manifest = {
        "kind": "unet",
        "reference": f"diffusers {diffusers.__version__} UNet2DConditionModel, torch {torch.__version__}",
        "timesteps": UNET_TIMESTEPS,
        "parameters": sum(p.numel() for p in unet.parameters()),
        "tolerance": 1e-4,
    }
    (case / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {case}")


# Tiny CLIP text towers: OpenAI-style (quick_gelu), OpenCLIP-style with a projection (gelu),
# and an old config whose eos_token_id is 2 (pooled at the largest id).
CLIP_CASES = {
    "clip_quick_gelu": dict(hidden_act="quick_gelu", eos_token_id=999, projection=False),
    "openclip_gelu_projection": dict(hidden_act="gelu", eos_token_id=999, projection=True),
    "legacy_eos_2": dict(hidden_act="quick_gelu", eos_token_id=2, projection=False),
}


def write_clip_case(root: pathlib.Path, name: str, spec: dict, seed: int) -> None:
    case = root / "clip" / name
    if case.exists():
        shutil.rmtree(case)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        projection_dim=24,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=spec["hidden_act"],
        bos_token_id=998,
        eos_token_id=spec["eos_token_id"],
        pad_token_id=999,
    )
    model = (CLIPTextModelWithProjection if spec["projection"] else CLIPTextModel)(config)
    randomise_norms(model, generator)
    model = model.half()
    model.save_pretrained(case / "text_encoder", safe_serialization=True)
    model = model.float().eval()
    # Two prompts of different lengths, padded with end-of-text to 77 as SD 1.x does.
    ids = torch.full((2, 77), 999, dtype=torch.long)
    for row, length in enumerate([12, 40]):
        ids[row, 0] = 998
        ids[row, 1 : length + 1] = torch.randint(3, 990, (length,), generator=generator)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    tensors = {
        "input_ids": ids.float(),
        "last_hidden_state": out.last_hidden_state,
        "pooled": out.text_embeds if spec["projection"] else out.pooler_output,
    }
    if spec["projection"]:
        # CLIPTextModelWithProjection returns text_embeds; the pooled state itself is the EOS row.
        tensors["text_embeds"] = out.text_embeds
        del tensors["pooled"]
    for i, h in enumerate(out.hidden_states):
        tensors[f"hidden_state_{i}"] = h
    save_file({k: v.contiguous().float() for k, v in tensors.items()}, case / "reference.safetensors")
    manifest = {
        "kind": "clip",
        "reference": f"transformers {transformers.__version__} {type(model).__name__}",
        "hidden_states": len(out.hidden_states),
        "tolerance": 1e-4,
    }
    (case / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {case}")


def bytes_to_unicode() -> dict:
    """GPT-2's reversible byte ↔ printable-character table, which CLIP's BPE works over."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_clip_vocabulary(crate_dir: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """`vocab.json` and `merges.txt` of CLIP's tokenizer (the same for SD 1.x, 2.x and XL), built
    from the BPE file that open_clip_torch ships (MIT): 256 byte tokens, the same with `</w>`, the
    first 48,894 merges, and the two special tokens: 49,408 entries."""
    spec = importlib.util.find_spec("open_clip")
    bpe = pathlib.Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == 49408
    crate_dir.mkdir(parents=True, exist_ok=True)
    vocab = crate_dir / "vocab.json"
    merges_file = crate_dir / "merges.txt"
    vocab.write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    merges_file.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return vocab, merges_file


BASE_PROMPTS = [
    "",
    "a photograph of an astronaut riding a horse",
    "A Photograph of an ASTRONAUT riding a horse!!!",
    "masterpiece, best quality, 1girl, solo, (long hair:1.2), [blue eyes]",
    "it's a dog's life, isn't it? they're here; we've seen; I'm sure; you'll see; he'd go",
    "café crème brûlée naïve résumé Ångström",
    "東京の夜景, 4k, 超高精細",
    "a cat 🐱 with sunglasses 😎 on a 🚀",
    "tabs\tand\nnewlines   and    runs     of   spaces",
    "numbers 1234567890 3.14159 1e-5 50% $100 #1",
    "<|endoftext|> literal special tokens <|startoftext|>",
    "punctuation... !?!? --- ___ *** @@@ ((( ))) [[[ ]]] {{{ }}} \\ // ||",
    "don't stop; won't stop — can't stop “quoted” ‘single’ «guillemets»",
    "ALL CAPS PROMPT WITH MIXED case Words",
    "   leading and trailing spaces   ",
    "hyphen-ated words and under_scored_words and CamelCaseWords",
    "emoji sequence 👨‍👩‍👧‍👦 and flags 🇯🇵 🇫🇷",
    "mathematical ∑ ∫ √ ∞ ≠ ≤ ≥ symbols and arrows → ← ↑ ↓",
    "Ελληνικά και Русский текст и العربية",
    "한국어 프롬프트 그리고 中文提示词",
]


def prompt_set() -> list[str]:
    prompts = list(BASE_PROMPTS)
    words = "a portrait of an old man, dramatic lighting, oil painting, by rembrandt, highly detailed".split()
    for i in range(1, 120):
        prompts.append(" ".join(words[(i * k) % len(words)] for k in range(1, 2 + i % 13)))
    # Long prompts: over 75 tokens, truncated by the padded encodings.
    for n in [76, 77, 80, 150, 300]:
        prompts.append(" ".join(f"word{i % 17}" for i in range(n)))
    for i in range(60):
        prompts.append(f"{BASE_PROMPTS[i % len(BASE_PROMPTS)]} , variant {i} ; {BASE_PROMPTS[(i * 7) % len(BASE_PROMPTS)]}")
    return prompts


def write_tokenizer_case(root: pathlib.Path, vocab: pathlib.Path, merges: pathlib.Path) -> None:
    case = root / "tokenizer" / "clip"
    case.mkdir(parents=True, exist_ok=True)
    eos_pad = transformers.CLIPTokenizer(str(vocab), str(merges))
    bang_pad = transformers.CLIPTokenizer(str(vocab), str(merges), pad_token="!")
    prompts = prompt_set()
    padded = lambda tok: tok(prompts, padding="max_length", max_length=77, truncation=True)["input_ids"]
    manifest = {
        "kind": "tokenizer",
        "reference": f"transformers {transformers.__version__} {type(eos_pad).__name__}",
        "prompts": prompts,
        "tokens": [eos_pad(p, add_special_tokens=False)["input_ids"] for p in prompts],
        "padded_eos": padded(eos_pad),
        "padded_bang": padded(bang_pad),
    }
    (case / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {case} ({len(prompts)} prompts)")


KINDS = ["vae", "diffusion", "tokenizer", "clip", "clip_vision", "unet", "schedulers", "pipeline", "training", "roundtrip", "lora", "metrics", "upscale", "clip_score", "controlnet", "ip_adapter", "x4_upscaler"]


def parse_kinds(values: list[str] | None) -> set[str]:
    """`--only` values, repeatable or comma-separated; every kind when none is given."""
    if not values:
        return set(KINDS)
    kinds = {v.strip() for value in values for v in value.split(",") if v.strip()}
    unknown = kinds - set(KINDS)
    if unknown:
        raise SystemExit(f"unknown --only kind(s) {sorted(unknown)}; choose from {KINDS}")
    return kinds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument(
        "--only",
        action="append",
        metavar="KIND",
        help=f"regenerate only these kinds (repeatable or comma-separated): {', '.join(KINDS)}; default all",
    )
    args = parser.parse_args()
    kinds = parse_kinds(args.only)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if "vae" in kinds:
        for i, (name, spec) in enumerate(sorted(VAE_CASES.items())):
            write_vae_case(args.out, name, spec, seed=1000 + i)
    if "diffusion" in kinds:
        for i, (name, config) in enumerate(sorted(DIFFUSION_CASES.items())):
            write_diffusion_case(args.out, name, config, seed=2000 + i)
    if "tokenizer" in kinds:
        vocab, merges = write_clip_vocabulary(pathlib.Path(__file__).resolve().parents[2] / "crates/sd-conditioner/vocab")
        write_tokenizer_case(args.out, vocab, merges)
    if "clip" in kinds:
        for name, spec in sorted(CLIP_CASES.items()):
            write_clip_case(args.out, name, spec, seed=zlib.crc32(name.encode()) % 100_000)
    if "clip_vision" in kinds:
        from vision_fixtures import write_vision_cases

        write_vision_cases(args.out, randomise_norms)
    if "unet" in kinds:
        for name, spec in sorted(UNET_CASES.items()):
            write_unet_case(args.out, name, spec, seed=zlib.crc32(name.encode()) % 100_000)
    if "schedulers" in kinds:
        for name, (cls, config, step_kwargs) in sorted(scheduler_cases().items()):
            # A seed from the name alone: adding a case leaves the others' data unchanged.
            write_scheduler_case(args.out, name, cls, config, step_kwargs, seed=zlib.crc32(name.encode()) % 100_000)
    if "metrics" in kinds:
        from metrics_fixtures import write_metrics_cases

        write_metrics_cases(args.out)
    if "pipeline" in kinds:
        # Imported here: pipeline_fixtures imports helpers from this module.
        from pipeline_fixtures import write_pipeline_cases

        write_pipeline_cases(args.out)
    if "training" in kinds:
        from training_fixtures import write_training_cases

        write_training_cases(args.out, randomise_norms)
    if "roundtrip" in kinds:
        # Runs the Rust binary (built first) on the committed fixture models.
        from roundtrip_fixtures import write_roundtrip_cases

        write_roundtrip_cases(args.out)
    if "lora" in kinds:
        from lora_fixtures import write_lora_cases

        write_lora_cases(args.out)
    if "upscale" in kinds:
        from upscale_fixtures import write_upscale_cases

        write_upscale_cases(args.out)
    if "clip_score" in kinds:
        from clip_score_fixtures import write_clip_score_case

        write_clip_score_case(args.out, randomise_norms)
    if "controlnet" in kinds:
        # After the pipeline fixtures: tiny_sd1 and tiny_sdxl are the base pipelines.
        from controlnet_fixtures import write_controlnet_cases

        write_controlnet_cases(args.out)
    if "ip_adapter" in kinds:
        # After the pipeline fixtures: tiny_sd1 is the base pipeline.
        from ip_adapter_fixtures import write_ip_adapter_cases

        write_ip_adapter_cases(args.out)
    if "x4_upscaler" in kinds:
        # After the pipeline fixtures: tiny_sd1's text encoder and tokenizer are copied.
        from x4_upscaler_fixtures import write_x4_upscaler_cases

        write_x4_upscaler_cases(args.out)


if __name__ == "__main__":
    main()
