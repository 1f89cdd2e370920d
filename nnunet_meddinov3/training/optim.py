"""Parameter groups (encoder vs decoder LR, layer-wise decay, freezing) and the LR schedule."""
from __future__ import annotations

import re

import torch
import torch.nn as nn


def encoder_layer_id(name: str, depth: int) -> int:
    """0 for the embeddings, i + 1 for block i, depth + 1 for the final norm (BEiT convention)."""
    match = re.search(r"blocks\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    if any(part in name for part in ("patch_embed", "cls_token", "reg_token", "rope")):
        return 0
    return depth + 1


def group_base_lr(name: str, depth: int, *, encoder_lr: float, decoder_lr: float, layer_decay: float = 1.0) -> float:
    """The peak LR of a group made by :func:`parameter_groups`, from its name: ``decoder`` or
    ``encoder_level{L}`` (``encoder_lr * layer_decay ** (depth + 1 - L)``). Used when a resumed run
    re-applies its recipe to the optimizer state it restored."""
    if name == "decoder":
        return decoder_lr
    match = re.fullmatch(r"encoder_level(\d+)", name)
    if match is None:
        raise ValueError(f"not a MedDINOv3 parameter group name: {name!r}")
    return encoder_lr * layer_decay ** (depth + 1 - int(match.group(1)))


def parameter_groups(network: nn.Module, *, encoder_lr: float, decoder_lr: float, weight_decay: float,
                     layer_decay: float = 1.0, freeze_encoder: bool = False) -> list[dict]:
    """AdamW groups for a MedDINOv3Net: the new parts first, as group ``decoder`` (the decoder and, in the
    3D network, the slice context: all that is not the pretrained encoder; nnU-Net logs group 0's LR), then the
    encoder, one group per depth level when ``layer_decay`` < 1 (block i gets
    ``encoder_lr * layer_decay ** (depth + 1 - (i + 1))``). A frozen encoder gets no group and
    ``requires_grad=False``, so it costs no optimizer state.
    """
    encoder = network.encoder
    depth = encoder.depth
    new_parts = [p for name, p in network.named_parameters() if not name.startswith("encoder.") and p.requires_grad]
    groups = [{"name": "decoder", "params": new_parts,
               "lr": decoder_lr, "base_lr": decoder_lr, "weight_decay": weight_decay}]
    if freeze_encoder:
        for p in encoder.parameters():
            p.requires_grad_(False)
        return groups
    by_level: dict[int, list] = {}
    for name, p in encoder.named_parameters():
        if p.requires_grad:
            level = encoder_layer_id(name, depth) if layer_decay != 1.0 else depth + 1
            by_level.setdefault(level, []).append(p)
    for level in sorted(by_level):
        name = f"encoder_level{level}"
        lr = group_base_lr(name, depth, encoder_lr=encoder_lr, decoder_lr=decoder_lr, layer_decay=layer_decay)
        groups.append({"name": name, "params": by_level[level], "lr": lr, "base_lr": lr,
                       "weight_decay": weight_decay})
    return groups


ADAMW_BETAS = (0.9, 0.98)
_FUSED_ADAMW_DEVICES = {"cpu", "cuda"}


def build_adamw(groups: list[dict]) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.98) over ``groups``, with torch's fused kernel where every parameter is
    on a device that has it: one pass over ~110M ViT-B parameters instead of a dozen (on a 2-core
    CPU 0.05 s per step instead of 0.27 s); same update, same state-dict layout."""
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = bool(devices) and devices <= _FUSED_ADAMW_DEVICES
    return torch.optim.AdamW(groups, betas=ADAMW_BETAS, fused=fused or None)


class WarmupLinearDecayLR:
    """Linear warm-up over ``warmup_epochs`` then linear decay to 0 at ``total_epochs``.

    nnU-Net steps its scheduler once per epoch with the epoch index (``step(current_epoch)``), so
    the LR is a pure function of the epoch and resuming with ``--c`` needs no scheduler state.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_epochs: int, warmup_epochs: int = 0):
        self.optimizer = optimizer
        self.total_epochs = total_epochs
        self.warmup_epochs = warmup_epochs
        self.step(0)

    def factor(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return (epoch + 1) / (self.warmup_epochs + 1)
        decay_epochs = max(self.total_epochs - self.warmup_epochs, 1)
        return max(0.0, 1.0 - (epoch - self.warmup_epochs) / decay_epochs)

    def step(self, current_epoch: int) -> None:
        f = self.factor(current_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * f

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"total_epochs": self.total_epochs, "warmup_epochs": self.warmup_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.total_epochs, self.warmup_epochs = state["total_epochs"], state["warmup_epochs"]
