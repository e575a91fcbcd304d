"""End-to-end pipeline references: tiny Stable Diffusion 1.x, 2.x (v-prediction) and XL pipelines
run through diffusers with many samplers, and A1111-style weighted prompt encodings.

Called by make_fixtures.py (`--only pipeline`). Every case is a folder
tests/fixtures/pipeline/<case>/ holding the pipeline in diffusers layout at `model/` (f16 weights),
`reference.safetensors` (f32, computed from those f16 weights upcast to f32) and `manifest.json`.
"""

import importlib
import json
import pathlib
import re
import shutil
import tempfile
import zlib

import diffusers
import torch
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

HEIGHT = WIDTH = 32
TOLERANCE = 1e-4
VOCAB_DIR = pathlib.Path(__file__).resolve().parents[2] / "crates/sd-conditioner/vocab"
BOS, EOS = 998, 999


def seed_of(name: str) -> int:
    return zlib.crc32(name.encode()) % 100_000


# ---------------------------------------------------------------------------------------------
# A. The tiny CLIP vocabulary.


def write_tiny_vocabulary(folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """Like hf-internal-testing's tiny CLIP tokenizers: the full CLIP vocabulary cut to its first
    998 ids (256 bytes, 256 bytes + `</w>`, the first 486 merges) plus the two special tokens at
    998 and 999. merges.txt keeps the same 486 merges, so every merge result is in the vocabulary."""
    full = json.loads((VOCAB_DIR / "vocab.json").read_text(encoding="utf-8"))
    lines = (VOCAB_DIR / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert lines[0].startswith("#version"), lines[0]
    merges = [line for line in lines[1:] if line]
    by_id = {i: t for t, i in full.items()}
    assert len(by_id) == 49408
    n_merges = BOS - 512
    for k in range(n_merges):
        assert by_id[512 + k] == "".join(merges[k].split()), k
    tiny = {by_id[i]: i for i in range(BOS)}
    tiny["<|startoftext|>"] = BOS
    tiny["<|endoftext|>"] = EOS
    assert len(tiny) == 1000
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab.write_text(json.dumps(tiny, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges[:n_merges]) + "\n", encoding="utf-8")
    return vocab, merges_file


def make_tokenizer(vocab: pathlib.Path, merges: pathlib.Path, pad_token: str) -> CLIPTokenizer:
    tokenizer = CLIPTokenizer(str(vocab), str(merges), pad_token=pad_token, model_max_length=77)
    for prompt in ["a photo of a cat", "blurry", "", "A Photograph of an ASTRONAUT riding a horse!!!", "東京 🐱"]:
        ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert len(ids) == 77 and ids[0] == BOS and max(ids) < 1000, (prompt, ids)
    return tokenizer


# ---------------------------------------------------------------------------------------------
# B. The tiny pipelines.

# Narrower than the brief's [32, 64] (1.3 MB a copy in f16, four copies with the single file): at
# [16, 32] a copy is about 0.35 MB, which keeps tests/fixtures/pipeline near its size budget. The
# [32, 64] shape itself is covered by tests/fixtures/vae/tiny_2block.
VAE_CONFIG = dict(
    block_out_channels=[16, 32],
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
    layers_per_block=1,
)


def clip_config(hidden_act: str, projection_dim: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        projection_dim=projection_dim,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
    )


def build_tiny_sd1(tokenizers: dict, randomise_norms, generator):
    unet = UNet2DConditionModel(
        block_out_channels=[32, 64],
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        layers_per_block=2,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
        sample_size=16,
        in_channels=4,
        out_channels=4,
    )
    vae = AutoencoderKL(**VAE_CONFIG)
    text_encoder = CLIPTextModel(clip_config("quick_gelu"))
    for model in (unet, vae, text_encoder):
        randomise_norms(model, generator)
    # Stable Diffusion 1.5's scheduler_config.json.
    # (from_config: PNDMScheduler's __init__ has no clip_sample, which that file carries.)
    scheduler = PNDMScheduler.from_config(
        dict(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            set_alpha_to_one=False,
            skip_prk_steps=True,
            steps_offset=1,
            clip_sample=False,
            trained_betas=None,
        )
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizers["eos"],
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sd2_vpred(tokenizers: dict, randomise_norms, generator):
    unet = UNet2DConditionModel(
        block_out_channels=[32, 64],
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=[2, 4],
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=8,
        sample_size=16,
        in_channels=4,
        out_channels=4,
    )
    vae = AutoencoderKL(**VAE_CONFIG)
    text_encoder = CLIPTextModel(clip_config("gelu"))
    for model in (unet, vae, text_encoder):
        randomise_norms(model, generator)
    # Stable Diffusion 2.1's scheduler_config.json.
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
        timestep_spacing="leading",
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizers["bang"],
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sdxl(tokenizers: dict, randomise_norms, generator):
    unet = UNet2DConditionModel(
        block_out_channels=[32, 64],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        layers_per_block=1,
        transformer_layers_per_block=[1, 2],
        cross_attention_dim=64,
        attention_head_dim=[2, 4],
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
        norm_num_groups=8,
        sample_size=16,
        in_channels=4,
        out_channels=4,
    )
    vae = AutoencoderKL(**VAE_CONFIG, scaling_factor=0.13025)
    text_encoder = CLIPTextModel(clip_config("quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(clip_config("gelu", projection_dim=32))
    for model in (unet, vae, text_encoder, text_encoder_2):
        randomise_norms(model, generator)
    # SDXL base 1.0's scheduler_config.json.
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        use_karras_sigmas=False,
        prediction_type="epsilon",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizers["eos"],
        tokenizer_2=tokenizers["bang"],
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def alias_text_model(pipe) -> None:
    """transformers >= 5.6 flattened CLIPTextModel (no `.text_model` wrapper; CLIPTextModelWithProjection
    keeps it), but diffusers' StableDiffusionPipeline.encode_prompt still calls
    `text_encoder.text_model.final_layer_norm` when clip_skip is set. Point `text_model` at the model
    itself (outside the module tree) so that call reaches the same final layer norm as before."""
    for name in ["text_encoder", "text_encoder_2"]:
        encoder = getattr(pipe, name, None)
        if encoder is not None and not hasattr(encoder, "text_model"):
            object.__setattr__(encoder, "text_model", encoder)


def save_and_reload(pipe, folder: pathlib.Path, vocab: pathlib.Path, merges: pathlib.Path):
    """Saves the pipeline with f16 weights and loads it back as f32: the references are computed
    from exactly the stored values."""
    pipe.to(torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True)
    # transformers 5 writes tokenizer.json and tokenizer_config.json only; Stable Diffusion
    # repositories ship vocab.json and merges.txt, so both are there.
    for sub in ["tokenizer", "tokenizer_2"]:
        if (folder / sub).is_dir():
            shutil.copy(vocab, folder / sub / "vocab.json")
            shutil.copy(merges, folder / sub / "merges.txt")
    return load_pipeline(type(pipe), folder, torch.float32)


def load_pipeline(cls, folder: pathlib.Path, dtype: torch.dtype):
    extra = dict(add_watermarker=False) if cls is StableDiffusionXLPipeline else dict(
        safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe = cls.from_pretrained(folder, torch_dtype=dtype, local_files_only=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    alias_text_model(pipe)
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            module.eval()
            assert all(p.dtype == dtype for p in module.parameters()), name
    return pipe


# ---------------------------------------------------------------------------------------------
# C. The runs.

SD1_PROMPT, SD1_NEGATIVE = "a photo of a cat", "blurry"
LONG_PROMPT = " ".join(f"word{i}" for i in range(100))


def run(name, scheduler=None, overrides=None, **kwargs):
    spec = dict(
        name=name,
        scheduler=scheduler,
        overrides=overrides or {},
        prompt=SD1_PROMPT,
        negative_prompt=SD1_NEGATIVE,
        steps=4,
        guidance_scale=7.5,
        guidance_rescale=0.0,
        clip_skip=None,
        original_size=None,
        crops_coords_top_left=None,
        target_size=None,
    )
    unknown = set(kwargs) - set(spec)
    assert not unknown, unknown
    spec.update(kwargs)
    return spec


KARRAS = dict(use_karras_sigmas=True)
SD1_RUNS = [
    run("pndm"),
    run("ddim", DDIMScheduler),
    run("ddpm", DDPMScheduler),
    run("euler", EulerDiscreteScheduler),
    run("euler_ancestral", EulerAncestralDiscreteScheduler),
    run("heun", HeunDiscreteScheduler),
    run("lms", LMSDiscreteScheduler),
    run("kdpm2", KDPM2DiscreteScheduler),
    run("kdpm2_ancestral", KDPM2AncestralDiscreteScheduler),
    run("dpmpp_2m", DPMSolverMultistepScheduler),
    run("dpmpp_2m_karras", DPMSolverMultistepScheduler, KARRAS),
    run("dpmpp_2m_sde_karras", DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++", **KARRAS)),
    run("dpmpp_2s", DPMSolverSinglestepScheduler),
    run("unipc", UniPCMultistepScheduler),
    run("lcm", LCMScheduler, guidance_scale=1.0),
    run("ddim_20_steps", DDIMScheduler, steps=20),
    run("ddim_no_negative", DDIMScheduler, negative_prompt=None),
    run("euler_guidance_1", EulerDiscreteScheduler, guidance_scale=1.0),
    run("ddim_guidance_rescale", DDIMScheduler, guidance_rescale=0.7),
    run("dpmpp_2m_clip_skip_1", DPMSolverMultistepScheduler, clip_skip=1),
    run("long_prompt", DDIMScheduler, prompt=LONG_PROMPT),
]
SD2_RUNS = [
    run("ddim"),
    run("euler", EulerDiscreteScheduler),
    run("dpmpp_2m_karras", DPMSolverMultistepScheduler, KARRAS),
    run("euler_ancestral", EulerAncestralDiscreteScheduler),
]
SDXL_RUNS = [
    run("euler"),
    run("dpmpp_2m_karras", DPMSolverMultistepScheduler, KARRAS),
    run("ddim", DDIMScheduler),
    run("euler_no_negative", negative_prompt=None),
    run(
        "euler_micro_conditioning",
        original_size=(64, 48),
        crops_coords_top_left=(4, 2),
        target_size=(32, 32),
    ),
]


class RecordNoise:
    """Records every `randn_tensor` draw a scheduler's module makes, in order (as run_sampler in
    make_fixtures.py does for the bare samplers)."""

    def __init__(self, scheduler_cls):
        self.module = importlib.import_module(scheduler_cls.__module__)
        self.draws = []

    def __enter__(self):
        self.original = getattr(self.module, "randn_tensor", None)
        if self.original is not None:
            def recording(*args, **kwargs):
                noise = self.original(*args, **kwargs)
                self.draws.append(noise.clone())
                return noise

            self.module.randn_tensor = recording
        return self

    def __exit__(self, *exc):
        if self.original is not None:
            self.module.randn_tensor = self.original
        return False


class ReplayNoise:
    """Hands a scheduler's module the recorded draws again, in order (for the float64 replay)."""

    def __init__(self, scheduler_cls, draws: list):
        self.module = importlib.import_module(scheduler_cls.__module__)
        self.draws = list(draws)
        self.used = 0

    def __enter__(self):
        self.original = getattr(self.module, "randn_tensor", None)

        def replay(shape, generator=None, device=None, dtype=None, layout=None):
            noise = self.draws[self.used]
            assert tuple(noise.shape) == tuple(shape), (noise.shape, shape)
            self.used += 1
            return noise.to(dtype=dtype or noise.dtype)

        self.module.randn_tensor = replay
        return self

    def __exit__(self, *exc):
        self.module.randn_tensor = self.original
        return False


def call_pipeline(
    pipe, spec: dict, own_scheduler, latents: torch.Tensor, seed: int, output_type: str, replay: list | None = None
):
    cls = spec["scheduler"] or type(own_scheduler)
    pipe.scheduler = cls.from_config(own_scheduler.config, **spec["overrides"])
    kwargs = dict(
        prompt=spec["prompt"],
        negative_prompt=spec["negative_prompt"],
        num_inference_steps=spec["steps"],
        guidance_scale=spec["guidance_scale"],
        guidance_rescale=spec["guidance_rescale"],
        clip_skip=spec["clip_skip"],
        height=HEIGHT,
        width=WIDTH,
        latents=latents.clone(),
        generator=torch.Generator().manual_seed(seed),
        output_type=output_type,
    )
    if isinstance(pipe, StableDiffusionXLPipeline):
        for key in ["original_size", "crops_coords_top_left", "target_size"]:
            if spec[key] is not None:
                kwargs[key] = spec[key]
    final = {}

    def on_step_end(pipeline, i, t, tensors):
        final["latents"] = tensors["latents"].clone()
        return tensors

    if replay is not None:
        with ReplayNoise(cls, replay) as replayer, torch.no_grad():
            out = pipe(**kwargs, callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"])
        assert replayer.used == len(replay), (spec["name"], replayer.used, len(replay))
        return out.images, final["latents"], replay, pipe.scheduler
    with RecordNoise(cls) as recorder, torch.no_grad():
        out = pipe(**kwargs, callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"])
    return out.images, final["latents"], recorder.draws, pipe.scheduler


def write_runs(pipe, pipe64, case_name: str, runs: list, finite_json) -> tuple[dict, list]:
    """pipe64: the same pipeline in float64, replaying the same noise: how far float32 rounding
    alone moves each output (`f64_deviation` in the manifest), a floor for the tolerances."""
    own_scheduler = pipe.scheduler
    is_xl = isinstance(pipe, StableDiffusionXLPipeline)
    tensors, manifest_runs = {}, []
    for spec in runs:
        name = spec["name"]
        latent_seed = seed_of(f"{case_name}.{name}")
        generator_seed = latent_seed + 1
        latents = torch.randn(1, 4, HEIGHT // 2, WIDTH // 2, generator=torch.Generator().manual_seed(latent_seed))
        latents_out, latents_cb, draws, scheduler = call_pipeline(
            pipe, spec, own_scheduler, latents, generator_seed, "latent"
        )
        image, latents_cb2, draws2, scheduler2 = call_pipeline(pipe, spec, own_scheduler, latents, generator_seed, "np")
        assert torch.equal(latents_out, latents_cb) and torch.equal(latents_out, latents_cb2), name
        assert len(draws) == len(draws2) and all(torch.equal(a, b) for a, b in zip(draws, draws2)), name
        assert torch.equal(scheduler.timesteps, scheduler2.timesteps)
        image = torch.from_numpy(image).permute(0, 3, 1, 2)
        assert image.shape == (1, 3, HEIGHT, WIDTH)
        image64, latents64, _, _ = call_pipeline(
            pipe64, spec, own_scheduler, latents.double(), generator_seed, "np", replay=[d.double() for d in draws]
        )
        image64 = torch.from_numpy(image64).permute(0, 3, 1, 2)

        do_cfg = spec["guidance_scale"] > 1.0
        with torch.no_grad():
            if is_xl:
                pe, npe, ppe, nppe = pipe.encode_prompt(
                    spec["prompt"],
                    device=torch.device("cpu"),
                    num_images_per_prompt=1,
                    do_classifier_free_guidance=do_cfg,
                    negative_prompt=spec["negative_prompt"],
                    clip_skip=spec["clip_skip"],
                )
                embeds = dict(
                    prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=ppe,
                    negative_pooled_prompt_embeds=nppe,
                )
            else:
                pe, npe = pipe.encode_prompt(
                    spec["prompt"],
                    torch.device("cpu"),
                    1,
                    do_cfg,
                    negative_prompt=spec["negative_prompt"],
                    clip_skip=spec["clip_skip"],
                )
                embeds = dict(prompt_embeds=pe, negative_prompt_embeds=npe)
        run_tensors = dict(latents_in=latents, latents_out=latents_out, image=image, **embeds)
        if draws:
            run_tensors["noise"] = torch.stack(draws)
        run_tensors["timesteps"] = scheduler.timesteps.float()
        entry = dict(
            name=name,
            scheduler=type(scheduler).__name__,
            overrides=spec["overrides"],
            prompt=spec["prompt"],
            negative_prompt=spec["negative_prompt"],
            steps=spec["steps"],
            guidance_scale=spec["guidance_scale"],
            guidance_rescale=spec["guidance_rescale"],
            clip_skip=spec["clip_skip"],
            noise_draws=len(draws),
            latent_seed=latent_seed,
            generator_seed=generator_seed,
            original_size=None,
            crops_coords_top_left=None,
            target_size=None,
            tolerance=TOLERANCE,
            # The scheduler's whole config after the run: from_config carries keys the class does
            # not take (clip_sample=False from SD 1.5's PNDM config reaches DDIM, DDPM and LCM, whose
            # default is True), and some samplers rewrite theirs in set_timesteps.
            scheduler_config=finite_json(dict(scheduler.config)),
            latents_out_max_abs=float(latents_out.abs().max()),
            f64_deviation=dict(
                latents_out=float((latents64 - latents_out.double()).abs().max()),
                image=float((image64 - image.double()).abs().max()),
            ),
        )
        if is_xl:
            # The values diffusers uses: (height, width), (0, 0), (height, width) by default.
            entry["original_size"] = list(spec["original_size"] or (HEIGHT, WIDTH))
            entry["crops_coords_top_left"] = list(spec["crops_coords_top_left"] or (0, 0))
            entry["target_size"] = list(spec["target_size"] or (HEIGHT, WIDTH))
            run_tensors["add_time_ids"] = torch.tensor(
                [entry["original_size"] + entry["crops_coords_top_left"] + entry["target_size"]], dtype=torch.float32
            )
        if name == "long_prompt":
            ids = pipe.tokenizer(spec["prompt"], add_special_tokens=False).input_ids
            entry["note"] = (
                f"the prompt is {len(ids)} tokens; diffusers truncates it to 75 (plus start and end of text), "
                "with a warning, and encodes a single 77-token chunk"
            )
            entry["prompt_tokens"] = len(ids)
        for key, value in run_tensors.items():
            if value is not None:
                tensors[f"{name}.{key}"] = value
        manifest_runs.append(entry)
        print(
            f"  {case_name}.{name}: {type(scheduler).__name__} {len(scheduler.timesteps)} timesteps, {len(draws)} draws,"
            f" max |latents| {entry['latents_out_max_abs']:.1f}, f64 deviation {entry['f64_deviation']}"
        )
    pipe.scheduler = own_scheduler
    return tensors, manifest_runs


# ---------------------------------------------------------------------------------------------
# D. The original single-file layout.


def diffusers_to_ldm_vae(state: dict, config) -> dict:
    """The original LDM layout (`first_stage_model.*`) of a diffusers AutoencoderKL state dict: the
    inverse of diffusers' `convert_ldm_vae_checkpoint`."""
    n_up = len(config["up_block_types"])
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

    def resnet(rest: str) -> str:
        return rest.replace("conv_shortcut", "nin_shortcut")

    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] in ("quant_conv", "post_quant_conv"):
            ldm = key
        else:
            side, kind = parts[0], parts[1]
            assert side in ("encoder", "decoder"), key
            if kind in ("conv_in", "conv_out"):
                ldm = key
            elif kind == "conv_norm_out":
                ldm = f"{side}.norm_out.{parts[2]}"
            elif kind in ("down_blocks", "up_blocks"):
                i = int(parts[2]) if kind == "down_blocks" else n_up - 1 - int(parts[2])
                level = "down" if kind == "down_blocks" else "up"
                if parts[3] == "resnets":
                    ldm = f"{side}.{level}.{i}.block.{parts[4]}.{resnet('.'.join(parts[5:]))}"
                else:
                    assert parts[3] in ("downsamplers", "upsamplers") and parts[4] == "0", key
                    ldm = f"{side}.{level}.{i}.{'downsample' if level == 'down' else 'upsample'}.{'.'.join(parts[5:])}"
            elif kind == "mid_block":
                if parts[2] == "resnets":
                    ldm = f"{side}.mid.block_{int(parts[3]) + 1}.{resnet('.'.join(parts[4:]))}"
                else:
                    assert parts[2] == "attentions" and parts[3] == "0", key
                    layer, param = ".".join(parts[4:-1]), parts[-1]
                    ldm = f"{side}.mid.attn_1.{attention[layer]}.{param}"
                    if layer != "group_norm" and param == "weight":
                        value = value[:, :, None, None]  # the original stores 1×1 convolutions
            else:
                raise KeyError(key)
        out["first_stage_model." + ldm] = value.contiguous()
    return out


# Where the text encoders live in each family's single file, and the run whose image the
# from_single_file check compares.
SINGLE_FILE = {
    "tiny_sd1": dict(family="sd1", check_run="ddim"),
    "tiny_sd2_vpred": dict(family="sd2", check_run="ddim"),
    "tiny_sdxl": dict(family="sdxl", check_run="euler"),
}
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT_PREFIXES = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")
# OpenCLIP's learned temperature; trained CLIP models saturate it at ln 100 (SD 2.x and SDXL files
# hold it as a 0-d tensor). No text-to-image pipeline reads it.
OPEN_CLIP_LOGIT_SCALE = 4.605170185988092


def clip_to_open_clip(state: dict, prefix: str, num_layers: int) -> dict:
    """The OpenCLIP layout (`{prefix}token_embedding.weight`, `positional_embedding`,
    `transformer.resblocks.N.*` with fused q/k/v `attn.in_proj_*`, `ln_final.*`, `text_projection`
    [width, proj]) of a transformers CLIPTextModel(WithProjection) state dict: the inverse of
    diffusers' `convert_open_clip_checkpoint`."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    used = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return state[key]

    out = {
        "token_embedding.weight": take("embeddings.token_embedding.weight"),
        "positional_embedding": take("embeddings.position_embedding.weight"),
    }
    for i in range(num_layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[dst + f"ln_1.{p}"] = take(src + f"layer_norm1.{p}")
            out[dst + f"attn.in_proj_{p}"] = torch.cat([take(src + f"self_attn.{x}_proj.{p}") for x in "qkv"])
            out[dst + f"attn.out_proj.{p}"] = take(src + f"self_attn.out_proj.{p}")
            out[dst + f"ln_2.{p}"] = take(src + f"layer_norm2.{p}")
            out[dst + f"mlp.c_fc.{p}"] = take(src + f"mlp.fc1.{p}")
            out[dst + f"mlp.c_proj.{p}"] = take(src + f"mlp.fc2.{p}")
    for p in ("weight", "bias"):
        out[f"ln_final.{p}"] = take(f"final_layer_norm.{p}")
    if "text_projection.weight" in state:
        # OpenCLIP computes x @ text_projection; a Linear stores the transpose.
        out["text_projection"] = take("text_projection.weight").T
    assert used == set(state), set(state) - used
    return {prefix + k: v.contiguous() for k, v in out.items()}


def random_open_clip_block(prefix: str, index: int, config, generator: torch.Generator) -> dict:
    """One more OpenCLIP residual block, random (f16): the last layer of ViT-H that SD 2.x files
    hold and diffusers' text encoder leaves out (SD 2.x conditions on the penultimate layer)."""
    d, f = config.hidden_size, config.intermediate_size

    def randn(*shape, scale=0.02, offset=0.0):
        return (offset + scale * torch.randn(*shape, generator=generator)).half()

    r = f"{prefix}transformer.resblocks.{index}."
    return {
        r + "ln_1.weight": randn(d, scale=0.1, offset=1.0),
        r + "ln_1.bias": randn(d, scale=0.1),
        r + "attn.in_proj_weight": randn(3 * d, d),
        r + "attn.in_proj_bias": randn(3 * d),
        r + "attn.out_proj.weight": randn(d, d),
        r + "attn.out_proj.bias": randn(d),
        r + "ln_2.weight": randn(d, scale=0.1, offset=1.0),
        r + "ln_2.bias": randn(d, scale=0.1),
        r + "mlp.c_fc.weight": randn(f, d),
        r + "mlp.c_fc.bias": randn(f),
        r + "mlp.c_proj.weight": randn(d, f),
        r + "mlp.c_proj.bias": randn(d),
    }


def ldm_unet_and_vae(pipe_f16, diffusers_to_ldm_unet) -> dict:
    """`model.diffusion_model.*` and `first_stage_model.*`, each proven by diffusers' converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet_state = {k: v.contiguous() for k, v in pipe_f16.unet.state_dict().items()}
    vae_state = {k: v.contiguous() for k, v in pipe_f16.vae.state_dict().items()}
    ldm_vae = diffusers_to_ldm_vae(vae_state, pipe_f16.vae.config)
    back = convert_ldm_vae_checkpoint(ldm_vae, dict(pipe_f16.vae.config))
    assert back.keys() == vae_state.keys(), set(back) ^ set(vae_state)
    assert all(torch.equal(back[k], vae_state[k]) for k in vae_state)
    ldm_unet = diffusers_to_ldm_unet(unet_state, pipe_f16.unet.config)
    back = convert_ldm_unet_checkpoint(ldm_unet, dict(pipe_f16.unet.config))
    assert back.keys() == unet_state.keys(), set(back) ^ set(unet_state)
    assert all(torch.equal(back[k], unet_state[k]) for k in unet_state)
    return {**ldm_unet, **ldm_vae}


def assert_same_state(converted: dict, state: dict, what: str) -> None:
    assert converted.keys() == state.keys(), (what, set(converted) ^ set(state))
    bad = [k for k in state if not torch.equal(converted[k], state[k])]
    assert not bad, (what, bad)


def write_single_file(pipe_f16, path: pathlib.Path, diffusers_to_ldm_unet, family: str = "sd1", generator=None) -> dict:
    """Writes the pipeline's single file in the original layout of its family and proves every part
    with diffusers' own converters (the keys they produce equal the folder's, value for value).
    Returns the converter facts for the manifest."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    single = ldm_unet_and_vae(pipe_f16, diffusers_to_ldm_unet)
    te_state = {k: v.contiguous() for k, v in pipe_f16.text_encoder.state_dict().items()}
    facts = {}
    if family == "sd1":
        # SD 1.x checkpoints hold transformers 4's layout: `cond_stage_model.transformer.text_model.*`
        # (transformers 5 dropped the `text_model.` level from CLIPTextModel).
        ldm_te = {
            "cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in te_state.items()
        }
    elif family == "sd2":
        config = pipe_f16.text_encoder.config
        n, d = config.num_hidden_layers, config.hidden_size
        ldm_te = clip_to_open_clip(te_state, SD2_TEXT_PREFIX, n)
        # Real SD 2.x files hold all 24 ViT-H blocks, a text_projection and logit_scale, none of which
        # the diffusers text encoder (23 blocks, no projection) uses.
        ldm_te.update(random_open_clip_block(SD2_TEXT_PREFIX, n, config, generator))
        ldm_te[SD2_TEXT_PREFIX + "text_projection"] = (
            torch.randn(d, config.projection_dim, generator=generator) * d**-0.5
        ).half()
        ldm_te[SD2_TEXT_PREFIX + "logit_scale"] = torch.tensor(OPEN_CLIP_LOGIT_SCALE).half()
        back = convert_open_clip_checkpoint(pipe_f16.text_encoder, {**single, **ldm_te}, prefix=SD2_TEXT_PREFIX)
        back = {k.removeprefix("text_model."): v for k, v in back.items()}
        # The extra block converts to encoder.layers.{n}.* (diffusers' own ignore list names only
        # ViT-H's resblocks.23); loading skips them as keys the model does not have.
        extra = {k for k in back if k.startswith(f"encoder.layers.{n}.")}
        assert len(extra) == 16, sorted(extra)
        assert "text_projection.weight" not in back
        assert_same_state({k: v for k, v in back.items() if k not in extra}, te_state, "text_encoder")
        facts["dropped_by_loading"] = sorted(extra)
    elif family == "sdxl":
        first, second = SDXL_TEXT_PREFIXES
        te2 = pipe_f16.text_encoder_2
        te2_state = {k: v.contiguous() for k, v in te2.state_dict().items()}
        ldm_te = {first + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in te_state.items()}
        ldm_te.update(clip_to_open_clip(te2_state, second, te2.config.num_hidden_layers))
        ldm_te[second + "logit_scale"] = torch.tensor(OPEN_CLIP_LOGIT_SCALE).half()
        everything = {**single, **ldm_te}
        back = convert_ldm_clip_checkpoint(everything)
        assert_same_state({k.removeprefix("text_model."): v for k, v in back.items()}, te_state, "text_encoder")
        back = convert_open_clip_checkpoint(te2, everything, prefix=second)
        assert_same_state(back, te2_state, "text_encoder_2")
    else:
        raise ValueError(family)
    # The original SD 1.x and SDXL files (v1-5-pruned-emaonly.safetensors, sd_xl_base_1.0) carry
    # transformers 4's `position_ids` buffer beside the CLIP weights, as I64 [1, 77]: a loader must
    # skip it by name rather than refuse the file for its dtype.
    clip_prefix = {"sd1": "cond_stage_model.transformer.", "sdxl": SDXL_TEXT_PREFIXES[0]}.get(family)
    if clip_prefix is not None:
        positions = pipe_f16.text_encoder.config.max_position_embeddings
        ldm_te[clip_prefix + "text_model.embeddings.position_ids"] = torch.arange(positions, dtype=torch.int64)[None]
    single.update(ldm_te)
    assert all(v.dtype == torch.float16 or k.endswith("position_ids") for k, v in single.items())
    save_file(single, path)
    return facts


def write_case_single_file(case_name, case, model_dir, pipe, runs, tensors, diffusers_to_ldm_unet) -> dict:
    """Writes <case>/<case>.safetensors, checks it with from_single_file, and returns the manifest
    entries."""
    info = SINGLE_FILE[case_name]
    family = info["family"]
    single = case / f"{case_name}.safetensors"
    f16 = load_pipeline(type(pipe), model_dir, torch.float16)
    generator = torch.Generator().manual_seed(seed_of(f"{case_name}.single_file"))
    facts = write_single_file(f16, single, diffusers_to_ldm_unet, family, generator)
    del f16
    spec = next(r for r in runs if r["name"] == info["check_run"])
    checked, note = check_single_file(single, model_dir, pipe, spec, case_name, tensors[f"{spec['name']}.image"])
    print(f"  single file: {note}")
    entries = dict(single_file=single.name, single_file_checked=checked, single_file_note=note)
    unet_vae = {
        "model.diffusion_model.": "unet (original LDM names)",
        "first_stage_model.": "vae (original LDM names; attention q/k/v/proj_out as [c, c, 1, 1])",
    }
    if family == "sd1":
        entries["single_file_layout"] = {
            **unet_vae,
            "cond_stage_model.transformer.text_model.": "text encoder (transformers 4 CLIPTextModel names)",
        }
        return entries
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}

    def open_clip_shapes(prefix: str) -> dict:
        return {
            k[len(prefix):]: shapes[k]
            for k in sorted(shapes)
            if k.startswith(prefix) and (".resblocks." not in k or ".resblocks.0." in k)
        }

    open_clip_note = (
        "text encoder in OpenCLIP's layout: token_embedding.weight, positional_embedding (a bare [77, width] "
        "tensor), transformer.resblocks.{i}.{ln_1, attn.in_proj_weight ([3·width, width] = q, k, v weights stacked "
        "in that order), attn.in_proj_bias ([3·width]), attn.out_proj, ln_2, mlp.c_fc (= fc1), mlp.c_proj (= fc2)}, "
        "ln_final (= final_layer_norm), text_projection ([width, projection_dim] = the transpose of a Linear's "
        "weight), logit_scale (0-d, ln 100, unused)"
    )
    if family == "sd2":
        n = pipe.text_encoder.config.num_hidden_layers
        entries["single_file_layout"] = {
            **unet_vae,
            SD2_TEXT_PREFIX: open_clip_note + f"; resblocks 0..{n} of which {n} is random and not part of the "
            f"model (text_encoder has {n} layers: SD 2.x files hold all 24 ViT-H blocks, diffusers keeps 23), "
            "text_projection is random (diffusers' SD 2.x text encoder is a CLIPTextModel without one)",
        }
        entries["single_file_open_clip_shapes"] = {SD2_TEXT_PREFIX: open_clip_shapes(SD2_TEXT_PREFIX)}
        entries["single_file_unused"] = sorted(
            [k for k in shapes if k.startswith(f"{SD2_TEXT_PREFIX}transformer.resblocks.{n}.")]
            + [SD2_TEXT_PREFIX + "text_projection", SD2_TEXT_PREFIX + "logit_scale"]
        )
        entries["single_file_unused_note"] = (
            "keys the diffusers pipeline does not use: diffusers' convert_open_clip_checkpoint skips "
            "cond_stage_model.model.text_projection (SD_2_TEXT_ENCODER_KEYS_TO_IGNORE) and logit_scale (no mapping); "
            f"resblocks.{n} converts to encoder.layers.{n}.* (its ignore list names only ViT-H's resblocks.23), which "
            f"loading skips as keys a {n}-layer model lacks. A loader should keep layers 0..num_hidden_layers-1"
        )
        assert len(facts["dropped_by_loading"]) == 16
    else:
        first, second = SDXL_TEXT_PREFIXES
        entries["single_file_layout"] = {
            **unet_vae,
            first + "text_model.": "text_encoder (transformers 4 CLIPTextModel names)",
            second: open_clip_note + "; text_encoder_2 (CLIPTextModelWithProjection), all its layers, text_projection "
            "= text_encoder_2's text_projection.weight transposed",
        }
        entries["single_file_open_clip_shapes"] = {second: open_clip_shapes(second)}
        entries["single_file_unused"] = [second + "logit_scale"]
    return entries


def check_single_file(path: pathlib.Path, model_dir: pathlib.Path, folder_pipe, spec: dict, case_name: str, reference):
    """Loads the single file with diffusers (offline, config from the model folder) and compares
    one run's image with the folder's. Returns (checked, note)."""
    cls = type(folder_pipe)
    xl = cls is StableDiffusionXLPipeline
    extra = dict(add_watermarker=False) if xl else dict(
        safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    names = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if xl else [])

    def load(**components):
        pipe = cls.from_single_file(
            str(path), config=str(model_dir), local_files_only=True, torch_dtype=torch.float32, **extra, **components
        )
        pipe.set_progress_bar_config(disable=True)
        alias_text_model(pipe)
        return pipe

    def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
        a, b = a.state_dict(), b.state_dict()
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    try:
        pipe = load()
    except Exception as error:  # noqa: BLE001 - reported in the manifest
        return False, f"from_single_file failed offline: {type(error).__name__}: {error}"
    wrong = [name for name in names if not same(getattr(pipe, name), getattr(folder_pipe, name))]
    note = f"{cls.__name__}.from_single_file(config=model/) gives run `{spec['name']}`'s image exactly"
    if xl and wrong == ["text_encoder_2"]:
        # diffusers picks the converter of a CLIPTextModel(WithProjection) by the file's keys and
        # widths: `conditioner.embedders.0.transformer...position_embedding.weight` as wide as the
        # model is taken as the CLIP-L branch, tested before the OpenCLIP one. Real SDXL files tell
        # them apart (768 vs 1280); here both encoders are 32 wide, so text_encoder_2 gets
        # text_encoder's weights (and a random projection). Load it with diffusers' own OpenCLIP
        # converter from the same file instead, and hand it in.
        from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
        from safetensors.torch import load_file

        got = {k.removeprefix("text_model."): v for k, v in pipe.text_encoder_2.state_dict().items()}
        first = folder_pipe.text_encoder.state_dict()
        assert sum(k in first and torch.equal(v, first[k]) for k, v in got.items()) == len(first), "unexpected mix-up"
        checkpoint = load_file(str(path))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(model_dir / "text_encoder_2"))
        te2.load_state_dict(convert_open_clip_checkpoint(te2, checkpoint, prefix=SDXL_TEXT_PREFIXES[1]), strict=True)
        te2 = te2.float().eval()
        pipe = load(text_encoder_2=te2)
        wrong = [name for name in names if not same(getattr(pipe, name), getattr(folder_pipe, name))]
        note += (
            " when given text_encoder_2 = convert_open_clip_checkpoint(prefix='conditioner.embedders.1.model.') of "
            "this file: unaided, from_single_file loads text_encoder's (conditioner.embedders.0) weights into "
            "text_encoder_2, because it tells the two encoders apart by width (768 vs 1280 in real SDXL) and both are "
            "32 wide here; unet, vae and text_encoder come from from_single_file itself"
        )
    assert not wrong, (cls.__name__, wrong)
    latent_seed = seed_of(f"{case_name}.{spec['name']}")
    latents = torch.randn(1, 4, HEIGHT // 2, WIDTH // 2, generator=torch.Generator().manual_seed(latent_seed))
    image, _, _, _ = call_pipeline(pipe, spec, folder_pipe.scheduler, latents, latent_seed + 1, "np")
    image = torch.from_numpy(image).permute(0, 3, 1, 2)
    assert torch.equal(image, reference), (image - reference).abs().max()
    return True, note


# ---------------------------------------------------------------------------------------------
# E. A1111-style prompt weighting.

ROUND, SQUARE = 1.1, 1 / 1.1
# One lexeme at a time: an escaped character, a bracket, a `:weight)` closing, a run of plain text,
# or a lone `:` (plain text too).
LEXEME = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list:
    """[text, weight] pieces of a prompt, by the rules of AUTOMATIC1111's prompt_parser: `(x)`
    ×1.1, `[x]` ÷1.1, `(x:w)` ×w, `\\(` etc. literal, brackets still open at the end apply to the
    end, stray closing brackets are text, `BREAK` (a word of its own) gives a ["BREAK", -1]
    piece, and neighbouring pieces of equal weight are merged."""
    pieces, round_open, square_open = [], [], []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in LEXEME.finditer(text):
        lexeme, weight = match.group(0), match.group(1)
        if lexeme.startswith("\\"):
            pieces.append([lexeme[1:], 1.0])
        elif lexeme == "(":
            round_open.append(len(pieces))
        elif lexeme == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif lexeme == ")" and round_open:
            scale(round_open.pop(), ROUND)
        elif lexeme == "]" and square_open:
            scale(square_open.pop(), SQUARE)
        else:
            for i, part in enumerate(BREAK.split(lexeme)):
                if i > 0:
                    pieces.append(["BREAK", -1])
                pieces.append([part, 1.0])
    for start in round_open:
        scale(start, ROUND)
    for start in square_open:
        scale(start, SQUARE)
    if not pieces:
        pieces = [["", 1.0]]
    merged = [pieces[0]]
    for piece in pieces[1:]:
        if piece[1] == merged[-1][1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return merged


def weighted_chunks(pieces: list, tokenizer) -> list:
    """75-token chunks of (tokens, multipliers), each wrapped as BOS + tokens + EOS and padded
    with EOS to 77; a BREAK closes the chunk. (A1111 also moves the tail after the last comma
    within 20 tokens of a full chunk into the next one: not done here.)"""
    chunks, tokens, weights = [], [], []

    def close():
        pad = 75 - len(tokens)
        chunks.append(([BOS] + tokens + [EOS] * pad + [EOS], [1.0] + weights + [1.0] * pad + [1.0]))
        tokens.clear()
        weights.clear()

    ids = tokenizer([text for text, _ in pieces], truncation=False, add_special_tokens=False).input_ids
    for piece_ids, (text, weight) in zip(ids, pieces):
        if text == "BREAK" and weight == -1:
            close()
            continue
        for token in piece_ids:
            if len(tokens) == 75:
                close()
            tokens.append(token)
            weights.append(weight)
    if tokens or not chunks:
        close()
    return chunks


def weighted_context(prompt: str, tokenizer, text_encoder):
    pieces = parse_prompt_attention(prompt)
    chunks = weighted_chunks(pieces, tokenizer)
    outputs = []
    with torch.no_grad():
        for ids, weights in chunks:
            z = text_encoder(torch.tensor([ids])).last_hidden_state
            multipliers = torch.tensor([weights], dtype=torch.float32)
            original_mean = z.mean()
            z = z * multipliers[..., None]
            new_mean = z.mean()
            outputs.append(z * (original_mean / new_mean))
    tokens = torch.tensor([ids for ids, _ in chunks], dtype=torch.float32)
    multipliers = torch.tensor([w for _, w in chunks], dtype=torch.float32)
    return pieces, torch.cat(outputs, dim=1), tokens, multipliers


def weighted_prompts() -> list:
    words = "the quick brown fox jumps over a lazy dog in the park".split()
    plain = " ".join(words[i % len(words)] for i in range(80))
    return [
        "a (cat:1.5) on a [mat]",
        "((masterpiece)), a dog BREAK a (red:0.8) ball",
        plain,
        "\\(literal\\) brackets (unbalanced",
    ]


def write_weighted(pipe, tensors: dict) -> list:
    entries = []
    for i, prompt in enumerate(weighted_prompts()):
        pieces, context, tokens, multipliers = weighted_context(prompt, pipe.tokenizer, pipe.text_encoder)
        tensors[f"weighted.{i}.context"] = context
        tensors[f"weighted.{i}.tokens"] = tokens
        tensors[f"weighted.{i}.multipliers"] = multipliers
        entries.append(dict(prompt=prompt, index=i, parsed=pieces, chunks=len(tokens)))
        print(f"  weighted.{i}: {len(tokens)} chunk(s), {pieces}")
    expected_chunks = [1, 2, 2, 1]
    assert [e["chunks"] for e in entries] == expected_chunks, [e["chunks"] for e in entries]
    # Unweighted and within one chunk, the rule is the identity: the plain encoding.
    with torch.no_grad():
        plain = pipe.encode_prompt(weighted_prompts()[2], torch.device("cpu"), 1, False)[0]
        first = weighted_context(weighted_prompts()[2], pipe.tokenizer, pipe.text_encoder)[1][:, :77]
    assert torch.allclose(plain, first, atol=1e-6), (plain - first).abs().max()
    return entries


# ---------------------------------------------------------------------------------------------

CASES = {
    "tiny_sd1": (build_tiny_sd1, SD1_RUNS),
    "tiny_sd2_vpred": (build_tiny_sd2_vpred, SD2_RUNS),
    "tiny_sdxl": (build_tiny_sdxl, SDXL_RUNS),
}


def write_pipeline_cases(out_root: pathlib.Path) -> None:
    # Imported here: make_fixtures imports this module.
    from make_fixtures import diffusers_to_ldm_unet, finite_json, randomise_norms

    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = write_tiny_vocabulary(pathlib.Path(tmp))
        tokenizers = {"eos": make_tokenizer(vocab, merges, "<|endoftext|>"), "bang": make_tokenizer(vocab, merges, "!")}
        assert tokenizers["bang"].pad_token_id == 0 and tokenizers["eos"].pad_token_id == EOS
        for case_name, (build, runs) in CASES.items():
            case = out_root / "pipeline" / case_name
            if case.exists():
                shutil.rmtree(case)
            case.mkdir(parents=True)
            seed = seed_of(case_name)
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            pipe = build(tokenizers, randomise_norms, generator)
            model_dir = case / "model"
            pipe = save_and_reload(pipe, model_dir, vocab, merges)
            pipe64 = load_pipeline(type(pipe), model_dir, torch.float64)
            tensors, manifest_runs = write_runs(pipe, pipe64, case_name, runs, finite_json)
            del pipe64
            manifest = {
                "kind": "pipeline",
                "reference": f"diffusers {diffusers.__version__} {type(pipe).__name__}, torch {torch.__version__}, "
                f"transformers {transformers.__version__}",
                "pipeline": type(pipe).__name__,
                "model": "model",
                "height": HEIGHT,
                "width": WIDTH,
                "scheduler_config": finite_json(dict(pipe.scheduler.config)),
                "runs": manifest_runs,
                "notes": [
                    "latents_in is the initial noise before init_noise_sigma scaling; the generator that the "
                    "stochastic samplers draw from is torch.Generator().manual_seed(generator_seed), and every "
                    "draw is stored in order in <run>.noise",
                    "negative_prompt_embeds is absent when guidance_scale <= 1 (no classifier-free guidance)",
                    "prompts over 75 tokens are truncated by diffusers (long_prompt)",
                    "f64_deviation: the max abs difference between these float32 outputs and the same pipeline "
                    "in float64 replaying the same noise, i.e. float32 rounding alone; the final latents reach "
                    "|x| ~ 50 with the karras/DPM samplers, where that alone approaches 1e-4",
                    "the tokenizer is a 1000-entry cut of CLIP's (ids 0..997 as in the full vocabulary, "
                    "<|startoftext|> 998, <|endoftext|> 999); tokenizer/ holds vocab.json and merges.txt as well "
                    "as the tokenizer.json and tokenizer_config.json that transformers 5 writes (pad_token there)",
                    "clip_skip: transformers >= 5.6 flattened CLIPTextModel (no .text_model); diffusers' "
                    "encode_prompt still calls text_encoder.text_model.final_layer_norm, so the generator "
                    "aliases text_model to the model itself (the same final layer norm)",
                ],
            }
            # The single file, after the runs and on a forked RNG: nothing above or in the later
            # cases depends on it (its random extras draw from a generator seeded by name).
            with torch.random.fork_rng(devices=[]):
                manifest.update(write_case_single_file(case_name, case, model_dir, pipe, runs, tensors, diffusers_to_ldm_unet))
            if case_name == "tiny_sd1":
                manifest["weighted_prompts"] = write_weighted(pipe, tensors)
                manifest["weighted_prompts_note"] = (
                    "A1111 emphasis ('Original'): per 77-token chunk z = last_hidden_state; z *= multipliers; "
                    "z *= mean_before / mean_after; chunks concatenated along tokens. A1111's comma back-tracking "
                    "(moving the words after the last comma within 20 tokens of a full chunk into the next chunk) "
                    "is NOT applied; textual-inversion embeddings are not looked up."
                )
            save_file({k: v.detach().contiguous().float() for k, v in sorted(tensors.items())}, case / "reference.safetensors")
            (case / "manifest.json").write_text(json.dumps(finite_json(manifest), indent=2, ensure_ascii=False, allow_nan=False) + "\n")
            print(f"wrote {case}")
    write_image_cases(out_root, finite_json, randomise_norms)
    write_turbo_case(out_root, finite_json)


# ---------------------------------------------------------------------------------------------
# F. img2img and inpainting.
#
# Two more cases, written after the three above (their data does not depend on these):
# tiny_sd1_img2img reuses tiny_sd1's model folder ("model": "../tiny_sd1/model"); tiny_sd1_inpaint
# has its own model/ (tiny_sd1's text encoder, tokenizer, VAE and scheduler copied, a new 9-channel
# UNet) and runs the 4-channel tiny_sd1 model through the inpainting pipeline as well. Every
# standard-normal draw of a call (the VAE posterior samples, the pipeline's prepare_latents noise,
# the samplers' noise) is recorded in call order with where it came from.

IMAGE_STEPS = 5
IMG2IMG_STRENGTH = 0.6


def image_run(name, scheduler=None, overrides=None, **kwargs):
    spec = dict(
        name=name,
        scheduler=scheduler,
        overrides=overrides or {},
        prompt=SD1_PROMPT,
        negative_prompt=SD1_NEGATIVE,
        steps=IMAGE_STEPS,
        guidance_scale=7.5,
        strength=IMG2IMG_STRENGTH,
        model=None,
    )
    unknown = set(kwargs) - set(spec)
    assert not unknown, unknown
    spec.update(kwargs)
    return spec


IMG2IMG_RUNS = [
    image_run("ddim", DDIMScheduler),
    image_run("pndm"),
    image_run("euler", EulerDiscreteScheduler),
    image_run("euler_ancestral", EulerAncestralDiscreteScheduler),
    image_run("dpmpp_2m_karras", DPMSolverMultistepScheduler, KARRAS),
    image_run("heun", HeunDiscreteScheduler),
    image_run("lms", LMSDiscreteScheduler),
    image_run("lcm", LCMScheduler, guidance_scale=1.0),
    image_run("ddim_strength_1", DDIMScheduler, strength=1.0),
    image_run("ddim_strength_0_2", DDIMScheduler, strength=0.2),
    image_run("dpmpp_2m_sde_karras", DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++", **KARRAS)),
]
SD1_MODEL = "../tiny_sd1/model"
INPAINT_RUNS = [
    image_run("ddim", DDIMScheduler, strength=1.0),
    image_run("euler_ancestral", EulerAncestralDiscreteScheduler, strength=1.0),
    image_run("ddim_strength_0_75", DDIMScheduler, strength=0.75),
    image_run("dpmpp_2m_karras", DPMSolverMultistepScheduler, KARRAS, strength=1.0),
    # The ordinary 4-channel UNet: diffusers blends the latents with the mask after every step.
    image_run("ddim_4ch", DDIMScheduler, strength=1.0, model=SD1_MODEL),
    image_run("euler_4ch", EulerDiscreteScheduler, strength=0.75, model=SD1_MODEL),
]


def make_init_png(path: pathlib.Path, seed: int):
    """A deterministic 32×32 RGB image: smooth gradients plus seeded noise, stored as an 8-bit
    PNG; returns the image read back from the file (what both implementations see)."""
    import numpy as np
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, HEIGHT)[:, None].expand(HEIGHT, WIDTH)
    x = torch.linspace(0, 1, WIDTH)[None, :].expand(HEIGHT, WIDTH)
    rgb = torch.stack([x, y, 0.5 + 0.4 * torch.sin(6.0 * (x + 0.5 * y))])
    rgb = (rgb + 0.08 * torch.randn(3, HEIGHT, WIDTH, generator=generator)).clamp(0, 1)
    pixels = (rgb.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(np.ascontiguousarray(pixels), mode="RGB").save(path)
    with Image.open(path) as image:
        image = image.convert("RGB")
    assert (np.asarray(image) == pixels).all()
    return image


# The repaint rectangle of mask.png (rows, columns, end exclusive) and its soft edge: the ring one
# pixel outside is 128 (128/255 >= 0.5: binarised to 1), the next 127 (below 0.5: 0), the next 64.
MASK_ROWS, MASK_COLS = (9, 23), (11, 25)
MASK_RINGS = [255, 128, 127, 64]


def make_mask_png(path: pathlib.Path):
    import numpy as np
    from PIL import Image

    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    for y in range(HEIGHT):
        for x in range(WIDTH):
            dy = max(MASK_ROWS[0] - y, y - (MASK_ROWS[1] - 1), 0)
            dx = max(MASK_COLS[0] - x, x - (MASK_COLS[1] - 1), 0)
            d = max(dx, dy)
            if d < len(MASK_RINGS):
                mask[y, x] = MASK_RINGS[d]
    Image.fromarray(mask, mode="L").save(path)
    with Image.open(path) as image:
        image.load()
        image = image.copy()
    assert image.mode == "L" and (np.asarray(image) == mask).all()
    return image


class NoiseTape:
    """Patches `randn_tensor` in several modules at once (the pipeline's, the VAE's, the
    scheduler's): records every draw in call order with its source, or hands recorded draws back
    in the same order (replay), checking that each comes from the same source and shape."""

    def __init__(self, sources: dict, role, replay: list | None = None):
        self.sources = sources  # label -> module
        self.role = role  # () -> the current phase, for the detailed roles
        self.replay = replay
        self.draws, self.labels, self.roles = [], [], []

    def __enter__(self):
        self.saved = []
        for label, module in self.sources.items():
            original = getattr(module, "randn_tensor", None)
            if original is None:
                continue
            self.saved.append((module, original))
            module.randn_tensor = self.patched(label, original)
        return self

    def patched(self, label, original):
        def draw(shape, generator=None, device=None, dtype=None, layout=None):
            if self.replay is not None:
                k = len(self.draws)
                want_label, noise = self.replay[k]
                assert want_label == label, (k, want_label, label)
                assert tuple(noise.shape) == tuple(shape), (noise.shape, shape)
                noise = noise.to(dtype=dtype or noise.dtype)
            else:
                noise = original(shape, generator=generator, device=device, dtype=dtype, layout=layout)
            self.draws.append(noise.clone())
            self.labels.append(label)
            self.roles.append(self.role(label))
            return noise

        return draw

    def __exit__(self, *exc):
        for module, original in reversed(self.saved):
            module.randn_tensor = original
        return False


def call_image_pipeline(pipe, spec: dict, own_scheduler, seed: int, inputs: dict, output_type: str, replay=None):
    """One img2img or inpainting call. Wraps prepare_latents, prepare_mask_latents and the
    scheduler's add_noise (instance attributes, removed afterwards) to capture the intermediates."""
    cls = spec["scheduler"] or type(own_scheduler)
    pipe.scheduler = cls.from_config(own_scheduler.config, **spec["overrides"])
    scheduler = pipe.scheduler
    inpaint = isinstance(pipe, StableDiffusionInpaintPipeline)
    captured = dict(add_noise=[], steps=[], timesteps=[])
    phase = ["setup"]

    def role(label):
        if label == "vae_sample":
            return {"prepare_latents": "vae_sample(image)", "prepare_mask_latents": "vae_sample(masked_image)"}.get(
                phase[0], f"vae_sample({phase[0]})"
            )
        if label == "add_noise":
            return "add_noise(prepare_latents noise)"
        return f"scheduler({phase[0]})"

    wrapped = ["prepare_latents"] + (["prepare_mask_latents"] if inpaint else [])

    def wrap(name):
        original = getattr(pipe, name)

        def wrapper(*args, **kwargs):
            phase[0] = name
            out = original(*args, **kwargs)
            # The denoising loop starts right after the last preparation call.
            phase[0] = "step 0" if name == wrapped[-1] else "setup"
            captured.setdefault(name, []).append(dict(args=args, kwargs=kwargs, out=out))
            return out

        object.__setattr__(pipe, name, wrapper)

    add_noise = scheduler.add_noise

    def add_noise_wrapper(original_samples, noise, timesteps):
        out = add_noise(original_samples, noise, timesteps)
        captured["add_noise"].append(
            dict(original=original_samples.clone(), noise=noise.clone(), timesteps=timesteps.clone(),
                 out=out.clone(), phase=phase[0], step_index=getattr(scheduler, "step_index", None))
        )
        return out

    scheduler.add_noise = add_noise_wrapper

    def on_step_end(pipeline, i, t, tensors):
        captured["steps"].append(tensors["latents"].clone())
        captured["timesteps"].append(float(t))
        phase[0] = f"step {i + 1}"
        return tensors

    kwargs = dict(
        prompt=spec["prompt"],
        negative_prompt=spec["negative_prompt"],
        image=inputs["image"],
        strength=spec["strength"],
        num_inference_steps=spec["steps"],
        guidance_scale=spec["guidance_scale"],
        generator=torch.Generator().manual_seed(seed),
        output_type=output_type,
        callback_on_step_end=on_step_end,
        callback_on_step_end_tensor_inputs=["latents"],
    )
    if inpaint:
        kwargs.update(mask_image=inputs["mask"], height=HEIGHT, width=WIDTH)
    sources = {
        "vae_sample": importlib.import_module(DiagonalGaussianDistribution.__module__),
        "add_noise": importlib.import_module(type(pipe).__module__),
        "scheduler": importlib.import_module(cls.__module__),
    }
    for name in wrapped:
        wrap(name)
    try:
        with NoiseTape(sources, role, replay) as tape, torch.no_grad():
            out = pipe(**kwargs)
    finally:
        for name in wrapped:
            object.__delattr__(pipe, name)
    if replay is not None:
        assert len(tape.draws) == len(replay), (spec["name"], len(tape.draws), len(replay))
    return out.images, captured, tape, scheduler


def image_run_tensors(pipe, spec, captured, tape, scheduler, image, latents_out) -> tuple[dict, dict]:
    """The reference tensors and the manifest facts of one run, checked against what diffusers did."""
    inpaint = isinstance(pipe, StableDiffusionInpaintPipeline)
    steps, strength = spec["steps"], spec["strength"]
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    begin_index = t_start * scheduler.order
    timesteps = torch.tensor(captured["timesteps"])
    assert torch.equal(timesteps, scheduler.timesteps[begin_index:].float()), spec["name"]
    latent_timestep = scheduler.timesteps[begin_index]
    is_float = torch.is_floating_point(latent_timestep)
    latent_timestep = float(latent_timestep) if is_float else int(latent_timestep)
    tensors = dict(latents_out=latents_out, image=image, timesteps=timesteps, noise=torch.stack(tape.draws))
    facts = dict(
        init_timestep=init_timestep,
        t_start=t_start,
        begin_index=begin_index,
        scheduler_begin_index=getattr(scheduler, "begin_index", None),
        has_set_begin_index=hasattr(scheduler, "set_begin_index"),
        latent_timestep=latent_timestep,
        denoising_steps=len(timesteps),
        init_noise_sigma=float(scheduler.init_noise_sigma),
    )
    prep = captured["prepare_latents"][0]
    adds = captured["add_noise"]
    if not inpaint:
        # img2img: prepare_latents encodes (one VAE sample), draws the noise and adds it at latent_timestep.
        assert tape.labels[:2] == ["vae_sample", "add_noise"], tape.labels
        assert all(label == "scheduler" for label in tape.labels[2:]), tape.labels
        assert len(adds) == 1 and adds[0]["phase"] == "prepare_latents", [a["phase"] for a in adds]
        assert torch.equal(adds[0]["noise"], tape.draws[1])
        assert adds[0]["timesteps"].tolist() == [latent_timestep]
        assert torch.equal(adds[0]["out"], prep["out"])
        tensors["init_latents"] = adds[0]["original"]
        tensors["noised_latents"] = adds[0]["out"]
        return tensors, facts

    four = pipe.unet.config.in_channels == 4
    is_strength_max = strength == 1.0
    facts.update(unet_in_channels=pipe.unet.config.in_channels, is_strength_max=is_strength_max)
    latents, noise = prep["out"][0], prep["out"][1]
    mask_call = captured["prepare_mask_latents"][0]
    mask, masked_image_latents = mask_call["out"]
    cfg = spec["guidance_scale"] > 1.0
    if cfg:
        assert mask.shape[0] == 2 and torch.equal(mask[0], mask[1])
        assert torch.equal(masked_image_latents[0], masked_image_latents[1])
    tensors["mask_latent"] = mask[:1]
    tensors["noised_latents"] = latents
    expected = (["vae_sample"] if (four or not is_strength_max) else []) + ["add_noise", "vae_sample"]
    assert tape.labels[: len(expected)] == expected, (tape.labels, expected)
    assert all(label == "scheduler" for label in tape.labels[len(expected):]), tape.labels
    noise_at = expected.index("add_noise")
    assert torch.equal(noise, tape.draws[noise_at])
    if not four:
        tensors["masked_image_latents"] = masked_image_latents[:1]
    prepare_adds = [a for a in adds if a["phase"] == "prepare_latents"]
    step_adds = [a for a in adds if a["phase"] != "prepare_latents"]
    if is_strength_max:
        assert not prepare_adds
        assert torch.equal(latents, noise * scheduler.init_noise_sigma)
    else:
        assert len(prepare_adds) == 1 and prepare_adds[0]["timesteps"].tolist() == [latent_timestep]
        assert torch.equal(prepare_adds[0]["out"], latents) and torch.equal(prepare_adds[0]["noise"], noise)
    if four:
        image_latents = prep["out"][2]
        tensors["init_latents"] = image_latents
        # Blending: after every step but the last, the image latents noised to the next timestep.
        assert len(step_adds) == len(timesteps) - 1, (len(step_adds), len(timesteps))
        for i, a in enumerate(step_adds):
            assert a["phase"] == f"step {i}", a["phase"]
            assert torch.equal(a["original"], image_latents) and torch.equal(a["noise"], noise)
            assert a["timesteps"].tolist() == [timesteps[i + 1].item()], (a["timesteps"], timesteps)
        facts["blend_add_noise_timesteps"] = [float(a["timesteps"][0]) for a in step_adds]
        facts["blend_add_noise_step_indices"] = [a["step_index"] for a in step_adds]
    else:
        assert not step_adds
        if not is_strength_max:
            tensors["init_latents"] = prepare_adds[0]["original"]
    return tensors, facts


def write_image_runs(pipes: dict, pipes64: dict, case_name: str, runs: list, inputs: dict, finite_json):
    tensors, manifest_runs = {}, []
    for spec in runs:
        name = spec["name"]
        model = spec["model"] or "model"
        pipe, pipe64 = pipes[model], pipes64[model]
        own_scheduler, own_scheduler64 = pipe.scheduler, pipe64.scheduler
        seed = seed_of(f"{case_name}.{name}")
        try:
            latents_out, cap, tape, scheduler = call_image_pipeline(pipe, spec, own_scheduler, seed, inputs, "latent")
            image, cap2, tape2, _ = call_image_pipeline(pipe, spec, own_scheduler, seed, inputs, "np")
            replay = list(zip(tape.labels, [d.double() for d in tape.draws]))
            image64, cap64, _, _ = call_image_pipeline(pipe64, spec, own_scheduler, seed, inputs, "np", replay=replay)
        finally:
            pipe.scheduler = own_scheduler
            pipe64.scheduler = own_scheduler64
        assert torch.equal(latents_out, cap["steps"][-1]) and torch.equal(latents_out, cap2["steps"][-1]), name
        assert tape.labels == tape2.labels and all(torch.equal(a, b) for a, b in zip(tape.draws, tape2.draws)), name
        image = torch.from_numpy(image).permute(0, 3, 1, 2)
        image64 = torch.from_numpy(image64).permute(0, 3, 1, 2)
        assert image.shape == (1, 3, HEIGHT, WIDTH)
        run_tensors, facts = image_run_tensors(pipe, spec, cap, tape, scheduler, image, latents_out)
        if isinstance(pipe, StableDiffusionInpaintPipeline):
            mask_args = cap["prepare_mask_latents"][0]["args"]
            assert torch.equal(mask_args[0], inputs["mask_condition"]) and torch.equal(mask_args[1], inputs["masked_image"])
        assert run_tensors["noise"].shape[1:] == (1, 4, HEIGHT // 2, WIDTH // 2), name
        entry = dict(
            name=name,
            model=spec["model"] or "model",
            scheduler=type(scheduler).__name__,
            overrides=spec["overrides"],
            prompt=spec["prompt"],
            negative_prompt=spec["negative_prompt"],
            steps=spec["steps"],
            guidance_scale=spec["guidance_scale"],
            strength=spec["strength"],
            generator_seed=seed,
            noise_draws=len(tape.draws),
            noise_sources=tape.labels,
            noise_roles=tape.roles,
            **facts,
            tolerance=TOLERANCE,
            scheduler_config=finite_json(dict(scheduler.config)),
            latents_out_max_abs=float(latents_out.abs().max()),
            f64_deviation=dict(
                latents_out=float((cap64["steps"][-1] - latents_out.double()).abs().max()),
                image=float((image64 - image.double()).abs().max()),
            ),
        )
        for key, value in run_tensors.items():
            tensors[f"{name}.{key}"] = value
        manifest_runs.append(entry)
        print(
            f"  {case_name}.{name}: {entry['scheduler']} strength {spec['strength']}, {len(run_tensors['timesteps'])} "
            f"timesteps from {facts['latent_timestep']}, draws {tape.labels}, f64 deviation {entry['f64_deviation']}"
        )
    return tensors, manifest_runs


IMAGE_NOTES = [
    "every standard-normal draw of a call, in call order, is stored in <run>.noise ([n, 1, 4, 16, 16]); "
    "noise_sources names where each came from: vae_sample (DiagonalGaussianDistribution.sample in the VAE "
    "encode, retrieve_latents sample mode), add_noise (the pipeline's prepare_latents draw: the noise handed to "
    "scheduler.add_noise, or for inpainting at strength 1 the initial latents before init_noise_sigma), scheduler "
    "(the sampler's step noise); noise_roles says more (which image was encoded, which step). All come from one "
    "torch.Generator().manual_seed(generator_seed), so on CPU they are consecutive torch.randn draws of that "
    "generator",
    "timesteps: the timesteps actually denoised (scheduler.timesteps[begin_index:]); begin_index = t_start * "
    "scheduler.order with init_timestep = min(int(steps * strength), steps), t_start = max(steps - init_timestep, 0); "
    "latent_timestep = timesteps[0] (the timestep add_noise is given); scheduler_begin_index is what "
    "set_begin_index stored (null for schedulers without it: DDIM, PNDM)",
    "f64_deviation: the max abs difference between these float32 outputs and the same pipeline in float64 "
    "replaying the same noise",
    "prompt embeddings are those of tiny_sd1 (same text encoder and tokenizer): tiny_sd1's reference.safetensors "
    "holds them (e.g. ddim.prompt_embeds / ddim.negative_prompt_embeds)",
    "image: [1, 3, 32, 32] in [0, 1] (output_type='np', VAE decode of latents / scaling_factor, then (x/2+0.5).clamp(0,1)); "
    "latents_out from the output_type='latent' call",
]


def image_manifest(pipe, case_name, model, runs, notes, finite_json, **extra) -> dict:
    return {
        "kind": "pipeline",
        "reference": f"diffusers {diffusers.__version__} {type(pipe).__name__}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
        "pipeline": type(pipe).__name__,
        "model": model,
        "height": HEIGHT,
        "width": WIDTH,
        **extra,
        "scheduler_config": finite_json(dict(pipe.scheduler.config)),
        "runs": runs,
        "notes": IMAGE_NOTES + notes,
    }


def write_image_cases(out_root: pathlib.Path, finite_json, randomise_norms) -> None:
    from diffusers import StableDiffusionImg2ImgPipeline

    root = out_root / "pipeline"
    sd1_dir = root / "tiny_sd1" / "model"
    assert sd1_dir.is_dir(), sd1_dir

    # img2img.
    case_name = "tiny_sd1_img2img"
    case = root / case_name
    if case.exists():
        shutil.rmtree(case)
    case.mkdir(parents=True)
    init = make_init_png(case / "init.png", seed_of(f"{case_name}.init"))
    pipe = load_pipeline(StableDiffusionImg2ImgPipeline, sd1_dir, torch.float32)
    pipe64 = load_pipeline(StableDiffusionImg2ImgPipeline, sd1_dir, torch.float64)
    init_image = pipe.image_processor.preprocess(init)
    inputs = dict(image=init)
    tensors, runs = write_image_runs({"model": pipe}, {"model": pipe64}, case_name, IMG2IMG_RUNS, inputs, finite_json)
    tensors["inputs.init_image"] = init_image
    manifest = image_manifest(
        pipe, case_name, SD1_MODEL, runs,
        [
            "init.png: 32×32 RGB, 8-bit; diffusers is given the PIL image read back from it. inputs.init_image is "
            "VaeImageProcessor.preprocess of it: pixels / 255 * 2 - 1 as [1, 3, 32, 32] (no resize: 32 is a multiple "
            "of the VAE scale factor and PIL returns a copy for an equal size)",
            "init_latents = scaling_factor * vae.encode(init_image).latent_dist.sample(generator) (the first draw); "
            "noised_latents = scheduler.add_noise(init_latents, noise, latent_timestep) (noise: the second draw), "
            "the latents entering the first step before scale_model_input (no init_noise_sigma scaling in img2img)",
        ],
        finite_json,
        init_image="init.png",
    )
    save_file({k: v.detach().contiguous().float() for k, v in sorted(tensors.items())}, case / "reference.safetensors")
    (case / "manifest.json").write_text(json.dumps(finite_json(manifest), indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    print(f"wrote {case}")
    del pipe, pipe64

    # Inpainting.
    case_name = "tiny_sd1_inpaint"
    case = root / case_name
    if case.exists():
        shutil.rmtree(case)
    case.mkdir(parents=True)
    model_dir = case / "model"
    seed = seed_of(case_name)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=[32, 64],
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
        sample_size=16,
        in_channels=9,
        out_channels=4,
    )
    randomise_norms(unet, generator)
    # tiny_sd1's text encoder, tokenizer, VAE and scheduler, byte for byte; only the UNet is new.
    shutil.copytree(sd1_dir, model_dir, ignore=shutil.ignore_patterns("unet"))
    unet.half().save_pretrained(model_dir / "unet", safe_serialization=True)
    index = json.loads((model_dir / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionInpaintPipeline"
    (model_dir / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    init = make_init_png(case / "init.png", seed_of(f"{case_name}.init"))
    mask = make_mask_png(case / "mask.png")
    pipes, pipes64 = {}, {}
    for key, folder in [("model", model_dir), (SD1_MODEL, sd1_dir)]:
        pipes[key] = load_pipeline(StableDiffusionInpaintPipeline, folder, torch.float32)
        pipes64[key] = load_pipeline(StableDiffusionInpaintPipeline, folder, torch.float64)
    assert pipes["model"].unet.config.in_channels == 9 and pipes[SD1_MODEL].unet.config.in_channels == 4
    pipe = pipes["model"]
    init_image = pipe.image_processor.preprocess(init, height=HEIGHT, width=WIDTH).to(torch.float32)
    mask_condition = pipe.mask_processor.preprocess(mask, height=HEIGHT, width=WIDTH)
    masked_image = init_image * (mask_condition < 0.5)
    inputs = dict(image=init, mask=mask, mask_condition=mask_condition, masked_image=masked_image)
    tensors, runs = write_image_runs(pipes, pipes64, case_name, INPAINT_RUNS, inputs, finite_json)
    tensors["inputs.init_image"] = init_image
    tensors["inputs.mask"] = mask_condition
    tensors["inputs.masked_image"] = masked_image
    manifest = image_manifest(
        pipe, case_name, "model", runs,
        [
            "runs name their model: model (this case's, a 9-channel UNet: latents, mask, masked_image_latents "
            "concatenated in that order after scale_model_input) or ../tiny_sd1/model (the 4-channel UNet: after "
            "every step latents = (1 - mask) * init_latents_noised + mask * latents, with init_latents noised to the "
            "next timestep by scheduler.add_noise(init_latents, noise, timesteps[i + 1]) and not noised after the "
            "last step; blend_add_noise_timesteps lists them, blend_add_noise_step_indices the scheduler's step_index "
            "at the time, which is what sigma-based schedulers use instead of the timestep)",
            "model/ is tiny_sd1's model folder with a new unet/ (in_channels 9, layers_per_block 1): the text encoder, "
            "tokenizer, VAE and scheduler files are copies of tiny_sd1's",
            "init.png: 32×32 RGB; mask.png: 32×32 mode L, white = repaint: a rectangle (rows 9..22, columns 11..24) "
            "with rings of 128, 127 and 64 around it. inputs.mask is the mask_processor output: pixels / 255, "
            "binarised (>= 0.5 -> 1, < 0.5 -> 0), [1, 1, 32, 32]; inputs.init_image is pixels / 255 * 2 - 1; "
            "inputs.masked_image = init_image * (mask < 0.5)",
            "mask_latent: torch.nn.functional.interpolate(inputs.mask, size=(16, 16)) (mode nearest: pixel (2i, 2j)), "
            "[1, 1, 16, 16]; masked_image_latents = scaling_factor * vae.encode(masked_image).latent_dist.sample(generator)",
            "noised_latents: the latents entering the first denoising step (before scale_model_input): at strength 1 "
            "noise * init_noise_sigma, else scheduler.add_noise(init_latents, noise, latent_timestep); init_latents = "
            "scaling_factor * vae.encode(init_image).latent_dist.sample(generator), present when they exist (the "
            "4-channel runs, where they are always encoded, and strength < 1)",
            "draw order: [vae_sample(image) when the UNet has 4 channels or strength < 1], add_noise (prepare_latents), "
            "vae_sample(masked_image), then the sampler's draws",
            "no padding_mask_crop: the output image is the VAE decode alone (apply_overlay runs only with padding_mask_crop)",
        ],
        finite_json,
        init_image="init.png",
        mask_image="mask.png",
    )
    save_file({k: v.detach().contiguous().float() for k, v in sorted(tensors.items())}, case / "reference.safetensors")
    (case / "manifest.json").write_text(json.dumps(finite_json(manifest), indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    print(f"wrote {case}")


# ---------------------------------------------------------------------------------------------
# G. Few-step, guidance-free sampling (SD-Turbo style).
#
# Written last (nothing above depends on it). tiny_sd1_turbo reuses tiny_sd1's model folder
# ("model": "../tiny_sd1/model") and runs it the way a user of stabilityai/sd-turbo does:
# EulerAncestralDiscreteScheduler with trailing timestep spacing, guidance_scale 0.0 (no
# classifier-free guidance: diffusers encodes no negative prompt), one to four steps; plus Euler
# with trailing spacing and LCM at guidance 1.0. The runs are tiny_sd1's kind (write_runs): the
# seeds derive from "tiny_sd1_turbo.<run>".

TRAILING = dict(timestep_spacing="trailing")
TURBO_RUNS = [
    run("turbo_1_step", EulerAncestralDiscreteScheduler, TRAILING, negative_prompt=None, steps=1, guidance_scale=0.0),
    run("turbo_4_steps", EulerAncestralDiscreteScheduler, TRAILING, negative_prompt=None, steps=4, guidance_scale=0.0),
    run("euler_trailing_2_steps", EulerDiscreteScheduler, TRAILING, negative_prompt=None, steps=2, guidance_scale=0.0),
    run("lcm_4_steps_guidance_1", LCMScheduler, negative_prompt=None, steps=4, guidance_scale=1.0),
]
# What diffusers 0.42.1 gives for these configs (checked, so that a diffusers change shows up here).
TURBO_TIMESTEPS = {
    "turbo_1_step": [999.0],
    "turbo_4_steps": [999.0, 749.0, 499.0, 249.0],
    "euler_trailing_2_steps": [999.0, 499.0],
    "lcm_4_steps_guidance_1": [999.0, 759.0, 499.0, 259.0],
}


def write_turbo_case(out_root: pathlib.Path, finite_json) -> None:
    case_name = "tiny_sd1_turbo"
    root = out_root / "pipeline"
    sd1_dir = root / "tiny_sd1" / "model"
    assert sd1_dir.is_dir(), sd1_dir
    case = root / case_name
    if case.exists():
        shutil.rmtree(case)
    case.mkdir(parents=True)
    pipe = load_pipeline(StableDiffusionPipeline, sd1_dir, torch.float32)
    pipe64 = load_pipeline(StableDiffusionPipeline, sd1_dir, torch.float64)
    tensors, manifest_runs = write_runs(pipe, pipe64, case_name, TURBO_RUNS, finite_json)
    del pipe64
    for spec, entry in zip(TURBO_RUNS, manifest_runs):
        name = spec["name"]
        timesteps = tensors[f"{name}.timesteps"].tolist()
        assert timesteps == TURBO_TIMESTEPS[name], (name, timesteps)
        assert f"{name}.negative_prompt_embeds" not in tensors, name
        # The scheduler as the run left it: what scaled latents_in (init_noise_sigma) and its sigmas.
        scheduler = spec["scheduler"].from_config(pipe.scheduler.config, **spec["overrides"])
        scheduler.set_timesteps(spec["steps"])
        assert scheduler.timesteps.float().tolist() == timesteps, name
        sigmas = getattr(scheduler, "sigmas", None)
        entry["init_noise_sigma"] = float(scheduler.init_noise_sigma)
        entry["sigmas"] = [float(s) for s in sigmas] if sigmas is not None else None
    manifest = {
        "kind": "pipeline",
        "reference": f"diffusers {diffusers.__version__} {type(pipe).__name__}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
        "pipeline": type(pipe).__name__,
        "model": SD1_MODEL,
        "height": HEIGHT,
        "width": WIDTH,
        "scheduler_config": finite_json(dict(pipe.scheduler.config)),
        "runs": manifest_runs,
        "notes": [
            "model is tiny_sd1's folder (../tiny_sd1/model, SD 1.5's PNDM scheduler config: leading spacing, "
            "steps_offset 1); each run's scheduler is SchedulerClass.from_config(that config, **overrides)",
            "SD-Turbo style: EulerAncestralDiscreteScheduler with timestep_spacing 'trailing', guidance_scale 0.0 "
            "(no classifier-free guidance: diffusers skips the negative prompt, negative_prompt_embeds is absent, "
            "the UNet runs once per step on the prompt embeddings alone)",
            "trailing spacing: timesteps = round(arange(N, 0, -N/steps)) - 1, i.e. 999 first, steps_offset ignored; "
            "init_noise_sigma is sigma_max itself (14.6146...) for trailing and linspace spacing in diffusers, not "
            "sqrt(sigma_max^2 + 1) as with leading spacing; the latents entering the first step are latents_in * "
            "init_noise_sigma (per-run init_noise_sigma and sigmas: extra fields of this case)",
            "latents_in is the initial noise before init_noise_sigma scaling; the generator that the stochastic "
            "samplers draw from is torch.Generator().manual_seed(generator_seed), and every draw is stored in order "
            "in <run>.noise",
            "LCM at guidance 1.0: no classifier-free guidance and no guidance embedding (the UNet has no "
            "time_cond_proj_dim); LCMScheduler from the PNDM config keeps original_inference_steps 50 and "
            "leading spacing",
            "f64_deviation: the max abs difference between these float32 outputs and the same pipeline in float64 "
            "replaying the same noise, i.e. float32 rounding alone",
        ],
    }
    save_file({k: v.detach().contiguous().float() for k, v in sorted(tensors.items())}, case / "reference.safetensors")
    (case / "manifest.json").write_text(json.dumps(finite_json(manifest), indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    print(f"wrote {case}")
