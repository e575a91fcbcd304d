"""Stable Diffusion x4 upscaler references: a tiny pipeline in the layout of
`stabilityai/stable-diffusion-x4-upscaler`, run through diffusers' StableDiffusionUpscalePipeline.

Called by make_fixtures.py (`--only x4_upscaler`), after the pipeline fixtures, whose tiny_sd1 text
encoder and tokenizer are copied here (read, never rewritten). tests/fixtures/x4_upscaler/ holds

- `model/`: `StableDiffusionUpscalePipeline.save_pretrained` (f16 weights): `unet` (7 input
  channels: 4 latent + 3 low-resolution image, the noise level as a class label, blocks whose first
  attention attends to the text too), `vae` (3 levels: factor 4, scaling_factor 0.08333), tiny_sd1's
  `text_encoder` and `tokenizer`, `scheduler` (DDIM, v-prediction) and `low_res_scheduler` (DDPM),
  `max_noise_level` 350; model_index.json lists only what the real repository's does (no
  safety_checker / feature_extractor / watermarker entries);
- `low_a.png` (12×8, a multiple of the VAE factor) and `low_b.png` (10×10: diffusers' image
  processor resizes it to 8×8 with PIL bicubic): RGB low-resolution inputs;
- `reference.safetensors` (f32, computed from the f16 weights upcast to f32): per run
  `<run>.latents_in`, `<run>.image_noise`, `<run>.noise` (scheduler draws, when there are any),
  `<run>.image_in`, `<run>.noised_image`, `<run>.timesteps`, `<run>.unet_input_0`,
  `<run>.latents_out`, `<run>.image`; `low_b_resized` (the 8×8 PIL-bicubic pixels, 0..255);
- `manifest.json`: every run's settings, seeds, the scheduler configs after the run, the float64
  deviations, how much the low-resolution image moves the result, and the conventions (notes).
"""

import importlib
import inspect
import json
import pathlib
import shutil

import diffusers
import numpy as np
import torch
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    EulerAncestralDiscreteScheduler,
    StableDiffusionUpscalePipeline,
    UNet2DConditionModel,
)
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer

from controlnet_fixtures import make_image_png
from pipeline_fixtures import SD1_NEGATIVE, SD1_PROMPT, TOLERANCE, NoiseTape, alias_text_model, seed_of

BASE = "../pipeline/tiny_sd1/model"
STEPS = 4
MAX_NOISE_LEVEL = 350
VAE_FACTOR = 4

# diffusers' upscale pipeline tests' dummy U-Net (tests/pipelines/stable_diffusion_2/
# test_stable_diffusion_upscale.py: in_channels 7, DownBlock2D + two CrossAttnDownBlock2D,
# layers_per_block 2, cross_attention_dim 32, attention_head_dim 8, use_linear_projection,
# only_cross_attention (True, True, False)) with narrower widths (16, 24, 32) and 8 norm groups, so
# that the folder stays under 3 MB (the dummy's (32, 32, 64) alone is 3.4 MB in f16), and the real
# model's 1000 class embeddings (the dummy's 100 cannot take noise levels >= 100: nn.Embedding(100, ·)
# has no row 100). The 24-channel level is the one with only_cross_attention: there attn1's to_k /
# to_v are 32 → 24 (the text) where a self-attention's would be 24 → 24, so the shapes tell them
# apart (as in the real model, whose context width 1024 differs from its 256/512 channels).
UNET_CONFIG = dict(
    sample_size=32,
    in_channels=7,
    out_channels=4,
    block_out_channels=[16, 24, 32],
    layers_per_block=2,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    cross_attention_dim=32,
    attention_head_dim=8,
    use_linear_projection=True,
    only_cross_attention=[True, True, False],
    num_class_embeds=1000,
    norm_num_groups=8,
)
# Three levels (factor 4) and two resnets per level as the real upscaler's VAE (ch_mult [1, 2, 4],
# num_res_blocks 2), narrow (16, 32, 32) for size; its scaling_factor 0.08333 (x4-upscaling.yaml's
# scale_factor; the pipeline's constructor resets any other value to 0.08333).
VAE_CONFIG = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=[16, 32, 32],
    layers_per_block=2,
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    latent_channels=4,
    norm_num_groups=8,
    scaling_factor=0.08333,
)
# The real repository's scheduler/scheduler_config.json as far as it can be established offline:
# Stability-AI/stablediffusion configs/stable-diffusion/x4-upscaling.yaml has parameterization "v",
# linear_start 0.0001, linear_end 0.02, timesteps 1000 (ldm's "linear" schedule is diffusers'
# scaled_linear: linspace of the square roots, squared), and diffusers' own converter
# (pipelines/stable_diffusion/convert_from_ckpt.py) makes from such a config
# DDIMScheduler(beta_schedule="scaled_linear", steps_offset=1, clip_sample=False,
# set_alpha_to_one=False, prediction_type="v_prediction"). Keys not given keep DDIM's defaults
# (timestep_spacing "leading", thresholding off, rescale_betas_zero_snr off).
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="v_prediction",
)
# The low-res scheduler: diffusers' loaders/single_file_utils.py builds it from this dict for the
# upscale pipeline ("StableDiffusionUpscale pipeline has two schedulers"), matching the yaml's
# low_scale_config noise_schedule_config (linear_start 0.0001, linear_end 0.02, ldm's default 1000
# steps, "linear" = scaled_linear). Only add_noise is used (alphas_cumprod): clip_sample,
# variance_type and prediction_type play no part.
LOW_RES_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="scaled_linear",
    clip_sample=True,
    prediction_type="epsilon",
    trained_betas=None,
    variance_type="fixed_small",
)

# ---------------------------------------------------------------------------------------------
# A. The low-resolution images.

# name -> ((width, height), background, [(kind, geometry, colour)]). Rectangles (x0, y0, x1, y1
# exclusive), circles (cx, cy, r).
IMAGES = {
    "low_a": (
        (12, 8),
        (30, 40, 90),
        [("rect", (1, 1, 6, 7), (230, 60, 40)), ("circle", (9, 4, 2), (60, 220, 120))],
    ),
    "low_b": (
        (10, 10),
        (200, 190, 150),
        [("circle", (3, 6, 3), (20, 50, 200)), ("rect", (5, 1, 9, 5), (250, 210, 30))],
    ),
}


def rounded_size(image: Image.Image) -> tuple[int, int]:
    """(height, width) rounded down to the VAE factor, as VaeImageProcessor.get_default_height_width."""
    return image.height - image.height % VAE_FACTOR, image.width - image.width % VAE_FACTOR


def expected_image_in(image: Image.Image) -> tuple[torch.Tensor, np.ndarray]:
    """What VaeImageProcessor(vae_scale_factor=4, resample="bicubic").preprocess does to a PIL
    image: PIL resize to the rounded size (bicubic; Pillow returns a copy when the size is
    unchanged), pixels / 255 in float32, then 2x - 1. Returns the tensor and the resized pixels."""
    h, w = rounded_size(image)
    resized = image.resize((w, h), resample=Image.BICUBIC, reducing_gap=None)
    pixels = np.asarray(resized)
    x = torch.from_numpy(pixels.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    return (2.0 * x - 1.0).contiguous(), pixels


# ---------------------------------------------------------------------------------------------
# B. The tiny pipeline.


def randomise_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    from make_fixtures import randomise_norms as jitter

    jitter(model, generator)


def build_pipeline(model_dir: pathlib.Path, base_dir: pathlib.Path) -> dict:
    """Saves the tiny upscaler (f16) into model_dir; returns the seeds and facts."""
    unet_seed, vae_seed = seed_of("x4_upscaler.unet"), seed_of("x4_upscaler.vae")
    torch.manual_seed(unet_seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    randomise_norms(unet, torch.Generator().manual_seed(unet_seed))
    torch.manual_seed(vae_seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    randomise_norms(vae, torch.Generator().manual_seed(vae_seed))
    text_encoder = CLIPTextModel.from_pretrained(base_dir / "text_encoder", torch_dtype=torch.float16)
    tokenizer = CLIPTokenizer.from_pretrained(base_dir / "tokenizer")
    pipe = StableDiffusionUpscalePipeline(
        vae=vae.half(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet.half(),
        low_res_scheduler=DDPMScheduler(**LOW_RES_SCHEDULER_CONFIG),
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        max_noise_level=MAX_NOISE_LEVEL,
    )
    assert pipe.vae.config.scaling_factor == 0.08333
    pipe.save_pretrained(model_dir, safe_serialization=True)
    # The tokenizer folder is tiny_sd1's, file for file: transformers 5 re-saves a loaded tokenizer
    # with its load-time arguments (is_local, padding_side, ...) and without vocab.json / merges.txt,
    # which Stable Diffusion repositories ship.
    shutil.rmtree(model_dir / "tokenizer")
    shutil.copytree(base_dir / "tokenizer", model_dir / "tokenizer")
    for name in ["model.safetensors", "config.json"]:
        same = (model_dir / "text_encoder" / name).read_bytes() == (base_dir / "text_encoder" / name).read_bytes()
        assert same, f"text_encoder/{name} differs from tiny_sd1's"
    # The real model_index.json lists the six components and max_noise_level only; diffusers
    # writes [null, null] for the optional safety_checker, feature_extractor and watermarker.
    index_path = model_dir / "model_index.json"
    index = json.loads(index_path.read_text())
    dropped = sorted(k for k, v in index.items() if v == [None, None])
    index = {k: v for k, v in index.items() if k not in dropped}
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return dict(unet_seed=unet_seed, vae_seed=vae_seed, model_index_dropped=dropped)


def load_upscaler(folder: pathlib.Path, dtype: torch.dtype) -> StableDiffusionUpscalePipeline:
    pipe = StableDiffusionUpscalePipeline.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    alias_text_model(pipe)
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            module.eval()
            assert all(p.dtype == dtype for p in module.parameters()), name
    assert pipe.watermarker is None and pipe.safety_checker is None and pipe.feature_extractor is None
    assert pipe.vae_scale_factor == VAE_FACTOR, pipe.vae_scale_factor
    return pipe


# ---------------------------------------------------------------------------------------------
# C. The runs.


def up_run(name, image, scheduler=None, noise_level=20, guidance_scale=7.5, negative_prompt=SD1_NEGATIVE):
    return dict(
        name=name, image=image, scheduler=scheduler, noise_level=noise_level, guidance_scale=guidance_scale,
        prompt=SD1_PROMPT, negative_prompt=negative_prompt, steps=STEPS,
    )


RUNS = [
    up_run("ddim", "low_a"),
    up_run("noise_level_100", "low_a", noise_level=100, guidance_scale=1.0, negative_prompt=None),
    up_run("euler_a", "low_b", scheduler=EulerAncestralDiscreteScheduler),
    up_run("ddpm", "low_a", scheduler=DDPMScheduler),
]


def call_upscaler(pipe, spec, own_scheduler, image, latents, seed, output_type, replay=None, noise_level=None):
    """One call. Records every randn_tensor draw of the pipeline's and the schedulers' modules in call
    order (or replays them), the low-res scheduler's add_noise and the first U-Net call."""
    cls = spec["scheduler"] or type(own_scheduler)
    pipe.scheduler = cls.from_config(own_scheduler.config)
    scheduler = pipe.scheduler
    low_res = pipe.low_res_scheduler
    captured = dict(add_noise=[], steps=[], timesteps=[], unet=[])

    def role(label):
        # A sampler draws inside step i, before that step's callback: i = the callbacks so far.
        if label == "pipeline":
            return "latents" if captured["add_noise"] else "image_noise"
        return f"{label}(step {len(captured['steps'])})"

    add_noise = low_res.add_noise

    def add_noise_wrapper(original_samples, noise, timesteps):
        out = add_noise(original_samples, noise, timesteps)
        captured["add_noise"].append(
            dict(original=original_samples.clone(), noise=noise.clone(), timesteps=timesteps.clone(), out=out.clone())
        )
        return out

    unet_forward = pipe.unet.forward

    def unet_wrapper(sample, timestep, *args, **kwargs):
        if not captured["unet"]:
            labels = kwargs["class_labels"]
            captured["unet"].append(dict(sample=sample.clone(), timestep=timestep, class_labels=labels.clone(),
                                         context=kwargs["encoder_hidden_states"].clone()))
        return unet_forward(sample, timestep, *args, **kwargs)

    def callback(i, t, step_latents):
        captured["steps"].append(step_latents.clone())
        captured["timesteps"].append(float(t))

    modules = {"pipeline": importlib.import_module(type(pipe).__module__), "scheduler": importlib.import_module(cls.__module__)}
    low_res_module = importlib.import_module(type(low_res).__module__)
    if low_res_module is not modules["scheduler"]:
        modules["low_res_scheduler"] = low_res_module
    kwargs = dict(
        prompt=spec["prompt"],
        negative_prompt=spec["negative_prompt"],
        image=image,
        num_inference_steps=spec["steps"],
        guidance_scale=spec["guidance_scale"],
        noise_level=spec["noise_level"] if noise_level is None else noise_level,
        latents=latents.clone(),
        generator=torch.Generator().manual_seed(seed),
        output_type=output_type,
        callback=callback,
        callback_steps=1,
    )
    low_res.add_noise = add_noise_wrapper
    pipe.unet.forward = unet_wrapper
    try:
        with NoiseTape(modules, role, replay) as tape, torch.no_grad():
            out = pipe(**kwargs)
    finally:
        del low_res.add_noise
        del pipe.unet.forward
    if replay is not None:
        assert len(tape.draws) == len(replay), (spec["name"], len(tape.draws), len(replay))
    return out.images, captured, tape, scheduler


def write_runs(pipe, pipe64, images: dict, finite_json) -> tuple[dict, list]:
    own_scheduler, own_scheduler64 = pipe.scheduler, pipe64.scheduler
    tensors, manifest_runs = {}, []
    for spec in RUNS:
        name = spec["name"]
        image = images[spec["image"]]
        h, w = rounded_size(image)
        latent_seed = seed_of(f"x4_upscaler.run.{name}")
        generator_seed = latent_seed + 1
        latents = torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(latent_seed))
        try:
            latents_out, cap, tape, scheduler = call_upscaler(pipe, spec, own_scheduler, image, latents, generator_seed, "latent")
            decoded, cap2, tape2, _ = call_upscaler(pipe, spec, own_scheduler, image, latents, generator_seed, "np")
            replay = list(zip(tape.labels, [d.double() for d in tape.draws]))
            decoded64, cap64, _, _ = call_upscaler(
                pipe64, spec, own_scheduler64, image, latents.double(), generator_seed, "np", replay=replay
            )
            # The same run with the low-resolution image mirrored (same size, same noise draws).
            mirrored = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            swapped, _, _, _ = call_upscaler(pipe, spec, own_scheduler, mirrored, latents, generator_seed, "latent")
        finally:
            pipe.scheduler, pipe64.scheduler = own_scheduler, own_scheduler64

        # The final latents: the latent call's output, its last callback and the np call's last callback.
        assert torch.equal(latents_out, cap["steps"][-1]) and torch.equal(latents_out, cap2["steps"][-1]), name
        assert tape.labels == tape2.labels and all(torch.equal(a, b) for a, b in zip(tape.draws, tape2.draws)), name
        image_out = torch.from_numpy(decoded).permute(0, 3, 1, 2).contiguous()
        image64 = torch.from_numpy(decoded64).permute(0, 3, 1, 2)
        assert image_out.shape == (1, 3, VAE_FACTOR * h, VAE_FACTOR * w), image_out.shape
        # The decode: vae.decode(latents / scaling_factor), then (x / 2 + 0.5).clamp(0, 1).
        with torch.no_grad():
            redecoded = pipe.vae.decode(latents_out / pipe.vae.config.scaling_factor).sample
        redecoded = (redecoded / 2 + 0.5).clamp(0, 1)
        decode_check = float((redecoded - image_out).abs().max())
        assert decode_check < 1e-6, (name, decode_check)

        # The draws: the pipeline's low-res image noise first, then the sampler's (none for DDIM at eta 0).
        assert tape.labels[0] == "pipeline" and all(label == "scheduler" for label in tape.labels[1:]), tape.labels
        image_noise = tape.draws[0]
        scheduler_draws = tape.draws[1:]
        (add,) = cap["add_noise"]
        image_in, resized = expected_image_in(image)
        assert torch.equal(add["original"], image_in), name
        assert torch.equal(add["noise"], image_noise) and image_noise.shape == (1, 3, h, w)
        assert add["timesteps"].dtype == torch.long and add["timesteps"].tolist() == [spec["noise_level"]]
        alpha = pipe.low_res_scheduler.alphas_cumprod[spec["noise_level"]]
        by_hand = alpha.sqrt() * image_in + (1 - alpha).sqrt() * image_noise
        assert torch.allclose(add["out"], by_hand, atol=1e-6), name

        # The first U-Net call: [latents scaled, noised image] on the channel axis, batch doubled for CFG.
        do_cfg = spec["guidance_scale"] > 1.0
        unet0 = cap["unet"][0]
        batch = 2 if do_cfg else 1
        assert unet0["sample"].shape == (batch, 7, h, w)
        assert unet0["class_labels"].dtype == torch.long
        assert unet0["class_labels"].tolist() == [spec["noise_level"]] * batch
        t0 = scheduler.timesteps[0]
        fresh = type(scheduler).from_config(scheduler.config)
        fresh.set_timesteps(STEPS)
        scaled = fresh.scale_model_input(latents * fresh.init_noise_sigma, t0)
        for b in range(batch):
            assert torch.equal(unet0["sample"][b, 4:], add["out"][0]), name
            assert torch.allclose(unet0["sample"][b, :4], scaled[0], rtol=1e-6, atol=1e-6), name

        timesteps = torch.tensor(cap["timesteps"])
        assert torch.equal(timesteps, scheduler.timesteps.float()), name
        run_tensors = {
            "latents_in": latents,
            "image_noise": image_noise,
            "image_in": image_in,
            "noised_image": add["out"],
            "timesteps": timesteps,
            "unet_input_0": unet0["sample"],
            "latents_out": latents_out,
            "image": image_out,
        }
        if scheduler_draws:
            run_tensors["noise"] = torch.stack(scheduler_draws)
        for key, value in run_tensors.items():
            tensors[f"{name}.{key}"] = value
        if spec["image"] == "low_b":
            tensors["low_b_resized"] = torch.from_numpy(resized.astype(np.float32)).permute(2, 0, 1)[None].contiguous()

        entry = dict(
            name=name,
            image=f"{spec['image']}.png",
            image_size=list(image.size),
            preprocessed_size=[w, h],
            latent_shape=list(latents.shape),
            output_shape=list(image_out.shape),
            scheduler=type(scheduler).__name__,
            prompt=spec["prompt"],
            negative_prompt=spec["negative_prompt"],
            steps=spec["steps"],
            guidance_scale=spec["guidance_scale"],
            noise_level=spec["noise_level"],
            low_res_alpha_cumprod=float(alpha),
            latent_seed=latent_seed,
            generator_seed=generator_seed,
            noise_draws=len(tape.draws),
            noise_sources=tape.labels,
            noise_roles=tape.roles,
            timesteps=[float(t) for t in scheduler.timesteps],
            init_noise_sigma=float(scheduler.init_noise_sigma),
            unet_batch=batch,
            class_labels=unet0["class_labels"].tolist(),
            tolerance=TOLERANCE,
            scheduler_config=finite_json(dict(scheduler.config)),
            latents_out_max_abs=float(latents_out.abs().max()),
            f64_deviation=dict(
                latents_out=float((cap64["steps"][-1] - latents_out.double()).abs().max()),
                image=float((image64 - image_out.double()).abs().max()),
            ),
            # How far the low-resolution image moves the result: max |latents_out - the same run
            # with the image mirrored left-right| (same seeds, same draws).
            mirrored_image_deviation=float((swapped - latents_out).abs().max()),
            decode_check=decode_check,
        )
        manifest_runs.append(entry)
        print(
            f"  {name}: {entry['scheduler']} t={entry['timesteps']} draws {tape.labels}, latents {list(latents.shape)} "
            f"-> image {list(image_out.shape)}, max |latents| {entry['latents_out_max_abs']:.3f}, f64 deviation "
            f"{entry['f64_deviation']}, mirrored image moves latents by {entry['mirrored_image_deviation']:.3f}"
        )
    return tensors, manifest_runs


def noise_level_checks(pipe, images: dict) -> dict:
    """noise_level above max_noise_level is refused by check_inputs (before anything runs)."""
    facts = {}
    try:
        pipe(prompt=SD1_PROMPT, image=images["low_a"], noise_level=MAX_NOISE_LEVEL + 1, num_inference_steps=1,
             output_type="latent")
    except ValueError as error:
        facts["above_max_noise_level_error"] = str(error)
    else:
        raise AssertionError("noise_level above max_noise_level was accepted")
    return facts


NOTES = [
    "model/: StableDiffusionUpscalePipeline.save_pretrained with f16 weights; the references use those f16 "
    "values upcast to f32 (StableDiffusionUpscalePipeline.from_pretrained(torch_dtype=float32)). "
    "model_index.json: the [null, null] entries diffusers writes for safety_checker, feature_extractor and "
    "watermarker are removed (the real repository lists vae, text_encoder, tokenizer, unet, scheduler, "
    "low_res_scheduler and max_noise_level 350 only); diffusers loads it without them (all three optional, None)",
    "unet: diffusers' upscale test dummy's structure (DownBlock2D + 2 CrossAttnDownBlock2D, layers_per_block 2, "
    "7 input channels, cross_attention_dim 32, attention_head_dim 8 (= 8 heads in diffusers' naming), "
    "use_linear_projection, only_cross_attention [True, True, False]) but block_out_channels [16, 24, 32] with 8 "
    "norm groups (the dummy's [32, 32, 64] is 3.4 MB in f16 alone; the 24-channel level, the only-cross-attention "
    "one, has attn1.to_k/to_v of shape [24, 32], where a self-attention's would be [24, 24]) and "
    "num_class_embeds 1000 as the real model (the dummy's 100 cannot embed noise_level 100: nn.Embedding(100, ·) has no row 100). Default diffusers "
    "initialisation from torch.manual_seed(unet_seed), then every GroupNorm/LayerNorm weight 1 + N(0, 0.3²) and "
    "bias N(0, 0.3²). only_cross_attention is per down block and reversed for the up blocks (up block 0: False, "
    "up block 1: True); a block with only_cross_attention has attn1 attend to the text (to_k/to_v of width 32) "
    "and attn2 attend to the text again; the mid block's transformer is ordinary (self then cross: "
    "mid_block_only_cross_attention is null, so False)",
    "vae: AutoencoderKL, 3 levels (factor 4), block_out_channels [16, 32, 32], layers_per_block 2, 8 norm groups, "
    "4 latent channels, scaling_factor 0.08333, norms jittered as the U-Net's. StableDiffusionUpscalePipeline's "
    "constructor overwrites any other vae scaling_factor with 0.08333 (a deprecation warning)",
    "text_encoder, tokenizer: tiny_sd1's (CLIPTextModel hidden 32, quick_gelu, eos 999), loaded from "
    "../pipeline/tiny_sd1/model; the text encoder saved again by the pipeline (byte-identical weights and config), "
    "the tokenizer folder copied file for file",
    "scheduler: DDIMScheduler(num_train_timesteps 1000, scaled_linear 0.0001 -> 0.02, clip_sample false, "
    "set_alpha_to_one false, steps_offset 1, prediction_type v_prediction; the rest DDIM's defaults, timestep_spacing "
    "leading). Not copied from the real repository (offline): x4-upscaling.yaml (Stability-AI/stablediffusion) has "
    "parameterization v, linear_start 0.0001, linear_end 0.02, timesteps 1000, and diffusers' convert_from_ckpt.py "
    "turns such a config into exactly this DDIMScheduler. ldm's 'linear' schedule is diffusers' scaled_linear",
    "low_res_scheduler: DDPMScheduler(1000, scaled_linear 0.0001 -> 0.02, clip_sample true, epsilon, fixed_small): the "
    "dict diffusers' single_file_utils.py uses for the upscale pipeline's low_res_scheduler, matching the yaml's "
    "low_scale_config (linear_start 0.0001, linear_end 0.02, max_noise_level 350). Only its alphas_cumprod matter "
    "(add_noise); low_res_alpha_cumprod per run is alphas_cumprod[noise_level]",
    "the call, diffusers 0.42.1: (1) check_inputs (noise_level > max_noise_level raises ValueError); (2) encode the "
    "prompt; with guidance_scale > 1 the batch is [negative, positive] ('' when no negative prompt); with "
    "guidance_scale <= 1 no negative is encoded and the batch is 1; (3) image_in = image_processor.preprocess(image): "
    "PIL resize to the size rounded down to a multiple of 4 (bicubic), /255, 2x-1; (4) scheduler.set_timesteps; "
    "(5) image_noise = randn_tensor(image_in.shape, generator) (the FIRST draw of the generator), noise_level = "
    "tensor([noise_level], int64), noised_image = low_res_scheduler.add_noise(image_in, image_noise, noise_level) = "
    "sqrt(acp[nl]) image_in + sqrt(1 - acp[nl]) image_noise; then for CFG image = cat([noised_image] * 2) (the SAME "
    "noised image for the negative and the positive half) and class_labels = cat([noise_level] * batch) (int64); "
    "(6) latents = (given latents, else a randn_tensor draw AFTER the image noise) * scheduler.init_noise_sigma, "
    "shape [1, 4, h, w] at the low-res size; (7) each step: x = cat([latents] * batch); x = "
    "scheduler.scale_model_input(x, t); x = cat([x, image], dim=1) (latents first, then the 3 image channels; the "
    "image is not scaled); out = unet(x, t, text, class_labels=noise_levels) (a v-prediction; the U-Net adds "
    "class_embedding(class_labels), an nn.Embedding(1000, 64) row, to its timestep embedding: class_embed_type null, "
    "no concat); guidance uncond + g (text - uncond); latents = scheduler.step(out, t, latents, eta=0 for DDIM, "
    "generator=...); (8) decode: vae.decode(latents / "
    "vae.config.scaling_factor) (divided by 0.08333), (x / 2 + 0.5).clamp(0, 1); output_type 'latent' returns the "
    "latents undivided",
    "every standard-normal draw of a call is listed in noise_sources / noise_roles in call order: 'pipeline' (the "
    "low-res image noise; the latents are given, so the pipeline draws once), 'scheduler' (the sampler's step "
    "noise; noise_roles 'scheduler(step i)': drawn inside step i, 0-based). All come from "
    "torch.Generator().manual_seed(generator_seed) in that order; <run>.image_noise is the "
    "first ([1, 3, h, w]), <run>.noise the scheduler's, stacked ([n, 1, 4, h, w]; absent when there are none). "
    "latents_in comes from its own torch.Generator().manual_seed(latent_seed)",
    "<run>.image_in: the preprocessed low-res image [1, 3, h, w] in [-1, 1]; for low_b.png (10×10) that is Pillow's "
    "Image.resize((8, 8), resample=BICUBIC, reducing_gap=None) (low_b_resized: those 8-bit pixels [1, 3, 8, 8]); "
    "low_a.png (12×8) is not resampled (Pillow returns a copy at the same size). <run>.noised_image: after "
    "low_res_scheduler.add_noise. <run>.unet_input_0: the first U-Net input [batch, 7, h, w] (batch 2 with CFG, "
    "both halves equal). <run>.timesteps: the scheduler's timesteps (EulerAncestral's are floats)",
    "<run>.latents_out: output_type='latent' (checked equal to the latents the np call decoded); <run>.image: "
    "output_type='np' as [1, 3, 4h, 4w] in [0, 1]; decode_check: max |image - (vae.decode(latents_out / "
    "0.08333) / 2 + 0.5).clamp(0, 1)|",
    "no watermark: the pipeline's watermarker is None (optional, not in model_index.json) and is only applied for "
    "output_type 'pil'; safety_checker None, so every image is denormalised",
    "f64_deviation: the max abs difference to the same pipeline in float64 replaying the same draws (float32 "
    "rounding alone). mirrored_image_deviation: max |latents_out - latents_out of the same run with the low-res "
    "image mirrored left-right| (same seeds, same draws): the low-res image matters",
    "samplers: DDIM (eta 0) draws nothing; DDPM (DDPMScheduler.from_config of the DDIM config: v_prediction, "
    "fixed_small variance) draws in every step, the last (t = 1) too (noise whenever t > 0); EulerAncestral draws "
    "in every step, its init_noise_sigma is sqrt(sigma_max² + 1) (leading spacing) and scale_model_input divides "
    "the latents (not the image channels) by sqrt(sigma² + 1). DDIM and DDPM timesteps are int64, EulerAncestral's "
    "float32; the U-Net gets t as it is",
    "the pipeline has no callback_on_step_end (only the old callback(step, t, latents) with callback_steps); the "
    "final latents were taken from it",
]


def write_x4_upscaler_cases(out_root: pathlib.Path) -> None:
    from make_fixtures import finite_json

    out = out_root / "x4_upscaler"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    base_dir = (out / BASE).resolve()
    assert base_dir.is_dir(), f"{base_dir}: run `--only pipeline` first"

    images = {
        name: make_image_png(out / f"{name}.png", size, background, shapes, seed_of(f"x4_upscaler.image.{name}"),
                             noise=12.0, gradient=40.0)
        for name, (size, background, shapes) in IMAGES.items()
    }
    model_entry = build_pipeline(out / "model", base_dir)
    pipe = load_upscaler(out / "model", torch.float32)
    pipe64 = load_upscaler(out / "model", torch.float64)
    # The stored images are what the pipeline's own image processor makes.
    for name, image in images.items():
        prepared = pipe.image_processor.preprocess(image)
        assert torch.equal(prepared, expected_image_in(image)[0]), name

    tensors, runs = write_runs(pipe, pipe64, images, finite_json)
    checks = noise_level_checks(pipe, images)

    seeds = [model_entry["unet_seed"], model_entry["vae_seed"]]
    seeds += [seed_of(f"x4_upscaler.image.{name}") for name in IMAGES]
    seeds += [s for r in runs for s in (r["latent_seed"], r["generator_seed"])]
    assert len(seeds) == len(set(seeds)), seeds

    unet, vae = pipe.unet, pipe.vae
    manifest = {
        "kind": "x4_upscaler",
        "reference": f"diffusers {diffusers.__version__} StableDiffusionUpscalePipeline, torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
        "model": "model",
        "text_encoder_from": BASE,
        "max_noise_level": pipe.config.max_noise_level,
        "vae_scale_factor": pipe.vae_scale_factor,
        "vae_scaling_factor": vae.config.scaling_factor,
        "image_processor": finite_json(dict(pipe.image_processor.config)),
        "seeds": {k: v for k, v in model_entry.items() if k.endswith("seed")},
        "model_index_dropped": model_entry["model_index_dropped"],
        "parameters": {
            "unet": sum(p.numel() for p in unet.parameters()),
            "vae": sum(p.numel() for p in vae.parameters()),
            "text_encoder": sum(p.numel() for p in pipe.text_encoder.parameters()),
        },
        "images": {
            name: dict(file=f"{name}.png", size=list(image.size), preprocessed_size=list(rounded_size(image))[::-1],
                       seed=seed_of(f"x4_upscaler.image.{name}"))
            for name, image in images.items()
        },
        # The __call__ defaults (the real model's usual settings as diffusers has them).
        "call_defaults": {
            k: v.default for k, v in inspect.signature(StableDiffusionUpscalePipeline.__call__).parameters.items()
            if k in ("num_inference_steps", "guidance_scale", "noise_level", "eta")
        },
        "scheduler_config": finite_json(dict(pipe.scheduler.config)),
        "low_res_scheduler_config": finite_json(dict(pipe.low_res_scheduler.config)),
        **checks,
        "runs": runs,
        "notes": NOTES,
    }
    save_file({k: v.detach().contiguous().float() for k, v in sorted(tensors.items())}, out / "reference.safetensors")
    (out / "manifest.json").write_text(json.dumps(finite_json(manifest), indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    print(f"wrote {out}")
