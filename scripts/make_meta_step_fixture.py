"""Regenerate tests/fixtures/meta_step_micro.pt: Meta's DINOv3 training step on a micro config (with
``--distillation``, meta_distill_step_micro.pt: its MultiDistillationMetaArch step, a frozen micro teacher).

tests/pretrain/test_meta_step.py holds our pretraining step (pretrain/engine/step.py's
``Trainer.train_iteration``) to what Meta's reference training code computes from the same weights
and the same batch. The reference is facebookresearch/dinov3 at commit REFERENCE_COMMIT: its
``SSLMetaArch`` (dinov3/train/ssl_meta_arch.py) computes the losses and gradients (``forward_backward``);
its train.py builds the optimiser (``build_optimizer`` over ``SSLMetaArch.get_params_groups``) and the
schedules (``build_schedulers``), sets them (``apply_optim_scheduler``), and its ``do_train`` loop body
(clip per student sub-network, ``optimizer.step()``, ``update_ema``) is called here in its order.
Nothing of Meta's code is copied into this repository: this script imports a checkout you point it at.

    git clone https://github.com/facebookresearch/dinov3
    git -C dinov3 checkout 6876159a11b4df116f30f667f8c9888617df0751
    pip install omegaconf termcolor      # Meta's imports; our package and tests need neither
    python scripts/make_meta_step_fixture.py --reference-root dinov3            # rewrite the fixture
    python scripts/make_meta_step_fixture.py --reference-root dinov3 --check    # compare, write nothing
    python scripts/make_meta_step_fixture.py --reference-root dinov3 --distillation [--check]

What runs differently from a GPU run of Meta's train.py, at runtime only: CPU, float32, one
thread; a 1-process gloo group stands in for its NCCL group (its losses all-reduce
unconditionally); ``Tensor.cuda`` returns the tensor itself; torch.compile is off (the iBOT
Sinkhorn-Knopp module is compiled in its constructor); no FSDP (``prepare_for_distributed_training``
is not called). A micro ViT (``MICRO_ENCODER``: width 32, 2 blocks, 1 input channel) is registered
in Meta's ``vision_transformer`` module and in our ``ENCODER_CONFIGS`` under one name, so both
build the same keys and shapes (Meta's ``build_model`` passes no ``in_chans``). The fixture keeps
that encoder config and our whole stage config, so the test needs neither this script nor Meta's code.

The inputs: random student weights with our keys (``_random_weights``: large enough that distinct
images have distinct features; the learned tokens N(0, 1), so that their weight decay is a visible
part of their update); the teacher is 0.9 x them + 0.1 x another draw, so that the teacher's forward
is not the student's. The batch is made by our own pipeline (``build_slice_dataset``,
``build_loader``: augmentation, collation, iBOT masks) from synthetic CT volumes (the demo's
generator). Meta then runs iterations 0 and 1 of the config: 0 has the warm-up's LR 0 (AdamW's
moments still take its gradient), 1 has LR peak / 2 with the last layer unfrozen.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nnunet_meddinov3.checkpoints.converters import from_dinov3_reference  # noqa: E402
from nnunet_meddinov3.network.configs import ENCODER_CONFIGS, EncoderConfig  # noqa: E402
from reference_checkout import (  # noqa: E402
    ENCODER_FILES,
    REFERENCE_COMMIT,
    REFERENCE_URL,
    changed_reference_files,
    import_reference,
    reference_file_hashes,
)

REFERENCE_FILES = (
    "dinov3/train/ssl_meta_arch.py",
    "dinov3/train/train.py",
    "dinov3/train/cosine_lr_scheduler.py",
    "dinov3/train/param_groups.py",
    "dinov3/loss/dino_clstoken_loss.py",
    "dinov3/loss/ibot_patch_loss.py",
    "dinov3/loss/koleo_loss.py",
    "dinov3/models/__init__.py",
    *ENCODER_FILES,
    "dinov3/layers/dino_head.py",
    "dinov3/configs/ssl_default_config.yaml",
)
FIXTURE, DISTILL_FIXTURE = (REPO / "tests" / "fixtures" / n for n in ("meta_step_micro.pt", "meta_distill_step_micro.pt"))
DISTILL_REFERENCE_FILES = (*REFERENCE_FILES, "dinov3/train/multidist_meta_arch.py")
SEED = 0
ITERATIONS = (0, 1)  # the steps run, in order, from the initial weights
SCHEDULE_LENGTH = 34  # schedule values stored for iterations [0, 34): past the config's 30

# The encoder: our MedDINOv3 layout (no qkv bias, LayerNorm eps 1e-6, 4 storage tokens) at a size
# that keeps the fixture small, RoPE in fp32; Meta's side is DinoVisionTransformer with the same
# numbers (MICRO_ARCH below). In bf16, RoPE's rounding of q and k turns last-bit differences of
# float32 summation order into bf16 steps: with it, our step computed with AVX2 kernels instead of
# AVX-512 moved a parameter group's update 8.5e-4 (relative) from Meta's, against 1.5e-5 with fp32.
# The bf16 RoPE itself is held to Meta's by tests/test_encoder.py.
ENCODER_NAME = "meta_step_micro"
MICRO_ARCH = "vit_meta_step_micro"  # its name in Meta's vision_transformer module
MICRO_ENCODER = ENCODER_CONFIGS["meddinov3_tiny"].replace(embed_dim=32, depth=2, num_heads=2, rope_dtype="fp32")
# --distillation: the micro student taught by a frozen 48-dim, 3-block teacher with the student config's heads
TEACHER_NAME, TEACHER_ARCH = "meta_step_micro_teacher", "vit_meta_step_micro_teacher"
MICRO_TEACHER = MICRO_ENCODER.replace(embed_dim=48, depth=3, num_heads=3)
# tiny_stage1 made smaller (crops, heads, batch) and given schedules that move within the two steps
CONFIG_OVERRIDES = [
    f"model.encoder={ENCODER_NAME}",
    "model.drop_path_rate=0.0",
    "model.dino_head={prototypes: 64, hidden_dim: 32, bottleneck_dim: 16, layers: 2}",
    "model.ibot_head={prototypes: 64, hidden_dim: 32, bottleneck_dim: 16, layers: 2}",
    "data.batch_size=4",
    "data.body_threshold=null",
    "crops.n_local=2",
    "crops.global_sizes=[48]",
    "crops.local_sizes=[32]",
    "loss.teacher_temp_start=0.02",
    "loss.teacher_temp_end=0.04",
    "loss.teacher_temp_warmup_iterations=4",
    "optim.warmup_iterations=3",
    "optim.freeze_last_layer_iterations=1",
    "optim.weight_decay=0.04",
    "optim.weight_decay_end=0.4",
    "train.iterations=30",
]
# vitb16_stage1's schedules at global batch 512, compared at these iterations (its arrays are 125k long)
LOSS_KEYS = ("dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss")  # Meta's loss_dict
STAGE1_POINTS = [0, 1, 2, 6249, 12498, 12499, 12500, 12501, 37498, 37499, 37500, 68750, 124999, 125000, 125010]


def our_config(distillation: bool = False):
    from unittest.mock import patch

    from nnunet_meddinov3.network.configs import MEDDINOV3_LAYOUT
    from pretrain.configs import load_config

    ENCODER_CONFIGS.setdefault(ENCODER_NAME, MICRO_ENCODER)
    ENCODER_CONFIGS.setdefault(TEACHER_NAME, MICRO_TEACHER)
    if not distillation:
        return load_config("tiny_stage1", CONFIG_OVERRIDES)
    # the micro student's fp32 RoPE (above) is no layout a fine-tuning trainer builds: let it pass that check
    with patch.dict(MEDDINOV3_LAYOUT, rope_dtype=MICRO_ENCODER.rope_dtype):
        return load_config("tiny_stage1", [*CONFIG_OVERRIDES, "stage=distillation"])


def meta_key_to_ours(key: str) -> str:
    """A key of Meta's ``SSLMetaArch.student`` / ``.teacher`` -> ours (heads share their keys)."""
    if not key.startswith("backbone."):
        return key
    inner = key[len("backbone."):]
    if inner == "mask_token":
        return "backbone.mask_token"
    (converted,) = from_dinov3_reference({inner: None}).keys()
    return "backbone.encoder." + converted


def _random_weights(network, generator: torch.Generator) -> dict:
    """Weights that make distinct images give distinct features: matrices N(0, 1 / fan_in), biases
    N(0, 0.2^2), norm weights 1 + 0.3 N(0, 1), layer scales 0.5 + 0.2 N(0, 1), tokens N(0, 1), prototypes
    N(0, 0.1^2) per unit bottleneck. The encoder's own initialisation (std 0.02) leaves a random micro
    ViT's CLS features of different slices within ~1e-3 of each other on the sphere, where KoLeo's
    -log(distance) turns float rounding into 1e-3 of the loss and flips nearest neighbours between
    CPU instruction sets."""
    state = {}
    for name, value in network.state_dict().items():
        if not value.is_floating_point() or name.endswith("periods"):
            state[name] = value.clone()
            continue
        noise = torch.randn(value.shape, generator=generator)
        if name.endswith("last_layer.weight"):
            state[name] = 0.1 * noise
        elif name.endswith("_token"):
            state[name] = noise
        elif "norm" in name and name.endswith("weight"):
            state[name] = 1 + 0.3 * noise
        elif "gamma" in name:
            state[name] = 0.5 + 0.2 * noise
        elif name.endswith("bias"):
            state[name] = 0.2 * noise
        else:
            state[name] = noise / value[0].numel() ** 0.5
    return state


def teacher_weights(config) -> dict:
    """The frozen teacher of --distillation: random weights (another seed) of the micro teacher with heads."""
    from pretrain.model import SSLNetwork

    network = SSLNetwork.build(type(config.model)(**{**vars(config.model), "encoder": TEACHER_NAME}), 0.0)
    return _random_weights(network, torch.Generator().manual_seed(SEED + 1))


def initial_weights(config) -> tuple[dict, dict]:
    from pretrain.model import build_student_and_teacher

    student, _ = build_student_and_teacher(config.model)  # for its keys, shapes and buffers
    generator = torch.Generator().manual_seed(SEED)
    s = _random_weights(student, generator)
    o = _random_weights(student, generator)
    t = {k: (0.9 * v + 0.1 * o[k]) if v.is_floating_point() and not k.endswith("periods") else v.clone()
         for k, v in s.items()}
    return s, t


def our_batch(config) -> dict:
    """One batch of our pipeline (slice cache, augmentation, collation, iBOT masks) from synthetic volumes."""
    import SimpleITK as sitk

    from nnunet_meddinov3.data.synthetic_ct import synthetic_case
    from pretrain.engine.data import build_loader, build_slice_dataset

    with tempfile.TemporaryDirectory() as tmp:
        for case in range(4):  # four patients: slices of one volume look alike
            image, _ = synthetic_case(np.random.default_rng([SEED, case]), shape=(2, 64, 64))
            volume = sitk.GetImageFromArray(image)
            volume.SetSpacing((0.8, 0.8, 3.0))
            sitk.WriteImage(volume, str(Path(tmp) / f"ct_{case}.nii.gz"))
        config.data.roots = [tmp]
        slices = build_slice_dataset(config, Path(tmp) / "cache")
        loader = build_loader(config, slices, rank=0, world_size=1, accumulation=1, start_iteration=0,
                              stop_iteration=1, pin_memory=False, patch_size=16)
        batch = next(iter(loader))
        config.data.roots = []
    keep = ("global_crops", "local_crops", "masks", "mask_indices", "masks_weight", "n_masked_patches")
    return {k: batch[k].clone() for k in keep}


def meta_config(config, reference):
    """Meta's config for the same step: its defaults, with our stage config's numbers."""
    from omegaconf import OmegaConf

    cfg = reference.get_default_config()
    o, loss, model = config.optim, config.loss, config.model
    total = config.train.iterations
    updates = {
        "student": {"arch": MICRO_ARCH, "patch_size": 16, "drop_path_rate": model.drop_path_rate,
                    "layerscale": model.layer_scale_init, "qkv_bias": False, "norm_layer": "layernorm",
                    "n_storage_tokens": MICRO_ENCODER.n_storage_tokens, "mask_k_bias": True,
                    "pos_embed_rope_base": MICRO_ENCODER.rope_base},
        "dino": {"head_n_prototypes": model.dino_head.prototypes, "head_hidden_dim": model.dino_head.hidden_dim,
                 "head_bottleneck_dim": model.dino_head.bottleneck_dim, "head_nlayers": model.dino_head.layers,
                 "loss_weight": loss.dino_weight, "koleo_loss_weight": loss.koleo_weight},
        "ibot": {"head_n_prototypes": model.ibot_head.prototypes, "head_hidden_dim": model.ibot_head.hidden_dim,
                 "head_bottleneck_dim": model.ibot_head.bottleneck_dim, "head_nlayers": model.ibot_head.layers,
                 "loss_weight": loss.ibot_weight},
        "crops": {"local_crops_number": config.crops.n_local, "global_crops_size": config.crops.global_sizes[0],
                  "local_crops_size": config.crops.local_sizes[0]},
        "train": {"OFFICIAL_EPOCH_LENGTH": 1, "batch_size_per_gpu": config.data.batch_size},
        "teacher": {"momentum_teacher": o.momentum_start, "final_momentum_teacher": o.momentum_end,
                    "warmup_teacher_temp": loss.teacher_temp_start, "teacher_temp": loss.teacher_temp_end,
                    "warmup_teacher_temp_epochs": loss.teacher_temp_warmup_iterations},
        "optim": {"epochs": total, "lr": o.lr, "min_lr": o.min_lr, "warmup_epochs": o.warmup_iterations,
                  "weight_decay": o.weight_decay, "weight_decay_end": o.weight_decay_end,
                  "freeze_last_layer_epochs": o.freeze_last_layer_iterations, "clip_grad": o.clip_grad,
                  "layerwise_decay": o.layerwise_decay, "patch_embed_lr_mult": o.patch_embed_lr_mult,
                  "adamw_beta1": o.betas[0], "adamw_beta2": o.betas[1], "scaling_rule": "none"},
    }
    assert o.scaling_rule == "none" and loss.student_temp == 0.1 and loss.sinkhorn_iterations == 3
    return OmegaConf.merge(cfg, OmegaConf.create(updates))


class Reference:
    """Meta's modules, imported from the checkout with the runtime patches the module docstring lists."""

    def __init__(self, root: Path):
        import_reference(root)
        torch._dynamo.config.disable = True  # before the iBOT loss compiles its Sinkhorn-Knopp module
        torch.Tensor.cuda = lambda self, *args, **kwargs: self  # forward_backward moves its batch to CUDA
        import dinov3.distributed.torch_distributed_wrapper as wrapper
        import dinov3.models.vision_transformer as vits
        from dinov3.configs import get_default_config
        from dinov3.train import train as train_module
        from dinov3.train.multidist_meta_arch import MultiDistillationMetaArch
        from dinov3.train.ssl_meta_arch import SSLMetaArch

        for arch, e in ((MICRO_ARCH, MICRO_ENCODER), (TEACHER_ARCH, MICRO_TEACHER)):
            setattr(vits, arch, lambda patch_size=16, e=e, **kwargs: vits.DinoVisionTransformer(
                patch_size=patch_size, embed_dim=e.embed_dim, depth=e.depth, num_heads=e.num_heads,
                ffn_ratio=e.mlp_ratio, in_chans=1, pos_embed_rope_dtype=e.rope_dtype, **kwargs))
        if not torch.distributed.is_initialized():
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
            torch.distributed.init_process_group("gloo", rank=0, world_size=1)
        wrapper._DEFAULT_PROCESS_GROUP = torch.distributed.group.WORLD
        self.get_default_config = get_default_config
        self.SSLMetaArch = SSLMetaArch
        self.MultiDistillationMetaArch = MultiDistillationMetaArch
        self.train = train_module


def run_reference(reference: Reference, config, student: dict, teacher: dict, batch: dict,
                  distill_teacher: dict | None = None) -> dict:
    """Meta's step; with ``distill_teacher`` MultiDistillationMetaArch's, whose frozen ``teacher`` gives the targets
    and whose ``model_ema`` (our ``teacher``, the student's EMA) follows the student."""
    from omegaconf import OmegaConf

    cfg = meta_config(config, reference)
    with tempfile.TemporaryDirectory() as tmp:
        if distill_teacher is not None:  # the teacher's config file, as _setup_distillation reads it
            OmegaConf.save(OmegaConf.merge(cfg, {"student": {"arch": TEACHER_ARCH}}), Path(tmp) / "teacher.yaml")
            cfg = OmegaConf.merge(cfg, {"distillation": {"enabled": True, "checkpoint_path": "ignore",
                                                         "full_cfg_path": str(Path(tmp) / "teacher.yaml")}})
        arch = reference.SSLMetaArch if distill_teacher is None else reference.MultiDistillationMetaArch
        model = arch(cfg)  # backbones on the meta device (as train.py builds them)
    model.to_empty(device="cpu")
    model.init_weights()
    for module, weights in ((model.student, student), (model.model_ema, teacher), (model.teacher, distill_teacher)):
        if weights is not None:  # model.teacher is model.model_ema in SSLMetaArch
            module.load_state_dict({k: weights[meta_key_to_ours(k)] for k in module.state_dict()}, strict=True)
    model.train()
    names = {meta: meta_key_to_ours(meta) for meta, _ in model.student.named_parameters()}

    optimizer = reference.train.build_optimizer(cfg, model.get_params_groups())
    lr_s, wd_s, mom_s, temp_s, last_s = reference.train.build_schedulers(cfg)
    data = {
        "collated_global_crops": batch["global_crops"], "collated_local_crops": batch["local_crops"],
        "collated_masks": batch["masks"], "mask_indices_list": batch["mask_indices"],
        "masks_weight": batch["masks_weight"], "upperbound": int(batch["mask_indices"].numel()),
        "global_batch_size": config.data.batch_size,
    }
    steps = []
    for it in ITERATIONS:
        # do_train's loop body, in its order
        lr, wd, mom, temp, last_lr = lr_s[it], wd_s[it], mom_s[it], temp_s[it], last_s[it]
        reference.train.apply_optim_scheduler(optimizer, lr, wd, last_lr)
        optimizer.zero_grad(set_to_none=True)
        data["n_masked_patches"] = batch["n_masked_patches"].reshape(1).clone()  # all-reduced in place
        total, metrics = model.forward_backward(data, teacher_temp=temp, iteration=it)
        # the gradients of the last step only (the fixture's size); earlier steps keep their norms
        grads = {names[n]: p.grad.detach().clone() for n, p in model.student.named_parameters()
                 if p.grad is not None and it == ITERATIONS[-1]}
        norms = {k: float(torch.nn.utils.clip_grad_norm_(v.parameters(), max_norm=cfg.optim.clip_grad))
                 for k, v in model.student.items()}
        optimizer.step()
        model.update_ema(mom)
        steps.append({
            "iteration": it,
            "schedule": {"lr": float(lr), "weight_decay": float(wd), "momentum": float(mom),
                         "teacher_temp": float(temp), "last_layer_lr": float(last_lr)},
            "losses": {"total_loss": float(total.detach()),
                       **{k: float(torch.as_tensor(metrics[k]).detach()) for k in LOSS_KEYS}},
            "grad_norms": norms,
            "grads": grads,
        })
    schedules = {"iterations": list(range(SCHEDULE_LENGTH))}
    for key, s in (("lr", lr_s), ("weight_decay", wd_s), ("momentum", mom_s), ("teacher_temp", temp_s),
                   ("last_layer_lr", last_s)):
        schedules[key] = [float(s[i]) for i in range(SCHEDULE_LENGTH)]
    groups = [{"names": [names[n] for n, p in model.student.named_parameters()
                         if any(p is q for q in g["params"])],
               **{k: g[k] for k in ("lr_multiplier", "wd_multiplier", "is_last_layer")}}
              for g in optimizer.param_groups]
    return {
        "steps": steps,
        "student_after": {names[n]: p.detach().clone() for n, p in model.student.named_parameters()},
        "teacher_after": {names[n]: p.detach().clone() for n, p in model.model_ema.named_parameters()},
        "param_groups": groups,
        "schedules": schedules,
    }


def stage1_schedule_points(reference: Reference) -> dict:
    """Meta's build_schedulers for vitb16_stage1 (its own recipe in iterations; lr already scaled)."""
    from omegaconf import OmegaConf

    from pretrain.configs import load_config
    from pretrain.optim import scaled_lr

    c = load_config("vitb16_stage1")
    epoch = 1250
    assert all(n % epoch == 0 for n in (c.train.iterations, c.optim.warmup_iterations,
                                        c.optim.freeze_last_layer_iterations, c.loss.teacher_temp_warmup_iterations))
    cfg = OmegaConf.merge(reference.get_default_config(), OmegaConf.create({
        "train": {"OFFICIAL_EPOCH_LENGTH": epoch},
        "optim": {"epochs": c.train.iterations // epoch, "lr": scaled_lr(c.optim, 512), "min_lr": c.optim.min_lr,
                  "warmup_epochs": c.optim.warmup_iterations // epoch, "weight_decay": c.optim.weight_decay,
                  "weight_decay_end": c.optim.weight_decay_end,
                  "freeze_last_layer_epochs": c.optim.freeze_last_layer_iterations // epoch},
        "teacher": {"momentum_teacher": c.optim.momentum_start, "final_momentum_teacher": c.optim.momentum_end,
                    "warmup_teacher_temp": c.loss.teacher_temp_start, "teacher_temp": c.loss.teacher_temp_end,
                    "warmup_teacher_temp_epochs": c.loss.teacher_temp_warmup_iterations // epoch},
    }))
    schedules = reference.train.build_schedulers(cfg)
    keys = ("lr", "weight_decay", "momentum", "teacher_temp", "last_layer_lr")
    return {"global_batch_size": 512, "iterations": STAGE1_POINTS,
            **{k: [float(s[i]) for i in STAGE1_POINTS] for k, s in zip(keys, schedules)}}


def make(root: Path, distillation: bool = False) -> dict:
    torch.set_num_threads(1)
    reference = Reference(root)
    config = our_config(distillation)
    student, teacher = initial_weights(config)
    batch = our_batch(config)
    frozen = teacher_weights(config) if distillation else None
    result = run_reference(reference, config, student, teacher, batch, frozen)
    if distillation:
        result.update(distill_teacher=frozen, teacher_encoder={"name": TEACHER_NAME, "config": MICRO_TEACHER.to_dict()})
    else:
        result["stage1_schedules"] = stage1_schedule_points(reference)
    return {
        "info": {
            "reference_url": REFERENCE_URL, "reference_commit": REFERENCE_COMMIT, "torch": str(torch.__version__),
            "ref_file_sha256": reference_file_hashes(root, DISTILL_REFERENCE_FILES if distillation else REFERENCE_FILES),
            "python": platform.python_version(), "threads": 1, "seed": SEED, "iterations": list(ITERATIONS),
            "config_overrides": list(CONFIG_OVERRIDES),
        },
        "encoder": {"name": ENCODER_NAME, "config": MICRO_ENCODER.to_dict()},
        "config": config.to_dict(),
        "student": student,
        "teacher": teacher,
        "batch": batch,
        **result,
    }


def compare(new, old, where: str = "fixture") -> list[str]:
    if isinstance(new, dict):
        if not isinstance(old, dict) or set(new) != set(old):
            return [f"{where}: keys differ"]
        return [d for k in new for d in compare(new[k], old[k], f"{where}.{k}")]
    if isinstance(new, (list, tuple)):
        if not isinstance(old, (list, tuple)) or len(new) != len(old):
            return [f"{where}: lengths differ"]
        return [d for i, (a, b) in enumerate(zip(new, old)) for d in compare(a, b, f"{where}[{i}]")]
    if isinstance(new, torch.Tensor):
        same = (isinstance(old, torch.Tensor) and new.dtype == old.dtype and new.shape == old.shape
                and torch.equal(new, old))
        return [] if same else [f"{where}: tensors differ"]
    return [] if new == old else [f"{where}: {new!r} != {old!r}"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference-root", type=Path, required=True, help="folder containing the dinov3 package")
    parser.add_argument("--check", action="store_true", help="compare with the committed fixture, write nothing")
    parser.add_argument("--allow-other-reference", action="store_true",
                        help="accept reference files whose sha256 differs from the commit's")
    parser.add_argument("--distillation", action="store_true",
                        help=f"MultiDistillationMetaArch's step instead (default output {DISTILL_FIXTURE.name})")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    args.output = args.output or (DISTILL_FIXTURE if args.distillation else FIXTURE)
    changed = changed_reference_files(args.reference_root, DISTILL_REFERENCE_FILES)
    if changed and not args.allow_other_reference:
        print(f"reference files differ from commit {REFERENCE_COMMIT}: {changed}", file=sys.stderr)
        return 2
    fixture = make(args.reference_root, args.distillation)
    if args.check:
        old = torch.load(args.output, weights_only=True)
        differences = compare(fixture, old)
        for d in differences[:20]:
            print(d)
        print("identical" if not differences else f"{len(differences)} differences")
        return 1 if differences else 0
    torch.save(fixture, args.output)
    print(f"wrote {args.output} ({args.output.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
