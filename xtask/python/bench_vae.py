"""Times diffusers' AutoencoderKL decode with random weights; prints one JSON line.

The Rust side is benches/vae_decode_timing.rs with the same arguments; `cargo xtask bench-vae`
runs both and prints the ratio.
"""

import argparse
import json
import resource
import statistics
import time

import torch
from diffusers import AutoencoderKL

CONFIGS = {
    # Stable Diffusion 1.5's VAE.
    "sd15": dict(
        block_out_channels=[128, 256, 512, 512],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=2,
        sample_size=512,
    ),
    # The tiny_2block fixture's shape.
    "tiny": dict(
        block_out_channels=[32, 64],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
    ),
}
LATENT = {"sd15": 64, "tiny": 16}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="sd15", choices=sorted(CONFIGS))
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    vae = AutoencoderKL(**CONFIGS[args.config]).eval()
    side = LATENT[args.config]
    z = torch.randn(1, 4, side, side)
    times = []
    with torch.inference_mode():
        image = vae.decode(z).sample  # warm-up
        for _ in range(args.runs):
            start = time.perf_counter()
            vae.decode(z).sample
            times.append(time.perf_counter() - start)
    print(json.dumps({
        "backend": f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "latent": list(z.shape),
        "image": list(image.shape),
        "median_s": statistics.median(times),
        "min_s": min(times),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()
