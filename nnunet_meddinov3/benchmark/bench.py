"""Training and inference throughput and peak memory: MedDINOv3Net variants vs the nnU-Net 2D network,
and optionally vs the MedDINOv3 reference implementation.

Every configuration runs in its own fresh process (``python -m nnunet_meddinov3.benchmark.bench
--worker JSON``), so its peak memory is its own: on CUDA ``torch.cuda.max_memory_allocated``
(reset before each phase), on CPU the growth of the peak resident set size (``getrusage``) over
the process's size before the network was built. The CPU peak is monotonic within a process, so
inference is measured first and training second.

Three kinds of network (``BenchConfig.network``):

- ``BASELINE``: nnU-Net's PlainConvUNet as its ExperimentPlanner plans it for the patch.
- ``OURS``: MedDINOv3Net (encoder x decoder).
- ``REFERENCE``: the MedDINOv3 reference implementation (github ricklisz/MedDINOv3), imported from a
  checkout the user points at (``--reference-repo``; its code is never copied here) and built exactly
  as its trainer ``meddinov3_base_primus_multiscale_Trainer`` builds it:
  ``DinoVisionTransformer(patch_size=16, embed_dim=E, depth=D, num_heads=H, ffn_ratio=4,
  drop_path_rate=0.2, layerscale_init=1e-5, n_storage_tokens=4, qkv_bias=False, mask_k_bias=True)``,
  ``.init_weights()``, wrapped in ``Primus_Multiscale(embed_dim=E, patch_embed_size=16, num_classes=K,
  dino_encoder=vit, interaction_indices=default_feature_layers(D))`` for our ``multiscale`` decoder or
  ``Primus(...)`` for ``single``; E/D/H come from our encoder registry. There is no reference for the
  ``bottleneck`` decoder. The reference takes one input channel only (it repeats it to three).

What one step is, for each network as its trainer runs it:

- training: ``zero_grad``, forward, nnU-Net's ``DC_and_CE_loss`` (soft Dice without background +
  cross-entropy, ``MemoryEfficientSoftDiceLoss``, batch Dice), backward, ``clip_grad_norm_(12)``,
  optimiser step, ``loss.item()`` (the sync nnU-Net's ``train_step`` does). The nnU-Net network
  trains with deep supervision: the loss is taken on all its outputs with nnU-Net's weights
  (1/2^i, the lowest resolution 0, normalised) against nearest-downsampled targets made once
  outside the timing, as nnU-Net's data loader makes them; the other two have one output.
  Optimisers: SGD (Nesterov, momentum 0.99) for nnU-Net; AdamW with our trainer's encoder/decoder
  parameter groups for MedDINOv3Net; for the reference, its trainer's AdamW: parameters whose name
  contains ``dino_encoder`` lr 3e-5, the others lr 3e-4, weight decay 0.05, betas (0.9, 0.98).
- inference: ``eval()``, ``torch.no_grad()`` forward; the nnU-Net network without deep
  supervision, as nnU-Net's predictor builds it.

Precision: on CUDA with ``dtype="bf16"`` MedDINOv3Net runs its own bf16 autocast and the nnU-Net
network runs under ``torch.autocast(bfloat16)`` (nnU-Net itself uses fp16 + GradScaler, the same
tensor-core rate; bf16 needs no scaler). The reference on CUDA always runs as its (nnU-Net) trainer
does, whatever ``dtype`` says: training under ``torch.autocast("cuda")`` (fp16) with
``torch.amp.GradScaler`` (scale, backward, unscale_, clip, step, update), inference under fp16
autocast as nnU-Net's predictor; its ``effective_dtype`` is ``"fp16+GradScaler"``. On CPU all run
fp32, as nnU-Net does, except our networks with ``cpu_bf16`` (bf16 autocast inside MedDINOv3Net).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

RESULT_MARKER = "MEDDINOV3_BENCH_RESULT "
BASELINE = "nnunet"
OURS = "meddinov3"
REFERENCE = "reference"
COMPILE_MODES = ("encoder", "network")

# nnUNetTrainer: clip_grad_norm_(..., 12), SGD lr 1e-2, momentum 0.99, Nesterov, weight decay 3e-5.
GRAD_CLIP_NORM = 12.0
NNUNET_SGD = dict(lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)

# The MedDINOv3 reference (github ricklisz/MedDINOv3). Its ``dinov3`` package lives at
# REFERENCE_PACKAGE_PARENT inside the repository; our decoder name -> its network class.
REFERENCE_URL = "https://github.com/ricklisz/MedDINOv3"
REFERENCE_PACKAGE_PARENT = os.path.join("nnUNet", "nnunetv2", "training", "nnUNetTrainer", "dinov3")
REFERENCE_MODULES = (os.path.join("dinov3", "models", "vision_transformer.py"),
                     os.path.join("dinov3", "models", "primus.py"))
REFERENCE_DECODERS = {"multiscale": "Primus_Multiscale", "single": "Primus"}
# meddinov3_base_primus_multiscale_Trainer: the ViT's constructor arguments besides E/D/H, the Primus
# patch size, and its AdamW (two groups split on 'dino_encoder' in the parameter name).
REFERENCE_PATCH_SIZE = 16
REFERENCE_VIT_KWARGS = dict(patch_size=REFERENCE_PATCH_SIZE, ffn_ratio=4, drop_path_rate=0.2, layerscale_init=1e-5,
                            n_storage_tokens=4, qkv_bias=False, mask_k_bias=True)
REFERENCE_ENCODER_PARAM = "dino_encoder"
REFERENCE_LRS = dict(encoder_lr=3e-5, decoder_lr=3e-4)
REFERENCE_WEIGHT_DECAY = 0.05
REFERENCE_ADAMW_BETAS = (0.9, 0.98)
REFERENCE_EFFECTIVE_DTYPE_CUDA = "fp16+GradScaler"

METHOD_NOTES = {
    "loss": "nnU-Net DC_and_CE_loss (soft Dice w/o background + CE, batch dice); nnU-Net network: deep "
            "supervision on, loss on all outputs with nnU-Net's weights (lowest resolution weight 0); "
            "MedDINOv3Net and the reference: one output",
    "optimizer": "nnU-Net: SGD Nesterov momentum 0.99; MedDINOv3Net: AdamW with encoder/decoder groups; "
                 "reference: its trainer's AdamW (params named *dino_encoder* lr 3e-5, others 3e-4, wd 0.05, "
                 "betas 0.9/0.98); all clip_grad_norm_(12)",
    "reference": "MedDINOv3 reference (github ricklisz/MedDINOv3) imported from --reference-repo, built as "
                 "meddinov3_base_primus_multiscale_Trainer builds it: DinoVisionTransformer(patch_size=16, "
                 "E/D/H of the encoder, ffn_ratio=4, drop_path_rate=0.2, layerscale_init=1e-5, n_storage_tokens=4, "
                 "qkv_bias=False, mask_k_bias=True).init_weights() in Primus_Multiscale (interaction_indices = "
                 "our default feature layers, [2,5,8,11] for 12 blocks) or Primus (decoder 'single'); random "
                 "weights; on CUDA fp16 autocast + GradScaler whatever --dtype says, as its trainer; no grad "
                 "checkpointing; eager unless --compile, which applies to it as to ours ('encoder': its ViT "
                 "blocks; 'network': the whole network, as nnU-Net trainers compile on CUDA by default)",
    "inference": "eval() + no_grad forward; nnU-Net network without deep supervision; on CUDA the reference "
                 "under fp16 autocast, as nnU-Net's predictor",
    "memory": "CUDA: torch.cuda.max_memory_allocated per phase (weights + optimiser state + activations); "
              "CPU: peak RSS growth over the process before the network was built (ru_maxrss)",
    "flops": "torch.utils.flop_counter.FlopCounterMode on one eager step (matmul/conv/attention only)",
    "throughput": "batch_size / median step time over the repeats, after the warm-up steps",
    "ratios": "ratios_to_baseline: vs the nnU-Net network of the same patch/batch/device/dtype; "
              "ratios_to_reference (our entries): ours / the reference of the same encoder, decoder, patch, "
              "batch, device (throughput >1 and step time <1: ours faster; memory >1: ours uses more)",
}


# --------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchConfig:
    """One measured network; serialised to JSON for the worker process."""

    # BASELINE (PlainConvUNet as nnU-Net plans it), OURS (MedDINOv3Net) or REFERENCE (the MedDINOv3 reference)
    network: str
    patch_size: int
    batch_size: int = 2
    num_classes: int = 16
    input_channels: int = 1
    device: str = "cpu"
    dtype: str = "bf16"
    warmup: int = 3
    repeats: int = 10
    encoder: str | None = None
    decoder: str | None = None
    grad_checkpointing: bool = False
    # OURS on CPU: bf16 autocast inside the network (MedDINOv3Net cpu_autocast, MEDDINOV3_CPU_BF16); the
    # baseline and the reference stay fp32 on CPU, as their nnU-Net trainers run there.
    cpu_bf16: bool = False
    compile: str | None = None  # None or one of COMPILE_MODES
    peak_tflops: float | None = None
    # REFERENCE only: the folder holding the reference's ``dinov3`` package (resolve_reference_repo's answer).
    reference_repo: str | None = None

    @property
    def is_baseline(self) -> bool:
        return self.network == BASELINE

    @property
    def runs_cpu_bf16(self) -> bool:
        """Our network in bf16 on a CPU; the baseline and the reference run as their trainers do."""
        return self.cpu_bf16 and self.device == "cpu" and self.network == OURS

    @property
    def is_reference(self) -> bool:
        return self.network == REFERENCE

    @property
    def label(self) -> str:
        if self.is_baseline:
            name = "nnU-Net PlainConvUNet"
        elif self.is_reference:
            name = f"reference {self.encoder}+{self.decoder}"
        else:
            name = f"{self.encoder}+{self.decoder}"
            if self.grad_checkpointing:
                name += " ckpt"
            if self.runs_cpu_bf16:
                name += " bf16"
        if self.compile == "network" or (self.compile == "encoder" and not self.is_baseline):
            name += " compiled"
        return name

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "BenchConfig":
        return cls(**json.loads(text))


def build_configs(encoders: Sequence[str], decoders: Sequence[str], patch_sizes: Sequence[int], *,
                  baseline: bool = True, reference_repo: str | None = None, **common) -> list[BenchConfig]:
    """Per patch size: the nnU-Net baseline, then every encoder x decoder, each followed by the
    MedDINOv3 reference of the same encoder and decoder when ``reference_repo`` is given and the
    reference has that decoder (REFERENCE_DECODERS: not ``bottleneck``).

    ``reference_repo`` is the folder holding the reference's ``dinov3`` package, or the repository
    root (resolve_reference_repo). The reference is built without gradient checkpointing (it has
    none) and takes one input channel only.
    """
    if reference_repo is not None:
        if common.get("input_channels", 1) != 1:
            raise ValueError(f"the MedDINOv3 reference takes 1 input channel (its Primus networks assert it), "
                             f"not {common['input_channels']}")
        reference_repo = resolve_reference_repo(reference_repo)
    configs = []
    for patch in patch_sizes:
        if baseline:
            configs.append(BenchConfig(network=BASELINE, patch_size=patch, **common))
        for encoder in encoders:
            for decoder in decoders:
                configs.append(BenchConfig(network=OURS, patch_size=patch, encoder=encoder, decoder=decoder, **common))
                if reference_repo is not None and decoder in REFERENCE_DECODERS:
                    configs.append(BenchConfig(network=REFERENCE, patch_size=patch, encoder=encoder, decoder=decoder,
                                               reference_repo=reference_repo,
                                               **{**common, "grad_checkpointing": False}))
    return configs


class ReferenceRepoError(ValueError):
    """The path given for the MedDINOv3 reference holds neither of its layouts."""


def resolve_reference_repo(path: str | os.PathLike) -> str:
    """The absolute folder that directly contains the reference's ``dinov3`` package.

    ``path`` is either the MedDINOv3 repository root (the package is under REFERENCE_PACKAGE_PARENT)
    or that folder itself; raises ReferenceRepoError naming both expected places otherwise.
    """
    root = os.path.abspath(os.path.expanduser(os.fspath(path)))
    candidates = (os.path.join(root, REFERENCE_PACKAGE_PARENT), root)
    for candidate in candidates:
        if all(os.path.isfile(os.path.join(candidate, module)) for module in REFERENCE_MODULES):
            return candidate
    expected = " or ".join(os.path.join(c, REFERENCE_MODULES[0].rsplit(os.sep, 1)[0], "{vision_transformer,primus}.py")
                           for c in candidates)
    raise ReferenceRepoError(
        f"no MedDINOv3 reference at {root}: expected {expected} (the path may be the MedDINOv3 repository root "
        f"or the folder that directly contains its 'dinov3' package); get the code with "
        f"'git clone {REFERENCE_URL}'")


def reference_commit(path: str | os.PathLike) -> str | None:
    """The git commit of a reference checkout, when it is one (for the report)."""
    try:
        proc = subprocess.run(["git", "-C", os.fspath(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


# --------------------------------------------------------------------------------------------
# Networks, losses, optimisers (worker side)
# --------------------------------------------------------------------------------------------

def nnunet_2d_arch_kwargs(patch_size: int, spacing=(1.0, 1.0)) -> dict:
    """``architecture`` of nnU-Net's ExperimentPlanner for a 2D patch of ``patch_size``.

    Same rules as ``ExperimentPlanner.get_plans_for_configuration`` (nnunetv2 2.8): topology from
    ``get_pool_and_conv_props`` with a minimal feature-map edge of 4, 32 base features doubling per
    stage up to 512, 2 convs per stage, InstanceNorm (eps 1e-5, affine), LeakyReLU, conv bias.
    The planner's VRAM loop that shrinks the patch is skipped: the patch is the benchmark's.
    """
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from dynamic_network_architectures.building_blocks.helper import convert_dim_to_conv_op, get_matching_instancenorm
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    base_features, max_features, min_edge, convs_per_stage = 32, 512, 4, 2
    _, strides, kernel_sizes, planned_patch, _ = get_pool_and_conv_props(
        spacing, (patch_size, patch_size), min_edge, 999999)
    if tuple(int(p) for p in planned_patch) != (patch_size, patch_size):
        raise ValueError(f"nnU-Net would plan a {tuple(int(p) for p in planned_patch)} patch, not "
                         f"{patch_size}x{patch_size}; pick a patch size with more factors of 2")
    n_stages = len(strides)
    conv_op = convert_dim_to_conv_op(2)
    norm_op = get_matching_instancenorm(conv_op)
    return {
        "network_class_name": f"{PlainConvUNet.__module__}.{PlainConvUNet.__name__}",
        "arch_kwargs": {
            "n_stages": n_stages,
            "features_per_stage": tuple(min(max_features, base_features * 2 ** i) for i in range(n_stages)),
            "conv_op": f"{conv_op.__module__}.{conv_op.__name__}",
            "kernel_sizes": kernel_sizes,
            "strides": strides,
            "n_conv_per_stage": (convs_per_stage,) * n_stages,
            "n_conv_per_stage_decoder": (convs_per_stage,) * (n_stages - 1),
            "conv_bias": True,
            "norm_op": f"{norm_op.__module__}.{norm_op.__name__}",
            "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ("conv_op", "norm_op", "dropout_op", "nonlin"),
    }


def build_nnunet_network(config: BenchConfig):
    """The network as nnunetv2's ``get_network_from_plans`` builds it (deep supervision on, He init).

    Done here rather than by calling it because that module imports batchgenerators, which a
    GPU machine would otherwise need only for this.
    """
    import pydoc

    arch = nnunet_2d_arch_kwargs(config.patch_size)
    kwargs = dict(arch["arch_kwargs"])
    for name in arch["_kw_requires_import"]:
        if kwargs[name] is not None:
            kwargs[name] = pydoc.locate(kwargs[name])
    network = pydoc.locate(arch["network_class_name"])(
        input_channels=config.input_channels, num_classes=config.num_classes, deep_supervision=True, **kwargs)
    network.apply(network.initialize)
    return network


def build_meddinov3_network(config: BenchConfig):
    from nnunet_meddinov3.network import MedDINOv3Net
    from nnunet_meddinov3.training import recipe

    return MedDINOv3Net(config.input_channels, config.num_classes, encoder=config.encoder, decoder=config.decoder,
                        drop_path_rate=recipe.DROP_PATH_RATE,
                        autocast_dtype="bf16" if config.dtype == "bf16" or config.runs_cpu_bf16 else None,
                        grad_checkpointing=config.grad_checkpointing, cpu_autocast=config.runs_cpu_bf16)


def import_reference(reference_repo: str) -> dict:
    """Import the reference's ViT and Primus classes from its checkout (worker side: this puts the
    checkout's ``dinov3`` package first on ``sys.path`` for the rest of the process)."""
    import importlib

    root = resolve_reference_repo(reference_repo)
    if root not in sys.path:
        sys.path.insert(0, root)
    vision_transformer = importlib.import_module("dinov3.models.vision_transformer")
    primus = importlib.import_module("dinov3.models.primus")
    origin = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(vision_transformer.__file__))))
    if os.path.realpath(origin) != os.path.realpath(root):
        raise ImportError(f"'dinov3' was imported from {origin}, not from the reference checkout {root} "
                          f"(another 'dinov3' package is installed or already imported)")
    classes = {"DinoVisionTransformer": vision_transformer.DinoVisionTransformer}
    classes.update({name: getattr(primus, name) for name in REFERENCE_DECODERS.values()})
    return classes


def build_reference_network(config: BenchConfig):
    """The network meddinov3_base_primus_multiscale_Trainer builds (random weights: the checkpoint it
    loads does not change the cost), with E/D/H from our encoder registry."""
    from nnunet_meddinov3.network.encoder import default_feature_layers, resolve_encoder_config

    if config.decoder not in REFERENCE_DECODERS:
        raise ValueError(f"the MedDINOv3 reference has no '{config.decoder}' decoder; it has "
                         f"{', '.join(sorted(REFERENCE_DECODERS))}")
    if config.input_channels != 1:
        raise ValueError(f"the MedDINOv3 reference takes 1 input channel (its Primus networks assert it), "
                         f"not {config.input_channels}")
    if not config.reference_repo:
        raise ValueError("a reference configuration needs reference_repo")
    classes = import_reference(config.reference_repo)
    encoder = resolve_encoder_config(config.encoder)
    if encoder.patch_size != REFERENCE_PATCH_SIZE:
        raise ValueError(f"the MedDINOv3 reference uses {REFERENCE_PATCH_SIZE}-pixel patches, encoder "
                         f"'{config.encoder}' has {encoder.patch_size}")
    vit = classes["DinoVisionTransformer"](embed_dim=encoder.embed_dim, depth=encoder.depth,
                                           num_heads=encoder.num_heads, **REFERENCE_VIT_KWARGS)
    vit.init_weights()
    common = dict(embed_dim=encoder.embed_dim, patch_embed_size=REFERENCE_PATCH_SIZE,
                  num_classes=config.num_classes, dino_encoder=vit)
    if config.decoder == "multiscale":
        return classes["Primus_Multiscale"](**common,
                                            interaction_indices=list(default_feature_layers(encoder.depth)))
    return classes["Primus"](**common)


def build_network(config: BenchConfig):
    if config.is_baseline:
        return build_nnunet_network(config)
    if config.is_reference:
        return build_reference_network(config)
    return build_meddinov3_network(config)


def build_loss(config: BenchConfig, n_outputs: int):
    """nnUNetTrainer._build_loss for a dataset without regions or ignore label."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    loss = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                          weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    if n_outputs == 1:
        return loss
    weights = [1 / 2 ** i for i in range(n_outputs)]
    weights[-1] = 0.0
    total = sum(weights)
    return DeepSupervisionWrapper(loss, [w / total for w in weights])


def reference_parameter_groups(model) -> list[dict]:
    """The reference trainer's AdamW groups: parameters named *dino_encoder* at the encoder LR, the
    rest at the decoder LR, both with its weight decay."""
    encoder = [p for n, p in model.named_parameters() if REFERENCE_ENCODER_PARAM in n]
    decoder = [p for n, p in model.named_parameters() if REFERENCE_ENCODER_PARAM not in n]
    return [{"params": encoder, "lr": REFERENCE_LRS["encoder_lr"], "weight_decay": REFERENCE_WEIGHT_DECAY},
            {"params": decoder, "lr": REFERENCE_LRS["decoder_lr"], "weight_decay": REFERENCE_WEIGHT_DECAY}]


def build_optimizer(model, config: BenchConfig):
    import torch

    if config.is_baseline:
        return torch.optim.SGD(model.parameters(), **NNUNET_SGD)
    if config.is_reference:
        return torch.optim.AdamW(reference_parameter_groups(model), betas=REFERENCE_ADAMW_BETAS)
    from nnunet_meddinov3.training import recipe
    from nnunet_meddinov3.training.optim import build_adamw, parameter_groups

    # nnUNetTrainerMedDINOv3's optimiser: its recipe's LRs and weight decay, fused AdamW
    return build_adamw(parameter_groups(model, weight_decay=recipe.WEIGHT_DECAY, encoder_lr=recipe.ENCODER_LR,
                                        decoder_lr=recipe.DECODER_LR))


def deep_supervision_targets(labels, strides):
    """Targets at every output resolution of the nnU-Net decoder, full resolution first.

    The scales are nnUNetTrainer._get_deep_supervision_scales (1 / cumulative pooling, all but the
    lowest stage); nearest downsampling as nnU-Net's data loader does it.
    """
    import torch.nn.functional as F

    size = list(labels.shape[-2:])
    targets = []
    for stride in strides[:-1]:
        size = [s // k for s, k in zip(size, stride)]
        targets.append(labels if size == list(labels.shape[-2:]) else
                       F.interpolate(labels.float(), size=size, mode="nearest").long())
    return targets


class CompiledBlocks:
    """torch.compile of each ViT block (regional compilation: one graph reused by all blocks).

    ``eager()`` puts the original blocks back for a while, for FLOP counting.
    """

    def __init__(self, vit):
        import torch

        self.blocks = vit.blocks
        self.originals = list(vit.blocks)
        for i, block in enumerate(self.originals):
            self.blocks[i] = torch.compile(block)

    @contextlib.contextmanager
    def eager(self):
        compiled = list(self.blocks)
        for i, block in enumerate(self.originals):
            self.blocks[i] = block
        try:
            yield
        finally:
            for i, block in enumerate(compiled):
                self.blocks[i] = block


# --------------------------------------------------------------------------------------------
# Measurement (worker side)
# --------------------------------------------------------------------------------------------

def _current_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


class PeakMemory:
    """Peak memory of a phase: CUDA allocator peak, or CPU peak-RSS growth since ``start()``."""

    def __init__(self, device):
        self.device = device
        self.rss_start = 0

    def start(self) -> None:
        if self.device.type == "cpu":
            current = _current_rss_bytes()
            self.rss_start = current if current is not None else _peak_rss_bytes()

    def new_phase(self) -> None:
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int:
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        return max(0, _peak_rss_bytes() - self.rss_start)


def _synchronize(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], object], device, warmup: int, repeats: int,
               after_warmup: Callable[[], object] | None = None) -> list[float]:
    for _ in range(warmup):
        step()
    _synchronize(device)
    if after_warmup is not None:
        after_warmup()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def count_flops(step: Callable[[], object]) -> int:
    """FLOPs of one call of ``step`` (matmuls, convolutions and attention; not elementwise ops)."""
    import torch
    from torch.utils import flop_counter

    # The CPU fused attention kernels have no registered formula; give them the SDPA ones.
    custom = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    cpu_sdpa_backward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if cpu_sdpa is not None:
        custom[cpu_sdpa] = lambda q, k, v, *a, out_shape=None, **kw: flop_counter.sdpa_flop_count(q, k, v)
    if cpu_sdpa_backward is not None:
        custom[cpu_sdpa_backward] = (lambda g, q, k, v, *a, out_shape=None, **kw:
                                     flop_counter.sdpa_backward_flop_count(g, q, k, v))
    with flop_counter.FlopCounterMode(display=False, custom_mapping=custom) as counter:
        step()
    return int(counter.get_total_flops())


def grad_scaler_report(scale_before: float, scale_after: float) -> dict:
    """GradScaler scale around the timed steps. Each step with inf/NaN gradients halves the scale and
    skips the optimiser step (a cheaper step); the scale grows only after 2000 clean steps, so over
    fewer timed steps the halvings count the skipped ones."""
    import math

    skipped = round(math.log2(scale_before / scale_after)) if 0 < scale_after < scale_before else 0
    return {"scale_before_timing": scale_before, "scale_after_timing": scale_after, "skipped_timed_steps": skipped}


def _phase_result(times: list[float], batch_size: int, peak: int) -> dict:
    median = statistics.median(times)
    return {"median_step_s": median, "step_times_s": times, "images_per_s": batch_size / median,
            "peak_memory_bytes": peak, "flops_per_step": None}


def _out_of_memory(error: BaseException) -> dict:
    return {"error": f"out of memory: {str(error).splitlines()[0]}"}


def _import_network_modules() -> None:
    import dynamic_network_architectures.architectures.unet  # noqa: F401
    import dynamic_network_architectures.building_blocks.patch_encode_decode  # noqa: F401
    import nnunetv2.training.loss.compound_losses  # noqa: F401
    import nnunetv2.experiment_planning.experiment_planners.network_topology  # noqa: F401
    import torch.utils.flop_counter  # noqa: F401

    import nnunet_meddinov3.network  # noqa: F401
    import nnunet_meddinov3.training.optim  # noqa: F401


def measure(config: BenchConfig) -> dict:
    """Build the configuration's network and time inference then training; one process per call."""
    import torch

    _import_network_modules()  # so that their memory is not counted as the network's
    if config.is_reference:
        import_reference(config.reference_repo)
    torch.manual_seed(0)
    device = torch.device(config.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as nnU-Net's run_training and predictor set it
    memory = PeakMemory(device)
    memory.start()

    model = build_network(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    images = torch.randn(config.batch_size, config.input_channels, config.patch_size, config.patch_size,
                         device=device)
    labels = torch.randint(0, config.num_classes, (config.batch_size, 1, config.patch_size, config.patch_size),
                           device=device)
    if config.is_baseline:
        strides = nnunet_2d_arch_kwargs(config.patch_size)["arch_kwargs"]["strides"]
        targets = deep_supervision_targets(labels, strides)
        loss_fn = build_loss(config, len(targets))
    else:
        targets, loss_fn = labels, build_loss(config, 1)

    # MedDINOv3Net autocasts itself; the other two need the caller's autocast, as in nnU-Net's train_step.
    # The reference on CUDA: fp16 autocast + GradScaler, as its nnU-Net trainer, whatever config.dtype says.
    on_cuda = device.type == "cuda"
    autocast_dtype, scaler = None, None
    if config.is_reference:
        effective_dtype = REFERENCE_EFFECTIVE_DTYPE_CUDA if on_cuda else "fp32"
        if on_cuda:
            autocast_dtype, scaler = torch.float16, torch.amp.GradScaler("cuda")
    else:
        use_bf16 = on_cuda and config.dtype == "bf16"
        effective_dtype = "bf16" if use_bf16 or config.runs_cpu_bf16 else "fp32"
        if use_bf16 and config.is_baseline:
            autocast_dtype = torch.bfloat16

    def precision():
        return torch.autocast("cuda", dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()

    eager_model, run_model, compiled_blocks = model, model, None
    if config.compile == "network":
        run_model = torch.compile(model)
    elif config.compile == "encoder" and config.is_reference:
        compiled_blocks = CompiledBlocks(model.dino_encoder)
    elif config.compile == "encoder" and not config.is_baseline:
        compiled_blocks = CompiledBlocks(model.encoder.vit)

    def set_deep_supervision(enabled: bool) -> None:
        if config.is_baseline:
            model.decoder.deep_supervision = enabled

    def infer_step(net=None):
        with precision():
            return (run_model if net is None else net)(images)

    optimizer = None

    def train_step(net=None):
        optimizer.zero_grad(set_to_none=True)
        with precision():
            loss = loss_fn((run_model if net is None else net)(images), targets)
        if scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
            optimizer.step()
        else:  # nnUNetTrainer.train_step with its GradScaler
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
            scaler.step(optimizer)
            scaler.update()
        return loss.item()

    result = {"label": config.label, "config": dataclasses.asdict(config), "parameters": n_params,
              "effective_dtype": effective_dtype}

    # Inference first: on CPU the peak RSS only grows, and training's peak is the larger one.
    model.eval()
    set_deep_supervision(False)
    memory.new_phase()
    try:
        with torch.no_grad():
            times = time_steps(infer_step, device, config.warmup, config.repeats)
        result["inference"] = _phase_result(times, config.batch_size, memory.peak_bytes())
    except torch.OutOfMemoryError as e:
        result["inference"] = _out_of_memory(e)

    model.train()
    set_deep_supervision(True)
    memory.new_phase()
    try:
        optimizer = build_optimizer(model, config)
        scale_before = []
        times = time_steps(train_step, device, config.warmup, config.repeats,
                           after_warmup=(lambda: scale_before.append(scaler.get_scale())) if scaler else None)
        result["training"] = _phase_result(times, config.batch_size, memory.peak_bytes())
        if scaler is not None:
            result["training"]["grad_scaler"] = grad_scaler_report(scale_before[0], scaler.get_scale())
    except torch.OutOfMemoryError as e:
        result["training"] = _out_of_memory(e)

    # FLOPs last (the counting step allocates like a real one), on the eager modules.
    peak_tflops = config.peak_tflops if device.type == "cuda" else None
    with compiled_blocks.eager() if compiled_blocks else contextlib.nullcontext():
        for phase, step, training in (("inference", infer_step, False), ("training", train_step, True)):
            if "error" in result[phase]:
                continue
            model.train(training)
            set_deep_supervision(training)
            try:
                with torch.enable_grad() if training else torch.no_grad():
                    flops = count_flops(lambda: step(eager_model))
            except torch.OutOfMemoryError:
                continue
            result[phase]["flops_per_step"] = flops
            if peak_tflops:
                result[phase]["mfu"] = flops / result[phase]["median_step_s"] / (peak_tflops * 1e12)
    return result


# --------------------------------------------------------------------------------------------
# Orchestration (parent side)
# --------------------------------------------------------------------------------------------

def run_worker(config: BenchConfig, timeout_s: float | None = None) -> dict:
    """Measure one configuration in a fresh Python process; errors come back as ``{"error": ...}``."""
    command = [sys.executable, "-m", "nnunet_meddinov3.benchmark.bench", "--worker", config.to_json()]
    failed = {"label": config.label, "config": dataclasses.asdict(config)}
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {**failed, "error": f"timed out after {timeout_s:g} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    return {**failed, "error": f"worker exited with status {proc.returncode}:\n{tail}"}


def _ratio(numerator, denominator):
    return numerator / denominator if numerator is not None and denominator else None


def add_baseline_ratios(results: list[dict]) -> None:
    """Each MedDINOv3Net or reference entry gets throughput and memory ratios to the baseline of its
    patch/batch/device/dtype."""
    def key(r):
        c = r["config"]
        return c["patch_size"], c["batch_size"], c["device"], c["dtype"]

    baselines = {key(r): r for r in results if r["config"]["network"] == BASELINE}
    for r in results:
        base = baselines.get(key(r))
        if r["config"]["network"] == BASELINE or base is None:
            continue
        ratios = {}
        for phase in ("training", "inference"):
            ours, theirs = r.get(phase, {}), base.get(phase, {})
            ratios[f"{phase}_throughput"] = _ratio(ours.get("images_per_s"), theirs.get("images_per_s"))
            ratios[f"{phase}_memory"] = _ratio(ours.get("peak_memory_bytes"), theirs.get("peak_memory_bytes"))
        r["ratios_to_baseline"] = ratios


def add_reference_ratios(results: list[dict]) -> None:
    """Each of our entries with a reference entry of the same encoder, decoder, patch, batch and device
    gets ``ratios_to_reference``, ours / the reference's: throughput (>1: ours faster), training step
    time (<1: ours faster) and peak memory (>1: ours uses more)."""
    def key(r):
        c = r["config"]
        return c["encoder"], c["decoder"], c["patch_size"], c["batch_size"], c["device"]

    references = {key(r): r for r in results if r["config"]["network"] == REFERENCE}
    for r in results:
        reference = references.get(key(r))
        if r["config"]["network"] != OURS or reference is None:
            continue
        ours, theirs = {p: r.get(p, {}) for p in ("training", "inference")}, \
            {p: reference.get(p, {}) for p in ("training", "inference")}
        r["ratios_to_reference"] = {
            "training_throughput": _ratio(ours["training"].get("images_per_s"),
                                          theirs["training"].get("images_per_s")),
            "training_step_time": _ratio(ours["training"].get("median_step_s"),
                                         theirs["training"].get("median_step_s")),
            "training_memory": _ratio(ours["training"].get("peak_memory_bytes"),
                                      theirs["training"].get("peak_memory_bytes")),
            "inference_throughput": _ratio(ours["inference"].get("images_per_s"),
                                           theirs["inference"].get("images_per_s")),
            "inference_memory": _ratio(ours["inference"].get("peak_memory_bytes"),
                                       theirs["inference"].get("peak_memory_bytes")),
        }


def run_benchmark(configs: Sequence[BenchConfig], timeout_s: float | None = None,
                  progress: Callable[[str], None] | None = None,
                  on_result: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Measure every configuration in turn; ``on_result`` sees the results so far after each one
    (so a run cut short still leaves what it measured)."""
    results = []
    for i, config in enumerate(configs, 1):
        if progress:
            progress(f"[{i}/{len(configs)}] {config.label} @ {config.patch_size}px, batch {config.batch_size}")
        started = time.perf_counter()
        result = run_worker(config, timeout_s)
        result["wall_s"] = time.perf_counter() - started
        if progress and "error" in result:
            progress(f"    failed: {result['error']}")
        results.append(result)
        add_baseline_ratios(results)
        add_reference_ratios(results)
        if on_result:
            on_result(results)
    return results


def environment(device: str) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_threads": torch.get_num_threads()}
    for module in ("timm", "nnunetv2"):
        try:
            info[module] = __import__(module).__version__
        except (ImportError, AttributeError):
            pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def write_report(path: str | os.PathLike, results: list[dict], meta: dict) -> None:
    """Write the JSON report; replaced in one step, so a run killed mid-write leaves the last one."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    os.replace(partial, path)


# --------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------

def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def format_table(results: list[dict]) -> str:
    header = ("network", "patch", "bs", "train img/s", "x nnU", "x ref", "train MiB", "x nnU", "infer img/s",
              "x nnU", "infer MiB", "x nnU", "GFLOP/img", "MFU train")
    rows = []
    for r in results:
        c = r["config"]
        train, infer = r.get("training", {}), r.get("inference", {})
        ratios = r.get("ratios_to_baseline", {})
        flops = train.get("flops_per_step")
        mib = 1024 ** 2
        rows.append((
            r["label"], str(c["patch_size"]), str(c["batch_size"]),
            _fmt(train.get("images_per_s"), ".2f", "ERR" if "error" in train else "-"),
            _fmt(ratios.get("training_throughput"), ".2f"),
            _fmt(r.get("ratios_to_reference", {}).get("training_throughput"), ".2f"),
            _fmt(None if train.get("peak_memory_bytes") is None else train["peak_memory_bytes"] / mib, ".0f"),
            _fmt(ratios.get("training_memory"), ".2f"),
            _fmt(infer.get("images_per_s"), ".2f", "ERR" if "error" in infer else "-"),
            _fmt(ratios.get("inference_throughput"), ".2f"),
            _fmt(None if infer.get("peak_memory_bytes") is None else infer["peak_memory_bytes"] / mib, ".0f"),
            _fmt(ratios.get("inference_memory"), ".2f"),
            _fmt(None if flops is None else flops / c["batch_size"] / 1e9, ".1f"),
            _fmt(None if train.get("mfu") is None else 100 * train["mfu"], ".1f"),
        ))
        if "error" in r:
            rows[-1] = (r["label"], str(c["patch_size"]), str(c["batch_size"]),
                        "ERROR: " + r["error"].splitlines()[0], *[""] * (len(header) - 4))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))))
    lines.append("x nnU: ratio to the nnU-Net PlainConvUNet of the same patch and batch (throughput: >1 is "
                 "faster; memory: >1 is more). GFLOP/img: training step (fwd+bwd) per image. MFU: CUDA only.")
    lines.append("x ref: our training throughput over the MedDINOv3 reference's (--reference-repo) of the same "
                 "encoder, decoder, patch and batch (>1: ours faster); on CUDA the reference runs fp16 autocast + "
                 "GradScaler, as its trainer.")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Worker entry point
# --------------------------------------------------------------------------------------------

def _worker_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="measure one benchmark configuration (used by meddinov3 bench)")
    parser.add_argument("--worker", required=True, metavar="JSON", help="a BenchConfig as JSON")
    args = parser.parse_args(argv)
    result = measure(BenchConfig.from_json(args.worker))
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
