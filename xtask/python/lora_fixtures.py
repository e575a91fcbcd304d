"""LoRA references: tiny LoRA files for the fixture pipelines in each layout users download, and
diffusers' (or PEFT's) images with them.

Called by make_fixtures.py (`--only lora`). For tiny_sd1 and tiny_sdxl
(tests/fixtures/pipeline/<case>/model), random LoRA factors are made with PEFT (`add_adapter`,
then every lora_B drawn at random too, since PEFT starts it at zero) on the U-Net's attention
projections, transformer projections and feed-forwards and the resnets' 3x3 convolutions (a
LoCon-style convolution LoRA), and on every text encoder's attention and MLP. They are written as

- `diffusers.safetensors`: diffusers' own `save_lora_weights` (with its adapter metadata);
- `kohya.safetensors`: diffusers' `convert_state_dict_to_kohya` of the same factors (SD 1.x's
  text encoder renamed `lora_te_`, as kohya's sd-scripts writes it), its alphas set to other
  values than the rank so that `alpha / rank` is tested;
- `peft/adapter_model.safetensors` + `adapter_config.json`: PEFT's `save_pretrained` of the U-Net
  alone (tiny_sd1 only);
- `second.safetensors`: another LoRA in diffusers' layout, for two at once.

and for each, diffusers' pipeline (`load_lora_weights` then `fuse_lora`; PEFT's
`merge_and_unload` for the PEFT folder) runs the roundtrip fixtures' generation from fixed
latents. `reference.safetensors` holds the latents in, and the final latents and image per case
(`<case>.latents_out`, `<case>.image`), plus the image without any LoRA (so that a test can see
that the LoRA changes it). `manifest.json` lists the cases with their files and weights.
"""

import copy
import json
import pathlib
import shutil

import diffusers
import peft
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
from peft import LoraConfig, inject_adapter_in_model, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from roundtrip_fixtures import GENERATION
from safetensors.torch import load_file, save_file

ROOT = pathlib.Path(__file__).resolve().parents[2]
# The roundtrip fixtures' generation (the same prompt, steps, size and seeds).
TOLERANCE = 1e-4

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def pipeline_class(name: str):
    return StableDiffusionXLPipeline if "sdxl" in name else StableDiffusionPipeline


def load(name: str):
    pipe = pipeline_class(name).from_pretrained(ROOT / f"tests/fixtures/pipeline/{name}/model", torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def text_encoders(pipe) -> list:
    return [("text_encoder", pipe.text_encoder)] + ([("text_encoder_2", pipe.text_encoder_2)] if getattr(pipe, "text_encoder_2", None) is not None else [])


def randomise_lora(model: torch.nn.Module, generator: torch.Generator, scale: float) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                # f16 values, so that the files (stored in f16, as most LoRAs are) hold
                # exactly the factors the references use.
                p.copy_((torch.randn(p.shape, generator=generator) * scale).half().float())


def make_adapters(name: str, seed: int):
    """A pipeline with random LoRA factors on the U-Net and text encoders; their configs."""
    pipe = load(name)
    g = torch.Generator().manual_seed(seed)
    unet_config = LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS, init_lora_weights="gaussian")
    pipe.unet.add_adapter(unet_config)
    randomise_lora(pipe.unet, g, 0.15)
    text_config = LoraConfig(r=2, lora_alpha=1, target_modules=TEXT_TARGETS, init_lora_weights="gaussian")
    for _, te in text_encoders(pipe):
        # transformers 5.24's `add_adapter` asks for PEFT 0.22, which PyPI does not have yet:
        # PEFT's own injection does the same.
        inject_adapter_in_model(text_config, te)
        randomise_lora(te, g, 0.3)
    return pipe, unet_config, text_config


def half(state_dict: dict) -> dict:
    return {k: v.detach().half().contiguous() for k, v in state_dict.items()}


def generate(pipe) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = GENERATION
    factor = pipe.vae_scale_factor
    shape = (1, pipe.vae.config.latent_channels, g["height"] // factor, g["width"] // factor)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(g["latent_seed"]), dtype=torch.float32)
    kwargs = dict(
        prompt=g["prompt"],
        negative_prompt=g["negative_prompt"],
        num_inference_steps=g["steps"],
        guidance_scale=g["guidance_scale"],
        height=g["height"],
        width=g["width"],
        latents=latents,
    )
    with torch.no_grad():
        image = pipe(**kwargs, output_type="np", generator=torch.Generator().manual_seed(g["generator_seed"])).images
        final = pipe(**kwargs, output_type="latent", generator=torch.Generator().manual_seed(g["generator_seed"])).images
    image = torch.from_numpy(image).permute(0, 3, 1, 2).contiguous().float()
    return latents, final.float().contiguous(), image


def write_case(out: pathlib.Path, name: str, seed: int) -> None:
    case = out / name
    shutil.rmtree(case, ignore_errors=True)
    case.mkdir(parents=True)
    tensors = {}
    cases = {}

    latents, final, image = generate(load(name))
    tensors["latents_in"] = latents
    tensors["base.latents_out"] = final
    tensors["base.image"] = image

    pipe, unet_config, text_config = make_adapters(name, seed)
    unet_sd = half(get_peft_model_state_dict(pipe.unet))
    te_sds = {n: half(get_peft_model_state_dict(te)) for n, te in text_encoders(pipe)}
    cls = pipeline_class(name)

    # diffusers' own writer, with the adapter configs as its metadata.
    kwargs = dict(unet_lora_layers=unet_sd, unet_lora_adapter_metadata=unet_config.to_dict())
    for n, sd in te_sds.items():
        kwargs[f"{n}_lora_layers"] = sd
        kwargs[f"{n}_lora_adapter_metadata"] = text_config.to_dict()
    tmp = case / "tmp"
    cls.save_lora_weights(tmp, weight_name="diffusers.safetensors", **kwargs)
    shutil.move(tmp / "diffusers.safetensors", case / "diffusers.safetensors")
    shutil.rmtree(tmp)

    # kohya's layout, from diffusers' converter, with alphas that are not the rank.
    prefixed = {f"unet.{k}": v for k, v in unet_sd.items()}
    for n, sd in te_sds.items():
        prefixed.update({f"{n}.{k}": v for k, v in sd.items()})
    kohya = convert_state_dict_to_kohya(prefixed)
    alphas = {}
    for key in list(kohya):
        if key.endswith(".alpha"):
            unet = key.startswith("lora_unet_")
            kohya[key] = torch.tensor(8.0 if unet else 1.0)
            alphas["unet" if unet else "text"] = float(kohya[key])
    if "sdxl" not in name:
        kohya = {k.replace("lora_te1_", "lora_te_", 1): v for k, v in kohya.items()}
    save_file({k: (v if k.endswith(".alpha") else v.half()).contiguous() for k, v in kohya.items()}, case / "kohya.safetensors", metadata={"ss_network_dim": "4", "ss_network_alpha": "8", "ss_network_module": "networks.lora"})

    # A second LoRA, for two at once.
    second, second_unet_config, second_text_config = make_adapters(name, seed + 1)
    kwargs = dict(unet_lora_layers=half(get_peft_model_state_dict(second.unet)), unet_lora_adapter_metadata=second_unet_config.to_dict())
    for n, te in text_encoders(second):
        kwargs[f"{n}_lora_layers"] = half(get_peft_model_state_dict(te))
        kwargs[f"{n}_lora_adapter_metadata"] = second_text_config.to_dict()
    cls.save_lora_weights(tmp, weight_name="second.safetensors", **kwargs)
    shutil.move(tmp / "second.safetensors", case / "second.safetensors")
    shutil.rmtree(tmp)

    def reference(label: str, loras: list) -> None:
        p = load(name)
        names = []
        for i, (file, _) in enumerate(loras):
            p.load_lora_weights(case, weight_name=file, adapter_name=f"l{i}")
            names.append(f"l{i}")
        p.set_adapters(names, adapter_weights=[w for _, w in loras])
        p.fuse_lora(adapter_names=names)
        p.unload_lora_weights()
        _, final, image = generate(p)
        tensors[f"{label}.latents_out"] = final
        tensors[f"{label}.image"] = image
        cases[label] = dict(loras=[dict(file=f, weight=w) for f, w in loras])

    reference("diffusers", [("diffusers.safetensors", 1.0)])
    reference("diffusers_half", [("diffusers.safetensors", 0.5)])
    reference("kohya", [("kohya.safetensors", 1.0)])
    reference("two", [("kohya.safetensors", 0.7), ("second.safetensors", -0.4)])

    if "sdxl" not in name:
        # PEFT's own folder for the U-Net alone, merged by PEFT.
        p = load(name)
        model = get_peft_model(p.unet, copy.deepcopy(unet_config))
        result = set_peft_model_state_dict(model, {f"base_model.model.{k}": v.float() for k, v in unet_sd.items()})
        assert not result.unexpected_keys, result.unexpected_keys[:3]
        model.half()
        model.save_pretrained(case / "peft")
        model.float()
        for extra in (case / "peft").iterdir():
            if extra.name not in ("adapter_model.safetensors", "adapter_config.json"):
                extra.unlink()
        p.unet = model.merge_and_unload()
        _, final, image = generate(p)
        assert (final - tensors["base.latents_out"]).abs().max() > 0.01, "the PEFT LoRA changes nothing"
        tensors["peft.latents_out"] = final
        tensors["peft.image"] = image
        cases["peft"] = dict(loras=[dict(file="peft/adapter_model.safetensors", weight=1.0)])

    save_file({k: v.contiguous() for k, v in tensors.items()}, case / "reference.safetensors")
    manifest = dict(
        generation=dict(GENERATION, tolerance=TOLERANCE),
        cases=cases,
        unet_config=dict(r=unet_config.r, lora_alpha=unet_config.lora_alpha, target_modules=UNET_TARGETS),
        text_config=dict(r=text_config.r, lora_alpha=text_config.lora_alpha, target_modules=TEXT_TARGETS),
        kohya_alphas=alphas,
        versions=dict(torch=torch.__version__, diffusers=diffusers.__version__, peft=peft.__version__),
    )
    (case / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {case} ({len(cases)} cases)")


def write_lora_cases(out: pathlib.Path) -> None:
    for i, name in enumerate(["tiny_sd1", "tiny_sdxl"]):
        write_case(out / "lora", name, seed=3000 + 10 * i)
