"""Peak memory (CPU peak RSS) of one training step of a model with and without gradient
checkpointing (timm's `set_grad_checkpointing()`, the recipe field `model.grad_checkpointing`).

Each setting runs in its own process, so each peak is its own: the model is built (train mode,
float32), then one step: the training forward (SiT: `forward_train`, whose RTSM-recovered block
tokens feed the FRD loss), a loss on every output, backward. The step's own memory is the peak
minus the RSS after the build (weights and their gradients' first allocation aside).

    python scripts/grad_checkpoint_memory.py sit_l --img-size 288 --batch 4
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(name: str, img_size: int, batch: int, enable: bool) -> dict:
    import torch

    import riformer  # noqa: F401  (registers the models before timm is used)
    import timm

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=img_size).train()
    model.set_grad_checkpointing(enable)
    images = torch.randn(batch, 3, img_size, img_size)
    built = rss_mib()
    out = model.forward_train(images) if hasattr(model, "forward_train") else model(images)
    tensors = [t for t in (out if isinstance(out, tuple) else (out,)) for t in (t if isinstance(t, list) else [t])]
    sum(t.float().pow(2).mean() for t in tensors).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"grad_checkpointing": enable, "rss_after_build_mib": round(built), "peak_rss_mib": round(peak),
            "step_mib": round(peak - built)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="sit_l")
    parser.add_argument("--img-size", type=int, default=288)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.img_size, args.batch, args.child == "on")))
        return
    rows = []
    for setting in ("off", "on"):
        done = subprocess.run([sys.executable, __file__, args.model, "--img-size", str(args.img_size),
                               "--batch", str(args.batch), "--child", setting],
                              capture_output=True, text=True, check=False)
        if done.returncode:
            sys.exit(f"{args.model} with checkpointing {setting} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{args.model}, batch {args.batch} at {args.img_size} px, float32, CPU peak RSS (MiB):")
    for row in rows:
        print(f"  grad_checkpointing {'on ' if row['grad_checkpointing'] else 'off'}: peak {row['peak_rss_mib']}, "
              f"after build {row['rss_after_build_mib']}, the step {row['step_mib']}")
    off, on = rows
    print(f"  the step's memory with checkpointing: {on['step_mib'] / max(off['step_mib'], 1):.2f} of without")


if __name__ == "__main__":
    main()
