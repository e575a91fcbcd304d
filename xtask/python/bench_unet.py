"""Times one classifier-free-guidance step of diffusers' UNet2DConditionModel (random weights,
batch 2, 77-token context); prints one JSON line. The Rust side is
benches/unet_step_timing.rs with the same arguments."""

import argparse
import json
import resource
import statistics
import time

import torch
from diffusers import UNet2DConditionModel

CONFIGS = {
    "sd15": (dict(cross_attention_dim=768), 768),
    "sd21": (
        dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True, upcast_attention=True),
        1024,
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="sd15", choices=sorted(CONFIGS))
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--latent", type=int, default=64)
    args = parser.parse_args()
    config, context_dim = CONFIGS[args.config]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).eval()
    latents = torch.randn(2, 4, args.latent, args.latent)
    context = torch.randn(2, 77, context_dim)
    t = torch.tensor([500.0, 500.0])
    times = []
    with torch.inference_mode():
        unet(latents, t, encoder_hidden_states=context)  # warm-up
        for _ in range(args.runs):
            start = time.perf_counter()
            unet(latents, t, encoder_hidden_states=context)
            times.append(time.perf_counter() - start)
    print(json.dumps({
        "backend": f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "latent": list(latents.shape),
        "image": [2, 77, context_dim],
        "median_s": statistics.median(times),
        "min_s": min(times),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()
