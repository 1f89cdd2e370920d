"""LoRA adapters on a DINOv3 encoder's linear layers, with Hugging Face ``peft``.

:func:`add_lora` wraps the chosen linear layers of every block (``qkv``, ``proj``: attention; ``mlp``:
every linear layer of the MLP, SwiGLU ones included) in peft's ``lora.Linear`` and freezes every
other encoder parameter. The wrapped layers keep their original weights as ``base_layer``, so a
network's state dict holds the base weights unchanged (``...qkv.base_layer.weight``) next to the
adapters (``...qkv.lora_A.default.weight`` / ``lora_B``), and the adapters' settings as the extra
state of ``encoder.lora`` (:class:`LoRARecord`).

A network built without adapters takes such a state dict too: :func:`merge_adapters_on_load`
folds ``W + scaling * B @ A`` into each plain layer while it loads (what ``nnUNetv2_predict`` does,
since it rebuilds the network from the plans alone). :func:`merged_state_dict` is the same merge on a
state dict (``meddinov3 weights merge-lora``).

peft is imported only when adapters are added, so everything else runs without it.
"""
from __future__ import annotations

import contextlib
import re

import torch
import torch.nn as nn

from nnunet_meddinov3.network.configs import LORA_TARGET_NAMES as TARGETS
from nnunet_meddinov3.network.timm_adapter import route_qkv_through_module

RECORD_NAME = "lora"  # encoder.lora: the LoRARecord
_ADAPTER = "default"  # peft's adapter name (one adapter per network)
_BLOCK_LINEAR = re.compile(r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.\w+)")
INSTALL_HINT = "pip install 'nnunet-meddinov3[lora]'  (or: pip install 'peft>=0.21')"


class LoRAUnavailable(ImportError):
    """peft is missing; the message says what to install."""


def parse_targets(targets) -> tuple[str, ...]:
    """``"qkv,proj"`` or a sequence of names -> the names in :data:`TARGETS` order; ValueError otherwise."""
    names = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets)]
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not any(names):
        raise ValueError(f"LoRA targets must be a comma-separated subset of {', '.join(TARGETS)}; got {targets!r}")
    return tuple(t for t in TARGETS if t in names)


def _target_kind(name: str) -> str | None:
    match = _BLOCK_LINEAR.fullmatch(name)
    if match is None:
        return None
    return "mlp" if match.group(1).startswith("mlp.") else match.group(1).split(".")[1]


def target_layer_names(vit: nn.Module, targets) -> list[str]:
    """The names (inside ``vit``) of the linear layers that get adapters for ``targets``."""
    wanted = set(parse_targets(targets))
    return [name for name, module in vit.named_modules()
            if isinstance(module, nn.Linear) and _target_kind(name) in wanted]


class LoRARecord(nn.Module):
    """The adapters' settings, carried in the state dict (``encoder.lora._extra_state``) so a
    checkpoint says how to merge its adapters without any other file."""

    def __init__(self, rank: int, alpha: float, targets):
        super().__init__()
        self.rank, self.alpha, self.targets = int(rank), float(alpha), parse_targets(targets)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank  # peft's LoRA scaling (no rsLoRA)

    def settings(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": ",".join(self.targets), "scaling": self.scaling}

    def get_extra_state(self) -> dict:
        return self.settings()

    def set_extra_state(self, state: dict) -> None:
        if state != self.settings():
            raise ValueError(f"the checkpoint's LoRA adapters were trained with {state}, this network has "
                             f"{self.settings()}; build the network with the checkpoint's lora_rank / lora_alpha / "
                             f"lora_targets")

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.settings().items())


def lora_record(encoder: nn.Module) -> LoRARecord | None:
    return getattr(encoder, RECORD_NAME, None) if isinstance(getattr(encoder, RECORD_NAME, None), LoRARecord) else None


def _import_peft():
    try:
        import peft
    except ImportError as e:
        raise LoRAUnavailable(f"LoRA fine-tuning (lora_rank > 0) needs the peft package, which is not installed "
                              f"({e}). Install it: {INSTALL_HINT}") from None
    return peft


def add_lora(encoder: nn.Module, rank: int, alpha: float, targets) -> LoRARecord:
    """Wrap ``encoder``'s target layers in LoRA adapters (B = 0: the output is unchanged until they
    train) and freeze everything else in the encoder. Calling it again with the same settings does
    nothing; other settings raise ValueError."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    wanted = LoRARecord(rank, alpha, targets)
    existing = lora_record(encoder)
    if existing is not None:
        if existing.settings() != wanted.settings():
            raise ValueError(f"the encoder already has LoRA adapters {existing.settings()}, not {wanted.settings()}")
        return existing
    peft = _import_peft()
    vit = encoder.vit
    names = target_layer_names(vit, wanted.targets)
    if not names:
        raise ValueError(f"no linear layer of the encoder matches the LoRA targets {wanted.targets}")
    if "qkv" in wanted.targets:
        route_qkv_through_module(vit)
    config = peft.LoraConfig(r=wanted.rank, lora_alpha=wanted.alpha, target_modules=names, lora_dropout=0.0,
                             bias="none")
    peft.inject_adapter_in_model(config, vit, adapter_name=_ADAPTER)
    for name, p in encoder.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)
    setattr(encoder, RECORD_NAME, wanted)
    return wanted


def adapter_layers(encoder: nn.Module) -> dict[str, nn.Module]:
    """name -> peft LoRA layer (empty without adapters; peft is imported only if there are some)."""
    if lora_record(encoder) is None:
        return {}
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in encoder.named_modules() if isinstance(m, LoraLayer)}


@contextlib.contextmanager
def plain_view(encoder: nn.Module):
    """Inside the block, ``encoder`` looks like one without adapters: each LoRA layer replaced by its
    base layer (the same module, so loading pretrained weights into it loads them into the adapted
    encoder) and no record. Restored on exit."""
    layers = adapter_layers(encoder)
    record = encoder._modules.pop(RECORD_NAME, None) if layers else None
    swaps = []
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = encoder.get_submodule(parent_name)
        swaps.append((parent, child, layer))
        setattr(parent, child, layer.base_layer)
    try:
        yield encoder
    finally:
        for parent, child, layer in swaps:
            setattr(parent, child, layer)
        if record is not None:
            setattr(encoder, RECORD_NAME, record)


def base_parameters(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's frozen base weights under their plain names (``vit.blocks.0.attn.qkv.weight``)."""
    with plain_view(encoder):
        return dict(encoder.named_parameters())


def _record_keys(state: dict, prefix: str) -> list[str]:
    return [k for k in state if k.startswith(prefix) and k.endswith(f"{RECORD_NAME}._extra_state")]


def has_adapters(state: dict, prefix: str = "") -> bool:
    return bool(_record_keys(state, prefix))


def merged_state_dict(state: dict, prefix: str = "") -> dict:
    """``state`` (keys under ``prefix``) with every adapter folded into its layer's weight,
    ``W + scaling * B @ A`` (in fp32 or wider, then the weight's dtype), and the plain key names;
    keys without adapters are passed through. Raises ValueError on a partial adapter."""
    records = _record_keys(state, prefix)
    if not records:
        return dict(state)
    merged = {k: v for k, v in state.items() if k not in records}
    for record_key in records:
        owner = record_key[: -len(f"{RECORD_NAME}._extra_state")]  # e.g. "encoder." or ""
        scaling = float(state[record_key]["scaling"])
        for key in [k for k in merged if k.startswith(owner) and k.endswith(".base_layer.weight")]:
            layer = key[: -len(".base_layer.weight")]
            try:
                a, b = merged.pop(f"{layer}.lora_A.{_ADAPTER}.weight"), merged.pop(f"{layer}.lora_B.{_ADAPTER}.weight")
            except KeyError:
                raise ValueError(f"{layer} has a base layer but no complete LoRA adapter (lora_A / lora_B)") from None
            weight = merged.pop(key)
            wide = torch.promote_types(weight.dtype, torch.float32)
            merged[f"{layer}.weight"] = (weight.to(wide) + scaling * (b.to(wide) @ a.to(wide))).to(weight.dtype)
            if f"{layer}.base_layer.bias" in merged:
                merged[f"{layer}.bias"] = merged.pop(f"{layer}.base_layer.bias")
        leftover = [k for k in merged if k.startswith(owner) and (".lora_A." in k or ".lora_B." in k)]
        if leftover:
            raise ValueError(f"LoRA weights without a base layer: {leftover[:3]}")
    return merged


def _merge_pre_hook(module, state_dict, prefix, *args, **kwargs) -> None:
    encoder = getattr(module, "encoder", None)
    if encoder is None or lora_record(encoder) is not None or not has_adapters(state_dict, prefix):
        return  # an adapted network takes the adapters as they are
    merged = merged_state_dict({k: v for k, v in state_dict.items() if k.startswith(prefix)}, prefix)
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]
    state_dict.update(merged)


def merge_adapters_on_load(network: nn.Module) -> nn.Module:
    """Let ``network`` (with an ``encoder``) load the state dict of the same network with adapters:
    while it has none itself, they are merged into its weights as it loads (strictness unchanged)."""
    network.register_load_state_dict_pre_hook(_merge_pre_hook)
    return network


def parameter_counts(module: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}
