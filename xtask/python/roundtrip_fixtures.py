"""Round trip through our writers: folders that the Rust binary writes (`sd convert`, `sd train
unet`) opened with diffusers' and transformers' `from_pretrained`, and compared with the
folders they came from.

Called by make_fixtures.py (`--only roundtrip`). It builds `target/debug/sd` (`cargo build -p
sd-cli`; set SD_BIN to use another binary instead) and, in a temporary folder:

- converts every single-file fixture checkpoint (`tests/fixtures/pipeline/<case>/<case>.safetensors`,
  with `--config <case>/model`) and the fixture model folders, in the source dtype and, for some,
  with `--dtype f32` / `--dtype bf16`;
- fine-tunes tiny_sd1 for a few steps (`sd train unet`, 32 px, batch 1, on three captioned PNGs
  written here), and trains a narrower U-Net from scratch (`--init`) on tiny_sd1's components;
- trains two rank-4 LoRAs of tiny_sd1's U-Net and text encoder (`sd train unet --lora-rank 4
  --train-text-encoder`), one in each of our file layouts (`--lora-format kohya`, `lora.safetensors`;
  `--lora-format diffusers`, `pytorch_lora_weights.safetensors`).

Every written folder is loaded as a pipeline and component by component (U-Net, VAE, text
encoders, tokenizers, scheduler) with diffusers' and transformers' logging captured: any message
about unexpected, missing, unused or newly initialised weights, or about config fields not found
or not expected, fails the folder. Each component is compared with the same component of the
source folder loaded the same way: weights (the files' keys, shapes and dtypes, and the loaded
state dicts, equal after casting to the written dtype), configs (apart from version and path
keys), tokenizers (vocabularies, special tokens, ids), the scheduler; and the pipelines' images
from the same latents. A trained folder must keep the base model's other components unchanged
(the same bytes) and hold a U-Net that loads.

Each LoRA file is loaded into tiny_sd1's pipeline with diffusers' `load_lora_weights`, its
messages captured as above: a fatal one fails the file. Every pair of factors in the file (read
here with our own map from the layouts' names to the model's modules, not with diffusers'
converter) must have become a PEFT LoRA layer of the U-Net or text encoder holding the same down
(`lora_A`) and up (`lora_B`) values and the scale alpha / rank, with no LoRA layer the file does
not name; the pipeline's image with the LoRA (unfused, then after `fuse_lora()`) is compared with
itself and with the image without it (the LoRA must move it). A file diffusers refuses is not
repaired into a pass: its verdict stays a failure with diffusers' messages, and a diagnosis
records which change (if any) makes it load. Negative controls: copies of the kohya file with one
key, and with one layer's keys, renamed must fail.

What is committed under tests/fixtures/roundtrip/: `manifest.json` (every check, pass or fail,
with the largest differences and every message), the from-scratch run's trained `unet/` (as `sd
train` wrote it, f32: 1.1 MB; tiny_sd1's own U-Net is 4.5 MB in f32 and 2.2 MB even in f16, too
large to commit) and `reference.safetensors`: diffusers' image from tiny_sd1's folder with that
U-Net, with its fixed initial latents and the final latents, for tests/roundtrip_parity.rs. Under
`lora/<format>/`: the LoRA file as `sd train` wrote it (f32, about 180 KB) and its
`reference.safetensors` (diffusers' latents and image with it, unfused and fused, and without it).
"""

import contextlib
import io
import json
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import warnings

import diffusers
import numpy as np
import peft
import safetensors
import torch
import transformers
from diffusers import UNet2DConditionModel
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ROOT = pathlib.Path(__file__).resolve().parents[2]
PIPELINE = ROOT / "tests/fixtures/pipeline"

# Keys whose values legitimately differ between a folder and its copy.
IGNORED_KEYS = {"_diffusers_version", "_name_or_path", "transformers_version"}
# transformers' config names the weights' dtype; a `--dtype` conversion changes it on purpose.
DTYPE_KEYS = {"dtype", "torch_dtype"}

# A message naming any of these fails the folder (diffusers and transformers word them so:
# "were not used when initializing", "newly initialized", "UNEXPECTED"/"MISSING" in the load
# report, "... was not found in config. Values will be initialized to default values", "... were
# passed to X, but are not expected and will be ignored", "size mismatch").
FATAL = (
    "unexpected",
    "missing",
    "not used",
    "newly initialized",
    "not initialized",
    "not found in config",
    "not expected",
    "will be ignored",
    "mismatch",
)
# Messages about this environment, not about the folder.
BENIGN = ("`accelerate` was not found",)

# diffusers loads as it does where `accelerate` is not installed: weights initialised, then the
# file's copied in. With accelerate, its default turns to `low_cpu_mem_usage=True`, and a weight
# missing from a file stays on the meta device, so that the damaged copy's U-Net (the negative
# control) can no longer be compared with its source.
DIFFUSERS_LOAD = dict(low_cpu_mem_usage=False)

PROMPTS = ["a photo of a cat", "", "an astronaut riding a horse on the moon, highly detailed!"]

# The generation that every pipeline runs (each folder's own scheduler).
GENERATION = dict(
    prompt="a red square on a blue background",
    negative_prompt="blurry",
    steps=2,
    guidance_scale=7.5,
    height=32,
    width=32,
    latent_seed=2024,
    generator_seed=2025,
)

TRAIN_STEPS = 3
TRAIN_SEED = 7
CAPTIONS = ["a red square", "a blue circle on grass", "a green cat"]

# The from-scratch U-Net: tiny_sd1's config with half the channels (4.5 MB → 1.1 MB in f32).
INIT_OVERRIDES = dict(block_out_channels=[16, 32])

# The LoRA runs: rank 4, a learning rate at which TRAIN_STEPS Adam steps move every up factor
# well away from its zero start (to about 0.09), strong enough that the parity test's tolerance
# resolves a 0.1 % change of the LoRA's weight (at 1e-2 the diffusers-format LoRA's latents moved
# 6.0e-4 under such a change, inside their 6.8e-4 bound; at 3e-2, 9.5e-4 against 7.2e-4); in each
# format an alpha other than the rank (a reader that ignored the alpha, kohya's `.alpha` tensors
# or diffusers' adapter metadata, would be caught).
LORA_RANK = 4
LORA_LEARNING_RATE = 3e-2
LORA_FORMATS = {
    "kohya": dict(file="lora.safetensors", alpha=8.0),
    "diffusers": dict(file="pytorch_lora_weights.safetensors", alpha=2.0),
}
# The largest difference allowed between diffusers' unfused and fused images (f32 rounding; the
# latents' scaled by their largest value), and the parity tests' tolerance; the LoRA must move the
# image and the latents by at least LORA_MIN_EFFECT times it.
LORA_TOLERANCE = 1e-4
LORA_MIN_EFFECT = 100


def dtype_of(name: str) -> torch.dtype:
    return {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}[name]


DTYPE_ARG = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}
TRANSFORMERS_DTYPE = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


class Paths:
    """Replaces machine-specific folders in text: the manifest and the messages stay the same
    wherever the fixtures are made."""

    def __init__(self, tmp: pathlib.Path):
        self.pairs = [(str(tmp.resolve()), "$TMP"), (str(tmp), "$TMP"), (str(ROOT) + "/", ""), (str(ROOT), ".")]

    def __call__(self, text: str) -> str:
        for a, b in self.pairs:
            text = text.replace(a, b)
        return text


# ---------------------------------------------------------------------------------------------
# The binary.


def sd_binary() -> pathlib.Path:
    """SD_BIN when set; otherwise target/debug/sd, built first (cargo rebuilds only what changed,
    so the fixtures always come from the current source)."""
    if os.environ.get("SD_BIN"):
        return pathlib.Path(os.environ["SD_BIN"]).resolve()
    binary = ROOT / "target/debug/sd"
    print("roundtrip: cargo build -p sd-cli")
    subprocess.run(["cargo", "build", "-p", "sd-cli"], cwd=ROOT, check=True)
    if not binary.is_file():
        raise SystemExit(f"{binary}: not built")
    return binary


def run_sd(binary: pathlib.Path, args: list, paths: Paths) -> dict:
    result = subprocess.run([str(binary), *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"sd {' '.join(map(str, args))} failed ({result.returncode}):\n{result.stderr}")
    return dict(command=paths("sd " + " ".join(map(str, args))), stdout=paths(result.stdout.strip()))


# ---------------------------------------------------------------------------------------------
# Loading with every message kept.


@contextlib.contextmanager
def captured(messages: list, paths: Paths):
    """Collects the diffusers and transformers log records (INFO and up: diffusers reports
    config fields it filled with defaults at INFO), Python warnings and anything printed, into
    `messages` as {source, level, text, class}."""
    records = []

    class Handler(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Handler(level=logging.INFO)
    loggers = [logging.getLogger("diffusers"), logging.getLogger("transformers")]
    saved = [(lg.level, lg.propagate, list(lg.handlers)) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.INFO)
        lg.handlers = [handler]
        lg.propagate = False
    out, err = io.StringIO(), io.StringIO()
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            warnings.simplefilter("always")
            yield
    finally:
        for lg, (level, propagate, handlers) in zip(loggers, saved):
            lg.setLevel(level)
            lg.handlers = handlers
            lg.propagate = propagate
        found = [(r.name, r.levelname, r.getMessage()) for r in records]
        found += [("warnings", w.category.__name__, str(w.message)) for w in caught]
        found += [(name, "PRINTED", text.getvalue()) for name, text in (("stdout", out), ("stderr", err)) if text.getvalue().strip()]
        for source, level, text in found:
            text = paths(text)
            messages.append(dict(source=source, level=level, text=text, **{"class": classify(level, text)}))


def classify(level: str, text: str) -> str:
    lower = text.lower()
    if any(b.lower() in lower for b in BENIGN):
        return "benign"
    # transformers prints a whole config at INFO; its keys are not messages.
    if level == "INFO" and lower.startswith("model config "):
        return "info"
    if any(f in lower for f in FATAL):
        return "fatal"
    return "info" if level in ("INFO", "DEBUG") else "warning"


def load(fn, messages: list, paths: Paths):
    """`fn()` with its messages captured; the error, if it fails, is a fatal message too."""
    try:
        with captured(messages, paths):
            return fn()
    except Exception as error:  # noqa: BLE001: every refusal is a result to report
        messages.append(dict(source="exception", level="ERROR", text=paths(f"{type(error).__name__}: {error}"), **{"class": "fatal"}))
        return None


def component_class(library: str, name: str):
    return getattr(diffusers if library == "diffusers" else transformers, name)


# ---------------------------------------------------------------------------------------------
# Comparisons.


def read_json(path: pathlib.Path) -> dict:
    return json.loads(path.read_text())


def dict_diff(written: dict, source: dict, ignore=IGNORED_KEYS) -> dict:
    """Keys only in one of them and keys whose values differ (numbers as numbers)."""
    w = {k: v for k, v in written.items() if k not in ignore}
    s = {k: v for k, v in source.items() if k not in ignore}
    diff = {}
    only_w, only_s = sorted(set(w) - set(s)), sorted(set(s) - set(w))
    if only_w:
        diff["only_written"] = {k: w[k] for k in only_w}
    if only_s:
        diff["only_source"] = {k: s[k] for k in only_s}
    changed = {k: dict(written=w[k], source=s[k]) for k in sorted(set(w) & set(s)) if not same_value(w[k], s[k])}
    if changed:
        diff["changed"] = changed
    return diff


def same_value(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return a == b
    return a == b


def jsonable(value):
    """A loaded config (FrozenDict, tuples, sets, dtypes) as plain JSON values."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, set):
        return sorted(jsonable(v) for v in value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def compare_tensors(written: dict, source: dict, dtype: torch.dtype | None, values: bool = True) -> dict:
    """Key sets, shapes, the written dtype (when `dtype` is given: the file check) and, with
    `values`, equality after casting the source to each written tensor's dtype and the largest
    absolute difference in f32 (before casting: the cost of a lossy `--dtype`)."""
    only_w, only_s = sorted(set(written) - set(source)), sorted(set(source) - set(written))
    common = sorted(set(written) & set(source))
    shapes = [k for k in common if written[k].shape != source[k].shape]
    dtypes = sorted({str(written[k].dtype) for k in common if dtype is not None and written[k].dtype != dtype and written[k].is_floating_point()})
    unequal, worst = [], 0.0
    for k in common if values else []:
        if k in shapes:
            continue
        w, s = written[k], source[k]
        if not torch.equal(w, s.to(w.dtype)):
            unequal.append(k)
        if w.is_floating_point() or s.is_floating_point():
            worst = max(worst, (w.float() - s.float()).abs().max().item() if w.numel() else 0.0)
    result = dict(
        tensors=len(common),
        only_written=only_w,
        only_source=only_s,
        shape_mismatch=shapes,
        unexpected_dtypes=dtypes,
    )
    if values:
        result.update(unequal_after_cast=len(unequal), first_unequal=unequal[:5], max_abs_diff=worst)
    result["equal"] = not (only_w or only_s or shapes or dtypes or unequal)
    return result


def file_dtypes(path: pathlib.Path) -> list:
    with safe_open(str(path), framework="pt") as f:
        return sorted({f.get_slice(k).get_dtype() for k in f.keys()})


def same_files(written: pathlib.Path, source: pathlib.Path) -> dict:
    """Whether two folders hold the same files with the same bytes."""

    def listing(d):
        return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}

    w, s = listing(written), listing(source)
    differing = sorted(k for k in set(w) & set(s) if w[k] != s[k])
    return dict(
        identical=w == s,
        only_written=sorted(set(w) - set(s)),
        only_source=sorted(set(s) - set(w)),
        differing=differing,
    )


def tokenizer_facts(tok) -> dict:
    return dict(
        cls=type(tok).__name__,
        vocab=tok.get_vocab(),
        special=dict(bos=tok.bos_token, eos=tok.eos_token, pad=tok.pad_token, unk=tok.unk_token),
        model_max_length=tok.model_max_length,
        ids=[tok(p, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids for p in PROMPTS],
    )


# ---------------------------------------------------------------------------------------------
# One folder.


def fatal_messages(messages: list, baseline: list) -> tuple[list, list]:
    """The fatal messages of a written folder, split into new ones and those the source folder
    gives too (inherited, not the writer's doing)."""
    seen = {m["text"].replace("$WRITTEN", "$FOLDER") for m in baseline if m["class"] == "fatal"}
    fatal = [m for m in messages if m["class"] == "fatal"]
    new = [m for m in fatal if m["text"].replace("$WRITTEN", "$FOLDER") not in seen]
    inherited = [m for m in fatal if m["text"].replace("$WRITTEN", "$FOLDER") in seen]
    return new, inherited


def check_component(name: str, library: str, cls_name: str, written: pathlib.Path, source: pathlib.Path, expect_dtype, base_paths: Paths, same_bytes: bool, unet_reference: pathlib.Path | None) -> dict:
    """Loads `name` from both folders and compares. `expect_dtype`: the dtype the written weights
    must have; `same_bytes`: the component must be a byte copy (a trained folder's untouched
    parts); `unet_reference`: for a trained U-Net, the folder whose config it must have (its
    weights are expected to differ from the base model's)."""
    cls = component_class(library, cls_name)
    report = dict(**{"class": f"{library}.{cls_name}"})
    w_paths = Paths.__new__(Paths)
    w_paths.pairs = [(str(written), "$WRITTEN")] + base_paths.pairs
    s_paths = Paths.__new__(Paths)
    s_paths.pairs = [(str(source), "$FOLDER")] + base_paths.pairs
    w_dir, s_dir = written / name, source / name
    if same_bytes:
        report["files"] = same_files(w_dir, s_dir)
    is_model = hasattr(cls, "state_dict")
    is_scheduler = library == "diffusers" and "Scheduler" in cls_name
    weights_file = None
    if is_model:
        weights_file = next((w_dir / f for f in ("diffusion_pytorch_model.safetensors", "model.safetensors") if (w_dir / f).is_file()), None)
        source_file = next((s_dir / f for f in ("diffusion_pytorch_model.safetensors", "model.safetensors") if (s_dir / f).is_file()), None)
        written_dtypes = file_dtypes(weights_file) if weights_file else []
        report["file_dtypes"] = written_dtypes
        w_dtype = dtype_of(written_dtypes[0]) if len(written_dtypes) == 1 else torch.float32
        s_dtype = dtype_of(file_dtypes(source_file)[0])
    messages, baseline = [], []
    if is_model:
        extra = DIFFUSERS_LOAD if library == "diffusers" else {}
        w_obj = load(lambda: cls.from_pretrained(written, subfolder=name, dtype=w_dtype, **extra), messages, w_paths)
        s_obj = load(lambda: cls.from_pretrained(source, subfolder=name, dtype=s_dtype, **extra), baseline, s_paths)
    else:
        w_obj = load(lambda: cls.from_pretrained(written, subfolder=name), messages, w_paths)
        s_obj = load(lambda: cls.from_pretrained(source, subfolder=name), baseline, s_paths)
    new, inherited = fatal_messages(messages, baseline)
    report["loads"] = w_obj is not None
    report["fatal_messages"] = new
    if inherited:
        report["inherited_messages"] = inherited
    report["other_warnings"] = [m for m in messages if m["class"] == "warning"]
    report["source_fatal_messages"] = [m for m in baseline if m["class"] == "fatal"]
    passed = w_obj is not None and s_obj is not None and not new
    if w_obj is None or s_obj is None:
        report["passed"] = False
        return report

    config_name = "scheduler_config.json" if is_scheduler else "config.json"
    if (w_dir / config_name).is_file():
        reference_dir = unet_reference / "unet" if unet_reference is not None else s_dir
        raw_w, raw_s = read_json(w_dir / config_name), read_json(reference_dir / config_name)
        ignore = IGNORED_KEYS | (DTYPE_KEYS if library == "transformers" else set())
        report["config_json_diff"] = dict_diff(raw_w, raw_s, ignore)
        passed &= not report["config_json_diff"]
        if library == "transformers" and is_model:
            want = TRANSFORMERS_DTYPE[expect_dtype]
            report["config_dtype"] = raw_w.get("dtype", raw_w.get("torch_dtype"))
            passed &= report["config_dtype"] == want

    if is_model:
        if library == "diffusers":
            w_cfg, s_cfg = jsonable(dict(w_obj.config)), jsonable(dict(s_obj.config))
        else:
            w_cfg, s_cfg = w_obj.config.to_dict(), s_obj.config.to_dict()
            w_cfg, s_cfg = jsonable(w_cfg), jsonable(s_cfg)
        if unet_reference is None:
            report["loaded_config_diff"] = dict_diff(w_cfg, s_cfg, IGNORED_KEYS | DTYPE_KEYS)
            passed &= not report["loaded_config_diff"]
        else:
            # A trained U-Net has the config it was trained with (the base's, or --init's):
            # every field diffusers fills in must come from the file, none by default.
            report["defaulted_fields"] = w_cfg.get("_use_default_values", [])
            passed &= not report["defaulted_fields"]
        file_w = load_file(str(weights_file))
        file_s = load_file(str(source_file))
        state_w, state_s = w_obj.state_dict(), s_obj.state_dict()
        if unet_reference is None:
            report["file"] = compare_tensors(file_w, file_s, expect_dtype)
            report["loaded"] = compare_tensors(state_w, state_s, None)
            passed &= report["file"]["equal"] and report["loaded"]["equal"]
        else:
            # Trained weights: the same keys and dtype as the config's U-Net would have, values
            # that moved (the training did something), all finite.
            fresh = UNet2DConditionModel.from_config(read_json(unet_reference / "unet" / "config.json")).state_dict()
            report["file"] = compare_tensors(file_w, {k: v.to(expect_dtype) for k, v in fresh.items()}, expect_dtype, values=False)
            report["file"]["note"] = "the layout of a diffusers U-Net built from the config it was trained with: keys, shapes, dtypes"
            keys_ok = report["file"]["equal"]
            report["finite"] = all(torch.isfinite(v).all().item() for v in state_w.values())
            report["loaded_equals_file"] = all(torch.equal(state_w[k], file_w[k].to(state_w[k].dtype)) for k in file_w if k in state_w) and set(file_w) == set(state_w)
            if set(state_w) == set(state_s) and all(state_w[k].shape == state_s[k].shape for k in state_w):
                report["change_from_base"] = compare_tensors(state_w, state_s, None)
            passed &= keys_ok and report["finite"] and report["loaded_equals_file"]
    elif is_scheduler:
        report["loaded_config_diff"] = dict_diff(jsonable(dict(w_obj.config)), jsonable(dict(s_obj.config)))
        passed &= not report["loaded_config_diff"]
    else:
        a, b = tokenizer_facts(w_obj), tokenizer_facts(s_obj)
        report["tokenizer"] = dict(
            cls=a["cls"],
            vocab_size=len(a["vocab"]),
            same_vocab=a["vocab"] == b["vocab"],
            same_special_tokens=a["special"] == b["special"],
            special_tokens=a["special"],
            same_model_max_length=a["model_max_length"] == b["model_max_length"],
            same_ids=a["ids"] == b["ids"],
            same_class=a["cls"] == b["cls"],
        )
        passed &= all(v for k, v in report["tokenizer"].items() if k.startswith("same_"))
        tok_files = sorted(p.name for p in s_dir.iterdir())
        report["tokenizer"]["files_identical"] = same_files(w_dir, s_dir)["identical"]
        report["tokenizer"]["source_files"] = tok_files
    if same_bytes:
        passed &= report["files"]["identical"]
    report["passed"] = bool(passed)
    return report


def pipeline_class(folder: pathlib.Path) -> str:
    return read_json(folder / "model_index.json")["_class_name"]


def generate(pipe, inpaint_inputs=None) -> tuple[np.ndarray, torch.Tensor | None, torch.Tensor | None]:
    """The pipeline on GENERATION: explicit latents (inpainting: drawn from the generator, as
    its pipeline also encodes the image); returns the image and the initial and final latents."""
    g = GENERATION
    pipe.set_progress_bar_config(disable=True)
    factor = pipe.vae_scale_factor
    shape = (1, pipe.vae.config.latent_channels, g["height"] // factor, g["width"] // factor)
    kwargs = dict(
        prompt=g["prompt"],
        negative_prompt=g["negative_prompt"],
        num_inference_steps=g["steps"],
        guidance_scale=g["guidance_scale"],
        height=g["height"],
        width=g["width"],
    )
    latents = None
    if inpaint_inputs is not None:
        kwargs.update(inpaint_inputs)
    else:
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(g["latent_seed"]), dtype=torch.float32)
        kwargs["latents"] = latents
    image = pipe(**kwargs, output_type="np", generator=torch.Generator().manual_seed(g["generator_seed"])).images
    final = None
    if latents is not None:
        final = pipe(**kwargs, output_type="latent", generator=torch.Generator().manual_seed(g["generator_seed"])).images
    return image, latents, final


def inpaint_inputs() -> dict:
    case = PIPELINE / "tiny_sd1_inpaint"
    return dict(image=Image.open(case / "init.png").convert("RGB"), mask_image=Image.open(case / "mask.png").convert("L"))


def own_memory(pipe) -> None:
    """Copies every weight of the pipeline's models into memory of its own. transformers maps an
    f32 file's tensors without copying them, at the file's offsets (safetensors aligns its data
    to 8 bytes only), and the CPU kernels take other paths on such data: the same values then
    give other roundings (an f32 copy of tiny_sdxl's text_encoder_2, every weight equal, gave a
    pooled embedding 2.4e-7 and an image 3.5e-6 from its f16 source's, which the cast puts into
    fresh memory). With both pipelines' weights copied, equal weights must give equal images."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            with torch.no_grad():
                for param in component.parameters():
                    param.data = param.data.clone()
                for module in component.modules():
                    for name, buffer in module._buffers.items():
                        if buffer is not None:
                            module._buffers[name] = buffer.clone()


def check_pipeline(written: pathlib.Path, source: pathlib.Path, paths: Paths, same_image: bool) -> dict:
    """The whole folder through the pipeline class its model_index.json names: it loads without
    a fatal message, its model_index.json and pipeline config match the source's, and it gives
    the source's image (exactly, when `same_image`)."""
    cls_name = pipeline_class(written)
    cls = getattr(diffusers, cls_name)
    w_paths = Paths.__new__(Paths)
    w_paths.pairs = [(str(written), "$WRITTEN")] + paths.pairs
    s_paths = Paths.__new__(Paths)
    s_paths.pairs = [(str(source), "$FOLDER")] + paths.pairs
    messages, baseline = [], []
    w_pipe = load(lambda: cls.from_pretrained(written, dtype=torch.float32, **DIFFUSERS_LOAD), messages, w_paths)
    s_pipe = load(lambda: getattr(diffusers, pipeline_class(source)).from_pretrained(source, dtype=torch.float32, **DIFFUSERS_LOAD), baseline, s_paths)
    new, inherited = fatal_messages(messages, baseline)
    report = dict(
        **{"class": cls_name},
        source_class=pipeline_class(source),
        loads=w_pipe is not None,
        fatal_messages=new,
        other_warnings=[m for m in messages if m["class"] == "warning"],
        source_fatal_messages=[m for m in baseline if m["class"] == "fatal"],
    )
    if inherited:
        report["inherited_messages"] = inherited
    report["model_index_diff"] = dict_diff(read_json(written / "model_index.json"), read_json(source / "model_index.json"))
    passed = w_pipe is not None and not new and not report["model_index_diff"] and cls_name == report["source_class"]
    if w_pipe is not None and s_pipe is not None:
        report["config_diff"] = dict_diff(jsonable(dict(w_pipe.config)), jsonable(dict(s_pipe.config)))
        passed &= not report["config_diff"]
        extra = inpaint_inputs() if "Inpaint" in cls_name else None
        own_memory(w_pipe)
        own_memory(s_pipe)
        img_w, _, _ = generate(w_pipe, extra)
        img_s, _, _ = generate(s_pipe, extra)
        report["image_finite"] = bool(np.isfinite(img_w).all())
        report["image_max_abs_diff"] = float(np.abs(img_w - img_s).max())
        report["image_expected_equal"] = same_image
        passed &= report["image_finite"] and (not same_image or report["image_max_abs_diff"] == 0.0)
    report["passed"] = bool(passed)
    return report


def check_folder(name: str, written: pathlib.Path, source: pathlib.Path, expect_dtype, paths: Paths, *, lossy: bool = False, trained_from: pathlib.Path | None = None, command=None) -> dict:
    """Every check of one written folder. `trained_from`: for a trained folder, the folder whose
    U-Net config it was trained with (the base model, or the --init folder)."""
    index = read_json(written / "model_index.json")
    components = {}
    for comp, pair in sorted(index.items()):
        if comp.startswith("_") or not isinstance(pair, list) or len(pair) != 2 or pair[0] is None:
            continue
        library, cls_name = pair
        trained = trained_from is not None and comp == "unet"
        components[comp] = check_component(
            comp,
            library,
            cls_name,
            written,
            source,
            torch.float32 if trained else expect_dtype,
            paths,
            same_bytes=trained_from is not None and not trained,
            unet_reference=trained_from if trained else None,
        )
    pipe = check_pipeline(written, source, paths, same_image=not lossy and trained_from is None)
    extras = sorted(p.name for p in written.iterdir() if p.name not in index and p.name != "model_index.json")
    report = dict(
        written_by=command,
        source=paths(str(source)),
        dtype=str(expect_dtype).removeprefix("torch."),
        pipeline=pipe,
        components=components,
        other_entries=extras,
    )
    report["passed"] = pipe["passed"] and all(c["passed"] for c in components.values())
    status = "ok  " if report["passed"] else "FAIL"
    parts = [f"{k}={'ok' if v['passed'] else 'FAIL'}" for k, v in components.items()]
    parts.append(f"pipeline={'ok' if pipe['passed'] else 'FAIL'}")
    print(f"  {status} {name}: {', '.join(parts)}")
    return report


# ---------------------------------------------------------------------------------------------
# The data and the runs.


def write_training_images(folder: pathlib.Path) -> None:
    """Three small non-square PNGs (smooth colour fields with a little noise, so that the crop
    and resize matter) with caption files."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1234)
    h, w = 40, 48
    y, x = np.mgrid[0:h, 0:w]
    for i, caption in enumerate(CAPTIONS):
        base = np.stack([(x * (i + 1) * 5) % 256, (y * 6 + 40 * i) % 256, ((x + y) * 3) % 256], axis=-1)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"image_{i}.png")
        (folder / f"image_{i}.txt").write_text(caption + "\n")


def write_init_config(folder: pathlib.Path) -> pathlib.Path:
    """The --init folder: tiny_sd1's U-Net config with INIT_OVERRIDES, written by diffusers."""
    config = UNet2DConditionModel.load_config(PIPELINE / "tiny_sd1/model", subfolder="unet")
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config.update(INIT_OVERRIDES)
    UNet2DConditionModel.from_config(config).save_config(folder / "unet")
    return folder


def versions(binary: pathlib.Path) -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    sd_version = subprocess.run([str(binary), "--version"], capture_output=True, text=True).stdout.strip()
    return dict(
        diffusers=diffusers.__version__,
        transformers=transformers.__version__,
        peft=peft.__version__,
        torch=torch.__version__,
        safetensors=safetensors.__version__,
        numpy=np.__version__,
        python=platform.python_version(),
        sd=sd_version,
        sd_built_from=git("describe", "--always", "--dirty"),
    )


def write_roundtrip_cases(out: pathlib.Path) -> None:
    case = out / "roundtrip"
    binary = sd_binary()
    for lib in (diffusers, transformers):
        lib.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="sd-roundtrip-") as tmp_name:
        tmp = pathlib.Path(tmp_name)
        paths = Paths(tmp)
        folders = {}

        # 1a. sd convert.
        converts = []
        for single in sorted(PIPELINE.glob("*/*.safetensors")):
            model = single.parent / "model"
            if single.stem == single.parent.name and (model / "model_index.json").is_file():
                converts.append((f"convert_single_{single.stem}", single, model, ["--config", model], None))
        for model in sorted(PIPELINE.glob("*/model")):
            if (model / "model_index.json").is_file():
                converts.append((f"convert_folder_{model.parent.name}", model, model, [], None))
        converts.append(("convert_folder_tiny_sd1_f32", PIPELINE / "tiny_sd1/model", PIPELINE / "tiny_sd1/model", [], "f32"))
        converts.append(("convert_folder_tiny_sdxl_f32", PIPELINE / "tiny_sdxl/model", PIPELINE / "tiny_sdxl/model", [], "f32"))
        converts.append(("convert_folder_tiny_sd1_bf16", PIPELINE / "tiny_sd1/model", PIPELINE / "tiny_sd1/model", [], "bf16"))
        for name, given, source, extra, dtype in converts:
            dest = tmp / name
            args = ["convert", given, dest, *extra] + (["--dtype", dtype] if dtype else [])
            command = run_sd(binary, args, paths)
            with safe_open(str(source / "unet/diffusion_pytorch_model.safetensors"), framework="pt") as f:
                source_dtype = dtype_of(f.get_slice(next(iter(f.keys()))).get_dtype())
            expect = DTYPE_ARG[dtype] if dtype else source_dtype
            folders[name] = check_folder(name, dest, source, expect, paths, lossy=dtype == "bf16", command=command)

        # The checks must see damage: a copy of one written folder with an extra and a missing
        # U-Net weight, a missing text encoder weight and a VAE config field left out.
        control = negative_control(tmp / "convert_folder_tiny_sd1", tmp / "control", PIPELINE / "tiny_sd1/model", paths)

        # 1b. sd train unet: a fine-tune of tiny_sd1, and a narrower U-Net from scratch.
        data = tmp / "data"
        write_training_images(data)
        init = write_init_config(tmp / "init")
        base = PIPELINE / "tiny_sd1/model"
        train_args = ["--data", data, "--model", base, "--max-steps", TRAIN_STEPS, "--resolution", 32, "--batch-size", 1, "--seed", TRAIN_SEED, "-q"]
        for name, extra, reference in [("train_tiny_sd1", [], base), ("train_tiny_sd1_init", ["--init", init], init)]:
            dest = tmp / name
            command = run_sd(binary, ["train", "unet", *train_args, "--output", dest, *extra], paths)
            folders[name] = check_folder(name, dest, base, torch.float16, paths, trained_from=reference, command=command)
            # The final checkpoint is a diffusers folder too, with the same U-Net.
            ckpt = dest / f"checkpoint-{TRAIN_STEPS}"
            report = check_folder(f"{name}/{ckpt.name}", ckpt, base, torch.float16, paths, trained_from=reference, command=command)
            same_unet = same_files(ckpt / "unet", dest / "unet")
            report["unet_same_as_final"] = same_unet
            report["passed"] &= same_unet["identical"]
            folders[f"{name}/{ckpt.name}"] = report

        # 3. The committed part: the from-scratch U-Net and diffusers' image with it.
        trained = tmp / "train_tiny_sd1_init"
        if case.exists():
            shutil.rmtree(case)
        (case / "unet").mkdir(parents=True)
        for f in ("config.json", "diffusion_pytorch_model.safetensors"):
            shutil.copyfile(trained / "unet" / f, case / "unet" / f)
        unet_bytes = sum(p.stat().st_size for p in (case / "unet").iterdir())
        # The folder the Rust test assembles: tiny_sd1's model with the committed U-Net.
        assembled = tmp / "assembled"
        shutil.copytree(base, assembled, ignore=lambda d, names: ["unet"] if pathlib.Path(d) == base else [])
        shutil.copytree(case / "unet", assembled / "unet")
        assembled_same = all(
            same_files(assembled / d, trained / d)["identical"] for d in [*(p.name for p in base.iterdir() if p.is_dir()), "unet"]
        ) and (assembled / "model_index.json").read_bytes() == (trained / "model_index.json").read_bytes()
        if not assembled_same:
            raise SystemExit(f"{assembled}: tiny_sd1's model with the committed unet/ is not the train output")
        messages = []
        pipe = load(lambda: diffusers.StableDiffusionPipeline.from_pretrained(assembled, dtype=torch.float32, **DIFFUSERS_LOAD), messages, paths)
        if pipe is None:
            raise SystemExit(f"the assembled folder does not load: {messages}")
        image, latents, final = generate(pipe)
        pipe64 = load(lambda: diffusers.StableDiffusionPipeline.from_pretrained(assembled, dtype=torch.float64, **DIFFUSERS_LOAD), [], paths)
        image64, _, final64 = generate_f64(pipe64, latents)
        image_nchw = torch.from_numpy(image).permute(0, 3, 1, 2).contiguous().float()
        tensors = {"latents_in": latents.contiguous(), "latents_out": final.float().contiguous(), "image": image_nchw}
        save_file(tensors, case / "reference.safetensors", metadata={"prompt": GENERATION["prompt"], "negative_prompt": GENERATION["negative_prompt"]})

        # 4. LoRA files that sd train unet writes, in diffusers' load_lora_weights.
        lora = write_trained_lora_cases(binary, train_args, tmp, case / "lora", paths)

        all_passed = all(f["passed"] for f in folders.values())
        manifest = dict(
            kind="roundtrip",
            reference=f"diffusers {diffusers.__version__} / transformers {transformers.__version__} from_pretrained on folders written by `sd convert` and `sd train unet`",
            versions=versions(binary),
            fatal_patterns=list(FATAL),
            benign_patterns=list(BENIGN),
            ignored_config_keys=sorted(IGNORED_KEYS),
            all_passed=all_passed,
            folders=folders,
            negative_control=control,
            lora=lora,
            train=dict(
                data=[dict(image=f"image_{i}.png", size=[48, 40], caption=c) for i, c in enumerate(CAPTIONS)],
                steps=TRAIN_STEPS,
                seed=TRAIN_SEED,
                resolution=32,
                batch_size=1,
                init_overrides=INIT_OVERRIDES,
            ),
            generation=dict(
                **GENERATION,
                model="tests/fixtures/pipeline/tiny_sd1/model with unet/ replaced by roundtrip/unet",
                pipeline="StableDiffusionPipeline",
                scheduler=pipe.scheduler.__class__.__name__,
                scheduler_config=jsonable(dict(pipe.scheduler.config)),
                unet="unet (sd train unet --init: tiny_sd1's U-Net config with block_out_channels [16, 32], f32)",
                unet_bytes=unet_bytes,
                assembled_equals_train_output=assembled_same,
                load_messages=[m for m in messages if m["class"] != "info"],
                tolerance=1e-4,
                image_min=float(image.min()),
                image_max=float(image.max()),
                image_std=float(image.std()),
                f64_deviation=dict(
                    image=float(np.abs(image64 - image).max()),
                    latents_out=float((final64 - final.double()).abs().max()),
                ),
            ),
        )
        (case / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    total = sum(p.stat().st_size for p in case.rglob("*") if p.is_file())
    print(f"wrote {case} ({total / 1e6:.2f} MB; {sum(f['passed'] for f in folders.values())}/{len(folders)} folders pass every check)")
    if total > 2_000_000:
        raise SystemExit(f"{case}: {total} bytes, over the 2 MB budget")
    if not all_passed:
        failed = [name for name, f in folders.items() if not f["passed"]]
        print(f"roundtrip: FAILED checks in {failed}; see {case / 'manifest.json'}")
    if not lora["all_passed"]:
        failed = [name for name, c in lora["cases"].items() if not c["passed"]]
        print(f"roundtrip: LoRA files diffusers does not load as written: {failed}; see lora in {case / 'manifest.json'}")


def negative_control(written: pathlib.Path, control: pathlib.Path, source: pathlib.Path, paths: Paths) -> dict:
    shutil.copytree(written, control)
    unet = control / "unet/diffusion_pytorch_model.safetensors"
    state = load_file(str(unet))
    dropped = sorted(state)[-1]
    state["extra.weight"] = state.pop(dropped)
    save_file(state, str(unet), metadata={"format": "pt"})
    text = control / "text_encoder/model.safetensors"
    state = load_file(str(text))
    text_dropped = "final_layer_norm.weight"
    del state[text_dropped]
    save_file(state, str(text), metadata={"format": "pt"})
    vae_config = read_json(control / "vae/config.json")
    del vae_config["force_upcast"]
    (control / "vae/config.json").write_text(json.dumps(vae_config, indent=2, sort_keys=True) + "\n")
    report = check_folder("negative_control (damaged on purpose: must FAIL)", control, source, torch.float16, paths)
    failed = sorted(k for k, v in report["components"].items() if not v["passed"])
    caught = dict(
        damage=dict(unet=f"{dropped} renamed extra.weight", text_encoder=f"{text_dropped} removed", vae="force_upcast removed from config.json"),
        failed_components=failed,
        pipeline_failed=not report["pipeline"]["passed"],
        messages={k: [m["text"] for m in v["fatal_messages"]] for k, v in report["components"].items() if v["fatal_messages"]},
    )
    if failed != ["text_encoder", "unet", "vae"] or not caught["pipeline_failed"]:
        raise SystemExit(f"the checks missed damage: {caught}")
    print("  ok   negative_control: the damaged copy fails in " + ", ".join(failed) + " and the pipeline")
    return caught


# ---------------------------------------------------------------------------------------------
# LoRA files our binary trains, in diffusers' `load_lora_weights`.

LORA_COMPONENTS = ("unet", "text_encoder")


def lora_module_names(pipe) -> dict:
    """Every module of the pipeline's U-Net and text encoder under each name the two layouts give
    it: kohya's stems (`lora_unet_` + the path with `_` for `.`; `lora_te_` + `text_model_` + the
    path) and diffusers' (`unet.` / `text_encoder.` + the path), to (component, path, module).
    Our own map from the files' names to the model, independent of diffusers' converter."""
    names = {}
    for component in LORA_COMPONENTS:
        for path, module in getattr(pipe, component).named_modules():
            if not path:
                continue
            entry = (component, path, module)
            names[f"{component}.{path}"] = entry
            flat = path.replace(".", "_")
            if component == "unet":
                names[f"lora_unet_{flat}"] = entry
            else:
                names[f"lora_te_{flat if flat.startswith('text_model_') else 'text_model_' + flat}"] = entry
    return names


LORA_SUFFIXES = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".alpha", "alpha"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
)


def lora_layers(path: pathlib.Path, names: dict) -> dict:
    """The file's layers, {(component, module path): {down, up, alpha, rank, keys}}, with the keys
    that name no module or no known part, the layers missing a factor, and the file's facts."""
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        dtypes = sorted({f.get_slice(k).get_dtype() for k in f.keys()})
    adapter = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    layers, unmapped = {}, []
    for key in sorted(tensors):
        part = next(((key[: -len(suffix)], name) for suffix, name in LORA_SUFFIXES if key.endswith(suffix)), None)
        if part is None or part[0] not in names:
            unmapped.append(key)
            continue
        component, module_path, _ = names[part[0]]
        layer = layers.setdefault((component, module_path), dict(keys=[]))
        layer[part[1]] = tensors[key]
        layer["keys"].append(key)
    incomplete = sorted(f"{c}.{m}" for (c, m), layer in layers.items() if "down" not in layer or "up" not in layer)
    for (component, _), layer in layers.items():
        if "down" not in layer:
            continue
        layer["rank"] = layer["down"].shape[0]
        if "alpha" in layer:
            layer["alpha"] = float(layer["alpha"])
        else:
            # diffusers' layout: one alpha per model in the adapter metadata (the rank without it).
            layer["alpha"] = float(adapter.get(f"{component}.lora_alpha", layer["rank"]))
    complete = {k: v for k, v in layers.items() if "down" in v and "up" in v}
    ups = [layer["up"].abs().max().item() for layer in complete.values()]
    facts = dict(
        keys=len(tensors),
        dtypes=dtypes,
        metadata_keys=sorted(metadata),
        layers={c: sum(1 for (comp, _) in complete if comp == c) for c in LORA_COMPONENTS},
        ranks=sorted({layer["rank"] for layer in complete.values()}),
        alphas=sorted({layer["alpha"] for layer in complete.values()}),
        unmapped_keys=unmapped,
        incomplete_layers=incomplete,
        zero_up_layers=sum(1 for u in ups if u == 0.0),
        smallest_up_abs_max=min(ups) if ups else None,
        largest_up_abs_max=max(ups) if ups else None,
    )
    facts["passed"] = bool(complete) and not unmapped and not incomplete and facts["zero_up_layers"] == 0
    return dict(layers=complete, facts=facts)


def lora_paths(folder: pathlib.Path, paths: Paths) -> Paths:
    p = Paths.__new__(Paths)
    p.pairs = [(str(folder), "$LORA")] + paths.pairs
    return p


def check_lora(folder: pathlib.Path, weight_name: str, base: pathlib.Path, base_run: tuple, paths: Paths) -> tuple[dict, dict | None]:
    """One LoRA file through tiny_sd1's pipeline in diffusers: `load_lora_weights` (every message
    kept), the LoRA layers it made against the file's pairs (count, values, scale), and the
    images unfused, fused and without it. Returns the report and the run's tensors (None when it
    did not load)."""
    lpaths = lora_paths(folder, paths)
    pipe = load(lambda: diffusers.StableDiffusionPipeline.from_pretrained(base, dtype=torch.float32, **DIFFUSERS_LOAD), [], paths)
    if pipe is None:
        raise SystemExit(f"{base} does not load")
    names = lora_module_names(pipe)
    read = lora_layers(folder / weight_name, names)
    layers = read["layers"]
    messages = []
    load(lambda: pipe.load_lora_weights(folder, weight_name=weight_name), messages, lpaths)
    fatal = [m for m in messages if m["class"] == "fatal"]
    loads = not any(m["source"] == "exception" for m in messages)
    adapters = {c: list(v) for c, v in pipe.get_list_adapters().items()} if loads else {}

    # The PEFT LoRA layers that hold an adapter of this load, per component.
    def holds(module, component):
        return isinstance(module, BaseTunerLayer) and any(a in getattr(module, "lora_A", {}) for a in adapters.get(component, []))

    lora_modules = {c: {n: m for n, m in getattr(pipe, c).named_modules() if holds(m, c)} for c in LORA_COMPONENTS}
    missing, shapes, worst_value, worst_scale = [], [], 0.0, 0.0
    for (component, module_path), layer in sorted(layers.items()):
        module = lora_modules[component].get(module_path)
        names_here = adapters.get(component, [])
        if module is None or len(names_here) != 1:
            missing.append(f"{component}.{module_path}")
            continue
        adapter = names_here[0]
        for part, param in (("down", module.lora_A[adapter].weight), ("up", module.lora_B[adapter].weight)):
            if tuple(param.shape) != tuple(layer[part].shape):
                shapes.append(dict(module=f"{component}.{module_path}", factor=part, file=list(layer[part].shape), loaded=list(param.shape)))
                continue
            worst_value = max(worst_value, (param.detach().float() - layer[part].float()).abs().max().item())
        worst_scale = max(worst_scale, abs(float(module.scaling[adapter]) - layer["alpha"] / layer["rank"]))
    extra = sorted(f"{c}.{n}" for c, mods in lora_modules.items() for n in mods if (c, n) not in layers)
    report = dict(
        file=read["facts"],
        loads=loads,
        messages=messages,
        fatal_messages=fatal,
        adapters=adapters,
        file_pairs={c: sum(1 for (comp, _) in layers if comp == c) for c in LORA_COMPONENTS},
        loaded_lora_modules={c: len(m) for c, m in lora_modules.items()},
        missing_modules=len(missing),
        first_missing_modules=missing[:5],
        extra_modules=extra,
        shape_mismatch=shapes[:10],
        shape_mismatches=len(shapes),
        factors_max_abs_diff=worst_value,
        scale_max_abs_diff=worst_scale,
        scales=sorted({layer["alpha"] / layer["rank"] for layer in layers.values()}),
    )
    passed = read["facts"]["passed"] and loads and not fatal and not missing and not extra and not shapes
    passed &= worst_value == 0.0 and worst_scale == 0.0 and all(report["file_pairs"].values())
    run = None
    if loads:
        base_image, latents, base_final = base_run
        image, latents_in, final = generate(pipe)
        fuse_messages = []
        load(lambda: pipe.fuse_lora(), fuse_messages, lpaths)
        image_fused, _, final_fused = generate(pipe)
        scale = max(1.0, final.abs().max().item())
        images = dict(
            finite=bool(np.isfinite(image).all() and np.isfinite(image_fused).all()),
            same_latents_in=bool(torch.equal(latents_in, latents)),
            fuse_messages=fuse_messages,
            fused_vs_unfused=dict(image=float(np.abs(image_fused - image).max()), latents_out=(final_fused - final).abs().max().item()),
            lora_effect=dict(image=float(np.abs(image - base_image).max()), latents_out=(final - base_final).abs().max().item()),
            latents_scale=scale,
            image_min=float(image.min()),
            image_max=float(image.max()),
        )
        images["fused_equals_unfused"] = images["fused_vs_unfused"]["image"] <= LORA_TOLERANCE and images["fused_vs_unfused"]["latents_out"] <= LORA_TOLERANCE * scale
        images["lora_matters"] = images["lora_effect"]["image"] >= LORA_MIN_EFFECT * LORA_TOLERANCE and images["lora_effect"]["latents_out"] >= LORA_MIN_EFFECT * LORA_TOLERANCE * scale
        report["images"] = images
        passed &= images["finite"] and images["same_latents_in"] and images["fused_equals_unfused"] and images["lora_matters"]
        passed &= not any(m["class"] == "fatal" for m in fuse_messages)
        nchw = lambda img: torch.from_numpy(img).permute(0, 3, 1, 2).contiguous().float()  # noqa: E731
        run = {
            "latents_in": latents_in.contiguous(),
            "latents_out": final.float().contiguous(),
            "image": nchw(image),
            "fused.latents_out": final_fused.float().contiguous(),
            "fused.image": nchw(image_fused),
            "base.latents_out": base_final.float().contiguous(),
            "base.image": nchw(base_image),
        }
    report["passed"] = bool(passed)
    return report, run


def repair_conv_factors(source: pathlib.Path, dest: pathlib.Path, names: dict) -> list:
    """A copy of a LoRA file whose factors for 1×1 convolutions of the diffusers model (SD 1.x's
    `proj_in` / `proj_out`, `use_linear_projection: false`) get the kernel's axes when they lack
    them, `[r, in]` → `[r, in, 1, 1]` and `[out, r]` → `[out, r, 1, 1]`, as kohya's sd-scripts
    (`LoRAModule`'s `Conv2d` factors) and PEFT (`lora.Conv2d`) shape them; keys, values and
    metadata unchanged. Returns the reshaped keys (none: no copy written)."""
    tensors = load_file(str(source))
    with safe_open(str(source), framework="pt") as f:
        metadata = f.metadata() or {}
    reshaped = []
    for key, value in tensors.items():
        part = next((key[: -len(suffix)] for suffix, name in LORA_SUFFIXES if key.endswith(suffix) and name in ("down", "up")), None)
        module = names[part][2] if part in names else None
        if isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) == (1, 1) and value.ndim == 2:
            tensors[key] = value[:, :, None, None].contiguous()
            reshaped.append(key)
    if reshaped:
        dest.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(dest), metadata=metadata)
    return sorted(reshaped)


def lora_negative_controls(source: pathlib.Path, weight_name: str, tmp: pathlib.Path, base: pathlib.Path, base_run: tuple, paths: Paths) -> list:
    """Copies of a kohya file that passes every check, damaged: one key renamed (a `lora_up`
    whose `lora_down` then has no partner) and one layer's three keys renamed onto a module the
    attention does not have (`to_q` → `to_z`). Each must fail with diffusers' message kept."""
    tensors = load_file(str(source / weight_name))
    with safe_open(str(source / weight_name), framework="pt") as f:
        metadata = f.metadata() or {}
    stem = next(k.removesuffix(".alpha") for k in sorted(tensors) if k.startswith("lora_unet_") and k.endswith("_attn1_to_q.alpha"))
    renamed_stem = stem.removesuffix("_to_q") + "_to_z"
    damages = {
        "one_key_renamed": {f"{stem}.lora_up.weight": f"{stem}_x.lora_up.weight"},
        "one_layer_renamed": {f"{stem}.{s}": f"{renamed_stem}.{s}" for s in ("lora_down.weight", "lora_up.weight", "alpha")},
    }
    controls = []
    for name, renames in damages.items():
        folder = tmp / f"lora_control_{name}"
        folder.mkdir(parents=True)
        save_file({renames.get(k, k): v for k, v in tensors.items()}, str(folder / weight_name), metadata=metadata)
        report, _ = check_lora(folder, weight_name, base, base_run, paths)
        control = dict(
            name=name,
            source=paths(str(source / weight_name)),
            damage=[dict(key=a, renamed=b) for a, b in renames.items()],
            failed=not report["passed"],
            loads=report["loads"],
            fatal_messages=[m["text"] for m in report["fatal_messages"]],
            file_pairs=report["file_pairs"],
            loaded_lora_modules=report["loaded_lora_modules"],
            missing_modules=report["missing_modules"],
            first_missing_modules=report["first_missing_modules"],
            unmapped_keys=report["file"]["unmapped_keys"],
        )
        if not control["failed"] or not control["fatal_messages"]:
            raise SystemExit(f"the LoRA checks missed damage: {control}")
        print(f"  ok   lora negative control {name}: fails ({control['fatal_messages'][0].splitlines()[0][:100]})")
        controls.append(control)
    return controls


def write_trained_lora_cases(binary: pathlib.Path, train_args: list, tmp: pathlib.Path, out: pathlib.Path, paths: Paths) -> dict:
    """Trains a LoRA in each of our formats, checks each in diffusers and commits the files with
    diffusers' references under `out`; returns the manifest's `lora` section."""
    base = PIPELINE / "tiny_sd1/model"
    base_pipe = load(lambda: diffusers.StableDiffusionPipeline.from_pretrained(base, dtype=torch.float32, **DIFFUSERS_LOAD), [], paths)
    base_run = generate(base_pipe)
    names = lora_module_names(base_pipe)
    cases, passing = {}, {}
    for fmt, spec in LORA_FORMATS.items():
        dest = tmp / f"lora_{fmt}"
        lora_args = ["--lora-rank", LORA_RANK, "--lora-alpha", spec["alpha"], "--lora-format", fmt, "--train-text-encoder", "--learning-rate", LORA_LEARNING_RATE]
        command = run_sd(binary, ["train", "unet", *train_args, "--output", dest, *lora_args], paths)
        written = dest / spec["file"]
        if not written.is_file():
            raise SystemExit(f"{written}: sd train unet wrote no LoRA file")
        report, run = check_lora(dest, spec["file"], base, base_run, paths)
        entry = dict(written_by=command, file=spec["file"], alpha=spec["alpha"], rank=LORA_RANK, check=report, passed=report["passed"])
        reference_from = "as written" if report["passed"] else None
        passing_folder = dest if report["passed"] else None
        if not report["passed"]:
            # Not a pass: find out which change makes diffusers load it, and keep the verdict.
            repaired = tmp / f"lora_{fmt}_repaired"
            reshaped = repair_conv_factors(written, repaired / spec["file"], names)
            if reshaped:
                repaired_report, repaired_run = check_lora(repaired, spec["file"], base, base_run, paths)
                entry["diagnosis"] = dict(
                    finding=(
                        "our file gives the factors of 1×1 convolutions (SD 1.x's proj_in/proj_out, use_linear_projection false) "
                        "as [r, in] and [out, r]; diffusers' PEFT Conv2d LoRA layers (and kohya's sd-scripts LoRAModule) hold "
                        "[r, in, 1, 1] and [out, r, 1, 1], and load_state_dict refuses the size mismatch"
                    ),
                    repair="only those factors reshaped to [r, in, 1, 1] / [out, r, 1, 1]: same keys, values and metadata",
                    reshaped_keys=len(reshaped),
                    first_reshaped_keys=reshaped[:4],
                    repaired_check=repaired_report,
                    repaired_passes=repaired_report["passed"],
                )
                if repaired_report["passed"]:
                    run, reference_from, passing_folder = repaired_run, "the repaired copy (see diagnosis): the same numbers as the file", repaired
            else:
                entry["diagnosis"] = dict(finding="no 1×1-convolution factor lacks its kernel axes; see the messages", reshaped_keys=0)
        if run is None or reference_from is None:
            raise SystemExit(f"lora {fmt}: neither the file nor a repaired copy passes in diffusers: {report['fatal_messages']}")
        entry["reference_from"] = reference_from
        passing[fmt] = passing_folder
        folder = out / fmt
        folder.mkdir(parents=True)
        shutil.copyfile(written, folder / spec["file"])
        save_file(run, folder / "reference.safetensors", metadata={"prompt": GENERATION["prompt"], "negative_prompt": GENERATION["negative_prompt"]})
        entry["committed"] = dict(file=f"lora/{fmt}/{spec['file']}", reference=f"lora/{fmt}/reference.safetensors", bytes=(folder / spec["file"]).stat().st_size)
        status = "ok  " if entry["passed"] else "FAIL"
        first = report["fatal_messages"][0]["text"].splitlines()[0][:120] if report["fatal_messages"] else ""
        print(f"  {status} lora_{fmt}: {report['loaded_lora_modules']} LoRA modules of {report['file_pairs']}{'; ' + first if first else ''}")
        if "diagnosis" in entry:
            print(f"       diagnosis: {entry['diagnosis'].get('reshaped_keys')} factors reshaped → {'passes' if entry['diagnosis'].get('repaired_passes') else 'still fails'}")
        cases[fmt] = entry
    controls = lora_negative_controls(passing["kohya"], LORA_FORMATS["kohya"]["file"], tmp, base, base_run, paths)
    return dict(
        reference=f"diffusers {diffusers.__version__} StableDiffusionPipeline.load_lora_weights (PEFT {peft.__version__}), then fuse_lora()",
        base_model="tests/fixtures/pipeline/tiny_sd1/model",
        train=dict(steps=TRAIN_STEPS, seed=TRAIN_SEED, resolution=32, batch_size=1, rank=LORA_RANK, learning_rate=LORA_LEARNING_RATE, train_text_encoder=True),
        generation=dict(
            **GENERATION,
            model="tests/fixtures/pipeline/tiny_sd1/model with the LoRA at weight 1",
            pipeline="StableDiffusionPipeline",
            scheduler=base_pipe.scheduler.__class__.__name__,
            tolerance=LORA_TOLERANCE,
            min_effect=LORA_MIN_EFFECT,
        ),
        all_passed=all(c["passed"] for c in cases.values()),
        cases=cases,
        negative_controls=controls,
    )


def generate_f64(pipe, latents: torch.Tensor):
    """The same run in f64 (how far f32 rounding alone moves the result)."""
    g = GENERATION
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(
        prompt=g["prompt"],
        negative_prompt=g["negative_prompt"],
        num_inference_steps=g["steps"],
        guidance_scale=g["guidance_scale"],
        height=g["height"],
        width=g["width"],
        latents=latents.double(),
    )
    image = pipe(**kwargs, output_type="np").images
    final = pipe(**kwargs, output_type="latent").images
    return image.astype(np.float32), None, final
