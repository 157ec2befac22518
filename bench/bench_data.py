"""Can the data pipeline feed the model? The training transform's CPU cost per image (normalised on the CPU
vs uint8 pixels normalised on the device), the bytes each image sends to the device, the loader's images/s
for 0, 1, 2 and the default number of workers, and beside them the model's own training images/s for one spec.

    python bench/bench_data.py                                  # ViT-B/16 224 px, U-Tuning dual, on the CPU
    python bench/bench_data.py --device cuda --batch 128        # the same on a GPU

Images: ``--images`` random RGB PIL images of ``--source-size`` held in memory (a decoded dataset; JPEG
decoding is not counted), through utune's real training transform for the model (``data.augment: timm``:
random-resized crop, flip, colour jitter). CPU cost is ``time.process_time`` per image in one thread.
The loader's rate is over ``--batches`` batches, worker start-up included. The model's rate: the Trainer's optimizer on
uint8 batches normalised on the device, median of ``--steps`` after one warm-up step. The slower of the
two limits training.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.machine import describe_machine, write_results  # noqa: E402
from bench.methods import spec_for  # noqa: E402


class Images:
    """``n`` random RGB images of ``size`` (w, h), labels 0..9, through ``transform``; ``length`` items
    (the images over and over)."""

    def __init__(self, n: int, size: tuple[int, int], transform: Any, length: int | None = None) -> None:
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(0)
        self.images = [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]
        self.transform, self.length = transform, length or n

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.transform(self.images[i % len(self.images)]), i % 10


def cpu_ms_per_image(transform: Any, images: list[Any], repeat: int) -> float:
    """Median over ``repeat`` passes of CPU milliseconds per image (one thread)."""
    passes = []
    for _ in range(repeat):
        t = time.process_time()
        for image in images:
            transform(image)
        passes.append(1000 * (time.process_time() - t) / len(images))
    return statistics.median(passes)


def loader_rate(ds: Images, batch: int, workers: int) -> float:
    """Images per second over one pass of ``ds``, worker start-up included (forked workers: ~0.1 s), so
    that batches the workers had ready before the clock started cannot inflate the rate."""
    from torch.utils.data import DataLoader

    t, n = time.perf_counter(), 0
    for x, _ in DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True):
        n += len(x)
    return n / (time.perf_counter() - t)


def model_rate(args: argparse.Namespace, data_config: dict, norm: Any) -> float:
    import torch
    import torch.nn.functional as F

    from utune.engine.build import build
    from utune.spec.sections import TrainConfig
    from utune.train.optim import build_optimizer

    device = torch.device(args.device)
    model = build(spec_for(args.method, args.model, args.img_size)).model.to(device).train()
    optimizer = build_optimizer(model, TrainConfig(lr=1e-4, device=args.device), device)
    x = torch.randint(0, 256, (args.batch, *data_config["input_size"]), dtype=torch.uint8)
    y = torch.randint(0, 10, (args.batch,), device=device)
    cuda = device.type == "cuda"
    times = []
    for _ in range(args.steps + 1):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            logits = model(norm(x.to(device, non_blocking=True)))
        F.cross_entropy(logits.float(), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return args.batch / statistics.median(times[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--method", default="utuning_dual")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=32, help="loader batch size (and the model's)")
    p.add_argument("--steps", type=int, default=3, help="timed training steps of the model")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--source-size", default="500x375", help="W x H of the source images (FGVC-like)")
    p.add_argument("--repeat", type=int, default=3, help="passes over the images for the CPU cost")
    p.add_argument("--batches", type=int, default=20, help="loader batches timed per worker count")
    p.add_argument("--workers", default="0,1,2,auto")
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--name", default=None)
    args = p.parse_args()

    import timm
    import torch

    from utune.data import InputNorm, default_workers
    from utune.data.datasets.transforms import build_transform

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the transform's cost in one thread, as each loader worker runs it
    base = timm.create_model(args.model, pretrained=False, num_classes=10, img_size=args.img_size)
    data_config = timm.data.resolve_data_config(model=base)
    data_config["input_size"] = (3, args.img_size, args.img_size)
    width, height = (int(v) for v in args.source_size.split("x"))
    cpu_tf = build_transform(data_config, None, training=True)
    raw_tf = build_transform(data_config, None, training=True, device_normalize=True)
    norm = InputNorm.from_data_config(data_config)
    sample = Images(args.images, (width, height), cpu_tf).images
    cost = {"cpu_normalise": cpu_ms_per_image(cpu_tf, sample, args.repeat)}
    cost["uint8"] = cpu_ms_per_image(raw_tf, sample, args.repeat)
    one = raw_tf(sample[0])
    bytes_per_image = {"float32": 4 * one.numel(), "uint8": one.numel() * one.element_size()}
    batch = torch.stack([raw_tf(im) for im in sample[:32]])
    t_norm = time.process_time()
    for _ in range(args.repeat):
        norm(batch)
    # the device step on this CPU, for scale (on a GPU it is one fused-ish elementwise pass: microseconds)
    cost["input_norm_on_cpu"] = 1000 * (time.process_time() - t_norm) / args.repeat / len(batch)
    ds = Images(args.images, (width, height), raw_tf, length=args.batch * args.batches)
    auto = default_workers(None)
    loaders = []
    for w in args.workers.split(","):
        n = auto if w == "auto" else int(w)
        rate = loader_rate(ds, args.batch, n)
        loaders.append({"workers": n, "label": w, "images_per_s": rate})
        print(f"loader, {w} workers ({n}): {rate:.0f} img/s", file=sys.stderr)
    torch.set_num_threads(threads)  # the model trains with every thread, as the Trainer does
    model_ips = None if args.skip_model else model_rate(args, data_config, norm)
    data = {
        "machine": describe_machine(args.device),
        "load_average_end": os.getloadavg()[0],  # other jobs on a shared machine: compare within one run
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "transform": str(raw_tf),
        "cpu_ms_per_image": cost,
        "cpu_saving": 1 - cost["uint8"] / cost["cpu_normalise"],
        "bytes_per_image": bytes_per_image,
        "loader": loaders,
        "default_workers": auto,
        "model_images_per_s": model_ips,
    }
    stem = args.name or f"data_{args.model}_{args.method}_b{args.batch}_{args.img_size}px_{args.device}"
    write_results(args.out, stem, data, markdown(data))
    print(markdown(data))


def markdown(d: dict[str, Any]) -> str:
    a, c, b = d["args"], d["cpu_ms_per_image"], d["bytes_per_image"]
    lines = [
        f"Machine: {d['machine']['summary']}, {d['load_average_end']:.1f} at the end",
        "",
        f"Training transform for {a['model']} at {a['img_size']} px (timm augmentation) on {a['source_size']} "
        f"images, CPU ms per image (one thread): normalised on the CPU **{c['cpu_normalise']:.2f}**, uint8 "
        f"**{c['uint8']:.2f}** ({100 * d['cpu_saving']:.0f} % less; the device then normalises: "
        f"{c['input_norm_on_cpu']:.3f} ms an image if that device is this CPU). Bytes to the device per image: "
        f"{b['float32']:,} as float32, {b['uint8']:,} as uint8 ({b['float32'] / b['uint8']:.0f}x less).",
        "",
        f"| what | images/s (batch {a['batch']}) |",
        "|---|---:|",
    ]
    for r in d["loader"]:
        label = f"{r['workers']} (default here)" if r["label"] == "auto" else r["label"]
        lines.append(f"| loader, {label} workers | {r['images_per_s']:.0f} |")
    if d["model_images_per_s"] is not None:
        lines.append(f"| model training, {a['method']} on {a['device']} | {d['model_images_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
