"""Times transformers' CLIPTextModel (random weights, ViT-L/14 or bigG shape) on 2×77 tokens;
prints one JSON line. The Rust side is benches/clip_text_timing.rs with the same arguments."""

import argparse
import json
import resource
import statistics
import time

import torch
from transformers import CLIPTextConfig, CLIPTextModel

CONFIGS = {
    "vit-l": dict(hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
                  num_attention_heads=12, hidden_act="quick_gelu"),
    "bigg": dict(hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
                 num_attention_heads=20, hidden_act="gelu"),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="vit-l", choices=sorted(CONFIGS))
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **CONFIGS[args.config])).eval()
    prompt = [49406] + [320 + i * 37 for i in range(20)]
    prompt += [49407] * (77 - len(prompt))
    ids = torch.tensor([[49406] + [49407] * 76, prompt])
    times = []
    with torch.inference_mode():
        model(ids)  # warm-up
        for _ in range(args.runs):
            start = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - start)
    print(json.dumps({
        "backend": f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "latent": [2, 77, CONFIGS[args.config]["hidden_size"]],
        "median_s": statistics.median(times),
        "min_s": min(times),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()
