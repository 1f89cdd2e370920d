"""The pretraining stage config: plain dataclasses, filled from YAML and dotted overrides.

Every field has a default, so a YAML file only states what differs (and may name a ``base``
config to start from). Lengths are in iterations, not epochs: a CT slice collection has no
natural epoch, and Meta's epoch of 1250 iterations is converted where its numbers are used.
The dict <-> dataclass conversion with its checks is in :mod:`pretrain.configs.plain`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pretrain.data.intensity import MEDDINOV3_CT, CTIntensity, MRIntensity

from .plain import ConfigError, to_plain

LR_SCHEDULES = ("warmup_cosine", "cosine_rise_constant", "warmup_constant")
SCALING_RULES = ("sqrt_wrt_1024", "none")
STAGES = ("self_distillation", "gram_anchoring", "high_resolution", "distillation")
DISTILLATION = "distillation"  # the stage of `python -m pretrain distill` (pretrain/engine/distill.py)


@dataclass
class InitConfig:
    """Where the weights come from when the stage starts (a resumed run ignores both)."""

    # Released backbone weights to continue from (path or registry name, any DINOv3 layout). Heads
    # and the iBOT mask token are taken from the file when it has them.
    weights: str | None = None
    # A training checkpoint of an earlier stage (file or run folder): student, teacher and heads.
    checkpoint: str | None = None


@dataclass
class HeadConfig:
    prototypes: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    layers: int = 3


@dataclass
class ModelConfig:
    encoder: str = "meddinov3_vitb16"  # a name of nnunet_meddinov3.network.encoder.ENCODER_CONFIGS
    drop_path_rate: float = 0.3  # student only; the teacher runs without drop path
    layer_scale_init: float | None = None  # None: the encoder config's (1e-5); only matters from scratch
    dino_head: HeadConfig = field(default_factory=HeadConfig)
    ibot_head: HeadConfig = field(default_factory=HeadConfig)
    grad_checkpointing: bool = False
    # Student RoPE coordinates scaled by a log-uniform factor in [1/R, R] each pass (DINOv3's
    # pos_embed_rope_rescale_coords): null in Meta's ViT-L recipe MedDINOv3 started from, 2 in its
    # later Gram and high-resolution stages. Teachers run in eval mode and never rescale.
    rope_rescale_coords: float | None = None


@dataclass
class DataConfig:
    roots: list[str] = field(default_factory=list)  # nnU-Net raw datasets, NIfTI or DICOM folders
    cache_dir: str | None = None  # slice cache; default: slice_cache/ next to the run (shared by a chain)
    intensity: dict = field(
        default_factory=lambda: MEDDINOV3_CT.to_dict()
    )
    target_spacing: list[float] | None = None  # in-plane (row, column) mm; None keeps each volume's own
    body_threshold: float | None = -500.0
    min_body_fraction: float = 0.05
    # The leakage guard: cases never read for pretraining.
    exclude_case_ids: list[str] = field(default_factory=list)
    exclude_test_images_of: list[str] = field(default_factory=list)  # nnU-Net raw dataset folders (imagesTs)
    exclude_validation_of: list[str] = field(default_factory=list)  # "path/splits_final.json:FOLD"
    batch_size: int = 64  # slices per process per micro-step
    num_workers: int = 8


@dataclass
class CropsConfig:
    """Crop sizes as parallel lists: entry i is one (global, local, Gram teacher) triple drawn with
    probability ``probabilities[i]`` for a whole iteration (all ranks use the same triple)."""

    n_local: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    global_sizes: list[int] = field(default_factory=lambda: [224])
    local_sizes: list[int] = field(default_factory=lambda: [96])
    gram_teacher_sizes: list[int] | None = None  # None: 2x the global size (when the Gram loss is on)
    probabilities: list[float] = field(default_factory=lambda: [1.0])


@dataclass
class AugmentConfig:
    """Per-crop augmentation of :class:`~pretrain.data.augment.MultiCropAugmentation` (its docstring
    says what each does). The photometric part must leave two views of one slice recognisably the
    same: a tiny run on natural images sits at uniform targets with the CT window below at
    ``window_p`` 0.8 / ``window_width`` from 0.25, and learns with it off (pretrain/README.md)."""

    flip_p: float = 0.5
    window_p: float = 0.8  # a random display window stretched back onto the full range
    window_width: tuple[float, float] = (0.25, 1.0)  # its width, as a fraction of the value range
    contrast_p: float = 0.8
    contrast: tuple[float, float] = (0.6, 1.4)
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)  # global crop 1, global crop 2, local crops
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.2  # second global crop only


@dataclass
class MaskingConfig:
    probability: float = 0.5  # fraction of global crops that get an iBOT mask
    ratio: tuple[float, float] = (0.1, 0.5)
    min_block_patches: int = 4


@dataclass
class LossConfig:
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    # Nearest neighbours among this many samples of adjacent ranks (DINOv3's distributed KoLeo: 16 in
    # its high-resolution stage); null: each rank's own batch, as its stage 1. See KoLeoLoss.
    koleo_group_size: int | None = None
    student_temp: float = 0.1
    teacher_temp_start: float = 0.04
    teacher_temp_end: float = 0.07
    teacher_temp_warmup_iterations: int = 37500  # Meta: 30 epochs x 1250
    # Extra factor on the local DINO term, cosine from start to end over the ramp (Gram stage: 1 -> 0.5).
    local_dino_weight_start: float = 1.0
    local_dino_weight_end: float = 1.0
    local_dino_weight_ramp_iterations: int = 0
    sinkhorn_iterations: int = 3
    # Sinkhorn-Knopp centres the teacher over the whole global batch, every micro-batch of a
    # gradient-accumulation step and every rank, as Meta's step does over its global batch;
    # micro_batch centres each micro-batch alone and saves the memory of holding the teacher's logits
    # of the whole step (pretrain/engine/teacher_targets.py).
    centre_over: str = "global_batch"


@dataclass
class GramConfig:
    enabled: bool = False
    weight: float = 2.0
    weight_ramp_iterations: int = 0  # cosine ramp from 0 to ``weight``; 0 = constant
    # "ema": a frozen snapshot of the EMA teacher at the stage start; "previous" / "previous@N": the
    # teacher of the chain's previous stage (its last checkpoint / the one at iteration N); or a path
    # or registry name of any checkpoint (a training checkpoint, an export, released weights).
    teacher: str = "ema"
    refresh_every: int = 0  # copy the EMA teacher into the Gram teacher every K iterations; 0 = never
    img_level: bool = True  # one Gram matrix per image (False: one over all patches of the batch)


@dataclass
class OptimConfig:
    lr: float = 1e-3  # before the scaling rule
    scaling_rule: str = "sqrt_wrt_1024"  # lr * 4 * sqrt(global batch / 1024) (DINOv3), or "none"
    min_lr: float = 1e-6
    lr_schedule: str = "warmup_cosine"  # or cosine_rise_constant (high-res stage), warmup_constant
    warmup_iterations: int = 12500  # Meta: 10 epochs x 1250
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float = 3.0  # per sub-network (backbone, DINO head, iBOT head); 0 = off
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    freeze_last_layer_iterations: int = 1250  # Meta: 1 epoch
    # Meta decays the CLS, storage and iBOT mask tokens like any weight (its no-decay rule matches
    # only biases, norms and layer scales); false spares them, as this project did before.
    weight_decay_on_tokens: bool = True
    momentum_start: float = 0.992
    momentum_end: float = 1.0
    global_batch_size: int | None = None  # reached by gradient accumulation; None = batch_size x processes


@dataclass
class HeadWarmupConfig:
    """Stage 0 of continued pretraining: new heads learn on a frozen backbone first.

    ``enabled``: "auto" (on when the stage starts from released weights without heads), "on", "off".
    The heads train alone for ``iterations`` iterations, or, with ``plateau_window`` > 0, until the
    mean DINO loss of the last window improved by less than ``plateau_tolerance`` (relative) on the
    window before (at most ``max_iterations``); then the backbone LR warms up linearly over
    ``backbone_warmup_iterations``.
    """

    enabled: str = "auto"
    iterations: int = 1000
    plateau_window: int = 0
    plateau_tolerance: float = 0.01
    max_iterations: int = 5000
    backbone_warmup_iterations: int = 1000


@dataclass
class DistillConfig:
    """``stage: distillation``: a frozen teacher's centred DINO and iBOT targets teach a smaller student
    (Meta's MultiDistillationMetaArch; pretrain/engine/distill.py). The student is ``model``; the
    engine's EMA teacher is the student's EMA (Meta's ``model_ema``), which is what is exported."""

    # Path or registry name of the teacher: a pretrain run folder or checkpoint (heads included), a
    # ``pretrain export``, Meta's or MedDINOv3's files; "previous" in a chain: the previous stage.
    teacher: str | None = None
    # The teacher's named layout (ENCODER_CONFIGS) for files that do not record it (Meta's .pth);
    # null: from the file's metadata, the run's config or the registry entry.
    teacher_encoder: str | None = None
    # A training checkpoint whose DINO/iBOT heads the teacher takes (set by the head warm-up run that
    # `distill` makes first when the teacher file has no heads; its length is head_warmup.iterations).
    teacher_heads: str | None = None


@dataclass
class TrainConfig:
    iterations: int = 125000  # the schedules' length (Meta: 100 epochs x 1250)
    max_iterations: int | None = None  # stop early (with a checkpoint) at this iteration: a planned interruption
    seed: int = 0
    checkpoint_every: int = 2500
    keep_last: int = 3
    keep_every: int = 0  # also keep every checkpoint at a multiple of this (Gram teachers); 0 = none
    log_every: int = 10
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU), bf16, fp32
    parallel: str = "ddp"  # ddp or fsdp (FSDP2 fully_shard)
    progress_bar: bool = True
    # How long a collective (checkpoint, step) may wait for the slowest process before the job fails.
    # The slice cache build does not count: processes wait for each other's shares without a timeout.
    distributed_timeout_minutes: float = 30.0


@dataclass
class MonitorConfig:
    """Collapse and divergence guards, on by default; a threshold of null switches that check off."""

    nonfinite_patience: int = 3  # consecutive non-finite losses that stop the run
    # Uniform collapse, checked per head (pretrain/engine/monitors.py): a head whose teacher targets are
    # near uniform (normalised per-image / per-patch entropy at or above ``max_teacher_sample_entropy``)
    # while its loss sits within ``uniform_loss_margin`` (relative) of its uniform value (DINO: ln K;
    # iBOT: ln K x the share of global crops with a mask, ln K / 2 at masking.probability 0.5) and its
    # logits have flattened (teacher_logit_std / teacher_ibot_logit_std at most ``max_teacher_logit_std``,
    # a quarter of the ~0.02 of the initialisation; null drops this condition) stops the run, even
    # while the other head learns. A head that has not left its uniform value yet but keeps a logit
    # spread is still learning, not collapsed. A head with loss weight 0 is not checked.
    max_teacher_sample_entropy: float | None = 0.98
    uniform_loss_margin: float | None = 0.01
    max_teacher_logit_std: float | None = 0.005
    min_feature_std: float | None = 0.02  # std of the L2-normalised teacher CLS features x sqrt(D)
    # Prototype concentration: normalised entropy of the teacher's batch-mean distribution (1 = every
    # prototype used evenly). The batch's rows can use at most that many prototypes: N rows that each
    # pick their own read ln N / ln K, so a floor must sit well below that. The iBOT floor is off by
    # default: the masked patches of one image (air, one organ) may rightly share a few prototypes.
    min_teacher_entropy: float | None = None  # DINO head, over the images
    min_teacher_ibot_entropy: float | None = None  # iBOT head, over the masked patches
    max_koleo: float | None = None
    patience: int = 50  # consecutive iterations one check must fail before a collapse stop
    start_iteration: int | None = None  # first checked iteration; null: the end of optim.warmup_iterations


@dataclass
class EvalConfig:
    """Linear-probe curves while pretraining: every ``every`` iterations the EMA teacher is probed as
    ``meddinov3 probe`` does (frozen encoder, one linear layer trained for ``steps`` steps on at most
    ``max_slices`` slices per training case) on an nnU-Net dataset's preprocessed ``configuration``,
    scored on ``fold``'s validation cases, which the pretraining data must not contain."""

    dataset: str | None = None  # nnU-Net dataset id or name; null: no probe
    every: int = 0
    configuration: str = "2d"
    plans: str = "nnUNetPlans"
    fold: int = 0
    steps: int = 100
    max_slices: int = 8


@dataclass
class DebugConfig:
    inject_nan_at_iteration: int | None = None  # the loss becomes NaN from this iteration ...
    inject_nan_iterations: int = 3  # ... for this many iterations
    # Slow things down, for the tests of what must survive a slow build or a kill mid-write:
    cache_build_delay_s: float = 0.0  # seconds added to the build of every cached volume
    checkpoint_write_delay_s: float = 0.0  # seconds between writing a checkpoint's temporary file and its rename


@dataclass
class PretrainConfig:
    name: str = ""
    stage: str = "self_distillation"
    init: InitConfig = field(default_factory=InitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    gram: GramConfig = field(default_factory=GramConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    head_warmup: HeadWarmupConfig = field(default_factory=HeadWarmupConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    @property
    def gram_sizes(self) -> list[int] | None:
        """Gram-teacher crop size per triple, or None when the Gram loss is off."""
        if not self.gram.enabled:
            return None
        return self.crops.gram_teacher_sizes or [2 * s for s in self.crops.global_sizes]

    def validate(self) -> PretrainConfig:
        """This config, if it can be run; else a ConfigError that names the field and what is valid."""
        self._check(self.stage in STAGES, f"stage must be one of {STAGES}, got {self.stage!r}")
        self._check_model_and_crops()
        self._check_loss_and_data()
        self._check_augment_and_masking()
        self._check_schedule_and_run()
        if self.stage == DISTILLATION:
            self._check_distillation()
        return self

    def _check(self, ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(f"config '{self.name}': {message}")

    def _check_model_and_crops(self) -> None:
        from nnunet_meddinov3.network.configs import ENCODER_CONFIGS

        check = self._check
        check(self.model.encoder in ENCODER_CONFIGS,
              f"model.encoder '{self.model.encoder}' unknown; known: {', '.join(sorted(ENCODER_CONFIGS))}")
        c = self.crops
        n = len(c.global_sizes)
        lists = {"local_sizes": c.local_sizes, "probabilities": c.probabilities}
        if c.gram_teacher_sizes is not None:
            lists["gram_teacher_sizes"] = c.gram_teacher_sizes
        for key, values in lists.items():
            check(len(values) == n, f"crops.{key} has {len(values)} entries, crops.global_sizes {n}")
        check(n > 0 and abs(sum(c.probabilities) - 1) < 1e-6 and min(c.probabilities) >= 0,
              f"crops.probabilities must be non-negative and sum to 1, got {c.probabilities}")
        # Global and Gram-teacher crops carry patch grids (masks, Gram matrices); a local crop is
        # only cut into whole patches (Meta's 168 px local crops give 10 x 10 patches).
        patch = ENCODER_CONFIGS[self.model.encoder].patch_size
        sizes = c.global_sizes + (self.gram_sizes or [])
        check(all(s > 0 and s % patch == 0 for s in sizes),
              f"global and Gram-teacher crop sizes must be multiples of the patch size {patch}, got {sizes}")
        check(all(s >= patch for s in c.local_sizes), f"local crops must be >= {patch} px")
        check(c.n_local >= 0, "crops.n_local must be >= 0")
        check(self.model.rope_rescale_coords is None or self.model.rope_rescale_coords >= 1,
              f"model.rope_rescale_coords must be >= 1 or null, got {self.model.rope_rescale_coords}")

    def _check_loss_and_data(self) -> None:
        from nnunet_meddinov3.data.intensity import INTENSITY_FIELDS, validate_intensity

        check = self._check
        check(self.loss.centre_over in ("global_batch", "micro_batch"),
              f"loss.centre_over must be global_batch or micro_batch, got {self.loss.centre_over!r}")
        check(self.loss.koleo_group_size is None or self.loss.koleo_group_size >= 2,
              f"loss.koleo_group_size must be >= 2 or null, got {self.loss.koleo_group_size}")
        check(self.data.batch_size >= 2, "data.batch_size must be >= 2 (KoLeo needs a nearest neighbour)")
        kinds = (CTIntensity.kind, MRIntensity.kind)
        intensity = self.data.intensity
        check(intensity.get("kind") in kinds,
              f"data.intensity.kind must be one of {kinds} for pretraining, got {intensity.get('kind')!r} "
              "(data.intensity.kind=mri selects the MRI preset with its defaults)")
        # the rule the exported checkpoint's metadata must pass, checked now rather than at export
        try:
            validate_intensity(intensity)
        except ValueError as e:
            reason = str(e).removeprefix("invalid checkpoint metadata: ")
            raise ConfigError(f"config '{self.name}': data.intensity {intensity}: {reason}") from e
        extra = sorted(set(intensity) - {"kind", *INTENSITY_FIELDS[intensity["kind"]]})
        check(not extra, f"data.intensity: the {intensity['kind']} preset has no field(s) {extra}; its fields: "
                         f"{', '.join(INTENSITY_FIELDS[intensity['kind']])}")

    def _check_augment_and_masking(self) -> None:
        check = self._check
        a = self.augment
        probabilities = {"flip_p": a.flip_p, "window_p": a.window_p, "contrast_p": a.contrast_p,
                         "solarize_p": a.solarize_p, **{f"blur_p[{i}]": p for i, p in enumerate(a.blur_p)}}
        bad = {k: v for k, v in probabilities.items() if not 0 <= v <= 1}
        check(not bad, f"augment probabilities must be in [0, 1], got {bad}")
        check(0 < a.window_width[0] <= a.window_width[1] <= 1, "augment.window_width must be 0 < low <= high <= 1")
        check(0 < a.contrast[0] <= a.contrast[1], "augment.contrast must be 0 < low <= high")
        check(0 < a.blur_sigma[0] <= a.blur_sigma[1], "augment.blur_sigma must be 0 < low <= high")
        check(0 <= self.masking.probability <= 1, "masking.probability must be in [0, 1]")
        check(0 <= self.masking.ratio[0] < self.masking.ratio[1] <= 1, "masking.ratio must be 0 <= low < high <= 1")

    def _check_schedule_and_run(self) -> None:
        check = self._check
        check(self.optim.lr_schedule in LR_SCHEDULES, f"optim.lr_schedule must be one of {LR_SCHEDULES}")
        check(self.optim.scaling_rule in SCALING_RULES, f"optim.scaling_rule must be one of {SCALING_RULES}")
        check(self.head_warmup.enabled in ("auto", "on", "off"), "head_warmup.enabled must be auto, on or off")
        check(self.train.precision in ("auto", "bf16", "fp32"), "train.precision must be auto, bf16 or fp32")
        check(self.train.parallel in ("ddp", "fsdp"), "train.parallel must be ddp or fsdp")
        check(self.train.iterations > 0, "train.iterations must be positive")
        check(self.train.keep_last >= 1, "train.keep_last must be >= 1")
        check(self.monitor.nonfinite_patience >= 1, "monitor.nonfinite_patience must be >= 1")
        check(self.monitor.patience >= 1, "monitor.patience must be >= 1")
        check(self.eval.dataset is None or self.eval.every > 0,
              "eval.every must be a positive number of iterations when eval.dataset is set")
        check(self.eval.dataset is None or self.train.parallel == "ddp",
              "eval (the probe) runs on the main process's teacher; it needs train.parallel=ddp")
        check(self.eval.steps >= 1 and self.eval.max_slices >= 1, "eval.steps and eval.max_slices must be >= 1")
        check(self.init.weights is None or self.init.checkpoint is None,
              "init.weights and init.checkpoint exclude each other (a checkpoint already holds weights)")

    def _check_distillation(self) -> None:
        from nnunet_meddinov3.network.configs import ENCODER_CONFIGS, MEDDINOV3_LAYOUT

        self._check(not self.gram.enabled, "the distillation stage has no Gram loss (gram.enabled must be false)")
        # what a fine-tuning trainer rebuilds: MedDINOv3's layout (nnUNetTrainerMedDINOv3*) or Meta's (_DINOv3)
        student = ENCODER_CONFIGS[self.model.encoder]
        fields = [k for k in MEDDINOV3_LAYOUT if k != "layer_scale_init"]
        layouts = {"MedDINOv3": MEDDINOV3_LAYOUT, "DINOv3": {k: getattr(ENCODER_CONFIGS["vitb16"], k) for k in fields}}
        fits = [n for n, lay in layouts.items() if all(getattr(student, k) == lay[k] for k in fields)]
        self._check(bool(fits), f"model.encoder '{self.model.encoder}': a student layout the fine-tuning trainers "
                                f"cannot load (they load MedDINOv3's {MEDDINOV3_LAYOUT} or DINOv3's "
                                f"{layouts['DINOv3']})")
