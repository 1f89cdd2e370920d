"""Training and inference throughput and peak memory: MedDINOv3Net variants vs the nnU-Net 2D network.

Every configuration runs in its own fresh process (``python -m nnunet_meddinov3.benchmark.bench
--worker JSON``), so its peak memory is its own: on CUDA ``torch.cuda.max_memory_allocated``
(reset before each phase), on CPU the growth of the peak resident set size (``getrusage``) over
the process's size before the network was built. The CPU peak is monotonic within a process, so
inference is measured first and training second.

What one step is, for both networks as their nnU-Net trainers run it:

- training: ``zero_grad``, forward, nnU-Net's ``DC_and_CE_loss`` (soft Dice without background +
  cross-entropy, ``MemoryEfficientSoftDiceLoss``, batch Dice), backward, ``clip_grad_norm_(12)``,
  optimiser step, ``loss.item()`` (the sync nnU-Net's ``train_step`` does). The nnU-Net network
  trains with deep supervision: the loss is taken on all its outputs with nnU-Net's weights
  (1/2^i, the lowest resolution 0, normalised) against nearest-downsampled targets made once
  outside the timing, as nnU-Net's data loader makes them. Optimisers: SGD (Nesterov, momentum
  0.99) for nnU-Net, AdamW with our trainer's encoder/decoder parameter groups for MedDINOv3Net.
- inference: ``eval()``, ``torch.no_grad()`` forward; the nnU-Net network without deep
  supervision, as nnU-Net's predictor builds it.

Precision: on CUDA with ``dtype="bf16"`` MedDINOv3Net runs its own bf16 autocast and the nnU-Net
network runs under ``torch.autocast(bfloat16)`` (nnU-Net itself uses fp16 + GradScaler, the same
tensor-core rate; bf16 needs no scaler). On CPU both run fp32, as nnU-Net does.
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
COMPILE_MODES = ("encoder", "network")

# nnUNetTrainer: clip_grad_norm_(..., 12), SGD lr 1e-2, momentum 0.99, Nesterov, weight decay 3e-5.
GRAD_CLIP_NORM = 12.0
NNUNET_SGD = dict(lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
# nnUNetTrainerMedDINOv3: AdamW betas (0.9, 0.98), weight decay 0.05, encoder/decoder LRs 3e-5/3e-4,
# drop path 0.2 while training. (Mirrored, not imported: the trainer module pulls in all of nnU-Net's
# training stack, seconds per worker, and the values do not change the cost of a step.)
MEDDINOV3_ADAMW_BETAS = (0.9, 0.98)
MEDDINOV3_LRS = dict(encoder_lr=3e-5, decoder_lr=3e-4)
MEDDINOV3_WEIGHT_DECAY = 0.05
MEDDINOV3_DROP_PATH = 0.2

METHOD_NOTES = {
    "loss": "nnU-Net DC_and_CE_loss (soft Dice w/o background + CE, batch dice); nnU-Net network: deep "
            "supervision on, loss on all outputs with nnU-Net's weights (lowest resolution weight 0)",
    "optimizer": "nnU-Net: SGD Nesterov momentum 0.99; MedDINOv3Net: AdamW with encoder/decoder groups; "
                 "both clip_grad_norm_(12)",
    "inference": "eval() + no_grad forward; nnU-Net network without deep supervision",
    "memory": "CUDA: torch.cuda.max_memory_allocated per phase (weights + optimiser state + activations); "
              "CPU: peak RSS growth over the process before the network was built (ru_maxrss)",
    "flops": "torch.utils.flop_counter.FlopCounterMode on one eager step (matmul/conv/attention only)",
    "throughput": "batch_size / median step time over the repeats, after the warm-up steps",
}


# --------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchConfig:
    """One measured network; serialised to JSON for the worker process."""

    network: str  # BASELINE (PlainConvUNet as nnU-Net plans it) or OURS (MedDINOv3Net)
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
    reference_layernorm: bool = False
    grad_checkpointing: bool = False
    compile: str | None = None  # None or one of COMPILE_MODES
    peak_tflops: float | None = None

    @property
    def is_baseline(self) -> bool:
        return self.network == BASELINE

    @property
    def label(self) -> str:
        if self.is_baseline:
            name = "nnU-Net PlainConvUNet"
        else:
            name = f"{self.encoder}+{self.decoder}"
            if self.reference_layernorm:
                name += " refLN"
            if self.grad_checkpointing:
                name += " ckpt"
        if self.compile == "network" or (self.compile == "encoder" and not self.is_baseline):
            name += " compiled"
        return name

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "BenchConfig":
        return cls(**json.loads(text))


def build_configs(encoders: Sequence[str], decoders: Sequence[str], patch_sizes: Sequence[int], *,
                  baseline: bool = True, reference_layernorm: bool = False, **common) -> list[BenchConfig]:
    """Per patch size: the nnU-Net baseline, then every encoder x decoder (and its reference-LN twin)."""
    configs = []
    for patch in patch_sizes:
        if baseline:
            configs.append(BenchConfig(network=BASELINE, patch_size=patch, **common))
        for encoder in encoders:
            for decoder in decoders:
                for ref_ln in ((False, True) if reference_layernorm else (False,)):
                    configs.append(BenchConfig(network=OURS, patch_size=patch, encoder=encoder, decoder=decoder,
                                               reference_layernorm=ref_ln, **common))
    return configs


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


def use_reference_layernorm(model) -> int:
    """Swap every fused ChannelLayerNorm2d for the elementwise-chain LayerNormNd the MedDINOv3
    reference uses (dynamic_network_architectures: mean, sub, pow, mean, add, sqrt, div, mul, add),
    copying the affine parameters; returns how many were swapped."""
    import torch
    from dynamic_network_architectures.building_blocks.patch_encode_decode import LayerNormNd

    from nnunet_meddinov3.network.decoders import ChannelLayerNorm2d

    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ChannelLayerNorm2d):
                reference = LayerNormNd(child.normalized_shape[0], eps=child.eps)
                with torch.no_grad():
                    reference.weight.copy_(child.weight)
                    reference.bias.copy_(child.bias)
                setattr(parent, name, reference)
                swapped += 1
    return swapped


def build_meddinov3_network(config: BenchConfig):
    from nnunet_meddinov3.network import MedDINOv3Net

    model = MedDINOv3Net(config.input_channels, config.num_classes, encoder=config.encoder, decoder=config.decoder,
                         drop_path_rate=MEDDINOV3_DROP_PATH,
                         autocast_dtype="bf16" if config.dtype == "bf16" else None,
                         grad_checkpointing=config.grad_checkpointing)
    if config.reference_layernorm:
        use_reference_layernorm(model)
    return model


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


def build_optimizer(model, config: BenchConfig):
    import torch

    if config.is_baseline:
        return torch.optim.SGD(model.parameters(), **NNUNET_SGD)
    from nnunet_meddinov3.training.optim import parameter_groups

    groups = parameter_groups(model, weight_decay=MEDDINOV3_WEIGHT_DECAY, **MEDDINOV3_LRS)
    return torch.optim.AdamW(groups, betas=MEDDINOV3_ADAMW_BETAS)


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


def time_steps(step: Callable[[], object], device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        step()
    _synchronize(device)
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
    torch.manual_seed(0)
    device = torch.device(config.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as nnU-Net's run_training and predictor set it
    memory = PeakMemory(device)
    memory.start()

    model = (build_nnunet_network(config) if config.is_baseline else build_meddinov3_network(config)).to(device)
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

    use_bf16 = device.type == "cuda" and config.dtype == "bf16"
    # MedDINOv3Net autocasts itself; the nnU-Net network needs the caller's autocast, as in train_step.
    def precision():
        if use_bf16 and config.is_baseline:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    eager_model, run_model, compiled_blocks = model, model, None
    if config.compile == "network":
        run_model = torch.compile(model)
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
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
        optimizer.step()
        return loss.item()

    result = {"label": config.label, "config": dataclasses.asdict(config), "parameters": n_params,
              "effective_dtype": "bf16" if use_bf16 else "fp32"}

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
        times = time_steps(train_step, device, config.warmup, config.repeats)
        result["training"] = _phase_result(times, config.batch_size, memory.peak_bytes())
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
    """Each MedDINOv3 entry gets throughput and memory ratios to the baseline of its patch/batch."""
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
    header = ("network", "patch", "bs", "train img/s", "x nnU", "train MiB", "x nnU", "infer img/s", "x nnU",
              "infer MiB", "x nnU", "GFLOP/img", "MFU train")
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
