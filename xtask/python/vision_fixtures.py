"""Reference data for the CLIP vision tower: tiny random CLIPVisionModelWithProjection models
(OpenAI-style quick_gelu and OpenCLIP-style gelu), written as tests/fixtures/clip_vision/<case>/."""

import json
import pathlib
import shutil
import zlib

import torch
import transformers
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

CASES = {
    "vision_quick_gelu": dict(hidden_act="quick_gelu", image_size=32, patch_size=8),
    "vision_gelu_odd_patches": dict(hidden_act="gelu", image_size=30, patch_size=6),
}


def write_vision_cases(root: pathlib.Path, randomise_norms) -> None:
    for name, spec in sorted(CASES.items()):
        seed = zlib.crc32(name.encode()) % 100_000
        case = root / "clip_vision" / name
        if case.exists():
            shutil.rmtree(case)
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        config = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            projection_dim=24,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_channels=3,
            image_size=spec["image_size"],
            patch_size=spec["patch_size"],
            hidden_act=spec["hidden_act"],
        )
        model = CLIPVisionModelWithProjection(config)
        randomise_norms(model, generator)
        with torch.no_grad():
            # The class embedding starts as N(0, 1) already; the position table as well.
            pass
        model = model.half()
        model.save_pretrained(case / "image_encoder", safe_serialization=True)
        model = model.float().eval()
        size = spec["image_size"]
        pixels = torch.randn(2, 3, size, size, generator=generator)
        with torch.no_grad():
            out = model(pixel_values=pixels, output_hidden_states=True)
        tensors = {
            "pixel_values": pixels,
            "last_hidden_state": out.last_hidden_state,
            "image_embeds": out.image_embeds,
        }
        for i, h in enumerate(out.hidden_states):
            tensors[f"hidden_state_{i}"] = h
        save_file({k: v.float().clone().contiguous() for k, v in tensors.items()}, case / "reference.safetensors")
        manifest = {
            "kind": "clip_vision",
            "reference": f"transformers {transformers.__version__} {type(model).__name__}",
            "hidden_states": len(out.hidden_states),
            "tolerance": 1e-4,
        }
        (case / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        print(f"wrote {case}")
