"""Times one training step of diffusers' UNet2DConditionModel on the CPU; prints one JSON line.

The step is train_text_to_image.py's: noise the latents with DDPM's scaled_linear schedule,
predict ε, mean squared error, backward, clip_grad_norm_(1.0) and an AdamW step (lr 1e-5,
betas 0.9 / 0.999, eps 1e-8, weight decay 1e-2), each step timed whole after one warm-up.
`--config sd15`: the SD 1.5 U-Net's shape with random weights; `--config tiny`: the tiny
fixture U-Net. Batch 1, a 4x32x32 latent, 77 context tokens, f32. The Rust side is
benches/unet_train_step_timing.rs with the same arguments; `cargo xtask bench-train` runs both
and prints the ratios.
"""

import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel

# Relative to the workspace root, where `cargo xtask` runs the script.
TINY_UNET = "tests/fixtures/pipeline/tiny_sd1/model/unet"
# Fixed, as on the Rust side: both do exactly the same work (a step's cost does not depend on it).
TIMESTEP = 500
LR = 1e-5
MAX_GRAD_NORM = 1.0


def load(name: str) -> tuple[UNet2DConditionModel, int]:
    """The model and its context width."""
    if name == "sd15":
        return UNet2DConditionModel(cross_attention_dim=768), 768
    unet = UNet2DConditionModel.from_pretrained(TINY_UNET)
    dim = unet.config.cross_attention_dim
    return unet, dim if isinstance(dim, int) else dim[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="sd15", choices=["sd15", "tiny"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--latent", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    unet, context_dim = load(args.config)
    unet.train()
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2
    )
    latents = torch.randn(1, 4, args.latent, args.latent)
    noise = torch.randn(1, 4, args.latent, args.latent)
    context = torch.randn(1, 77, context_dim)
    t = torch.tensor([TIMESTEP], dtype=torch.long)
    losses = []

    def step() -> None:
        noisy = scheduler.add_noise(latents, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=context).sample
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        losses.append(loss.item())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    times = []
    for _ in range(max(args.runs, 1)):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(json.dumps({
        "backend": f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "latent": list(latents.shape),
        "context": list(context.shape),
        "median_s": median,
        "min_s": min(times),
        "steps_per_s": 1.0 / median,
        "loss": losses[-1],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()
