"""What is measured: one :class:`BenchConfig` per network, and the notes on method the report carries."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Sequence

from nnunet_meddinov3.benchmark.reference import REFERENCE_DECODERS, resolve_reference_repo

BASELINE = "nnunet"
OURS = "meddinov3"
REFERENCE = "reference"
COMPILE_MODES = ("encoder", "network")

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
    "profile": "--profile: one training step after the timed ones under torch.profiler; the 15 entries with the "
               "most self time (CUDA: device time, i.e. kernels; CPU: CPU time of aten ops), in ms",
    "volumetric": "3D patches (S, H, W), slice axis first: MedDINOv3Net3D (the 2D network on every (H, W) slice, "
                  "cross-slice context as named) against nnU-Net's 3d_fullres PlainConvUNet planned by its "
                  "ExperimentPlanner for a one-volume dataset of that shape at CT-like spacing (2.5, 0.8, 0.8) mm, "
                  "built, with its deep-supervised loss and SGD, by an nnUNetTrainer for 3d_fullres; img/s counts "
                  "patches",
    "ratios": "ratios_to_baseline: vs the nnU-Net network of the same patch/batch/device/dtype (step times: "
              "ours / nnU-Net's, <1 is faster); "
              "ratios_to_reference (our entries): ours / the reference of the same encoder, decoder, patch, "
              "batch, device (throughput >1 and step time <1: ours faster; memory >1: ours uses more)",
}


@dataclass(frozen=True)
class BenchConfig:
    """One measured network; serialised to JSON for the worker process."""

    # BASELINE (PlainConvUNet as nnU-Net plans it), OURS (MedDINOv3Net) or REFERENCE (the MedDINOv3 reference)
    network: str
    # a square 2D patch's side, or a 3D patch (S, H, W), slice axis first (a list from JSON becomes the tuple)
    patch_size: int | tuple[int, int, int]
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
    # OURS: the decoder's plain autograd path on CPU too (UpsamplingStack.cpu_workspace = False), to
    # measure what the CPU path gains; on CUDA both paths are the plain one.
    plain_decoder: bool = False
    # after the timing, one training step under torch.profiler: the ops/kernels with the most self time
    profile: bool = False
    peak_tflops: float | None = None
    # REFERENCE only: the folder holding the reference's ``dinov3`` package (resolve_reference_repo's answer).
    reference_repo: str | None = None
    # OURS on a 3D patch: MedDINOv3Net3D's cross-slice context (network.slice_context.CONTEXT_KINDS)
    context: str | None = None

    def __post_init__(self):
        if isinstance(self.patch_size, list):
            object.__setattr__(self, "patch_size", tuple(self.patch_size))

    @property
    def is_volumetric(self) -> bool:
        return isinstance(self.patch_size, tuple)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """The input's spatial shape: (S, H, W) for a 3D patch, (P, P) for a square 2D one."""
        return self.patch_size if self.is_volumetric else (self.patch_size, self.patch_size)

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
            name = "nnU-Net 3d_fullres PlainConvUNet" if self.is_volumetric else "nnU-Net PlainConvUNet"
        elif self.is_reference:
            name = f"reference {self.encoder}+{self.decoder}"
        else:
            name = f"{self.encoder}+{self.decoder}"
            if self.is_volumetric:
                name += f" 3D {self.context}"
            if self.grad_checkpointing:
                name += " ckpt"
            if self.runs_cpu_bf16:
                name += " bf16"
            if self.plain_decoder:
                name += " plain-decoder"
        if self.compile == "network" or (self.compile == "encoder" and not self.is_baseline):
            name += " compiled"
        return name

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "BenchConfig":
        return cls(**json.loads(text))


def patch_label(patch_size) -> str:
    """A patch as tables show it: "64" (square 2D) or "8x64x64" (3D, slice axis first)."""
    return str(patch_size) if isinstance(patch_size, int) else "x".join(map(str, patch_size))


def build_configs(encoders: Sequence[str], decoders: Sequence[str], patch_sizes: Sequence[int | tuple[int, int, int]],
                  *, baseline: bool = True, reference_repo: str | None = None, plain_decoder_too: bool = False,
                  contexts: Sequence[str] = ("slice_attention",), **common) -> list[BenchConfig]:
    """Per patch size: the nnU-Net baseline, then every encoder x decoder (with ``plain_decoder_too``,
    followed by the same with the decoder's plain path), each followed by the MedDINOv3 reference of
    the same encoder and decoder when ``reference_repo`` is given and the reference has that decoder
    (REFERENCE_DECODERS: not ``bottleneck``).

    A 3D patch (S, H, W) gets nnU-Net's 3d_fullres network as its baseline and MedDINOv3Net3D once per
    cross-slice context of ``contexts`` for each encoder x decoder; the reference has no 3D network.

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
        patch = patch if isinstance(patch, int) else tuple(patch)
        volumetric = not isinstance(patch, int)
        if baseline:
            configs.append(BenchConfig(network=BASELINE, patch_size=patch, **common))
        for encoder in encoders:
            for decoder in decoders:
                for context in contexts if volumetric else (None,):
                    ours = BenchConfig(network=OURS, patch_size=patch, encoder=encoder, decoder=decoder,
                                       context=context, **common)
                    configs.append(ours)
                    if plain_decoder_too:
                        configs.append(dataclasses.replace(ours, plain_decoder=True))
                if reference_repo is not None and decoder in REFERENCE_DECODERS and not volumetric:
                    configs.append(BenchConfig(network=REFERENCE, patch_size=patch, encoder=encoder, decoder=decoder,
                                               reference_repo=reference_repo,
                                               **{**common, "grad_checkpointing": False}))
    return configs
