"""The encoder of a LoRA fine-tuning run, adapters merged, as a weights file (``meddinov3 weights merge-lora``).

An nnU-Net checkpoint of a LoRA run holds the unchanged base weights and the adapters apart
(:mod:`nnunet_meddinov3.network.lora`); this writes ``W + scaling * B @ A`` for each adapted layer into
this project's one weights format (:mod:`nnunet_meddinov3.checkpoints.format`), with the architecture
rebuilt from the checkpoint's own plans and trainer, and the run recorded as a stage of its history.
The file then loads like any other encoder (``MEDDINOV3_WEIGHTS``, ``build_encoder(checkpoint=...)``).
"""
from __future__ import annotations

from pathlib import Path

from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_meddinov3.checkpoints.format import (
    CheckpointMetadata,
    file_sha256,
    read_checkpoint,
    write_checkpoint,
)
from nnunet_meddinov3.checkpoints.keys import PATCH_EMBED_KEY
from nnunet_meddinov3.checkpoints.loading import build_encoder_from_checkpoint
from nnunet_meddinov3.data.intensity import INTENSITY_PRESETS
from nnunet_meddinov3.network import lora
from nnunet_meddinov3.network.configs import EncoderConfig, resolve_encoder_config
from nnunet_meddinov3.nnunet_checkpoints import read_checkpoint_lazily
from nnunet_meddinov3.training import recipe
from nnunet_meddinov3.training import trainer as trainers

NETWORK_PREFIX = "encoder."  # MedDINOv3Net.encoder


def encoder_config_of(checkpoint: dict) -> EncoderConfig:
    """The encoder architecture the run trained, from its recorded plans and trainer (as the predictor
    rebuilds the network)."""
    name = checkpoint.get("trainer_name")
    cls = getattr(trainers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, trainers.nnUNetTrainerMedDINOv3)):
        raise ValueError(f"the checkpoint was written by trainer {name!r}, not one of this package's MedDINOv3 "
                         f"trainers: its encoder architecture cannot be rebuilt here")
    init_args = checkpoint.get("init_args") or {}
    configuration = PlansManager(init_args["plans"]).get_configuration(init_args["configuration"])
    kwargs = cls.network_kwargs(configuration)
    return resolve_encoder_config(kwargs["encoder"], drop_path_rate=kwargs.get("drop_path_rate", 0.0),
                                  **kwargs.get("encoder_overrides", {}))


def merged_encoder_state(network_weights: dict) -> tuple[dict, dict]:
    """(the encoder's ``vit.*`` tensors with the adapters merged, the adapters' settings)."""
    record_key = f"{NETWORK_PREFIX}{lora.RECORD_NAME}._extra_state"
    if record_key not in network_weights:
        raise ValueError(f"this checkpoint has no LoRA adapters ({record_key} is missing): it is a run with "
                         f"lora_rank=0, whose encoder weights are network_weights['{NETWORK_PREFIX}*'] as they are")
    merged = lora.merged_state_dict(network_weights, NETWORK_PREFIX)
    state = {k[len(NETWORK_PREFIX):]: v for k, v in merged.items() if k.startswith(NETWORK_PREFIX)}
    return state, dict(network_weights[record_key])


def export_merged_encoder(checkpoint_file: str | Path, output: str | Path) -> CheckpointMetadata:
    """Write the merged encoder of the LoRA run ``checkpoint_file`` to ``output`` (.safetensors), then
    read it back (hashes) and load it strictly into an encoder rebuilt from its header."""
    checkpoint_file = Path(checkpoint_file)
    checkpoint = read_checkpoint_lazily(str(checkpoint_file))
    state, settings = merged_encoder_state(checkpoint["network_weights"])
    state = {k: v.clone() for k, v in state.items()}  # out of the memory-mapped file
    config = encoder_config_of(checkpoint)
    run = (checkpoint.get("init_args") or {}).get(recipe.CHECKPOINT_KEY) or {}
    started = dict(run.get("weights") or {})
    provenance = started.pop("provenance", None) or {}
    started.pop("intensity", None)
    kernel = state.get(PATCH_EMBED_KEY)
    stage = {"stage": "nnunet-lora-finetuning", "trainer": checkpoint.get("trainer_name"),
             "plans": run.get("plans"), "epochs_done": int(checkpoint.get("current_epoch", 0)), "lora": settings,
             "recipe": run.get("values")}
    metadata = CheckpointMetadata(
        architecture=config.to_dict(),
        # fine-tuned inside nnU-Net: the encoder now expects what the run's plans fed it
        intensity=INTENSITY_PRESETS["nnunet"],
        in_channels=int(kernel.shape[1]) if kernel is not None else 3,
        stages=list(provenance.get("stages") or []) + [stage],
        licence=provenance.get("licence") or "",
        source={"file": checkpoint_file.name, "sha256": file_sha256(checkpoint_file),
                "layout": "nnunet_checkpoint_lora", "started_from": started or None},
    )
    written = write_checkpoint(output, state, metadata)
    build_encoder_from_checkpoint(read_checkpoint(output), in_channels=metadata.in_channels)
    return written
