"""Training-step references: a tiny U-Net trained for a few optimiser steps with diffusers' own
pieces, as `train_text_to_image.py` composes them (DDPMScheduler.add_noise / get_velocity,
compute_snr, torch's AdamW and clip_grad_norm_, get_scheduler, EMAModel).

Called by make_fixtures.py (`--only training`). Every case is a folder
tests/fixtures/training/<case>/ with the starting U-Net in diffusers layout at `unet/` (f16
weights, upcast to f32 for training on both sides), `inputs.safetensors` (every random draw of
every micro-batch: latents, text states, noise, offset and perturbation draws, timesteps),
`reference.safetensors` (per micro-batch losses, per step learning rates and gradient norms)
and `final.safetensors` (after the last step: every weight, EMA weight and Adam moment under
its diffusers key, f32), plus `manifest.json` with the hyper-parameters.
"""

import json
import pathlib
import shutil
import zlib

import diffusers
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from transformers import CLIPTextConfig, CLIPTextModel
from safetensors.torch import save_file

# Small enough that four f32 copies of every parameter stay well under a megabyte per case.
UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=[4, 8],
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=8,
    attention_head_dim=2,
    norm_num_groups=2,
)

SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

# Learning rates are train_text_to_image.py's 1e-4 scale: Adam normalises each update to about
# ±lr, so an element whose gradient is mostly rounding (a sum that cancels) moves by up to lr
# in a direction that depends on summation order; at 1e-3 that alone reached 2e-5 between two
# correct implementations. Each case turns on a different part of the recipe; together they cover ε and v targets,
# Min-SNR-γ, noise offset, input perturbation, accumulation, active clipping, warm-up with
# cosine and linear decay, weight decay and both EMA decay rules.
CASES = {
    "epsilon_constant": dict(
        prediction_type="epsilon",
        lr=1e-4,
        lr_scheduler="constant",
        warmup=0,
        steps=5,
        batch=2,
        accumulation=1,
        max_grad_norm=1.0,
        weight_decay=1e-2,
        ema=dict(decay=0.9999),
    ),
    "v_min_snr_cosine": dict(
        prediction_type="v_prediction",
        snr_gamma=5.0,
        lr=2e-4,
        lr_scheduler="cosine",
        warmup=2,
        steps=5,
        batch=2,
        accumulation=1,
        max_grad_norm=1.0,
        weight_decay=1e-2,
        ema=dict(decay=0.999, use_ema_warmup=True, power=2 / 3),
    ),
    "text_encoder_trained": dict(
        prediction_type="epsilon",
        text_encoder=True,
        lr=1e-4,
        lr_scheduler="constant_with_warmup",
        warmup=2,
        steps=4,
        batch=2,
        accumulation=1,
        max_grad_norm=0.5,
        weight_decay=1e-2,
        ema=dict(decay=0.9999),
    ),
    "offset_perturbation_accumulate_clip": dict(
        prediction_type="epsilon",
        snr_gamma=1.0,
        noise_offset=0.1,
        input_perturbation=0.1,
        lr=1e-4,
        lr_scheduler="linear",
        warmup=1,
        steps=5,
        batch=2,
        accumulation=2,
        max_grad_norm=0.05,
        weight_decay=0.1,
        ema=dict(decay=0.99, update_after_step=1),
    ),
    # accelerate's `--mixed_precision fp16`: f32 weights, the forward under CPU autocast to
    # f16, torch's GradScaler (a start high enough that the first steps overflow f16 and are
    # skipped, backing the scale off; growth after two good steps) and the LR schedule, as
    # accelerate's scheduler does, held still on a skipped step.
    "f16_grad_scaler": dict(
        mixed_precision="fp16",
        grad_scaler=dict(init_scale=2.0**17, growth_factor=2.0, backoff_factor=0.5, growth_interval=2),
        prediction_type="epsilon",
        lr=1e-4,
        lr_scheduler="linear",
        warmup=1,
        steps=8,
        batch=2,
        accumulation=1,
        max_grad_norm=1.0,
        weight_decay=1e-2,
        ema=dict(decay=0.99),
    ),
    # An inpainting U-Net (9 input channels), as diffusers' inpainting training scripts feed it:
    # `torch.cat([noisy_latents, mask, masked_latents], dim=1)`, the mask at latent resolution
    # (1 where the image is to be filled in) and the masked image's latents; the target is the
    # noise of the 4 latent channels alone.
    # An SDXL-style U-Net (`addition_embed_type: "text_time"`), as train_text_to_image_sdxl.py
    # calls it: `added_cond_kwargs={"text_embeds": pooled, "time_ids": add_time_ids}`.
    "sdxl_text_time": dict(
        text_time=True,
        prediction_type="epsilon",
        lr=1e-4,
        lr_scheduler="constant",
        warmup=0,
        steps=4,
        batch=2,
        accumulation=1,
        max_grad_norm=1.0,
        weight_decay=1e-2,
        ema=dict(decay=0.999),
    ),
    "inpainting_epsilon": dict(
        inpainting=True,
        prediction_type="epsilon",
        lr=1e-4,
        lr_scheduler="constant",
        warmup=0,
        steps=4,
        batch=2,
        accumulation=1,
        max_grad_norm=1.0,
        weight_decay=1e-2,
        ema=dict(decay=0.999),
    ),
}

TOKENS = 5

# The SDXL case's pooled text width and its time-id embedding width.
POOLED = 8
TIME_EMBED = 4

# A tiny CLIP text tower for the case that trains it with the U-Net (its hidden size is the
# U-Net's cross-attention width); token ids are random, so no tokenizer is needed.
TEXT_CONFIG = dict(
    vocab_size=1000,
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    bos_token_id=998,
    eos_token_id=999,
    pad_token_id=1,
)
TEXT_TOKENS = 8


def micro_batch_loss(spec: dict, unet, text, scheduler, generator, inputs: dict, k: str) -> torch.Tensor:
    """One micro-batch of `train_text_to_image.py`'s step: every random draw in a fixed order
    (latents, context or token ids, noise, offset, perturbation, timesteps), recorded in
    `inputs` under `<name>_<k>`, and the loss (ε or v target, Min-SNR-γ when set)."""
    b = spec["batch"]
    latents = torch.randn(b, 4, 8, 8, generator=generator)
    if text is None:
        context = torch.randn(b, TOKENS, UNET_CONFIG["cross_attention_dim"], generator=generator)
        inputs[f"context_{k}"] = context
    else:
        ids = torch.randint(0, TEXT_CONFIG["vocab_size"], (b, TEXT_TOKENS), generator=generator)
        inputs[f"ids_{k}"] = ids.to(torch.float32)
        context = text(ids, return_dict=False)[0]
    noise = torch.randn(b, 4, 8, 8, generator=generator)
    inputs.update({f"latents_{k}": latents, f"noise_{k}": noise})
    if spec.get("noise_offset"):
        draw = torch.randn(b, 4, 1, 1, generator=generator)
        inputs[f"offset_{k}"] = draw
        noise = noise + spec["noise_offset"] * draw
    noisy_noise = noise
    if spec.get("input_perturbation"):
        draw = torch.randn(b, 4, 8, 8, generator=generator)
        inputs[f"perturbation_{k}"] = draw
        noisy_noise = noise + spec["input_perturbation"] * draw
    timesteps = torch.randint(0, SCHEDULE["num_train_timesteps"], (b,), generator=generator)
    inputs[f"timesteps_{k}"] = timesteps.to(torch.float32)  # exact below 2^24
    noisy = scheduler.add_noise(latents, noisy_noise, timesteps)
    if spec.get("inpainting"):
        mask = (torch.rand(b, 1, 8, 8, generator=generator) < 0.4).float()
        masked_latents = torch.randn(b, 4, 8, 8, generator=generator)
        inputs.update({f"mask_{k}": mask, f"masked_latents_{k}": masked_latents})
        noisy = torch.cat([noisy, mask, masked_latents], dim=1)
    if spec["prediction_type"] == "epsilon":
        target = noise
    else:
        target = scheduler.get_velocity(latents, noise, timesteps)
    added = None
    if spec.get("text_time"):
        text_embeds = torch.randn(b, POOLED, generator=generator)
        # original size, crop top-left, target size: whole pixels, as the script makes them
        time_ids = torch.randint(0, 96, (b, 6), generator=generator).to(torch.float32)
        inputs.update({f"text_embeds_{k}": text_embeds, f"time_ids_{k}": time_ids})
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
    pred = unet(noisy, timesteps, context, added_cond_kwargs=added, return_dict=False)[0]
    if spec.get("snr_gamma") is None:
        loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
    else:
        # train_text_to_image.py's Min-SNR-γ weighting, v-prediction denominator included.
        snr = compute_snr(scheduler, timesteps)
        weights = torch.stack([snr, spec["snr_gamma"] * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
        if spec["prediction_type"] == "epsilon":
            weights = weights / snr
        else:
            weights = weights / (snr + 1)
        loss = F.mse_loss(pred.float(), target.float(), reduction="none")
        loss = (loss.mean(dim=list(range(1, loss.ndim))) * weights).mean()
    return loss


def write_training_case(root: pathlib.Path, name: str, spec: dict, randomise_norms) -> None:
    case = root / "training" / name
    if case.exists():
        shutil.rmtree(case)
    seed = zlib.crc32(name.encode()) % 100_000
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    config = {**UNET_CONFIG, "in_channels": 9 if spec.get("inpainting") else 4}
    if spec.get("text_time"):
        config.update(addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED, projection_class_embeddings_input_dim=POOLED + 6 * TIME_EMBED)
    unet = UNet2DConditionModel(**config)
    randomise_norms(unet, generator)
    unet = unet.half()
    unet.save_pretrained(case / "unet", safe_serialization=True)
    unet = unet.float().train()
    text = None
    params = list(unet.parameters())
    if spec.get("text_encoder"):
        text = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
        randomise_norms(text, generator)
        text = text.half()
        text.save_pretrained(case / "text_encoder", safe_serialization=True)
        text = text.float().train()
        # train_text_to_image.py-style: one optimiser over both models' parameters.
        params += list(text.parameters())

    scheduler = DDPMScheduler(prediction_type=spec["prediction_type"], **SCHEDULE)
    optimizer = torch.optim.AdamW(
        params, lr=spec["lr"], betas=(0.9, 0.999), weight_decay=spec["weight_decay"], eps=1e-8
    )
    lr_scheduler = get_scheduler(
        spec["lr_scheduler"], optimizer=optimizer, num_warmup_steps=spec["warmup"], num_training_steps=spec["steps"]
    )
    ema = EMAModel(unet.parameters(), model_cls=UNet2DConditionModel, model_config=unet.config, **spec["ema"])

    b, accumulation = spec["batch"], spec["accumulation"]
    fp16 = spec.get("mixed_precision") == "fp16"
    scaler = torch.amp.GradScaler("cpu", **spec["grad_scaler"]) if fp16 else None
    inputs, reference = {}, {}
    losses, lrs, norms, scales, skipped = [], [], [], [], []
    for step in range(spec["steps"]):
        for micro in range(accumulation):
            k = f"{step}_{micro}"
            with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
                loss = micro_batch_loss(spec, unet, text, scheduler, generator, inputs, k)
            losses.append(loss.item())
            # accelerate divides the loss by the accumulation steps before backward (and
            # scales it under fp16).
            loss = loss / accumulation
            (scaler.scale(loss) if fp16 else loss).backward()
        if fp16:
            # accelerator.clip_grad_norm_ unscales first; a non-finite gradient makes the norm
            # non-finite and scaler.step skip the optimiser.
            scaler.unscale_(optimizer)
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, spec["max_grad_norm"])))
        lrs.append(lr_scheduler.get_last_lr()[0])
        if fp16:
            scales.append(scaler.get_scale())
            found_inf = sum(v.item() for v in scaler._found_inf_per_device(optimizer).values()) > 0
            skipped.append(float(found_inf))
            scaler.step(optimizer)
            scaler.update()
            if not found_inf:
                lr_scheduler.step()
        else:
            optimizer.step()
            lr_scheduler.step()
        optimizer.zero_grad()
        ema.step(unet.parameters())

    reference["loss"] = torch.tensor(losses, dtype=torch.float64)
    reference["lr"] = torch.tensor(lrs, dtype=torch.float64)
    reference["grad_norm"] = torch.tensor(norms, dtype=torch.float64)
    if fp16:
        reference["loss_scale"] = torch.tensor(scales, dtype=torch.float64)
        reference["skipped"] = torch.tensor(skipped, dtype=torch.float64)
    final = {}
    names = {id(p): n for n, p in unet.named_parameters()}
    for n, p in unet.named_parameters():
        final[f"weight.{n}"] = p.detach()
        state = optimizer.state[p]
        final[f"exp_avg.{n}"] = state["exp_avg"]
        final[f"exp_avg_sq.{n}"] = state["exp_avg_sq"]
    for p, s in zip(unet.parameters(), ema.shadow_params):
        final[f"ema.{names[id(p)]}"] = s
    if text is not None:
        for n, p in text.named_parameters():
            final[f"text_weight.{n}"] = p.detach()
            state = optimizer.state[p]
            final[f"text_exp_avg.{n}"] = state["exp_avg"]
            final[f"text_exp_avg_sq.{n}"] = state["exp_avg_sq"]
    save_file({k: v.contiguous() for k, v in inputs.items()}, case / "inputs.safetensors")
    save_file({k: v.contiguous() for k, v in reference.items()}, case / "reference.safetensors")
    save_file({k: v.contiguous().float() for k, v in final.items()}, case / "final.safetensors")
    manifest = {
        "kind": "training",
        "reference": f"diffusers {diffusers.__version__} train_text_to_image.py step, torch {torch.__version__}",
        "schedule": SCHEDULE,
        "tokens": TOKENS,
        "parameters": sum(p.numel() for p in unet.parameters()),
        "tolerance": 1e-5,
        **{k: v for k, v in spec.items()},
    }
    (case / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {case}: {manifest['parameters']} parameters, losses {[round(x, 5) for x in losses]}")
    if fp16:
        print(f"  loss scales {scales}, skipped {skipped}")


VAE_CONFIG = dict(
    block_out_channels=[4, 8],
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    layers_per_block=1,
    norm_num_groups=2,
    latent_channels=4,
    sample_size=16,
)

VAE_SPEC = dict(objective="vae", reconstruction="l1", kl_weight=1e-3, lr=1e-3, steps=4, batch=2, max_grad_norm=50.0, weight_decay=1e-2)


def tiny_vae_case(root: pathlib.Path, name: str, randomise_norms):
    """A fresh case folder, its generator (seeded by the name) and the tiny VAE with random
    norms, saved in f16 under `vae/` and returned in f32 for training."""
    case = root / "training" / name
    if case.exists():
        shutil.rmtree(case)
    seed = zlib.crc32(name.encode()) % 100_000
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    randomise_norms(vae, generator)
    vae = vae.half()
    vae.save_pretrained(case / "vae", safe_serialization=True)
    return case, generator, vae.float().train()


def write_vae_training_case(root: pathlib.Path, randomise_norms) -> None:
    """The first-stage objective of the latent diffusion code (`LPIPSWithDiscriminator` with
    the perceptual and adversarial terms off and logvar 0): sum |x - x̂| per image + w · KL,
    averaged over the batch."""
    name = "vae_objective"
    spec = VAE_SPEC
    case, generator, vae = tiny_vae_case(root, name, randomise_norms)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=spec["lr"], betas=(0.9, 0.999), weight_decay=spec["weight_decay"], eps=1e-8)
    inputs, losses, recs, kls, norms = {}, [], [], [], []
    b = spec["batch"]
    for step in range(spec["steps"]):
        images = torch.rand(b, 3, 16, 16, generator=generator) * 2 - 1
        posterior = vae.encode(images).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator)
        inputs.update({f"images_{step}": images, f"noise_{step}": noise})
        z = posterior.mean + posterior.std * noise
        reconstructed = vae.decode(z).sample
        rec = (images - reconstructed).abs().sum() / b
        kl = posterior.kl().sum() / b
        loss = rec + spec["kl_weight"] * kl
        losses.append(loss.item())
        recs.append(rec.item())
        kls.append(kl.item())
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(vae.parameters(), spec["max_grad_norm"])))
        optimizer.step()
        optimizer.zero_grad()
    final = {}
    for n, p in vae.named_parameters():
        final[f"weight.{n}"] = p.detach()
        final[f"exp_avg.{n}"] = optimizer.state[p]["exp_avg"]
        final[f"exp_avg_sq.{n}"] = optimizer.state[p]["exp_avg_sq"]
    reference = {
        "loss": torch.tensor(losses, dtype=torch.float64),
        "reconstruction": torch.tensor(recs, dtype=torch.float64),
        "kl": torch.tensor(kls, dtype=torch.float64),
        "grad_norm": torch.tensor(norms, dtype=torch.float64),
    }
    save_file({k: v.contiguous() for k, v in inputs.items()}, case / "inputs.safetensors")
    save_file({k: v.contiguous() for k, v in reference.items()}, case / "reference.safetensors")
    save_file({k: v.contiguous().float() for k, v in final.items()}, case / "final.safetensors")
    manifest = {
        "kind": "training",
        "reference": f"diffusers {diffusers.__version__} AutoencoderKL, the latent diffusion first-stage objective, torch {torch.__version__}",
        "parameters": sum(p.numel() for p in vae.parameters()),
        "tolerance": 1e-5,
        **spec,
    }
    (case / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {case}: {manifest['parameters']} parameters, losses {[round(x, 4) for x in losses]}")


# The autoencoder with the latent diffusion paper's adversarial term (its
# `LPIPSWithDiscriminator` with the perceptual weight 0, logvar 0): a PatchGAN discriminator (the
# `NLayerDiscriminator` of pix2pix / taming-transformers: 4x4 convolutions, BatchNorm, LeakyReLU
# 0.2), the generator's hinge term `-mean(D(x̂))` weighted adaptively by the ratio of the
# reconstruction's and the adversarial term's gradient norms at the decoder's last layer, from
# `start` on; the discriminator's hinge loss on real images and on a fresh reconstruction by the
# updated autoencoder (Lightning runs the two optimisers' steps one after the other), Adam with
# betas (0.5, 0.9) as the paper's code. Written here from the paper's code's structure.
VAE_GAN_SPEC = dict(objective="vae", reconstruction="l1", kl_weight=1e-3, lr=1e-3, steps=4, batch=2, max_grad_norm=50.0, weight_decay=1e-2, discriminator=dict(start=1, weight=0.5, factor=1.0, channels=8, layers=2))


def patch_discriminator(channels: int, layers: int) -> torch.nn.Module:
    class NLayerDiscriminator(torch.nn.Module):
        def __init__(self):
            super().__init__()
            seq = [torch.nn.Conv2d(3, channels, 4, 2, 1), torch.nn.LeakyReLU(0.2, True)]
            mult = 1
            for n in range(1, layers + 1):
                prev, mult = mult, min(2**n, 8)
                stride = 2 if n < layers else 1
                seq += [torch.nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False), torch.nn.BatchNorm2d(channels * mult), torch.nn.LeakyReLU(0.2, True)]
            seq += [torch.nn.Conv2d(channels * mult, 1, 4, 1, 1)]
            self.main = torch.nn.Sequential(*seq)

        def forward(self, x):
            return self.main(x)

    d = NLayerDiscriminator()
    for m in d.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.normal_(m.weight, 1.0, 0.02)
            torch.nn.init.constant_(m.bias, 0)
    return d


def write_vae_gan_training_case(root: pathlib.Path, randomise_norms) -> None:
    name = "vae_discriminator"
    spec = VAE_GAN_SPEC
    ds = spec["discriminator"]
    case, generator, vae = tiny_vae_case(root, name, randomise_norms)
    disc = patch_discriminator(ds["channels"], ds["layers"]).half().float().train()
    (case / "discriminator").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in disc.state_dict().items() if not k.endswith("num_batches_tracked")}, case / "discriminator" / "diffusion_pytorch_model.safetensors")
    optimizer = torch.optim.AdamW(vae.parameters(), lr=spec["lr"], betas=(0.9, 0.999), weight_decay=spec["weight_decay"], eps=1e-8)
    optimizer_d = torch.optim.Adam(disc.parameters(), lr=spec["lr"], betas=(0.5, 0.9), eps=1e-8)
    last_layer = vae.decoder.conv_out.weight
    inputs, rows = {}, {k: [] for k in ["loss", "reconstruction", "kl", "g_loss", "d_weight", "d_loss", "grad_norm"]}
    b = spec["batch"]
    for step in range(spec["steps"]):
        factor = ds["factor"] if step >= ds["start"] else 0.0
        images = torch.rand(b, 3, 16, 16, generator=generator) * 2 - 1
        posterior = vae.encode(images).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator)
        inputs.update({f"images_{step}": images, f"noise_{step}": noise})
        z = posterior.mean + posterior.std * noise
        reconstructed = vae.decode(z).sample
        rec = (images - reconstructed).abs().sum() / b
        kl = posterior.kl().sum() / b
        for p in disc.parameters():
            p.requires_grad_(False)
        g_loss = -disc(reconstructed).mean()
        rec_grads = torch.autograd.grad(rec, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        d_weight = torch.clamp(torch.norm(rec_grads) / (torch.norm(g_grads) + 1e-4), 0.0, 1e4).detach() * ds["weight"]
        loss = rec + spec["kl_weight"] * kl + d_weight * factor * g_loss
        loss.backward()
        rows["grad_norm"].append(float(torch.nn.utils.clip_grad_norm_(vae.parameters(), spec["max_grad_norm"])))
        optimizer.step()
        optimizer.zero_grad()
        for p in disc.parameters():
            p.requires_grad_(True)
        d_loss = torch.zeros(())
        if factor > 0:
            noise2 = torch.randn(posterior.mean.shape, generator=generator)
            inputs[f"discriminator_noise_{step}"] = noise2
            with torch.no_grad():
                posterior2 = vae.encode(images).latent_dist
                fake = vae.decode(posterior2.mean + posterior2.std * noise2).sample
            logits_real, logits_fake = disc(images), disc(fake)
            d_loss = factor * 0.5 * (torch.relu(1.0 - logits_real).mean() + torch.relu(1.0 + logits_fake).mean())
            d_loss.backward()
        # Before `start` Lightning still steps the discriminator's optimiser on the zero loss:
        # zero gradients, so its moments and weights stay, and its step count goes on.
        for p in disc.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        optimizer_d.step()
        optimizer_d.zero_grad()
        for k, v in [("loss", loss), ("reconstruction", rec), ("kl", kl), ("g_loss", g_loss), ("d_weight", d_weight * factor), ("d_loss", d_loss)]:
            rows[k].append(float(v.detach()))
    final = {}
    for n, p in vae.named_parameters():
        final[f"weight.{n}"] = p.detach()
        final[f"exp_avg.{n}"] = optimizer.state[p]["exp_avg"]
        final[f"exp_avg_sq.{n}"] = optimizer.state[p]["exp_avg_sq"]
    for n, p in disc.named_parameters():
        final[f"discriminator.weight.{n}"] = p.detach()
        final[f"discriminator.exp_avg.{n}"] = optimizer_d.state[p]["exp_avg"]
        final[f"discriminator.exp_avg_sq.{n}"] = optimizer_d.state[p]["exp_avg_sq"]
    reference = {k: torch.tensor(v, dtype=torch.float64) for k, v in rows.items()}
    save_file({k: v.contiguous() for k, v in inputs.items()}, case / "inputs.safetensors")
    save_file({k: v.contiguous() for k, v in reference.items()}, case / "reference.safetensors")
    save_file({k: v.contiguous().float() for k, v in final.items()}, case / "final.safetensors")
    manifest = {
        "kind": "training",
        "reference": f"diffusers {diffusers.__version__} AutoencoderKL, the latent diffusion first-stage objective with its PatchGAN discriminator (hinge loss, adaptive weight), torch {torch.__version__}",
        "parameters": sum(p.numel() for p in vae.parameters()) + sum(p.numel() for p in disc.parameters()),
        "tolerance": 1e-5,
        **spec,
    }
    (case / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {case}: {manifest['parameters']} parameters, losses {[round(x, 4) for x in rows['loss']]}, d losses {[round(x, 4) for x in rows['d_loss']]}")


# LoRA training (`sd train unet --lora-rank`): the U-Net frozen, PEFT's LoRA layers trained
# as diffusers' `train_text_to_image_lora.py` does (`unet.add_adapter(LoraConfig(...))`, AdamW over
# the trainable parameters alone, the same loss), and, in the second case, the text encoder's
# LoRA too, in one optimiser and one gradient norm as `train_dreambooth_lora.py` does. kohya's
# targets are every linear layer and 1x1 convolution of the transformer blocks.
KOHYA_UNET_TARGETS = ["proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
DIFFUSERS_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
DIFFUSERS_TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]

LORA_CASES = {
    "lora_kohya_targets": dict(
        prediction_type="epsilon",
        lr=1e-4,
        lr_scheduler="constant",
        warmup=0,
        steps=5,
        batch=2,
        accumulation=1,
        max_grad_norm=1.0,
        weight_decay=1e-2,
        rank=4,
        alpha=8.0,
        targets="kohya",
        init="kohya",
    ),
    "lora_text_encoder_diffusers": dict(
        prediction_type="v_prediction",
        snr_gamma=5.0,
        text_encoder=True,
        lr=2e-4,
        lr_scheduler="cosine",
        warmup=1,
        steps=4,
        batch=2,
        accumulation=2,
        max_grad_norm=0.05,
        weight_decay=1e-2,
        rank=2,
        alpha=2.0,
        targets="diffusers",
        init="gaussian",
    ),
}


def write_lora_training_case(root: pathlib.Path, name: str, spec: dict, randomise_norms) -> None:
    """`init.safetensors` (the factors PEFT drew, in diffusers' `save_lora_weights` layout),
    `final_lora.safetensors`, `final_exp_avg.safetensors` and `final_exp_avg_sq.safetensors`
    (the factors and Adam moments after the last step, in the same layout), the inputs and the
    per-step references as for the full cases, and in the manifest the keys
    `convert_state_dict_to_kohya` gives the final factors."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    case = root / "training" / name
    if case.exists():
        shutil.rmtree(case)
    seed = zlib.crc32(name.encode()) % 100_000
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    randomise_norms(unet, generator)
    unet = unet.half()
    unet.save_pretrained(case / "unet", safe_serialization=True)
    unet = unet.float().train()
    unet.requires_grad_(False)
    kohya = spec["targets"] == "kohya"
    unet_targets = KOHYA_UNET_TARGETS if kohya else DIFFUSERS_UNET_TARGETS
    init = "gaussian" if spec["init"] == "gaussian" else True
    unet_lora = LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], init_lora_weights=init, target_modules=unet_targets)
    unet.add_adapter(unet_lora)
    text = None
    if spec.get("text_encoder"):
        text = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
        randomise_norms(text, generator)
        text = text.half()
        text.save_pretrained(case / "text_encoder", safe_serialization=True)
        text = text.float().train()
        text.requires_grad_(False)
        text_lora = LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], init_lora_weights=init, target_modules=DIFFUSERS_TEXT_TARGETS)
        inject_adapter_in_model(text_lora, text)
    models = [("unet", unet)] + ([("text_encoder", text)] if text is not None else [])
    params = []
    for _, model in models:
        for n, p in model.named_parameters():
            assert p.requires_grad == ("lora_" in n), n
            if p.requires_grad:
                params.append(p)

    def lora_file(path: pathlib.Path, values=None) -> None:
        """The factors (or, with `values`, one tensor per factor) in save_lora_weights' layout."""
        layers = {}
        for prefix, model in models:
            sd = get_peft_model_state_dict(model)
            if values is not None:
                by_param = {id(p): n for n, p in model.named_parameters()}
                named = dict(model.named_parameters())
                sd = {k: values(named[k.replace(".weight", ".default.weight")]) for k in sd}
            layers[prefix] = {k: v.detach().contiguous() for k, v in sd.items()}
        tmp = case / "tmp"
        kwargs = dict(unet_lora_layers=layers["unet"], unet_lora_adapter_metadata=unet_lora.to_dict())
        if "text_encoder" in layers:
            kwargs.update(text_encoder_lora_layers=layers["text_encoder"], text_encoder_lora_adapter_metadata=text_lora.to_dict())
        StableDiffusionPipeline.save_lora_weights(tmp, weight_name="lora.safetensors", **kwargs)
        shutil.move(tmp / "lora.safetensors", path)
        shutil.rmtree(tmp)

    lora_file(case / "init.safetensors")

    scheduler = DDPMScheduler(prediction_type=spec["prediction_type"], **SCHEDULE)
    optimizer = torch.optim.AdamW(params, lr=spec["lr"], betas=(0.9, 0.999), weight_decay=spec["weight_decay"], eps=1e-8)
    lr_scheduler = get_scheduler(spec["lr_scheduler"], optimizer=optimizer, num_warmup_steps=spec["warmup"], num_training_steps=spec["steps"])
    b, accumulation = spec["batch"], spec["accumulation"]
    inputs, losses, lrs, norms = {}, [], [], []
    for step in range(spec["steps"]):
        for micro in range(accumulation):
            k = f"{step}_{micro}"
            loss = micro_batch_loss(spec, unet, text, scheduler, generator, inputs, k)
            losses.append(loss.item())
            (loss / accumulation).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, spec["max_grad_norm"])))
        lrs.append(lr_scheduler.get_last_lr()[0])
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()

    lora_file(case / "final_lora.safetensors")
    lora_file(case / "final_exp_avg.safetensors", lambda p: optimizer.state[p]["exp_avg"])
    lora_file(case / "final_exp_avg_sq.safetensors", lambda p: optimizer.state[p]["exp_avg_sq"])
    prefixed = {}
    for prefix, model in models:
        prefixed.update({f"{prefix}.{k}": v for k, v in get_peft_model_state_dict(model).items()})
    kohya_keys = sorted(k.replace("lora_te1_", "lora_te_", 1) for k in convert_state_dict_to_kohya(prefixed))
    save_file({k: v.contiguous() for k, v in inputs.items()}, case / "inputs.safetensors")
    reference = {
        "loss": torch.tensor(losses, dtype=torch.float64),
        "lr": torch.tensor(lrs, dtype=torch.float64),
        "grad_norm": torch.tensor(norms, dtype=torch.float64),
    }
    save_file(reference, case / "reference.safetensors")
    manifest = {
        "kind": "lora_training",
        "reference": f"diffusers {diffusers.__version__} train_text_to_image_lora.py step with PEFT {__import__('peft').__version__} LoRA layers, torch {torch.__version__}",
        "schedule": SCHEDULE,
        "tokens": TOKENS,
        "trained_parameters": sum(p.numel() for p in params),
        "tolerance": 1e-5,
        "kohya_keys": kohya_keys,
        **spec,
    }
    (case / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {case}: {manifest['trained_parameters']} LoRA parameters, losses {[round(x, 5) for x in losses]}")


def write_lora_training_cases(root: pathlib.Path, randomise_norms) -> None:
    for name, spec in sorted(LORA_CASES.items()):
        write_lora_training_case(root, name, spec, randomise_norms)


def write_training_cases(root: pathlib.Path, randomise_norms) -> None:
    for name, spec in sorted(CASES.items()):
        write_training_case(root, name, spec, randomise_norms)
    write_vae_training_case(root, randomise_norms)
    write_vae_gan_training_case(root, randomise_norms)
    write_lora_training_cases(root, randomise_norms)
