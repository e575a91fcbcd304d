"""Super-resolution references: Real-ESRGAN's two generators written here in torch from the
papers (ESRGAN, Wang et al. 2018, §3.1 and Fig. 4: RRDB with dense blocks and residual scaling
0.2, nearest x2 upsampling twice; Real-ESRGAN, Wang et al. 2021: the x2 model's pixel-unshuffled
input, and the compact SRVGG network with PReLU, pixel shuffle and the nearest-upsampled input
added), with the key names of the released files, random weights, tiny widths.

Called by make_fixtures.py (`--only upscale`). tests/fixtures/upscale/ holds

- `rrdb_x4.pth` (BasicSR's `{"params_ema": ..., "params": ...}`, torch.save's zip format),
  `rrdb_x2.pth` (legacy, non-zip torch.save, `params_ema` only), `compact_x4.safetensors` and
  `compact_x4.pth` (bare state dicts);
- `reference.safetensors`: `input` ([1, 3, 12, 10] in [0, 1]) and each model's raw output
  (`<name>.output`, unclamped);
- `manifest.json`: the shapes.
"""

import json
import pathlib
import shutil

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file


class ResidualDenseBlock(nn.Module):
    def __init__(self, nf, gc):
        super().__init__()
        self.conv1 = nn.Conv2d(nf, gc, 3, 1, 1)
        self.conv2 = nn.Conv2d(nf + gc, gc, 3, 1, 1)
        self.conv3 = nn.Conv2d(nf + 2 * gc, gc, 3, 1, 1)
        self.conv4 = nn.Conv2d(nf + 3 * gc, gc, 3, 1, 1)
        self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, 1, 1)

    def forward(self, x):
        lrelu = lambda t: F.leaky_relu(t, 0.2)
        x1 = lrelu(self.conv1(x))
        x2 = lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x


class RRDB(nn.Module):
    def __init__(self, nf, gc):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(nf, gc)
        self.rdb2 = ResidualDenseBlock(nf, gc)
        self.rdb3 = ResidualDenseBlock(nf, gc)

    def forward(self, x):
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    def __init__(self, scale, nf, nb, gc):
        super().__init__()
        self.scale = scale
        unshuffle = 4 // scale
        self.conv_first = nn.Conv2d(3 * unshuffle * unshuffle, nf, 3, 1, 1)
        self.body = nn.Sequential(*[RRDB(nf, gc) for _ in range(nb)])
        self.conv_body = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_hr = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, 3, 3, 1, 1)

    def forward(self, x):
        if self.scale < 4:
            x = F.pixel_unshuffle(x, 4 // self.scale)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        lrelu = lambda t: F.leaky_relu(t, 0.2)
        feat = lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(lrelu(self.conv_hr(feat)))


class SRVGGNetCompact(nn.Module):
    def __init__(self, nf, num_conv, upscale):
        super().__init__()
        self.upscale = upscale
        layers = [nn.Conv2d(3, nf, 3, 1, 1), nn.PReLU(num_parameters=nf)]
        for _ in range(num_conv):
            layers += [nn.Conv2d(nf, nf, 3, 1, 1), nn.PReLU(num_parameters=nf)]
        layers.append(nn.Conv2d(nf, 3 * upscale * upscale, 3, 1, 1))
        self.body = nn.ModuleList(layers)

    def forward(self, x):
        out = x
        for layer in self.body:
            out = layer(out)
        return F.pixel_shuffle(out, self.upscale) + F.interpolate(x, scale_factor=self.upscale, mode="nearest")


def jitter(model, generator):
    """Random weights around torch's initialisation; PReLU slopes spread around 0.25."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))


def write_upscale_cases(root: pathlib.Path) -> None:
    out = root / "upscale"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    generator = torch.Generator().manual_seed(4242)
    torch.manual_seed(4242)
    image = torch.rand(1, 3, 12, 10, generator=generator)
    tensors = {"input": image}
    manifest = {"tolerance": 1e-4, "models": {}}
    models = {
        "rrdb_x4": (RRDBNet(4, nf=8, nb=2, gc=4), dict(kind="rrdb", scale=4, features=8, blocks=2, growth=4)),
        "rrdb_x2": (RRDBNet(2, nf=8, nb=1, gc=4), dict(kind="rrdb", scale=2, features=8, blocks=1, growth=4)),
        "compact_x4": (SRVGGNetCompact(nf=8, num_conv=3, upscale=4), dict(kind="compact", scale=4, features=8, convs=3)),
    }
    for name, (model, shape) in models.items():
        jitter(model, generator)
        model.eval()
        with torch.no_grad():
            tensors[f"{name}.output"] = model(image).contiguous()
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        if name == "rrdb_x4":
            # BasicSR's layout: the EMA weights and the raw ones (different, as after training).
            raw = {k: v + 0.01 for k, v in sd.items()}
            torch.save({"params_ema": sd, "params": raw}, out / f"{name}.pth")
            files = [f"{name}.pth"]
        elif name == "rrdb_x2":
            torch.save({"params_ema": sd}, out / f"{name}.pth", _use_new_zipfile_serialization=False)
            files = [f"{name}.pth"]
        else:
            torch.save(sd, out / f"{name}.pth")
            save_file(sd, out / f"{name}.safetensors")
            files = [f"{name}.pth", f"{name}.safetensors"]
        manifest["models"][name] = dict(shape, files=files, output=list(tensors[f"{name}.output"].shape))
    save_file(tensors, out / "reference.safetensors")
    manifest["reference"] = f"torch {torch.__version__}, the generators written from the papers with Real-ESRGAN's key names"
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {out}: {', '.join(models)}")
