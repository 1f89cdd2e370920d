"""The frozen teacher of a distillation stage (``stage: distillation``, pretrain/engine/distill.py).

Any encoder the loader reads can teach: a pretrain run folder or training checkpoint (its EMA teacher,
heads included), a ``pretrain export`` or a converted registry file (this project's safetensors: the
architecture is in the file), Meta's or MedDINOv3's files (a registry name knows its layout; a bare
path needs ``distill.teacher_encoder``). The teacher is an :class:`~pretrain.model.SSLNetwork` with
DINO and iBOT heads of the student's prototype counts; heads come from the file when it has them, or
from ``distill.teacher_heads`` (the head warm-up run's checkpoint). It never trains.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from nnunet_meddinov3.checkpoints.format import read_checkpoint
from nnunet_meddinov3.checkpoints.loading import (
    architecture_differences,
    build_encoder_from_checkpoint,
    read_state_dict,
)
from nnunet_meddinov3.checkpoints.registry import registry_entries, resolve_weights
from nnunet_meddinov3.network.configs import ENCODER_CONFIGS
from nnunet_meddinov3.network.encoder import DINOv3Encoder

from ..configs import ConfigError, PretrainConfig, config_from_dict
from ..configs.schema import ModelConfig
from ..heads import DINOHead
from ..model import MaskableBackbone, SSLNetwork, encoder_config, load_released_weights
from .checkpoint import read_training_checkpoint

HEADS = ("dino_head", "ibot_head")


@dataclass
class DistillTeacher:
    network: SSLNetwork
    model: ModelConfig  # the teacher's named layout and heads (what the head warm-up run trains)
    heads_loaded: bool
    record: dict  # source, layout, encoder, heads, licence: the run's provenance["teacher"]

    @property
    def licence(self) -> str | None:
        return self.record.get("licence")


def _is_training_run(path: Path) -> bool:
    return (path.is_dir() and (path / "checkpoints").is_dir()) or (
        path.is_file() and path.suffix == ".pt" and path.name.startswith("checkpoint_"))


def _frozen(network: SSLNetwork) -> SSLNetwork:
    network.requires_grad_(False)
    return network.eval()


def _heads_from(network: SSLNetwork, checkpoint: str) -> None:
    state = read_training_checkpoint(checkpoint)["teacher"]
    for name in HEADS:
        getattr(network, name).load_state_dict({k[len(name) + 1:]: v for k, v in state.items()
                                                if k.startswith(f"{name}.")})


def _from_training_run(path: Path) -> DistillTeacher:
    state = read_training_checkpoint(path)
    model = config_from_dict(state["config"]).model
    network = SSLNetwork.build(model, 0.0)
    network.load_state_dict(state["teacher"])
    licence = state["provenance"].get("licence")
    record = {"source": str(state["path"]), "layout": "meddinov3_pretrain_checkpoint", "encoder": model.encoder,
              "heads": "from the file", "licence": licence,
              "start_weights": state["provenance"].get("start_weights")}
    return DistillTeacher(network, dataclasses.replace(model, drop_path_rate=0.0), True, record)


def _network(model: ModelConfig, encoder: DINOv3Encoder | None = None) -> SSLNetwork:
    """The student's heads (prototype counts must match, Meta's step asserts it) on the teacher's encoder."""
    if encoder is None:
        return SSLNetwork.build(model, 0.0)

    def head(h):
        return DINOHead(encoder.embed_dim, h.prototypes, h.hidden_dim, h.bottleneck_dim, h.layers)

    return SSLNetwork(MaskableBackbone(encoder), head(model.dino_head), head(model.ibot_head))


def _from_weights(source: str, path: Path, student: ModelConfig, encoder_name: str | None) -> DistillTeacher:
    encoder = None
    if encoder_name is None and path.suffix == ".safetensors":  # this project's format records its architecture
        checkpoint = read_checkpoint(path)
        encoder = build_encoder_from_checkpoint(checkpoint)
        recorded = checkpoint.metadata.architecture
        fits = [n for n, c in ENCODER_CONFIGS.items() if not architecture_differences(recorded, c)]
        encoder_name = fits[0] if fits else None  # only a head warm-up run needs a name
    elif encoder_name is None:
        encoder_name = registry_entries().get(source, {}).get("encoder")
        if encoder_name is None:
            read_state_dict(path)  # an unreadable file says so first
            raise ConfigError(f"the teacher '{source}' does not record its architecture; name its layout with "
                              f"distill.teacher_encoder (one of {', '.join(sorted(ENCODER_CONFIGS))})")
    if encoder_name is not None and encoder_name not in ENCODER_CONFIGS:
        raise ConfigError(f"distill.teacher_encoder '{encoder_name}' unknown; known: "
                          f"{', '.join(sorted(ENCODER_CONFIGS))}")
    model = dataclasses.replace(student, encoder=encoder_name, drop_path_rate=0.0, layer_scale_init=None,
                                rope_rescale_coords=None, grad_checkpointing=False)
    network = _network(model, encoder)
    info = load_released_weights(network, str(path))
    record = {"source": source, "layout": info["layout"], "encoder": encoder_name or encoder.config.to_dict(),
              "heads": "from the file" if info["heads_loaded"] else None, "licence": info["licence"],
              "start_weights": {"source": source, "layout": info["layout"]}}
    return DistillTeacher(network, model, info["heads_loaded"], record)


def _one_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def load_teacher(config: PretrainConfig) -> DistillTeacher:
    """The frozen teacher of ``config`` (``distill.teacher``, ``distill.teacher_heads``), checked
    against the student; a ConfigError with one line when it cannot teach this student."""
    source = config.distill.teacher
    if not source:
        raise ConfigError(f"config '{config.name}': a distillation stage needs a teacher (--teacher NAME_OR_PATH, "
                          "or distill.teacher=...)")
    try:
        path = resolve_weights(source)
        if _is_training_run(path):
            teacher = _from_training_run(path)
        else:
            teacher = _from_weights(source, path, config.model, config.distill.teacher_encoder)
        if config.distill.teacher_heads and not teacher.heads_loaded:
            _heads_from(teacher.network, config.distill.teacher_heads)
            teacher.heads_loaded = True
            teacher.record["heads"] = f"head warm-up run {config.distill.teacher_heads}"
    except ConfigError:
        raise
    except Exception as e:  # unreadable, foreign or mismatched files: one line, exit status 2
        raise ConfigError(f"the teacher '{source}' cannot be read: {_one_line(e)}") from e
    check_teacher(config, teacher)
    _frozen(teacher.network)
    return teacher


def _parameters(encoder_cfg) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in DINOv3Encoder(encoder_cfg, in_channels=1).parameters())


def check_teacher(config: PretrainConfig, teacher: DistillTeacher) -> None:
    source = config.distill.teacher
    student = encoder_config(config.model, 0.0)
    taught = teacher.network.encoder
    if taught.patch_size != student.patch_size:
        raise ConfigError(f"the teacher '{source}' has patch size {taught.patch_size}, the student "
                          f"'{config.model.encoder}' {student.patch_size}: they must be equal")
    if _parameters(taught.config) < _parameters(student):
        raise ConfigError(f"the teacher '{source}' ({taught.config.embed_dim}-dim, {taught.config.depth} blocks) is "
                          f"smaller than the student '{config.model.encoder}' ({student.embed_dim}-dim, "
                          f"{student.depth} blocks): distil into a smaller model.encoder")
    for name, head in (("dino_head", config.model.dino_head), ("ibot_head", config.model.ibot_head)):
        prototypes = getattr(teacher.network, name).last_layer.weight.shape[0]
        if prototypes != head.prototypes:
            raise ConfigError(f"the teacher '{source}' has a {name} of {prototypes} prototypes, the student "
                              f"{head.prototypes}: set model.{name}.prototypes={prototypes}")


__all__ = ["DistillTeacher", "check_teacher", "load_teacher"]
