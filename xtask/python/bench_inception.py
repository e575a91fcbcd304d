"""Times pytorch-fid's InceptionV3 (pool3 features) on 200 images at 299², batches of 50, random
weights; prints one JSON line. The Rust side is benches/inception_timing.rs; `cargo xtask
bench-metrics` runs both and prints the ratio."""

import argparse
import json
import resource
import statistics
import time

import torch
import pytorch_fid.inception as fid_inception


def network() -> torch.nn.Module:
    # fid_inception_v3() without its download: the same modules, random weights.
    net = fid_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = fid_inception.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = fid_inception.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = fid_inception.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = fid_inception.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = fid_inception.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = fid_inception.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = fid_inception.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = fid_inception.FIDInceptionE_1(1280)
    net.Mixed_7c = fid_inception.FIDInceptionE_2(2048)
    fid_inception.fid_inception_v3 = lambda: net
    return fid_inception.InceptionV3([3]).eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="fid")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = network()
    x = torch.rand(50, 3, 299, 299)
    times = []
    with torch.inference_mode():
        model(x)  # warm-up
        for _ in range(args.runs):
            start = time.perf_counter()
            for _ in range(4):
                model(x)[0].numpy()
            times.append(time.perf_counter() - start)
    print(json.dumps({
        "backend": f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "latent": "200 images at 299², batches of 50",
        "median_s": statistics.median(times),
        "min_s": min(times),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()
