"""LoRA against full fine-tuning: trainable parameters, peak memory and step time of one training step.

    python -m nnunet_meddinov3.benchmark.lora_cost --encoder meddinov3_vitl16 --patch 896 --mode lora \
        --rank 8 --warmup 1 --repeats 2

One configuration per process, so the peak RSS (``ru_maxrss``) is that configuration's alone; run it once
per mode and encoder. The network is MedDINOv3Net with the multiscale decoder and the recipe's drop path;
the optimiser is the trainer's (AdamW groups from :func:`~nnunet_meddinov3.training.optim.parameter_groups`,
LoRA adapters added exactly as the trainer adds them); the step is forward, cross-entropy, backward,
``clip_grad_norm_(12)``, optimiser step and ``loss.item()`` (nnU-Net's loss adds a Dice term, a negligible
cost next to a ViT at 896 px). Prints one JSON line, with the RSS the first forward adds and the exact bytes
autograd saves for backward (``--forward-only`` stops there: for encoders whose full step does not fit).
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
            classes: int = 16, batch: int = 1, grad_checkpointing: bool = False, forward_only: bool = False) -> dict:
    torch.manual_seed(0)
    network = MedDINOv3Net(1, classes, encoder=encoder, decoder="multiscale", drop_path_rate=recipe.DROP_PATH_RATE,
                           autocast_dtype=None, grad_checkpointing=grad_checkpointing)
    if mode == "lora":
        lora.add_lora(network.encoder, rank, alpha, targets)
    optimizer = build_adamw(parameter_groups(network, encoder_lr=recipe.ENCODER_LR, decoder_lr=recipe.DECODER_LR,
                                             weight_decay=recipe.WEIGHT_DECAY))
    trainable = [p for p in network.parameters() if p.requires_grad]
    x = torch.randn(batch, 1, patch, patch)
    y = torch.randint(0, classes, (batch, patch, patch))
    network.train()
    rss_built = _current_rss_bytes()

    # The first forward's RSS growth, and the exact bytes autograd saves for backward (unique storages
    # other than the parameters): the RSS also holds what the forward freed but the allocator kept.
    held, saved, saved_by_encoder = [], {}, []
    parameter_storages = {p.untyped_storage()._cdata for p in network.parameters()}

    def record(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in parameter_storages:
            saved[storage._cdata] = storage.nbytes()
        return t

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        before = _current_rss_bytes()
        if held:
            loss = torch.nn.functional.cross_entropy(network(x), y)
        else:
            encoder_forward = network.encoder.intermediate_tokens

            def counted_encoder_forward(*args, **kwargs):  # what is saved by the time the encoder is done
                tokens = encoder_forward(*args, **kwargs)
                saved_by_encoder.append(sum(saved.values()))
                return tokens

            network.encoder.intermediate_tokens = counted_encoder_forward
            try:
                with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
                    loss = torch.nn.functional.cross_entropy(network(x), y)
            finally:
                del network.encoder.intermediate_tokens
            after = _current_rss_bytes()
            held.append(after - before if before is not None and after is not None else None)
        if forward_only:
            return loss.item()
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
        "grad_checkpointing": grad_checkpointing,
        "rss_after_build_gib": round(rss_built / 2 ** 30, 2) if rss_built else None,
        "forward_only": forward_only,
        "forward_held_gib": round(held[0] / 2 ** 30, 3) if held and held[0] is not None else None,
        "saved_for_backward_gib": round(sum(saved.values()) / 2 ** 30, 3),
        "saved_by_encoder_gib": round(saved_by_encoder[0] / 2 ** 30, 3) if saved_by_encoder else None,
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
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="recompute the encoder blocks in backward (the planner's grad_checkpointing)")
    parser.add_argument("--forward-only", action="store_true",
                        help="the forward of one step only: what it keeps for backward, without the backward's peak")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.encoder, args.patch, args.mode, args.rank, args.alpha, args.targets,
                             args.warmup, args.repeats, batch=args.batch,
                             grad_checkpointing=args.grad_checkpointing, forward_only=args.forward_only)))


if __name__ == "__main__":
    main()
