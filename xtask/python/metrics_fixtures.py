"""Metrics fixtures: the FID Inception and the metrics computed by the reference packages
themselves (pytorch-fid's `InceptionV3`, `get_activations` and `calculate_frechet_distance`;
torch-fidelity's feature extractor, `kid_features_to_metric` and `isc_features_to_metric`).

Real Inception weights cannot be downloaded here and 95 MB of random ones cannot be committed,
so the convolution and classifier weights come from a formula both sides compute bit for bit
(splitmix64 of the key's FNV-1a hash and the element index, a 24-bit uniform scaled in f32),
and only the BatchNorm parameters are stored. A random Inception's deep features collapse, so
its BatchNorm statistics are recomputed on real photographs first (public-domain images from
scikit-image's data: crops and flips, as SWA's `update_bn` does with a cumulative average).
"""

import io
import json
import math
import pathlib
import tempfile

import numpy as np
import PIL
import PIL.Image
import skimage
import skimage.data
import torch
import pytorch_fid
import pytorch_fid.inception as fid_inception
from pytorch_fid import fid_score
import torch_fidelity
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from safetensors.numpy import save_file

MASK64 = (1 << 64) - 1


def fnv1a64(text: str) -> int:
    h = 0xCBF29CE484222325
    for byte in text.encode():
        h = ((h ^ byte) * 0x100000001B3) & MASK64
    return h


def splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def formula(key: str, shape: tuple, scale: float) -> np.ndarray:
    """Uniform in [-scale, scale): `(u24 · 2⁻²³ − 1) · f32(scale)`, every step exact or one f32
    rounding, so the Rust test computes the same bits."""
    n = int(np.prod(shape))
    z = splitmix64(np.uint64(fnv1a64(key)) ^ np.arange(n, dtype=np.uint64))
    v = (z >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-23) - np.float32(1.0)
    return (v * np.float32(scale)).reshape(shape)


def formula_state(model: torch.nn.Module) -> dict:
    state = {}
    for key, value in model.state_dict().items():
        shape = tuple(value.shape)
        if key.endswith("conv.weight") or key == "fc.weight":
            fan_in = int(np.prod(shape[1:]))
            state[key] = torch.from_numpy(formula(key, shape, math.sqrt(3.0 / fan_in)))
        elif key == "fc.bias":
            state[key] = torch.from_numpy(formula(key, shape, 0.1))
        elif key.endswith("bn.weight"):
            state[key] = torch.from_numpy(formula(key, shape, 0.2) + np.float32(1.0))
        elif key.endswith("bn.bias"):
            state[key] = torch.from_numpy(formula(key, shape, 0.2))
        else:
            state[key] = value.clone()
    return state


def photographs() -> list[np.ndarray]:
    return [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket(), skimage.data.immunohistochemistry()]


def crops(count: int, size: tuple[int, int], seed: int) -> list[np.ndarray]:
    """`count` crops of `size` (h, w), some flipped, from the photographs."""
    rng = np.random.RandomState(seed)
    pictures = photographs()
    out = []
    for i in range(count):
        pic = pictures[i % len(pictures)]
        h, w = size
        y = rng.randint(0, pic.shape[0] - h + 1)
        x = rng.randint(0, pic.shape[1] - w + 1)
        crop = pic[y : y + h, x : x + w]
        if rng.rand() < 0.5:
            crop = crop[:, ::-1]
        out.append(np.ascontiguousarray(crop))
    return out


def recompute_batchnorm(model: torch.nn.Module) -> None:
    """Cumulative BatchNorm statistics over 160 crops of 96-192 px (resized by the model)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for size in (96, 128, 160, 192):
            batch = crops(40, (size, size), seed=size)
            x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float() / 255.0
            model(x)
    model.eval()


def write_metrics_cases(root: pathlib.Path) -> None:
    case = root / "metrics"
    case.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    # pytorch-fid's InceptionV3 with the formula weights in place of the download.
    probe = fid_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    probe.Mixed_5b = fid_inception.FIDInceptionA(192, pool_features=32)
    probe.Mixed_5c = fid_inception.FIDInceptionA(256, pool_features=64)
    probe.Mixed_5d = fid_inception.FIDInceptionA(288, pool_features=64)
    probe.Mixed_6b = fid_inception.FIDInceptionC(768, channels_7x7=128)
    probe.Mixed_6c = fid_inception.FIDInceptionC(768, channels_7x7=160)
    probe.Mixed_6d = fid_inception.FIDInceptionC(768, channels_7x7=160)
    probe.Mixed_6e = fid_inception.FIDInceptionC(768, channels_7x7=192)
    probe.Mixed_7b = fid_inception.FIDInceptionE_1(1280)
    probe.Mixed_7c = fid_inception.FIDInceptionE_2(2048)
    probe.load_state_dict(formula_state(probe))
    # `InceptionV3` builds its blocks from `fid_inception_v3()`, which would download the
    # weights: hand it the network above, so that its blocks share these modules.
    fid_inception.fid_inception_v3 = lambda: probe
    model = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    recompute_batchnorm(model)
    full = {k: v.clone() for k, v in probe.state_dict().items()}
    bn = {k: v.numpy().astype(np.float32) for k, v in full.items() if ".bn." in k and not k.endswith("num_batches_tracked")}
    save_file(bn, str(case / "inception_bn.safetensors"))

    # The two image sets: PNG 64×64 and JPEG 100 wide × 80 high (PIL quality 90, 4:2:0 chroma as
    # most evaluation sets are stored).
    images = case / "images"
    (images / "png").mkdir(parents=True, exist_ok=True)
    (images / "jpeg").mkdir(parents=True, exist_ok=True)
    png_files, jpeg_files, decoded = [], [], {}
    for i, crop in enumerate(crops(6, (64, 64), seed=1)):
        path = images / "png" / f"{i:02}.png"
        PIL.Image.fromarray(crop).save(path)
        png_files.append(path)
    for i, crop in enumerate(crops(6, (80, 100), seed=2)):
        path = images / "jpeg" / f"{i:02}.jpg"
        PIL.Image.fromarray(crop).save(path, quality=90)
        jpeg_files.append(path)
        decoded[f"{i:02}"] = np.asarray(PIL.Image.open(path).convert("RGB"))
    save_file(decoded, str(case / "jpeg_decoded_by_pil.safetensors"))

    # pytorch-fid: features through its own data path (PIL, ToTensor, resize, 2x-1).
    fid_png = fid_score.get_activations(png_files, model, batch_size=6, dims=2048, device="cpu", num_workers=0)
    fid_jpeg = fid_score.get_activations(jpeg_files, model, batch_size=6, dims=2048, device="cpu", num_workers=0)
    stats = [(np.mean(a, axis=0), np.cov(a, rowvar=False)) for a in (fid_png, fid_jpeg)]
    fid_value = fid_score.calculate_frechet_distance(stats[0][0], stats[0][1], stats[1][0], stats[1][1])

    # The network alone (no resize) on 96² inputs, a size below 299² where every map is
    # smaller than pytorch-fid's: Mixed_7a's stride-2 convolutions leave 1×1 maps.
    small = np.stack(crops(2, (96, 96), seed=5))
    with torch.no_grad():
        h = torch.from_numpy(small).permute(0, 3, 1, 2).float() / 255.0 * 2.0 - 1.0
        for block in model.blocks:
            h = block(h)
    small_pool3 = h.reshape(len(small), -1).numpy()

    # torch-fidelity: its extractor on the same weights (its own resize and normalisation).
    with tempfile.TemporaryDirectory() as tmp:
        weights = pathlib.Path(tmp) / "inception.pth"
        torch.save({k: v for k, v in full.items() if not k.endswith("num_batches_tracked")}, weights)
        extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(weights))
        extractor.eval()
        fidelity = {}
        for name, files in (("png", png_files), ("jpeg", jpeg_files)):
            x = torch.from_numpy(np.stack([np.asarray(PIL.Image.open(f).convert("RGB")) for f in files])).permute(0, 3, 1, 2).contiguous()
            with torch.no_grad():
                pool, logits = extractor(x)
            fidelity[name] = (pool, logits)
    kid_small = kid_features_to_metric(fidelity["png"][0], fidelity["jpeg"][0], kid_subsets=10, kid_subset_size=5, kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1, rng_seed=2020, verbose=False)
    isc_small = isc_features_to_metric(torch.cat([fidelity["png"][1], fidelity["jpeg"][1]]), splits=3, shuffle=True, rng_seed=2020)

    # The maths on larger feature sets (no network): 300 and 250 vectors of 64, logits of 40.
    rng = np.random.RandomState(7)
    mix = rng.randn(64, 64).astype(np.float32) * 0.3
    maths_a = (rng.randn(300, 64).astype(np.float32) @ mix + 1.0).astype(np.float32)
    maths_b = (rng.randn(250, 64).astype(np.float32) @ (mix * 1.2) + 1.1).astype(np.float32)
    maths_logits = (rng.randn(300, 40) * 3.0).astype(np.float32)
    sa = (np.mean(maths_a.astype(np.float64), axis=0), np.cov(maths_a.astype(np.float64), rowvar=False))
    sb = (np.mean(maths_b.astype(np.float64), axis=0), np.cov(maths_b.astype(np.float64), rowvar=False))
    maths_fid = fid_score.calculate_frechet_distance(sa[0], sa[1], sb[0], sb[1])
    np.savez_compressed(case / "maths_a_stats.npz", mu=sa[0], sigma=sa[1])
    maths_kid = kid_features_to_metric(torch.from_numpy(maths_a), torch.from_numpy(maths_b), kid_subsets=20, kid_subset_size=100, kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1, rng_seed=2020, verbose=False)
    maths_isc = isc_features_to_metric(torch.from_numpy(maths_logits), splits=10, shuffle=True, rng_seed=2020)

    # Two small .pth files of the same tensors, in torch's zip and legacy formats.
    sample = {k: full[k] for k in ("Conv2d_1a_3x3.conv.weight", "Conv2d_1a_3x3.bn.running_var", "fc.bias")}
    torch.save(sample, case / "sample_zip.pth")
    torch.save(sample, case / "sample_legacy.pth", _use_new_zipfile_serialization=False)

    # clean-fid's "clean" resize (PIL bicubic on float channels): up to 299² (its size), and
    # down (antialiased) to odd sizes, since the filter's support widens when downscaling.
    from cleanfid.resize import make_resizer

    png0 = np.asarray(PIL.Image.open(png_files[0]).convert("RGB"))
    jpeg0 = np.asarray(PIL.Image.open(jpeg_files[0]).convert("RGB"))
    big = crops(1, (225, 300), seed=4)[0]
    clean = {
        "clean_png0_299": make_resizer("PIL", False, "bicubic", (299, 299))(png0),
        "clean_jpeg0_37x29": make_resizer("PIL", False, "bicubic", (37, 29))(jpeg0),
        "clean_big_150x113": make_resizer("PIL", False, "bicubic", (150, 113))(big),
        "clean_big_input": big,
    }
    save_file({k: np.ascontiguousarray(v) for k, v in clean.items()}, str(case / "clean_resize.safetensors"))

    save_file(
        {
            "fid_png": fid_png.astype(np.float32),
            "small_input": np.ascontiguousarray(small),
            "small_pool3": small_pool3,
            "fid_jpeg": fid_jpeg.astype(np.float32),
            "fidelity_png_pool3": fidelity["png"][0].numpy(),
            "fidelity_png_logits": fidelity["png"][1].numpy(),
            "fidelity_jpeg_pool3": fidelity["jpeg"][0].numpy(),
            "fidelity_jpeg_logits": fidelity["jpeg"][1].numpy(),
            "maths_a": maths_a,
            "maths_b": maths_b,
            "maths_logits": maths_logits,
            "sample_conv": sample["Conv2d_1a_3x3.conv.weight"].numpy(),
            "sample_running_var": sample["Conv2d_1a_3x3.bn.running_var"].numpy(),
            "sample_fc_bias": sample["fc.bias"].numpy(),
        },
        str(case / "reference.safetensors"),
    )
    manifest = {
        "kind": "metrics",
        "reference": f"pytorch-fid {pytorch_fid.__version__}, torch-fidelity {torch_fidelity.__version__}, torch {torch.__version__}, numpy {np.__version__}, Pillow {PIL.__version__}, scikit-image {skimage.__version__}",
        "formula": "splitmix64(fnv1a64(key) ^ i) >> 40, times 2^-23, minus 1, times f32(scale); conv/fc weights scale sqrt(3/fan_in), fc.bias 0.1, bn.weight 1 + 0.2 u, bn.bias 0.2 u",
        "fid_png_jpeg": fid_value,
        "fidelity_kid_png_jpeg": {"subsets": 10, "subset_size": 5, **kid_small},
        "fidelity_isc_png_jpeg": {"splits": 3, **isc_small},
        "maths_fid": maths_fid,
        "maths_kid": {"subsets": 20, "subset_size": 100, **maths_kid},
        "maths_isc": {"splits": 10, **maths_isc},
    }
    (case / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {case}: FID {fid_value:.6f}, maths FID {maths_fid:.6f}")
