"""Peak memory of the teacher's centring per optimiser step: whole global batch vs one micro-batch.

Runs pretrain/engine/teacher_targets.py's centring on teacher logits of the sizes a config gives
(bf16, as the teacher's heads produce them under bf16 autocast) in a fresh process per mode, and
prints the peak resident memory above the process's baseline. On a GPU the same tensors are
allocated by the caching allocator, so the figures carry over to the GPU's memory to within its
allocator's rounding.

    python scripts/bench_centring_memory.py                       # vitb16_stage1: 512 images, 1 rank
    python scripts/bench_centring_memory.py --images 256 --micro 64   # its share of 2 GPUs x 64 x 4

The iBOT rows are the masked patches: half of the global crops masked, ratios stratified over
``masking.ratio``, so ``probability * mean(ratio) * patches`` per global crop on average.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure(mode: str, images: int, micro: int, prototypes: int, masked_per_image: int) -> dict:
    import torch

    from pretrain.engine.teacher_targets import TeacherPass, centred_targets

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)

    def one_pass(n: int) -> TeacherPass:
        # made in bf16 directly: a float32 randn first would itself be the peak
        return TeacherPass(None, torch.randn(2 * n, prototypes, generator=g, dtype=torch.bfloat16),
                           torch.randn(n * masked_per_image, prototypes, generator=g, dtype=torch.bfloat16))

    torch.randn(8, 8)  # the allocator's first arena, outside the figure
    base = _rss_mib()
    if mode == "global_batch":
        passes = [one_pass(micro) for _ in range(images // micro)]
        targets = centred_targets(passes, 0.04, 3)
        held = sum(t[k].numel() * t[k].element_size() for t in targets for k in t)
    else:
        held = 0
        for _ in range(images // micro):
            targets = centred_targets([one_pass(micro)], 0.04, 3)
            held = max(held, sum(t[k].numel() * t[k].element_size() for t in targets for k in t))
            del targets
    return {"mode": mode, "peak_mib": round(_rss_mib() - base), "targets_held_mib": round(held / 2**20)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512, help="images per rank per optimiser step")
    parser.add_argument("--micro", type=int, default=64, help="images per micro-batch (data.batch_size)")
    parser.add_argument("--prototypes", type=int, default=65536)
    parser.add_argument("--patches", type=int, default=196, help="patches per global crop (224 px / 16)")
    parser.add_argument("--child", choices=["global_batch", "micro_batch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    # vitb16_stage1's masking: probability 0.5 of the 2 global crops, ratio 0.1-0.5 (mean 0.3)
    masked_per_image = round(2 * 0.5 * 0.3 * args.patches)
    if args.child:
        print(json.dumps(_measure(args.child, args.images, args.micro, args.prototypes, masked_per_image)))
        return
    print(f"{args.images} images per rank per step, micro-batches of {args.micro}, {args.prototypes} prototypes, "
          f"~{masked_per_image} masked patches per image (bf16 logits)")
    for mode in ("micro_batch", "global_batch"):
        out = subprocess.run([sys.executable, __file__, "--images", str(args.images), "--micro", str(args.micro),
                              "--prototypes", str(args.prototypes), "--patches", str(args.patches),
                              "--child", mode], capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  loss.centre_over={mode:13s} peak {result['peak_mib']:>6} MiB, centred targets held during "
              f"the micro-steps {result['targets_held_mib']:>6} MiB")


if __name__ == "__main__":
    main()
