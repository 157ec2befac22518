"""Turn the Fashion-MNIST pre-training run into the backbone file the quickstart and the benchmark ship.

    utune apply quickstart/pretrain.yaml --train --out runs/quickstart-pretrain     # ~13 min on 2 CPU cores
    python quickstart/ship_backbone.py runs/quickstart-pretrain   # writes quickstart/vit_fmnist6.safetensors

Steps, all through utune's own code: ``eval_run`` scores the run's final checkpoint on the Fashion-MNIST
test set (what ``utune eval RUN --split test`` prints); ``utune.runs.load_run`` rebuilds the trained model
and ``merged_state_dict`` writes it keyed like the plain timm model (it has no tuners, so nothing is folded).
The classifier head is then **zeroed**: downstream tasks get a fresh head, not Fashion-MNIST's class weights
(utune's loader keeps a file's head whenever the class count matches). The Fashion-MNIST accuracy on the
pre-training classes, those classes, the model kwargs and the source run go into the file's metadata.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="the pre-training run folder (utune apply quickstart/pretrain.yaml --train)")
    p.add_argument("-o", "--output", type=Path, default=HERE / "vit_fmnist6.safetensors")
    p.add_argument("--checkpoint", default="latest", choices=("latest", "best"), help="default: the final one")
    p.add_argument("--fp16", action="store_true", help="store half-precision tensors (only needed above 5 MB)")
    args = p.parse_args(argv)
    os.environ.setdefault("UTUNE_QUIET", "1")
    from safetensors.torch import save_file

    from utune.export import merged_state_dict
    from utune.runs import eval_run, load_run

    ev = eval_run(args.run, split="test", which=args.checkpoint)
    classes = built_classes(args.run)
    print(
        f"Fashion-MNIST test accuracy (classes {classes}) of {ev['checkpoint']}: "
        f"{100 * ev['acc']:.2f} % on {ev['n']} images"
    )
    built = load_run(args.run, which=args.checkpoint)
    state = {k: v.detach().clone().contiguous() for k, v in merged_state_dict(built).state.items()}
    heads = [k for k in state if k.startswith("head.")]
    for k in heads:
        state[k].zero_()
    if args.fp16:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    m = built.spec.model
    spec_text = (args.run / "spec.yaml").read_text()
    meta = {
        "format": "pt",
        "model_name": m.name,
        "model_kwargs": json.dumps(dict(m.kwargs), sort_keys=True),
        "pretrained_on": f"fashion-mnist classes {classes} ({6000 * len(classes):,} train images)",
        "fmnist_classes": json.dumps(classes),
        "fmnist_test_acc": f"{ev['acc']:.4f}",
        "fmnist_test_n": str(ev["n"]),
        "head": "zeroed: a fresh head for the downstream task (" + ", ".join(heads) + ")",
        "source_run": str(args.run),
        "source_checkpoint": str(Path(ev["checkpoint"]).name),
        "pretrain_spec_sha256": hashlib.sha256(spec_text.encode()).hexdigest(),
        "dtype": "float16" if args.fp16 else "float32",
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.output), metadata=meta)
    n = sum(t.numel() for t in state.values())
    size = args.output.stat().st_size
    print(f"wrote {args.output}: {len(state)} tensors, {n:,} parameters, {size / 2**20:.2f} MiB ({meta['dtype']})")
    if size > 5 * 2**20:
        print("warning: above 5 MiB; pass --fp16", file=sys.stderr)
    # the file must load strictly into the plain model, as model.pretrained does
    from utune.models import create_model

    create_model(m.name, pretrained=args.output, num_classes=m.num_classes, kwargs=dict(m.kwargs))
    print("checked: loads into", m.name, "with", json.dumps(dict(m.kwargs)))
    return 0


def built_classes(run: Path) -> list[int]:
    """The Fashion-MNIST classes the run trained on (``data.classes``; all ten when not set)."""
    from utune.runs import recorded_spec

    return list(recorded_spec(run).data.classes or range(10))


if __name__ == "__main__":
    sys.exit(main())
