"""LoRA against full fine-tuning: trainable parameters, peak memory and step time of one training step.

    python -m nnunet_meddinov3.benchmark.lora_cost --encoder meddinov3_vitl16 --patch 896 --mode lora \
        --rank 8 --warmup 1 --repeats 2

One configuration per process, so the peak RSS (``ru_maxrss``) is that configuration's alone; run it once
per mode and encoder. The network is MedDINOv3Net with the multiscale decoder and the recipe's drop path;
the optimiser is the trainer's (AdamW groups from :func:`~nnunet_meddinov3.training.optim.parameter_groups`,
LoRA adapters added exactly as the trainer adds them); the step is forward, cross-entropy, backward,
``clip_grad_norm_(12)``, optimiser step and ``loss.item()`` (nnU-Net's loss adds a Dice term, a negligible
cost next to a ViT at 896 px). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from nnunet_meddinov3.benchmark.measure import GRAD_CLIP_NORM, _current_rss_bytes, _peak_rss_bytes
from nnunet_meddinov3.network import MedDINOv3Net, lora
from nnunet_meddinov3.training import recipe
from nnunet_meddinov3.training.optim import build_adamw, parameter_groups


def measure(encoder: str, patch: int, mode: str, rank: int, alpha: float, targets: str, warmup: int, repeats: int,
            classes: int = 16, batch: int = 1) -> dict:
    torch.manual_seed(0)
    network = MedDINOv3Net(1, classes, encoder=encoder, decoder="multiscale", drop_path_rate=recipe.DROP_PATH_RATE,
                           autocast_dtype=None)
    if mode == "lora":
        lora.add_lora(network.encoder, rank, alpha, targets)
    optimizer = build_adamw(parameter_groups(network, encoder_lr=recipe.ENCODER_LR, decoder_lr=recipe.DECODER_LR,
                                             weight_decay=recipe.WEIGHT_DECAY))
    trainable = [p for p in network.parameters() if p.requires_grad]
    x = torch.randn(batch, 1, patch, patch)
    y = torch.randint(0, classes, (batch, patch, patch))
    network.train()
    rss_built = _current_rss_bytes()

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(network(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, GRAD_CLIP_NORM)
        optimizer.step()
        return loss.item()

    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    counts = lora.parameter_counts(network)
    encoder_counts = lora.parameter_counts(network.encoder)
    return {
        "encoder": encoder, "patch": patch, "batch": batch, "mode": mode,
        "lora": {"rank": rank, "alpha": alpha, "targets": targets} if mode == "lora" else None,
        "params_total": counts["total"], "params_trainable": counts["trainable"],
        "encoder_params_trainable": encoder_counts["trainable"], "encoder_params_total": encoder_counts["total"],
        "rss_after_build_gib": round(rss_built / 2 ** 30, 2) if rss_built else None,
        "peak_rss_gib": round(_peak_rss_bytes() / 2 ** 30, 2),
        "step_s": [round(t, 2) for t in times], "step_s_median": round(sorted(times)[len(times) // 2], 2),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", default="meddinov3_vitb16")
    parser.add_argument("--patch", type=int, default=896)
    parser.add_argument("--mode", choices=("full", "lora"), required=True)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=recipe.LORA_ALPHA)
    parser.add_argument("--targets", default=recipe.LORA_TARGETS)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.encoder, args.patch, args.mode, args.rank, args.alpha, args.targets,
                             args.warmup, args.repeats)))


if __name__ == "__main__":
    main()
