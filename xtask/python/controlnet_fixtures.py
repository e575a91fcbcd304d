"""ControlNet references: three tiny ControlNets made from the committed tiny pipelines' U-Nets, run
through diffusers' StableDiffusionControlNetPipeline and StableDiffusionXLControlNetPipeline, plus a
direct call of the models themselves.

Called by make_fixtures.py (`--only controlnet`), after the pipeline fixtures, whose tiny_sd1 and
tiny_sdxl model folders are the base pipelines here (read, never rewritten). tests/fixtures/controlnet/
holds

- `sd1_a/`, `sd1_b/` (tiny_sd1's U-Net shape, different seeds) and `sdxl/` (tiny_sdxl's): each a
  diffusers `ControlNetModel.save_pretrained` folder (`config.json`,
  `diffusion_pytorch_model.safetensors`, f16), made by `ControlNetModel.from_unet` with a
  two-level conditioning embedding (8, 16 channels: one stride-2 convolution, 32×32 control image
  to the 16×16 latent of the tiny VAEs, whose factor is 2), every parameter then random;
- `control_a.png`, `control_b.png`: 32×32 RGB control images (shapes on a background plus noise);
- `reference.safetensors` (f32, computed from the f16 weights upcast to f32): per pipeline run
  `<run>.latents_in`, `<run>.latents_out`, `<run>.image`, `<run>.timesteps`; the control images
  as the pipelines see them (`control_a`, `control_b`, [1, 3, 32, 32] in [0, 1]); and the direct
  model calls `direct.<net>.*`;
- `manifest.json`: every run's settings, the scheduler config, seeds, tolerances and the float64
  deviations.
"""

import importlib
import json
import pathlib
import shutil

import diffusers
import numpy as np
import torch
import transformers
from diffusers import (
    ControlNetModel,
    DDIMScheduler,
    MultiControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image
from safetensors.torch import save_file

from pipeline_fixtures import HEIGHT, SD1_NEGATIVE, SD1_PROMPT, TOLERANCE, WIDTH, load_pipeline, seed_of

BASES = {"sd1": "../pipeline/tiny_sd1/model", "sdxl": "../pipeline/tiny_sdxl/model"}
PIPELINES = {
    "sd1": (StableDiffusionPipeline, StableDiffusionControlNetPipeline),
    "sdxl": (StableDiffusionXLPipeline, StableDiffusionXLControlNetPipeline),
}
# name -> base. sd1_a and sd1_b share a shape and differ in their random values only.
NETS = {"sd1_a": "sd1", "sd1_b": "sd1", "sdxl": "sdxl"}
# Two levels: conv_in at full resolution, then one stride-2 convolution, so the 32×32 control
# image lands on the 16×16 latent of the tiny VAEs (two blocks: factor 2).
CONDITIONING_CHANNELS = (8, 16)
# The zero convolutions (diffusers zero-initialises them, which would make every residual zero and
# the test vacuous). At std 0.1 the residuals are of the order of the U-Net's own skip features, so
# a run with the ControlNet differs clearly from one without (see the printed summary).
ZERO_CONV_STD = 0.1
ZERO_CONV_PREFIXES = ("controlnet_down_blocks.", "controlnet_mid_block.", "controlnet_cond_embedding.conv_out.")
STEPS = 4
DIRECT_TIMESTEP = 500
DIRECT_SCALE = 0.9
DIRECT_GUESS_SCALE = 1.0


# ---------------------------------------------------------------------------------------------
# A. The control images.

# (background, [(kind, box or centre+radius, colour)]) for each image; different shapes and
# colours, so that swapping the two images in the multi-ControlNet run shows.
CONTROL_IMAGES = {
    "control_a": (
        (24, 28, 52),
        [
            ("rect", (4, 6, 14, 26), (230, 40, 40)),
            ("circle", (22, 10, 7), (40, 220, 90)),
            ("rect", (18, 22, 30, 25), (250, 250, 250)),
        ],
    ),
    "control_b": (
        (210, 200, 170),
        [
            ("circle", (9, 20, 8), (30, 60, 200)),
            ("rect", (16, 2, 29, 12), (240, 200, 20)),
            ("rect", (2, 2, 6, 30), (20, 20, 20)),
        ],
    ),
}


def make_image_png(path: pathlib.Path, size, background, shapes, seed: int, noise: float = 10.0,
                   gradient: float = 0.0) -> Image.Image:
    """Filled rectangles (x0, y0, x1, y1 exclusive) and circles (cx, cy, r) on a plain background
    (plus a horizontal gradient of `gradient` levels, when given), plus seeded noise of `noise`
    levels, stored as an 8-bit PNG of `size` = (width, height); returns the image read back from
    the file (what both implementations see). Shared by the ControlNet, IP-Adapter and x4 upscaler
    fixtures."""
    width, height = size
    rgb = np.empty((height, width, 3), dtype=np.float32)
    rgb[:] = background
    y, x = np.mgrid[0:height, 0:width]
    if gradient:
        rgb += (gradient * x / max(width - 1, 1))[..., None]
    for kind, geometry, colour in shapes:
        if kind == "rect":
            x0, y0, x1, y1 = geometry
            inside = (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
        else:
            cx, cy, r = geometry
            inside = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
        rgb[inside] = colour
    generator = torch.Generator().manual_seed(seed)
    rgb += noise * torch.randn(height, width, 3, generator=generator).numpy()
    pixels = np.clip(np.round(rgb), 0, 255).astype(np.uint8)
    Image.fromarray(pixels, mode="RGB").save(path)
    with Image.open(path) as image:
        image = image.convert("RGB")
    assert image.size == (width, height) and (np.asarray(image) == pixels).all()
    return image


def control_tensor(image: Image.Image) -> torch.Tensor:
    """[1, 3, H, W] in [0, 1]: what diffusers' control_image_processor (do_normalize=False) gives."""
    return torch.from_numpy(np.asarray(image).astype(np.float32) / 255.0).permute(2, 0, 1)[None].contiguous()


# ---------------------------------------------------------------------------------------------
# B. The tiny ControlNets.


def randomise_controlnet(controlnet: ControlNetModel, generator: torch.Generator) -> None:
    """Every parameter random. from_unet copies the U-Net's encoder and zero-initialises the zero
    convolutions; here each convolution and linear layer gets N(0, 1/fan_in) weights (variance
    preserving, so activations stay O(1) through the blocks), small random biases, the zero
    convolutions N(0, ZERO_CONV_STD²) so the residuals are not zero, and the norms weights near 1
    and biases near 0 (random, so a swapped weight and bias shows)."""
    assigned = set()
    with torch.no_grad():
        for module_name, module in controlnet.named_modules():
            prefix = module_name + "."
            params = dict(module.named_parameters(recurse=False))
            if not params:
                continue
            if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                module.weight.copy_(1.0 + 0.2 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=generator))
            elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                weight = module.weight
                if prefix.startswith(ZERO_CONV_PREFIXES):
                    std = ZERO_CONV_STD
                else:
                    std = (weight[0].numel()) ** -0.5  # fan_in: in_channels · kernel area
                weight.copy_(std * torch.randn(weight.shape, generator=generator))
                if module.bias is not None:
                    module.bias.copy_(0.05 * torch.randn(module.bias.shape, generator=generator))
            else:
                raise TypeError(f"{module_name}: {type(module).__name__} has parameters this does not randomise")
            assigned.update(prefix + name for name in params)
    everything = {name for name, _ in controlnet.named_parameters()}
    assert assigned == everything, everything ^ assigned
    for name, p in controlnet.named_parameters():
        assert p.abs().max() > 0, name


def write_controlnet(out: pathlib.Path, name: str, base_unet) -> dict:
    seed = seed_of(f"controlnet.weights.{name}")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(base_unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS)
    randomise_controlnet(controlnet, generator)
    # The conditioning embedding's single stride-2 step must map the 32×32 control image onto the
    # 16×16 latent (the tiny VAE's factor is 2), with the U-Net's first block width.
    strides = [m.stride[0] for m in controlnet.controlnet_cond_embedding.modules() if isinstance(m, torch.nn.Conv2d)]
    assert strides.count(2) == 1 and set(strides) == {1, 2}, strides
    with torch.no_grad():
        embedded = controlnet.controlnet_cond_embedding(torch.rand(1, 3, HEIGHT, WIDTH))
    assert embedded.shape == (1, base_unet.config.block_out_channels[0], HEIGHT // 2, WIDTH // 2), embedded.shape
    # f16 on disk; the references use exactly these values (reloaded and upcast by load_controlnet).
    controlnet.half().save_pretrained(out / name, safe_serialization=True)
    return dict(folder=name, base=BASES[NETS[name]], seed=seed)


def load_controlnet(out: pathlib.Path, name: str, dtype: torch.dtype) -> ControlNetModel:
    controlnet = ControlNetModel.from_pretrained(out / name, torch_dtype=dtype, local_files_only=True).eval()
    assert all(p.dtype == dtype for p in controlnet.parameters()), name
    return controlnet


# ---------------------------------------------------------------------------------------------
# C. The runs.


def cn_run(name, base, nets, images, scales, guidance_scale=7.5, start=0.0, end=1.0, guess_mode=False):
    return dict(
        name=name, base=base, nets=nets, images=images, scales=scales, guidance_scale=guidance_scale,
        control_guidance_start=start, control_guidance_end=end, guess_mode=guess_mode,
    )


RUNS = [
    cn_run("one", "sd1", ["sd1_a"], ["control_a"], [1.0]),
    cn_run("two", "sd1", ["sd1_a", "sd1_b"], ["control_a", "control_b"], [0.8, 0.5]),
    cn_run("range", "sd1", ["sd1_a"], ["control_a"], [1.0], start=0.25, end=0.75),
    cn_run("guess", "sd1", ["sd1_a"], ["control_a"], [1.0], guess_mode=True),
    cn_run("no_guidance", "sd1", ["sd1_a"], ["control_a"], [1.0], guidance_scale=1.0),
    cn_run("sdxl", "sdxl", ["sdxl"], ["control_a"], [0.7]),
]


def expected_scales(spec: dict) -> list:
    """The conditioning scale each net gets at each step: diffusers' controlnet_keep, a net is on
    at step i of n unless i/n < start or (i+1)/n > end."""
    start, end = spec["control_guidance_start"], spec["control_guidance_end"]
    return [
        [s * (0.0 if (i / STEPS < start or (i + 1) / STEPS > end) else 1.0) for s in spec["scales"]]
        for i in range(STEPS)
    ]


class NoNoise:
    """DDIM at eta 0 is deterministic and the latents are given: fails if the pipeline or the
    scheduler draws noise at all, so the references hold no hidden random input."""

    def __init__(self, *modules):
        self.modules = modules

    def __enter__(self):
        self.originals = [getattr(m, "randn_tensor") for m in self.modules]

        def refuse(*args, **kwargs):
            raise AssertionError("a ControlNet fixture run drew noise")

        for m in self.modules:
            m.randn_tensor = refuse
        return self

    def __exit__(self, *exc):
        for m, original in zip(self.modules, self.originals):
            m.randn_tensor = original
        return False


def make_pipeline(base_pipe, controlnets: list):
    """The ControlNet pipeline on the base pipeline's own components (one net, or a list, which
    diffusers wraps in a MultiControlNetModel)."""
    cls = PIPELINES["sdxl" if isinstance(base_pipe, StableDiffusionXLPipeline) else "sd1"][1]
    components = {k: v for k, v in base_pipe.components.items() if k in ("vae", "text_encoder", "text_encoder_2",
                                                                          "tokenizer", "tokenizer_2", "unet", "scheduler")}
    net = controlnets[0] if len(controlnets) == 1 else controlnets
    if cls is StableDiffusionXLControlNetPipeline:
        pipe = cls(**components, controlnet=net, add_watermarker=False)
    else:
        pipe = cls(**components, controlnet=net, safety_checker=None, feature_extractor=None,
                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_controlnet_pipeline(pipe, spec, base_scheduler, images, latents, seed, output_type, scales=None):
    """One call; returns (images or latents, the final latents seen by the step callback, the
    scheduler after the run, the conditioning scales the ControlNet was handed at each step)."""
    pipe.scheduler = DDIMScheduler.from_config(base_scheduler.config)
    scales = spec["scales"] if scales is None else scales
    multi = len(spec["nets"]) > 1
    kwargs = dict(
        prompt=SD1_PROMPT,
        negative_prompt=SD1_NEGATIVE,
        image=[images[i] for i in spec["images"]] if multi else images[spec["images"][0]],
        num_inference_steps=STEPS,
        guidance_scale=spec["guidance_scale"],
        controlnet_conditioning_scale=list(scales) if multi else scales[0],
        control_guidance_start=spec["control_guidance_start"],
        control_guidance_end=spec["control_guidance_end"],
        guess_mode=spec["guess_mode"],
        height=HEIGHT,
        width=WIDTH,
        latents=latents.clone(),
        generator=torch.Generator().manual_seed(seed),
        output_type=output_type,
    )
    final, handed = {}, []

    def on_step_end(pipeline, i, t, tensors):
        final["latents"] = tensors["latents"].clone()
        return tensors

    controlnet = pipe.controlnet
    forward = controlnet.forward

    def recording_forward(*args, **kw):
        scale = kw["conditioning_scale"]
        handed.append([float(s) for s in scale] if isinstance(scale, list) else [float(scale)])
        return forward(*args, **kw)

    pipeline_module = importlib.import_module(type(pipe).__module__)
    ddim_module = importlib.import_module(DDIMScheduler.__module__)
    controlnet.forward = recording_forward
    try:
        with NoNoise(pipeline_module, ddim_module), torch.no_grad():
            out = pipe(**kwargs, callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"])
    finally:
        del controlnet.forward
    return out.images, final["latents"], pipe.scheduler, handed


def write_runs(bases: dict, bases64: dict, nets: dict, nets64: dict, images: dict, finite_json):
    tensors, manifest_runs = {}, []
    for spec in RUNS:
        name = spec["name"]
        base = bases[spec["base"]]
        pipe = make_pipeline(base, [nets[n] for n in spec["nets"]])
        pipe64 = make_pipeline(bases64[spec["base"]], [nets64[n] for n in spec["nets"]])
        if len(spec["nets"]) > 1:
            assert isinstance(pipe.controlnet, MultiControlNetModel)
        assert pipe.vae_scale_factor == 2, pipe.vae_scale_factor
        base_scheduler = base.scheduler
        latent_seed = seed_of(f"controlnet.run.{name}")
        generator_seed = latent_seed + 1
        latents = torch.randn(1, 4, HEIGHT // 2, WIDTH // 2, generator=torch.Generator().manual_seed(latent_seed))
        call = lambda p, lat, output_type, **kw: call_controlnet_pipeline(
            p, spec, base_scheduler, images, lat, generator_seed, output_type, **kw
        )
        latents_out, latents_cb, scheduler, handed = call(pipe, latents, "latent")
        image, latents_cb2, scheduler2, handed2 = call(pipe, latents, "np")
        # The latents the np call decoded are those of the latent call.
        assert torch.equal(latents_out, latents_cb) and torch.equal(latents_out, latents_cb2), name
        assert torch.equal(scheduler.timesteps, scheduler2.timesteps) and len(scheduler.timesteps) == STEPS
        assert handed == handed2 == expected_scales(spec), (name, handed, expected_scales(spec))
        image = torch.from_numpy(image).permute(0, 3, 1, 2)
        assert image.shape == (1, 3, HEIGHT, WIDTH) and 0 <= image.min() and image.max() <= 1
        image64, latents64, _, _ = call(pipe64, latents.double(), "np")
        image64 = torch.from_numpy(image64).permute(0, 3, 1, 2)
        # The same run with every conditioning scale 0: the U-Net gets zero residuals, i.e. the
        # base pipeline alone; how far the ControlNet moves the result.
        unscaled, _, _, _ = call(pipe, latents, "latent", scales=[0.0] * len(spec["scales"]))
        control_effect = float((latents_out - unscaled).abs().max())
        assert control_effect > 1e-2, (name, control_effect)

        tensors[f"{name}.latents_in"] = latents
        tensors[f"{name}.latents_out"] = latents_out
        tensors[f"{name}.image"] = image
        tensors[f"{name}.timesteps"] = scheduler.timesteps.float()
        pipe_cls = PIPELINES[spec["base"]][1]
        entry = dict(
            name=name,
            base=BASES[spec["base"]],
            pipeline=pipe_cls.__name__,
            controlnets=[dict(folder=n, image=f"{i}.png", scale=s) for n, i, s in zip(spec["nets"], spec["images"], spec["scales"])],
            multi_controlnet=len(spec["nets"]) > 1,
            control_guidance_start=spec["control_guidance_start"],
            control_guidance_end=spec["control_guidance_end"],
            guess_mode=spec["guess_mode"],
            prompt=SD1_PROMPT,
            negative_prompt=SD1_NEGATIVE,
            steps=STEPS,
            guidance_scale=spec["guidance_scale"],
            scheduler=type(scheduler).__name__,
            # The whole config after the run: DDIMScheduler.from_config of the base pipeline's
            # scheduler config, so keys DDIM takes but the base config lacks keep DDIM's defaults.
            scheduler_config=finite_json(dict(scheduler.config)),
            timesteps=[int(t) for t in scheduler.timesteps],
            conditioning_scales=handed,
            latent_seed=latent_seed,
            generator_seed=generator_seed,
            tolerance=TOLERANCE,
            latents_out_max_abs=float(latents_out.abs().max()),
            f64_deviation=dict(
                latents_out=float((latents64 - latents_out.double()).abs().max()),
                image=float((image64 - image.double()).abs().max()),
            ),
            zero_scale_deviation=control_effect,
        )
        if spec["base"] == "sdxl":
            # diffusers' defaults: original_size from the (prepared) control image, target_size
            # (height, width), crops (0, 0); the negative ids equal the positive ones.
            entry.update(original_size=[HEIGHT, WIDTH], crops_coords_top_left=[0, 0], target_size=[HEIGHT, WIDTH])
        manifest_runs.append(entry)
        print(
            f"  {name}: max |latents| {entry['latents_out_max_abs']:.3f}, f64 deviation latents "
            f"{entry['f64_deviation']['latents_out']:.2e} image {entry['f64_deviation']['image']:.2e}, "
            f"scale-0 difference {control_effect:.3f}, scales per step {handed}"
        )
    return tensors, manifest_runs


# ---------------------------------------------------------------------------------------------
# D. The models called directly.


def direct_outputs(controlnet, unet, inputs: dict, dtype: torch.dtype) -> dict:
    """The direct calls on `inputs` cast to `dtype` (the float64 replay gives the rounding floor)."""
    x = {k: v.to(dtype) for k, v in inputs.items()}
    added = dict(text_embeds=x["text_embeds"], time_ids=x["time_ids"]) if "text_embeds" in x else None
    call = lambda scale, guess: controlnet(
        x["sample"], DIRECT_TIMESTEP, encoder_hidden_states=x["context"], controlnet_cond=x["cond"],
        conditioning_scale=scale, guess_mode=guess, added_cond_kwargs=added, return_dict=False,
    )
    outputs = {}
    with torch.no_grad():
        down, mid = call(DIRECT_SCALE, False)
        guess_down, guess_mid = call(DIRECT_GUESS_SCALE, True)
        for i, d in enumerate(down):
            outputs[f"down.{i}"] = d
        outputs["mid"] = mid
        for i, d in enumerate(guess_down):
            outputs[f"guess.down.{i}"] = d
        outputs["guess.mid"] = guess_mid
        if unet is not None:
            outputs["unet_out"] = unet(
                x["sample"], DIRECT_TIMESTEP, x["context"],
                down_block_additional_residuals=list(down), mid_block_additional_residual=mid,
            ).sample
            outputs["unet_plain"] = unet(x["sample"], DIRECT_TIMESTEP, x["context"]).sample
    return outputs


def write_direct(nets: dict, nets64: dict, bases: dict, bases64: dict, control_a: torch.Tensor) -> tuple[dict, dict]:
    """Each of sd1_a and sdxl on seeded random inputs (independent of any pipeline), at
    conditioning_scale DIRECT_SCALE and again in guess mode at DIRECT_GUESS_SCALE; for sd1_a also
    tiny_sd1's U-Net given the DIRECT_SCALE residuals."""
    tensors, entries = {}, {}
    for name in ["sd1_a", "sdxl"]:
        config = nets[name].config
        seed = seed_of(f"controlnet.direct.{name}")
        generator = torch.Generator().manual_seed(seed)
        prefix = f"direct.{name}"
        inputs = dict(
            sample=torch.randn(2, 4, HEIGHT // 2, WIDTH // 2, generator=generator),
            context=torch.randn(2, 77, config.cross_attention_dim, generator=generator),
            cond=control_a.repeat(2, 1, 1, 1),
        )
        if config.addition_embed_type == "text_time":
            # SDXL's added conditioning: the pooled text embedding (the projection_class_embeddings_input_dim
            # left after the six size/crop numbers' sinusoidal embeddings) and the default size ids.
            pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            inputs["text_embeds"] = torch.randn(2, pooled, generator=generator)
            inputs["time_ids"] = torch.tensor([[HEIGHT, WIDTH, 0, 0, HEIGHT, WIDTH]] * 2, dtype=torch.float32)
        with_unet = name == "sd1_a"
        outputs = direct_outputs(nets[name], bases["sd1"].unet if with_unet else None, inputs, torch.float32)
        outputs64 = direct_outputs(nets64[name], bases64["sd1"].unet if with_unet else None, inputs, torch.float64)
        plain = outputs.pop("unet_plain", None)
        outputs64.pop("unet_plain", None)
        for key, value in {**inputs, **outputs}.items():
            tensors[f"{prefix}.{key}"] = value
        down = [outputs[k] for k in outputs if k.startswith("down.")]
        entry = dict(
            seed=seed,
            inputs=list(inputs),
            down_shapes=[list(d.shape) for d in down],
            mid_shape=list(outputs["mid"].shape),
            # torch.logspace(-1, 0, len(down) + 1) · scale: down residual i gets guess_scales[i], mid the last.
            guess_scales=[float(s) for s in torch.logspace(-1, 0, len(down) + 1) * DIRECT_GUESS_SCALE],
            max_abs={key: float(value.abs().max()) for key, value in outputs.items()},
            f64_deviation={key: float((outputs64[key] - value.double()).abs().max()) for key, value in outputs.items()},
        )
        if with_unet:
            entry["unet"] = BASES["sd1"] + "/unet"
            # How far the residuals move the U-Net's output (max abs difference to the call without them).
            entry["unet_residual_effect"] = float((outputs["unet_out"] - plain).abs().max())
        entries[name] = entry
        print(
            f"  direct.{name}: {len(down)} down residuals, max |down| {max(float(d.abs().max()) for d in down):.3f}, "
            f"max |mid| {entry['max_abs']['mid']:.3f}, max f64 deviation {max(entry['f64_deviation'].values()):.2e}"
            + (f", U-Net output moved by {entry['unet_residual_effect']:.3f}" if with_unet else "")
        )
    return tensors, entries


# ---------------------------------------------------------------------------------------------
# E. The case.

NOTES = [
    "the ControlNet folders are ControlNetModel.from_unet(base unet, conditioning_embedding_out_channels=(8, 16)) "
    "with every parameter then random (N(0, 1/fan_in) convolution and linear weights, N(0, 0.05²) biases, "
    "norm weights 1 + N(0, 0.2²) and biases N(0, 0.2²); the zero convolutions controlnet_down_blocks.*, "
    "controlnet_mid_block and controlnet_cond_embedding.conv_out N(0, 0.1²)), saved in f16; the references use "
    "those f16 values upcast to f32 (the encoder is not a copy of the base U-Net's)",
    "base: the base pipeline's folder relative to this one; its text encoder(s), tokenizer(s), U-Net and VAE are "
    "used as they are, its scheduler config is given to DDIMScheduler.from_config (eta 0: no noise is drawn, "
    "which the generator script asserts; latents_in is the whole random input)",
    "control images: the PIL images read back from the PNGs; diffusers' control_image_processor gives pixels / "
    "255 as [1, 3, 32, 32] (no normalisation to [-1, 1], no resize at 32×32); the `control_a` and `control_b` "
    "tensors hold exactly that",
    "conditioning_scales: the scale each ControlNet was handed at each step (recorded from the calls): "
    "scale · keep with keep = 0 when i/steps < control_guidance_start or (i+1)/steps > control_guidance_end, "
    "else 1. A net with scale 0 still runs; its residuals are multiplied by 0",
    "with classifier-free guidance (guidance_scale > 1) the ControlNet runs on the doubled batch [negative, "
    "positive] with the control image repeated, and its residuals are added to both halves of the U-Net batch; "
    "MultiControlNet: the residuals of the nets are summed (each already multiplied by its scale)",
    "guess_mode with classifier-free guidance: the ControlNet runs on the positive half only (the unscaled "
    "latents through scale_model_input, the positive prompt embeddings, the control image once, for SDXL the "
    "positive text_embeds and time_ids) and its residual i is multiplied by scale · logspace(-1, 0, n+1)[i] "
    "(n down residuals; the mid residual by the last, 1.0); the negative half of the U-Net batch gets zero "
    "residuals",
    "no_guidance: guidance_scale 1.0, no negative prompt is encoded, batch 1",
    "sdxl: add_time_ids [32, 32, 0, 0, 32, 32] (original size = the control image's size, crops (0, 0), target "
    "size = height, width) for both halves; the ControlNet gets the same text_embeds and time_ids as the U-Net",
    "image: [1, 3, 32, 32] in [0, 1] (output_type='np' permuted to NCHW); latents_out from the output_type="
    "'latent' call, checked equal to the latents the np call decoded",
    "f64_deviation: the max abs difference between these float32 outputs and the same pipelines (base and "
    "ControlNets) in float64 with the same inputs: float32 rounding alone",
    "zero_scale_deviation: the max abs difference between latents_out and the same run with every "
    "controlnet_conditioning_scale 0 (the base pipeline alone): how much the ControlNet changes the result",
    "direct: <net>.sample [2, 4, 16, 16], context [2, 77, cross_attention_dim], cond = control_a repeated to "
    "batch 2, timestep 500 (a Python int: diffusers makes it an int64 tensor and broadcasts it), for sdxl "
    "text_embeds [2, 32] and time_ids [2, 6]; down.i / mid at conditioning_scale 0.9, guess.down.i / guess.mid "
    "at guess_mode=True and conditioning_scale 1.0; sd1_a.unet_out = tiny_sd1's U-Net(sample, 500, context, "
    "down_block_additional_residuals=down, mid_block_additional_residual=mid).sample (scale 0.9 residuals); "
    "direct.<net>.f64_deviation: the same calls in float64 (nets, U-Net and inputs), max abs difference per output",
]


def write_controlnet_cases(out_root: pathlib.Path) -> None:
    from make_fixtures import finite_json

    out = out_root / "controlnet"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    base_dirs = {key: (out / rel).resolve() for key, rel in BASES.items()}
    for folder in base_dirs.values():
        assert folder.is_dir(), f"{folder}: run `--only pipeline` first"
    bases = {key: load_pipeline(PIPELINES[key][0], folder, torch.float32) for key, folder in base_dirs.items()}
    bases64 = {key: load_pipeline(PIPELINES[key][0], folder, torch.float64) for key, folder in base_dirs.items()}

    images = {
        name: make_image_png(out / f"{name}.png", (WIDTH, HEIGHT), background, shapes, seed_of(f"controlnet.image.{name}"))
        for name, (background, shapes) in CONTROL_IMAGES.items()
    }
    tensors = {name: control_tensor(image) for name, image in images.items()}
    nets_manifest = {name: write_controlnet(out, name, bases[base].unet) for name, base in NETS.items()}
    nets = {name: load_controlnet(out, name, torch.float32) for name in NETS}
    nets64 = {name: load_controlnet(out, name, torch.float64) for name in NETS}
    # The control tensors stored are what the pipelines' own control_image_processor makes.
    probe = make_pipeline(bases["sd1"], [nets["sd1_a"]])
    for name, image in images.items():
        prepared = probe.control_image_processor.preprocess(image, height=HEIGHT, width=WIDTH)
        assert torch.equal(prepared.float(), tensors[name]), name
    for name, entry in nets_manifest.items():
        config = nets[name].config
        entry.update(
            parameters=sum(p.numel() for p in nets[name].parameters()),
            conditioning_embedding_out_channels=list(config.conditioning_embedding_out_channels),
            down_residuals=1 + sum(
                config.layers_per_block + (i < len(config.block_out_channels) - 1)
                for i in range(len(config.block_out_channels))
            ),
        )

    run_tensors, runs = write_runs(bases, bases64, nets, nets64, images, finite_json)
    tensors.update(run_tensors)
    direct_tensors, direct_entries = write_direct(nets, nets64, bases, bases64, tensors["control_a"])
    for name, entry in direct_entries.items():
        assert len(entry["down_shapes"]) == nets_manifest[name]["down_residuals"], name
    tensors.update(direct_tensors)

    # Every random input from its own seed (weights, images, runs, direct calls named apart).
    seeds = [e["seed"] for e in nets_manifest.values()] + [e["seed"] for e in direct_entries.values()]
    seeds += [s for r in runs for s in (r["latent_seed"], r["generator_seed"])]
    assert len(seeds) == len(set(seeds)), seeds

    manifest = {
        "kind": "controlnet",
        "reference": f"diffusers {diffusers.__version__} StableDiffusionControlNetPipeline / "
        f"StableDiffusionXLControlNetPipeline / ControlNetModel, torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
        "height": HEIGHT,
        "width": WIDTH,
        "controlnets": nets_manifest,
        "images": {name: f"{name}.png" for name in images},
        "runs": runs,
        "direct": {
            "timestep": DIRECT_TIMESTEP,
            "scale": DIRECT_SCALE,
            "guess_scale": DIRECT_GUESS_SCALE,
            "nets": list(direct_entries),
            "tolerance": TOLERANCE,
            **direct_entries,
        },
        "notes": NOTES,
    }
    save_file({k: v.detach().contiguous().float() for k, v in sorted(tensors.items())}, out / "reference.safetensors")
    (out / "manifest.json").write_text(json.dumps(finite_json(manifest), indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    print(f"wrote {out}")
