"""CLIP score references: torchmetrics' `CLIPScore` formula (100 · cos(image, text) clipped at
0, averaged) on a random transformers `CLIPModel`, with `CLIPImageProcessorPil`'s preprocessing
(shortest side 224 by PIL's 8-bit bicubic, centre crop 224, CLIP's mean and std) and the
tokenizer truncating at 77 tokens with the end token kept. torchmetrics 1.9's class breaks with
transformers 5, so its formula is computed here on the model's own `get_image_features` /
`get_text_features`.

Called by make_fixtures.py (`--only clip_score`), after the metrics fixtures (whose PNG and
JPEG images it scores) and the pipeline fixtures (whose 1000-token tokenizer it reuses).
tests/fixtures/clip_score/ holds `model/` (the CLIPModel folder, f16, with its tokenizer),
`captions.json` (one caption per image, by file name; one longer than 77 tokens) and
`reference.safetensors` (`resized`: the 8-bit 224² crops, `image_embeds`, `text_embeds`,
`scores`, `mean`).
"""

import json
import pathlib
import shutil

import PIL.Image
import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

WORDS = "a red circle above a blue square on white, a photograph of rocks and grass by the sea".split()


def features(output):
    """transformers 5 returns a model output from get_*_features; earlier versions a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def write_clip_score_case(root: pathlib.Path, randomise_norms) -> None:
    out = root / "clip_score"
    shutil.rmtree(out, ignore_errors=True)
    model_dir = out / "model"
    model_dir.mkdir(parents=True)
    generator = torch.Generator().manual_seed(2718)
    torch.manual_seed(2718)
    tokenizer_dir = root / "pipeline/tiny_sd1/model/tokenizer"
    tokenizer = CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"), pad_token="<|endoftext|>", model_max_length=77)
    config = CLIPConfig(
        text_config=dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77, bos_token_id=998, eos_token_id=999, pad_token_id=999, hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=224, patch_size=32, hidden_act="quick_gelu"),
        projection_dim=16,
    )
    model = CLIPModel(config)
    randomise_norms(model, generator)
    model = model.half()
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    model = model.float().eval()

    images_dir = root / "metrics/images"
    files = sorted((images_dir / "png").glob("*.png")) + sorted((images_dir / "jpeg").glob("*.jpg"))
    captions = {}
    for i, f in enumerate(files):
        n = 3 + (i * 5) % 11
        captions[f"{f.parent.name}/{f.name}"] = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n))
    # One caption past 77 tokens: truncated with its end token kept.
    first = f"{files[0].parent.name}/{files[0].name}"
    captions[first] = " ".join(WORDS[k % len(WORDS)] for k in range(120))
    processor = CLIPImageProcessorPil()
    pictures = [PIL.Image.open(f).convert("RGB") for f in files]
    pixels = processor(images=pictures, return_tensors="pt")["pixel_values"]
    # The 8-bit image after PIL's resize and the crop, before scaling: compared exactly.
    resized = processor(images=pictures, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"]
    assert torch.equal(resized, resized.round())
    texts = [captions[f"{f.parent.name}/{f.name}"] for f in files]
    ids = tokenizer(texts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")["input_ids"]
    assert int(ids[0, -1]) == tokenizer.eos_token_id, "the long caption lost its end token"
    with torch.no_grad():
        image_embeds = features(model.get_image_features(pixel_values=pixels))
        text_embeds = features(model.get_text_features(input_ids=ids))
    # torchmetrics' _clip_score_update: normalise, 100 · the dot product, clipped at 0.
    img = image_embeds / image_embeds.norm(p=2, dim=-1, keepdim=True)
    txt = text_embeds / text_embeds.norm(p=2, dim=-1, keepdim=True)
    scores = (100 * (img * txt).sum(dim=-1)).clamp(min=0)
    assert (scores > 0).sum() >= 3, "too few positive scores to test anything"
    tensors = {
        "resized": resized.to(torch.uint8).contiguous(),
        "image_embeds": image_embeds.contiguous(),
        "text_embeds": text_embeds.contiguous(),
        "scores": scores.double(),
        "mean": scores.double().mean().reshape(1),
    }
    save_file(tensors, out / "reference.safetensors")
    (out / "captions.json").write_text(json.dumps({"files": [f"{f.parent.name}/{f.name}" for f in files], "captions": captions}, indent=1, ensure_ascii=False) + "\n")
    manifest = dict(tolerance=1e-3, embeds_tolerance=1e-4, reference=f"torchmetrics' CLIPScore formula on transformers' CLIPModel and CLIPImageProcessorPil")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {out}: {len(files)} images, mean score {float(tensors['mean'][0]):.4f}, scores {[round(float(s), 3) for s in scores]}")
