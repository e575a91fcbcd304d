"""IP-Adapter references: a tiny IP-Adapter in the layout of the released `ip-adapter_sd15.safetensors`
and a tiny CLIP image encoder, loaded into the committed tiny SD 1.x pipeline by diffusers'
`load_ip_adapter` and run through StableDiffusionPipeline, plus each stage called alone; and a tiny
IP-Adapter in the same layout for the committed tiny SDXL pipeline, run through
StableDiffusionXLPipeline with the same image encoder.

Called by make_fixtures.py (`--only ip_adapter`), after the pipeline fixtures, whose tiny_sd1 and
tiny_sdxl model folders are the base pipelines here (read, never rewritten). tests/fixtures/ip_adapter/
holds

- `image_encoder/`: a `CLIPVisionModelWithProjection.save_pretrained` folder (f16): hidden size 32,
  2 layers, 4 heads, MLP 64, 224×224 images in 32×32 patches, projection 24, gelu;
- `ip_adapter.safetensors` (f16): `image_proj.proj.{weight,bias}`, `image_proj.norm.{weight,bias}` and
  `ip_adapter.{k}.to_{k,v}_ip.weight` for k = 1, 3, 5, …, one k per cross-attention layer of the base
  U-Net in the order diffusers numbers them (the manifest's `attention_layers`);
- `ip_adapter_sdxl.safetensors` (f16): the same keys for tiny_sdxl (cross_attention_dim 64; two
  transformer blocks per attention in its second level, so 8 cross-attention layers, keys 1 … 15, the
  manifest's `attention_layers_sdxl`);
- `image_prompt.png` (40×28) and `image_prompt_b.png` (28×40): RGB image prompts (shapes on a
  background plus noise), neither square nor 224, so the CLIP processor's resize and centre crop act;
- `reference.safetensors` (f32, computed from the f16 weights upcast to f32): per pipeline run
  `<run>.latents_in`, `<run>.latents_out`, `<run>.image`, `<run>.timesteps`, `<run>.image_embeds`
  (the SDXL run is `sdxl`, its manifest entry naming its base, adapter and pipeline);
  and the stages called alone, `direct.*` (image_prompt.png) and `direct_b.*` (image_prompt_b.png);
- `manifest.json`: every run's settings, the scheduler config, seeds, tolerances, the float64
  deviations, the feature extractor's config, the attention layers and the conventions (notes).
"""

import importlib
import json
import pathlib
import shutil

import diffusers
import numpy as np
import torch
import transformers
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.models.attention_processor import IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPImageProcessor, CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection

from controlnet_fixtures import NoNoise, make_image_png
from pipeline_fixtures import HEIGHT, SD1_NEGATIVE, SD1_PROMPT, TOLERANCE, WIDTH, load_pipeline, seed_of

BASE = "../pipeline/tiny_sd1/model"
ADAPTER_FILE = "ip_adapter.safetensors"
# The SDXL case: the same layout for tiny_sdxl (cross_attention_dim 64, transformer_layers_per_block
# [1, 2]: every attention of the second level holds two transformer blocks), the same image encoder.
BASE_SDXL = "../pipeline/tiny_sdxl/model"
ADAPTER_FILE_SDXL = "ip_adapter_sdxl.safetensors"
ENCODER_FOLDER = "image_encoder"
# The released SD 1.5 IP-Adapter: 4 image tokens (ImageProjection), what diffusers picks when the
# file has `image_proj.proj.weight`.
NUM_TOKENS = 4
ENCODER_CONFIG = dict(
    hidden_size=32,
    intermediate_size=64,
    projection_dim=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_channels=3,
    image_size=224,
    patch_size=32,
    hidden_act="gelu",
)
NORM_STD = 0.2
BIAS_STD = 0.2
# Gain on the N(0, 1/fan_in) to_k_ip / to_v_ip weights. At 1 the image prompt already moves the
# 4-step latents by O(0.1–1) (zero_scale_deviation in the manifest), so no scaling up is needed.
IP_GAIN = 1.0
STEPS = 4
DIRECT_TIMESTEP = 500
DIRECT_SCALE = 0.6


# ---------------------------------------------------------------------------------------------
# A. The image prompts.

# name -> ((width, height), background, [(kind, box or centre+radius, colour)]).
IMAGES = {
    "image_prompt": (
        (40, 28),
        (30, 36, 70),
        [
            ("rect", (3, 4, 15, 20), (225, 45, 40)),
            ("circle", (28, 11, 8), (50, 215, 95)),
            ("rect", (17, 21, 38, 25), (245, 245, 240)),
        ],
    ),
    "image_prompt_b": (
        (28, 40),
        (205, 195, 165),
        [
            ("circle", (14, 10, 8), (35, 65, 205)),
            ("rect", (3, 22, 25, 30), (240, 205, 25)),
            ("rect", (20, 2, 24, 38), (25, 20, 20)),
        ],
    ),
}


def write_image_encoder(out: pathlib.Path) -> dict:
    """transformers' own random initialisation (seeded), then every LayerNorm's weight 1 + N(0, 0.2²)
    and every bias (LayerNorms and linear layers; transformers starts them at 0) N(0, 0.2²), so
    that a dropped bias or a swapped norm shows; saved in f16."""
    seed = seed_of("ip_adapter.image_encoder")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**ENCODER_CONFIG))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1.0 + NORM_STD * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(BIAS_STD * torch.randn(module.bias.shape, generator=generator))
            elif isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.copy_(BIAS_STD * torch.randn(module.bias.shape, generator=generator))
    model.half().save_pretrained(out / ENCODER_FOLDER, safe_serialization=True)
    return dict(folder=ENCODER_FOLDER, seed=seed, parameters=sum(p.numel() for p in model.parameters()), **ENCODER_CONFIG)


def ip_attention_layers(unet) -> list:
    """The cross-attention layers diffusers' `_convert_ip_adapter_attn_to_diffusers` gives an
    IP-Adapter processor, with the key number it reads for each: it walks `unet.attn_processors`
    (module registration order: down_blocks, up_blocks, then mid_block) and numbers every processor
    not ending in `attn1.processor` 1, 3, 5, … (the released files number all attention layers
    0, 1, 2, …, self-attention even, cross-attention odd). hidden_size is diffusers' guess from the
    block (block_out_channels, reversed for up_blocks); checked here against the layer's to_k."""
    modules = dict(unet.named_modules())
    layers, k = [], 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        module = name[: -len(".processor")]
        if name.startswith("mid_block"):
            hidden = unet.config.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(unet.config.block_out_channels))[int(name[len("up_blocks.")])]
        else:
            hidden = unet.config.block_out_channels[int(name[len("down_blocks.")])]
        attn = modules[module]
        assert attn.is_cross_attention and attn.to_k.out_features == hidden, (module, hidden)
        layers.append(dict(k=k, module=module, hidden_size=hidden, heads=attn.heads, head_dim=hidden // attn.heads))
        k += 2
    return layers


def write_ip_adapter(out: pathlib.Path, unet, layers: list, file: str = ADAPTER_FILE,
                     seed_name: str = "ip_adapter.weights") -> tuple[dict, dict]:
    """The released layout (diffusers' load_ip_adapter splits the keys at `image_proj.` and
    `ip_adapter.`). proj: N(0, 1/24) weight, N(0, 0.2²) bias; norm: weight 1 + N(0, 0.2²), bias
    N(0, 0.2²); to_k_ip / to_v_ip: IP_GAIN · N(0, 1/cross_attention_dim) (its fan_in: 32 for
    tiny_sd1, 64 for tiny_sdxl); f16."""
    seed = seed_of(seed_name)
    generator = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    embed = ENCODER_CONFIG["projection_dim"]
    tensors = {
        "image_proj.proj.weight": torch.randn(NUM_TOKENS * cross, embed, generator=generator) * embed**-0.5,
        "image_proj.proj.bias": BIAS_STD * torch.randn(NUM_TOKENS * cross, generator=generator),
        "image_proj.norm.weight": 1.0 + NORM_STD * torch.randn(cross, generator=generator),
        "image_proj.norm.bias": BIAS_STD * torch.randn(cross, generator=generator),
    }
    for layer in layers:
        for which in ["to_k_ip", "to_v_ip"]:
            weight = torch.randn(layer["hidden_size"], cross, generator=generator) * (IP_GAIN * cross**-0.5)
            tensors[f"ip_adapter.{layer['k']}.{which}.weight"] = weight
    tensors = {k: v.half().contiguous() for k, v in tensors.items()}
    save_file(tensors, out / file, metadata={"format": "pt"})
    entry = dict(file=file, seed=seed, ip_gain=IP_GAIN, tensors={k: list(v.shape) for k, v in sorted(tensors.items())})
    return entry, tensors


def load_ip_pipeline(base_dir: pathlib.Path, out: pathlib.Path, dtype: torch.dtype, stored: dict, layers: list,
                     cls=StableDiffusionPipeline, file: str = ADAPTER_FILE):
    """tiny_sd1 (or tiny_sdxl, cls StableDiffusionXLPipeline) in `dtype` with the IP-Adapter loaded
    as a user would: load_ip_adapter(folder, subfolder="", weight_name=..., image_encoder_folder=
    <absolute path>). The pipeline is loaded with feature_extractor=None (tiny_sdxl's model_index has
    none), so load_ip_adapter makes its own CLIPImageProcessor (size and crop_size = the encoder's
    image_size, 224). Checks that every IP processor holds the stored weights under the key number the
    manifest gives it."""
    pipe = load_pipeline(cls, base_dir, dtype)
    assert type(pipe) is cls
    assert pipe.image_encoder is None and pipe.feature_extractor is None
    pipe.load_ip_adapter(
        str(out), subfolder="", weight_name=file,
        image_encoder_folder=str((out / ENCODER_FOLDER).resolve()), local_files_only=True,
    )
    pipe.image_encoder.eval()
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            assert all(p.dtype == dtype for p in module.parameters()), name
    assert type(pipe.feature_extractor) is CLIPImageProcessor, type(pipe.feature_extractor)
    assert pipe.feature_extractor.to_dict() == CLIPImageProcessor().to_dict()
    unet = pipe.unet
    assert unet.config.encoder_hid_dim_type == "ip_image_proj"
    assert isinstance(unet.encoder_hid_proj, MultiIPAdapterImageProjection)
    (projection,) = unet.encoder_hid_proj.image_projection_layers
    assert isinstance(projection, ImageProjection) and projection.num_image_text_embeds == NUM_TOKENS
    # diffusers renames proj -> image_embeds.
    assert torch.equal(projection.image_embeds.weight, stored["image_proj.proj.weight"].to(dtype))
    assert torch.equal(projection.image_embeds.bias, stored["image_proj.proj.bias"].to(dtype))
    assert torch.equal(projection.norm.weight, stored["image_proj.norm.weight"].to(dtype))
    assert torch.equal(projection.norm.bias, stored["image_proj.norm.bias"].to(dtype))
    by_module = {layer["module"]: layer["k"] for layer in layers}
    seen = []
    for name, processor in unet.attn_processors.items():
        module = name[: -len(".processor")]
        if isinstance(processor, (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0)):
            k = by_module[module]
            assert type(processor) is IPAdapterAttnProcessor2_0
            assert torch.equal(processor.to_k_ip[0].weight, stored[f"ip_adapter.{k}.to_k_ip.weight"].to(dtype)), module
            assert torch.equal(processor.to_v_ip[0].weight, stored[f"ip_adapter.{k}.to_v_ip.weight"].to(dtype)), module
            assert processor.num_tokens == [NUM_TOKENS]
            seen.append(module)
        else:
            assert module not in by_module and name.endswith("attn1.processor"), name
    assert seen == [layer["module"] for layer in layers], seen
    return pipe


# ---------------------------------------------------------------------------------------------
# C. The runs.


def ip_run(name, image, scale, prompt=SD1_PROMPT, negative_prompt=SD1_NEGATIVE, guidance_scale=7.5):
    return dict(name=name, image=image, scale=scale, prompt=prompt, negative_prompt=negative_prompt,
                guidance_scale=guidance_scale)


RUNS = [
    ip_run("one", "image_prompt", 0.6),
    ip_run("image_only", "image_prompt_b", 1.0, prompt="", negative_prompt=None),
    ip_run("no_guidance", "image_prompt", 0.8, negative_prompt=None, guidance_scale=1.0),
]
# Through StableDiffusionXLPipeline on tiny_sdxl with ip_adapter_sdxl.safetensors.
SDXL_RUNS = [
    ip_run("sdxl", "image_prompt", 0.7),
]


def call_ip_pipeline(pipe, spec, base_scheduler, image, latents, seed, output_type, scale=None, with_image=True,
                     image_embeds=None):
    """One call; returns (images or latents, the final latents seen by the step callback, the
    scheduler after the run, the `image_embeds` the U-Net was handed at each step). `image_embeds`
    (diffusers' ip_adapter_image_embeds, already batched for CFG) replaces the image."""
    if with_image:
        pipe.set_ip_adapter_scale(spec["scale"] if scale is None else scale)
    pipe.scheduler = DDIMScheduler.from_config(base_scheduler.config)
    kwargs = dict(
        prompt=spec["prompt"],
        negative_prompt=spec["negative_prompt"],
        num_inference_steps=STEPS,
        guidance_scale=spec["guidance_scale"],
        height=HEIGHT,
        width=WIDTH,
        latents=latents.clone(),
        generator=torch.Generator().manual_seed(seed),
        output_type=output_type,
    )
    if with_image and image_embeds is not None:
        kwargs["ip_adapter_image_embeds"] = [image_embeds]
    elif with_image:
        kwargs["ip_adapter_image"] = image
    final, handed = {}, []

    def on_step_end(pipeline, i, t, tensors):
        final["latents"] = tensors["latents"].clone()
        return tensors

    unet = pipe.unet
    forward = unet.forward

    def recording_forward(*args, **kw):
        added = kw.get("added_cond_kwargs")
        # SDXL always hands text_embeds and time_ids; image_embeds only with an image prompt.
        handed.append(None if added is None or "image_embeds" not in added else [e.clone() for e in added["image_embeds"]])
        return forward(*args, **kw)

    pipeline_module = importlib.import_module(type(pipe).__module__)
    ddim_module = importlib.import_module(DDIMScheduler.__module__)
    unet.forward = recording_forward
    try:
        with NoNoise(pipeline_module, ddim_module), torch.no_grad():
            out = pipe(**kwargs, callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"])
    finally:
        del unet.forward
    return out.images, final["latents"], pipe.scheduler, handed


def encode(pipe, image, processor=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values [1, 3, 224, 224], image_embeds [1, 24]) as the pipeline's encode_image makes them
    (with `processor` in place of its feature extractor if given)."""
    pixel_values = (processor or pipe.feature_extractor)(image, return_tensors="pt").pixel_values
    with torch.no_grad():
        embeds = pipe.image_encoder(pixel_values.to(pipe.image_encoder.dtype)).image_embeds
    return pixel_values, embeds


def write_runs(pipe, pipe64, plain, images: dict, finite_json, runs: list = RUNS, base: str = BASE,
               adapter_file: str = ADAPTER_FILE):
    tensors, manifest_runs = {}, []
    base_scheduler = plain.scheduler
    for spec in runs:
        name = spec["name"]
        image = images[spec["image"]]
        latent_seed = seed_of(f"ip_adapter.run.{name}")
        generator_seed = latent_seed + 1
        latents = torch.randn(1, 4, HEIGHT // 2, WIDTH // 2, generator=torch.Generator().manual_seed(latent_seed))
        call = lambda p, lat, output_type, **kw: call_ip_pipeline(
            p, spec, base_scheduler, image, lat, generator_seed, output_type, **kw
        )
        latents_out, latents_cb, scheduler, handed = call(pipe, latents, "latent")
        image_out, latents_cb2, scheduler2, handed2 = call(pipe, latents, "np")
        # The latents the np call decoded are those of the latent call.
        assert torch.equal(latents_out, latents_cb) and torch.equal(latents_out, latents_cb2), name
        assert torch.equal(scheduler.timesteps, scheduler2.timesteps) and len(scheduler.timesteps) == STEPS
        # What the U-Net was handed: a list of one tensor [batch, 1, 24] at every step, the same at
        # every step; with CFG batch 2 = [zeros (the negative image embedding); image_embeds].
        _, embeds = encode(pipe, image)
        cfg = spec["guidance_scale"] > 1
        expected = torch.cat([torch.zeros_like(embeds), embeds])[:, None] if cfg else embeds[:, None]
        assert len(handed) == len(handed2) == STEPS
        for step in handed + handed2:
            assert len(step) == 1 and step[0].shape == expected.shape and torch.equal(step[0], expected), name
        image_out = torch.from_numpy(image_out).permute(0, 3, 1, 2)
        assert image_out.shape == (1, 3, HEIGHT, WIDTH) and 0 <= image_out.min() and image_out.max() <= 1
        image64, latents64, _, _ = call(pipe64, latents.double(), "np")
        image64 = torch.from_numpy(image64).permute(0, 3, 1, 2)
        # The same run with IP-Adapter scale 0: diffusers' processor skips the image attention
        # altogether, so this is the base pipeline; how far the image prompt moves the result.
        unscaled, _, _, _ = call(pipe, latents, "latent", scale=0.0)
        effect = float((latents_out - unscaled).abs().max())
        assert effect > 1e-2, (name, effect)
        without, _, _, handed_plain = call(plain, latents, "latent", with_image=False)
        assert all(h is None for h in handed_plain)
        base_difference = float((without - unscaled).abs().max())
        assert base_difference < 1e-6, (name, base_difference)
        # The same run with the image embedding from transformers' PIL backend's pixels (Pillow's
        # own 8-bit bicubic, a level off on a few pixels): what an implementation of that backend gets.
        _, embeds_pil = encode(pipe, image, CLIPImageProcessorPil())
        pil_batch = torch.cat([torch.zeros_like(embeds_pil), embeds_pil])[:, None] if cfg else embeds_pil[:, None]
        pil_latents, _, _, _ = call(pipe, latents, "latent", image_embeds=pil_batch)
        pil_deviation = float((pil_latents - latents_out).abs().max())
        pipe.set_ip_adapter_scale(spec["scale"])

        tensors[f"{name}.latents_in"] = latents
        tensors[f"{name}.latents_out"] = latents_out
        tensors[f"{name}.image"] = image_out
        tensors[f"{name}.timesteps"] = scheduler.timesteps.float()
        tensors[f"{name}.image_embeds"] = embeds
        entry = dict(
            name=name,
            base=base,
            pipeline=type(plain).__name__,
            ip_adapter=adapter_file,
            image_encoder=ENCODER_FOLDER,
            image=f"{spec['image']}.png",
            scale=spec["scale"],
            prompt=spec["prompt"],
            negative_prompt=spec["negative_prompt"],
            steps=STEPS,
            guidance_scale=spec["guidance_scale"],
            classifier_free_guidance=cfg,
            unet_image_embeds_shape=list(expected.shape),
            scheduler=type(scheduler).__name__,
            # The whole config after the run: DDIMScheduler.from_config of the base pipeline's
            # scheduler config, so keys DDIM takes but the base config lacks keep DDIM's defaults.
            scheduler_config=finite_json(dict(scheduler.config)),
            timesteps=[int(t) for t in scheduler.timesteps],
            latent_seed=latent_seed,
            generator_seed=generator_seed,
            tolerance=TOLERANCE,
            latents_out_max_abs=float(latents_out.abs().max()),
            f64_deviation=dict(
                latents_out=float((latents64 - latents_out.double()).abs().max()),
                image=float((image64 - image_out.double()).abs().max()),
            ),
            zero_scale_deviation=effect,
            zero_scale_vs_base_pipeline=base_difference,
            pil_backend_latents_deviation=pil_deviation,
        )
        manifest_runs.append(entry)
        print(
            f"  {name}: max |latents| {entry['latents_out_max_abs']:.3f}, f64 deviation latents "
            f"{entry['f64_deviation']['latents_out']:.2e} image {entry['f64_deviation']['image']:.2e}, "
            f"scale-0 difference {effect:.3f} (scale 0 vs base pipeline {base_difference:.1e}), "
            f"PIL-backend pixels move the latents by {pil_deviation:.1e}"
        )
    return tensors, manifest_runs


# ---------------------------------------------------------------------------------------------
# D. The stages called alone.


def direct_stages(pipe, pixel_values: torch.Tensor, inputs: dict, dtype: torch.dtype) -> dict:
    """Encoder, image projection and one U-Net call in `dtype` (the float64 replay gives the
    rounding floor); the same pixel values for both."""
    unet = pipe.unet
    with torch.no_grad():
        embeds = pipe.image_encoder(pixel_values.to(dtype)).image_embeds
        zeros = torch.zeros_like(embeds)
        # encoder_hid_proj takes a list (one entry per IP-Adapter) of [batch, num_images, 24] and
        # gives [batch, num_images, 4, 32]; one image here.
        (tokens,) = unet.encoder_hid_proj([embeds[:, None]])
        (negative,) = unet.encoder_hid_proj([zeros[:, None]])
        unet_embeds = torch.cat([zeros, embeds])[:, None]
        pipe.set_ip_adapter_scale(DIRECT_SCALE)
        unet_out = unet(
            inputs["sample"].to(dtype), DIRECT_TIMESTEP, inputs["context"].to(dtype),
            added_cond_kwargs={"image_embeds": [unet_embeds]},
        ).sample
    return dict(image_embeds=embeds, ip_tokens=tokens[:, 0], ip_tokens_negative=negative[:, 0],
                unet_image_embeds=unet_embeds, unet_out=unet_out)


def write_direct(pipe, pipe64, images: dict) -> tuple[dict, dict]:
    tensors, entry = {}, {}
    seed = seed_of("ip_adapter.direct")
    generator = torch.Generator().manual_seed(seed)
    inputs = dict(
        sample=torch.randn(2, 4, HEIGHT // 2, WIDTH // 2, generator=generator),
        context=torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=generator),
    )
    pixel_values, embeds = encode(pipe, images["image_prompt"])
    outputs = direct_stages(pipe, pixel_values, inputs, torch.float32)
    outputs64 = direct_stages(pipe64, pixel_values, inputs, torch.float64)
    assert torch.equal(outputs["image_embeds"], embeds)
    projection = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    with torch.no_grad():
        assert torch.equal(outputs["ip_tokens"], projection(embeds))
        # The negative tokens: LayerNorm(proj.bias viewed [4, 32]) (the linear layer of zeros).
        bias_tokens = torch.nn.functional.layer_norm(
            projection.image_embeds.bias.view(1, NUM_TOKENS, -1), (projection.norm.normalized_shape[0],),
            projection.norm.weight, projection.norm.bias, projection.norm.eps,
        )
        assert torch.allclose(outputs["ip_tokens_negative"], bias_tokens, atol=1e-6)
        pipe.set_ip_adapter_scale(0.0)
        plain = pipe.unet(inputs["sample"], DIRECT_TIMESTEP, inputs["context"],
                          added_cond_kwargs={"image_embeds": [outputs["unet_image_embeds"]]}).sample
    for key, value in {**inputs, "pixel_values": pixel_values, **outputs}.items():
        tensors[f"direct.{key}"] = value
    # transformers' PIL backend's pixels for the same image (Pillow's 8-bit bicubic resize).
    tensors["direct.pixel_values_pil"] = CLIPImageProcessorPil()(images["image_prompt"], return_tensors="pt").pixel_values
    pixel_values_b, embeds_b = encode(pipe, images["image_prompt_b"])
    tensors["direct_b.pixel_values"] = pixel_values_b
    tensors["direct_b.image_embeds"] = embeds_b
    with torch.no_grad():
        embeds_b64 = pipe64.image_encoder(pixel_values_b.double()).image_embeds
    entry = dict(
        image="image_prompt.png",
        image_b="image_prompt_b.png",
        # The U-Net of direct.unet_out (the adapter's layers attached to it), relative to this folder.
        unet=BASE + "/unet",
        seed=seed,
        timestep=DIRECT_TIMESTEP,
        scale=DIRECT_SCALE,
        tolerance=TOLERANCE,
        shapes={key: list(value.shape) for key, value in tensors.items()},
        max_abs={key: float(value.abs().max()) for key, value in outputs.items()},
        f64_deviation={
            **{key: float((outputs64[key] - value.double()).abs().max()) for key, value in outputs.items()},
            "direct_b.image_embeds": float((embeds_b64 - embeds_b.double()).abs().max()),
        },
        # How far the image attention moves this U-Net output (the same call at scale 0).
        unet_zero_scale_deviation=float((outputs["unet_out"] - plain).abs().max()),
    )
    print(
        f"  direct: |image_embeds| {entry['max_abs']['image_embeds']:.3f}, |ip_tokens| {entry['max_abs']['ip_tokens']:.3f}, "
        f"U-Net output moved by {entry['unet_zero_scale_deviation']:.3f} at scale {DIRECT_SCALE}, "
        f"max f64 deviation {max(entry['f64_deviation'].values()):.2e}"
    )
    return tensors, entry


def feature_extractor_entry(pipe, images: dict) -> dict:
    """The processor's config, the geometry of its resize and crop for each image, and how far the
    PIL backend (CLIPImageProcessorPil, transformers' other implementation) is from it."""
    processor = pipe.feature_extractor
    config = processor.to_dict()
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    pil = CLIPImageProcessorPil()
    geometry = {}
    for name, image in images.items():
        width, height = image.size
        short = processor.size["shortest_edge"]
        # transformers' get_resize_output_image_size: the short side to 224, the long side int(224 · long / short).
        if width <= height:
            resized = (short, int(short * height / width))
        else:
            resized = (int(short * width / height), short)
        crop = processor.crop_size
        pixel_values = processor(image, return_tensors="pt").pixel_values
        levels = (pixel_values * std + mean) * 255
        geometry[name] = dict(
            size=[width, height],
            resized=list(resized),
            crop_left=int((resized[0] - crop["width"]) / 2),
            crop_top=int((resized[1] - crop["height"]) / 2),
            # The resize works on the uint8 image and rounds back to uint8: (pixel · std + mean) · 255
            # are whole numbers.
            max_distance_from_uint8=float((levels - levels.round()).abs().max()),
        )
        pil_pixels = pil(image, return_tensors="pt").pixel_values
        pil_levels = ((pil_pixels - pixel_values) * std * 255).round()
        with torch.no_grad():
            encoder = pipe.image_encoder
            embeds_deviation = (encoder(pil_pixels).image_embeds - encoder(pixel_values).image_embeds).abs().max()
        geometry[name].update(
            pil_backend_max_deviation=float((pil_pixels - pixel_values).abs().max()),
            pil_backend_values_off_by_one_level=int((pil_levels != 0).sum()),
            pil_backend_max_levels=int(pil_levels.abs().max()),
            pil_backend_image_embeds_deviation=float(embeds_deviation),
        )
        assert geometry[name]["max_distance_from_uint8"] < 1e-3, geometry[name]
    return dict(
        cls=type(processor).__name__,
        backend="torchvision",
        config=config,
        geometry=geometry,
    )


# ---------------------------------------------------------------------------------------------
# E. The case.

NOTES = [
    "image_encoder: CLIPVisionModelWithProjection with transformers' seeded random initialisation, then every "
    "LayerNorm weight 1 + N(0, 0.2²) and every bias (LayerNorms, attention and MLP linears) N(0, 0.2²); saved in "
    "f16; the references use those f16 values upcast to f32 (reloaded from disk by load_ip_adapter)",
    "ip_adapter.safetensors: the released ip-adapter_sd15.safetensors layout. image_proj.proj.weight [4·32, 24] "
    "N(0, 1/24), image_proj.proj.bias [128] N(0, 0.2²), image_proj.norm.weight [32] 1 + N(0, 0.2²), "
    "image_proj.norm.bias [32] N(0, 0.2²); ip_adapter.{k}.to_k_ip.weight / to_v_ip.weight [hidden size, 32] "
    "N(0, 1/32), no bias; f16. diffusers loads image_proj into ImageProjection (proj renamed image_embeds): "
    "tokens = LayerNorm(reshape(proj(image_embeds), [batch, 4, 32])), the LayerNorm over the last 32 (eps 1e-5)",
    "attention_layers: diffusers' _convert_ip_adapter_attn_to_diffusers walks unet.attn_processors in module "
    "registration order (down_blocks, up_blocks, then mid_block; within a block attentions.i.transformer_blocks.j, "
    "attn1 then attn2), skips the self-attention (attn1) processors and gives the cross-attention (attn2) ones "
    "the keys 1, 3, 5, … in that order (the released files count every attention layer 0, 1, 2, …; the "
    "self-attention ones hold nothing). hidden_size = the attention's inner dim (to_k_ip's out features)",
    "image prompt preprocessing: load_ip_adapter makes CLIPImageProcessor(size=224, crop_size=224) (the pipeline "
    "was loaded with feature_extractor=None), equal to the default CLIPImageProcessor(). In transformers 5 that "
    "class is the torchvision backend: the PNG read back as RGB uint8 [3, H, W] -> torchvision resize with "
    "bicubic interpolation and antialias=True on the uint8 tensor (PIL's bicubic filter, a = -0.5; the result is "
    "rounded to uint8) so that the short side is 224 and the long side int(224 · long / short) (both images: "
    "224×320) -> centre crop 224×224 at top = int((H - 224) / 2), left = int((W - 224) / 2) -> (x / 255 - mean) "
    "/ std with the OpenAI CLIP mean/std. feature_extractor.geometry gives the sizes ([width, height]), the crop "
    "offsets and how far transformers' PIL backend (CLIPImageProcessorPil, PIL's own bicubic resize) is from "
    "this: pil_backend_max_deviation in pixel_values units (one uint8 level: 1 / 255 / std ≈ 0.015), "
    "pil_backend_values_off_by_one_level how many of the 3·224² values differ, pil_backend_image_embeds_deviation "
    "the encoder's output moved by it; direct.pixel_values_pil holds the PIL backend's pixel_values for "
    "image_prompt.png and each run's pil_backend_latents_deviation is its latents_out with the image embedding "
    "from those pixels instead (diffusers' ip_adapter_image_embeds)",
    "image embeddings: encode_image runs the image encoder on pixel_values and takes image_embeds [1, 24] "
    "(visual_projection of the post-LayerNormed class token); the negative image embedding is torch.zeros_like("
    "image_embeds) (for this adapter type, ImageProjection, diffusers never encodes a blank image: that is only "
    "for the Plus adapters' hidden states). prepare_ip_adapter_image_embeds makes [1, 1, 24] (num_images axis), "
    "with CFG cat([zeros, embeds]) -> [2, 1, 24] (negative first, like the prompt embeddings), and the U-Net "
    "gets added_cond_kwargs={'image_embeds': [that tensor]} (a list, one entry per IP-Adapter) at every step. "
    "The U-Net (encoder_hid_dim_type 'ip_image_proj') applies encoder_hid_proj -> [batch, 1, 4, 32] and passes "
    "(text context, [tokens]) to every attention; the negative half's tokens are LayerNorm(proj.bias) (not zero)",
    "IPAdapterAttnProcessor2_0 (every attn2; attn1 keeps AttnProcessor2_0): q = to_q(x); text: k = to_k(ctx), v = "
    "to_v(ctx) (attn.norm_cross applies to the text context only, never to the image tokens; None in SD 1.x), "
    "h = softmax(q kᵀ / √head_dim) v over the same heads (the attention mask, None here, only for the text part); "
    "image: k' = to_k_ip(tokens), v' = to_v_ip(tokens) (no bias, no norm, no mask), h' = softmax(q k'ᵀ / "
    "√head_dim) v' with the same q and heads; out = to_out(h + scale · h') (scale inside, before to_out and its "
    "bias), then the residual connection / rescale_output_factor as usual (none in SD 1.x's attn2: the transformer "
    "block adds the residual). A scale of exactly 0 skips the image branch (zero_scale_vs_base_pipeline: the run "
    "at scale 0 against tiny_sd1 without the adapter). set_ip_adapter_scale(s) sets the same s in every layer",
    "runs: tiny_sd1 in f32 with the adapter loaded by pipe.load_ip_adapter(<this folder>, subfolder='', "
    "weight_name='ip_adapter.safetensors', image_encoder_folder=<absolute path of image_encoder>), "
    "pipe.set_ip_adapter_scale(scale), DDIMScheduler.from_config(base scheduler config) (eta 0: no noise is "
    "drawn, which the generator script asserts; latents_in is the whole random input), ip_adapter_image = the "
    "PIL image read back from the PNG. <run>.image_embeds: the positive image embedding the pipeline computed "
    "(checked equal to what the U-Net was handed). no_guidance: guidance_scale 1, no negative prompt, batch 1, "
    "image_embeds [1, 1, 24] only. image_only: prompt '' and negative None (diffusers encodes '' for both halves)",
    "image: [1, 3, 32, 32] in [0, 1] (output_type='np' permuted to NCHW); latents_out from the output_type="
    "'latent' call, checked equal to the latents the np call decoded",
    "f64_deviation: the max abs difference between these float32 outputs and the same pipeline (base, image "
    "encoder and adapter) in float64 with the same inputs: float32 rounding alone",
    "zero_scale_deviation: the max abs difference between latents_out and the same run with IP-Adapter scale 0 "
    "(the base pipeline alone): how much the image prompt changes the result",
    "direct: on image_prompt.png, pixel_values [1, 3, 224, 224] (the feature extractor's output), image_embeds "
    "[1, 24] (the encoder's image_embeds), ip_tokens [1, 4, 32] = encoder_hid_proj([image_embeds[:, None]])[0]"
    "[:, 0], ip_tokens_negative the same on zeros; sample [2, 4, 16, 16] and context [2, 77, 32] seeded random, "
    "timestep 500 (a Python int), unet_image_embeds = cat([zeros, image_embeds])[:, None] -> [2, 1, 24] (as the "
    "pipeline builds it for CFG), IP-Adapter scale 0.6: unet_out = unet(sample, 500, context, added_cond_kwargs="
    "{'image_embeds': [unet_image_embeds]}).sample. direct_b: pixel_values and image_embeds of image_prompt_b.png "
    "(portrait: the crop acts on the other axis). direct.f64_deviation: the same stages in float64",
]

NOTES_SDXL = [
    "ip_adapter_sdxl.safetensors: the same released layout for tiny_sdxl (cross_attention_dim 64, the width of "
    "the two text encoders' hidden states concatenated, 32 + 32): image_proj.proj.weight [4·64, 24] N(0, 1/24), "
    "image_proj.proj.bias [256] N(0, 0.2²), image_proj.norm.weight [64] 1 + N(0, 0.2²), image_proj.norm.bias [64] "
    "N(0, 0.2²); ip_adapter.{k}.to_k_ip.weight / to_v_ip.weight [64, 64] N(0, 1/64), no bias; f16; the same "
    "image encoder (image_encoder/, image embedding width 24) as the SD 1.x runs. Tokens: [batch, 4, 64]",
    "attention_layers_sdxl: tiny_sdxl's U-Net has transformer_layers_per_block [1, 2] (up blocks reversed: [2, 1]), "
    "layers_per_block 1, down blocks (DownBlock2D, CrossAttnDownBlock2D), up blocks (CrossAttnUpBlock2D, "
    "UpBlock2D), so every cross-attention block holds attentions.i with two transformer_blocks.j each: "
    "down_blocks.1 (one attention), up_blocks.0 (layers_per_block + 1 = two attentions), mid_block (one "
    "attention); 8 attn2 layers. diffusers' attn_processors order (down_blocks, up_blocks, then mid_block; within "
    "a block attentions.i outer, transformer_blocks.j inner, attn1 before attn2) gives them the keys 1, 3, …, 15: "
    "a second transformer block's attn2 comes right after the first's, before the next attention. heads 4 "
    "(tiny_sdxl's attention_head_dim [2, 4] is, in diffusers, the number of heads), head_dim 16",
    "runs.sdxl: StableDiffusionXLPipeline (add_watermarker=False) on tiny_sdxl in f32 with the adapter loaded by "
    "pipe.load_ip_adapter(<this folder>, subfolder='', weight_name='ip_adapter_sdxl.safetensors', "
    "image_encoder_folder=<absolute path of image_encoder>), pipe.set_ip_adapter_scale(0.7), the default "
    "micro-conditioning (original_size = target_size = (32, 32), crops_coords_top_left (0, 0)), guidance 7.5 "
    "with negative prompt 'blurry'. The U-Net gets added_cond_kwargs {text_embeds, time_ids, image_embeds}, "
    "image_embeds = [cat([zeros, image_embeds])[:, None]] ([2, 1, 24]) as in the SD 1.x runs; every other "
    "convention (image preprocessing, negative image embedding, IPAdapterAttnProcessor2_0 with the scale inside "
    "before to_out) is the SD 1.x one. zero_scale_vs_base_pipeline compares with tiny_sdxl without the adapter",
    "runs.sdxl scheduler: DDIMScheduler.from_config(tiny_sdxl's EulerDiscreteScheduler config). That config has "
    "no clip_sample / set_alpha_to_one, so DDIM's defaults apply (both true): every step clips the predicted "
    "x0 to [-1, 1] (clip_sample_range 1), and the last step (t = 1, previous alpha_cumprod 1 by "
    "set_alpha_to_one) returns that clipped x0, so latents_out lies in [-1, 1] (65 of its 1024 values are "
    "exactly ±1). scheduler_config is the whole config after the run: the Euler-only keys it carries "
    "(interpolation_type, use_karras_sigmas, …, final_sigmas_type) are ignored by DDIM",
]


def write_ip_adapter_cases(out_root: pathlib.Path) -> None:
    from make_fixtures import finite_json

    out = out_root / "ip_adapter"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    base_dir = (out / BASE).resolve()
    assert base_dir.is_dir(), f"{base_dir}: run `--only pipeline` first"
    plain = load_pipeline(StableDiffusionPipeline, base_dir, torch.float32)
    assert plain.vae_scale_factor == 2, plain.vae_scale_factor

    images = {
        name: make_image_png(out / f"{name}.png", size, background, shapes, seed_of(f"ip_adapter.image.{name}"), noise=12.0)
        for name, (size, background, shapes) in IMAGES.items()
    }
    encoder_entry = write_image_encoder(out)
    layers = ip_attention_layers(plain.unet)
    adapter_entry, stored = write_ip_adapter(out, plain.unet, layers)
    assert load_file(out / ADAPTER_FILE).keys() == stored.keys()

    pipe = load_ip_pipeline(base_dir, out, torch.float32, stored, layers)
    pipe64 = load_ip_pipeline(base_dir, out, torch.float64, stored, layers)

    tensors, runs = write_runs(pipe, pipe64, plain, images, finite_json)
    direct_tensors, direct_entry = write_direct(pipe, pipe64, images)
    tensors.update(direct_tensors)
    features = feature_extractor_entry(pipe, images)

    # The SDXL case, after everything above (whose tensors and numbers it leaves as they were).
    base_sdxl = (out / BASE_SDXL).resolve()
    assert base_sdxl.is_dir(), f"{base_sdxl}: run `--only pipeline` first"
    plain_sdxl = load_pipeline(StableDiffusionXLPipeline, base_sdxl, torch.float32)
    assert plain_sdxl.vae_scale_factor == 2, plain_sdxl.vae_scale_factor
    assert list(plain_sdxl.unet.config.transformer_layers_per_block) == [1, 2]
    layers_sdxl = ip_attention_layers(plain_sdxl.unet)
    adapter_sdxl_entry, stored_sdxl = write_ip_adapter(
        out, plain_sdxl.unet, layers_sdxl, file=ADAPTER_FILE_SDXL, seed_name="ip_adapter.weights.sdxl"
    )
    assert load_file(out / ADAPTER_FILE_SDXL).keys() == stored_sdxl.keys()
    pipe_sdxl = load_ip_pipeline(base_sdxl, out, torch.float32, stored_sdxl, layers_sdxl,
                                 cls=StableDiffusionXLPipeline, file=ADAPTER_FILE_SDXL)
    pipe_sdxl64 = load_ip_pipeline(base_sdxl, out, torch.float64, stored_sdxl, layers_sdxl,
                                   cls=StableDiffusionXLPipeline, file=ADAPTER_FILE_SDXL)
    # The same image encoder as the SD 1.x runs: the same image embedding.
    assert torch.equal(encode(pipe_sdxl, images["image_prompt"])[1], encode(pipe, images["image_prompt"])[1])
    tensors_sdxl, runs_sdxl = write_runs(pipe_sdxl, pipe_sdxl64, plain_sdxl, images, finite_json, runs=SDXL_RUNS,
                                         base=BASE_SDXL, adapter_file=ADAPTER_FILE_SDXL)
    assert not tensors_sdxl.keys() & tensors.keys()
    # clip_sample (DDIM's default; tiny_sdxl's Euler config has none): the last step returns the clipped x0.
    assert float(tensors_sdxl["sdxl.latents_out"].abs().max()) <= 1.0
    assert int((tensors_sdxl["sdxl.latents_out"].abs() == 1).sum()) == 65, "NOTES_SDXL counts 65 values at ±1"
    tensors.update(tensors_sdxl)
    runs = runs + runs_sdxl

    seeds = [encoder_entry["seed"], adapter_entry["seed"], direct_entry["seed"], adapter_sdxl_entry["seed"]]
    seeds += [seed_of(f"ip_adapter.image.{name}") for name in IMAGES]
    seeds += [s for r in runs for s in (r["latent_seed"], r["generator_seed"])]
    assert len(seeds) == len(set(seeds)), seeds

    manifest = {
        "kind": "ip_adapter",
        "reference": f"diffusers {diffusers.__version__} StableDiffusionPipeline.load_ip_adapter / "
        f"IPAdapterAttnProcessor2_0 / ImageProjection, transformers {transformers.__version__} "
        f"CLIPVisionModelWithProjection / CLIPImageProcessor, torch {torch.__version__}",
        "height": HEIGHT,
        "width": WIDTH,
        "base": BASE,
        "ip_adapter": adapter_entry,
        "ip_adapter_sdxl": adapter_sdxl_entry,
        "image_encoder": encoder_entry,
        "num_tokens": NUM_TOKENS,
        "cross_attention_dim": pipe.unet.config.cross_attention_dim,
        "base_sdxl": BASE_SDXL,
        "cross_attention_dim_sdxl": pipe_sdxl.unet.config.cross_attention_dim,
        "images": {name: dict(file=f"{name}.png", size=list(image.size)) for name, image in images.items()},
        "feature_extractor": features,
        "attention_layers": layers,
        "attention_layers_sdxl": layers_sdxl,
        "runs": runs,
        "direct": direct_entry,
        "notes": NOTES,
        "notes_sdxl": NOTES_SDXL,
    }
    save_file({k: v.detach().contiguous().float() for k, v in sorted(tensors.items())}, out / "reference.safetensors")
    (out / "manifest.json").write_text(json.dumps(finite_json(manifest), indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    print(f"wrote {out}")
