"""Time ``relayops evaluate``'s features: N images of 64x64 (crops of scikit-image's photographs,
written as PNG files), read from a folder, Inception features on the CPU with T threads.

    python bench/evaluate_speed.py                  # 1,000 images, 2 threads
    python bench/evaluate_speed.py --num 200 --threads 1

Prints the wall time, the process's CPU time and images per second; the folder is written
before the clock starts. Needs the [eval] and [train] extras.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from relayops import evaluate
from relayops.training.data import CropDataset, builtin_images, save_png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        crops = CropDataset(builtin_images("train"), 64, crop_scale=(1.0, 3.0), flip=False, seed=0)
        for i in range(args.num):
            save_png(crops.sample(i)[0], Path(tmp) / f"{i:05d}.png")
        evaluate.load_inception("cpu")  # loading (about a second) is not part of the rate
        wall, cpu = time.perf_counter(), time.process_time()
        features = evaluate.inception_features(tmp, batch_size=args.batch, device="cpu")
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert features.pool.shape == (args.num, evaluate.POOL_DIM)
    print(json.dumps({"images": args.num, "size": "64x64", "threads": args.threads, "batch": args.batch,
                      "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "images_per_s": round(args.num / wall, 2),
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
