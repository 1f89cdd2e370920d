"""Student, EMA teacher and Gram teacher networks of DINOv3 pretraining.

The backbone is the project's own :class:`~nnunet_meddinov3.network.encoder.DINOv3Encoder`, so
what pretraining produces is exactly what fine-tuning loads. iBOT needs the student to see a
learnable mask token in place of masked patches *before* the transformer blocks;
:class:`MaskableBackbone` owns that token and runs the encoder's own token path with it
(``forward_tokens(x, masks, mask_token)``).
"""

from __future__ import annotations

import torch
from torch import nn

from nnunet_meddinov3.checkpoints.format import DINOV3_LICENCE, read_checkpoint
from nnunet_meddinov3.checkpoints.keys import teacher_state
from nnunet_meddinov3.checkpoints.loading import load_encoder_weights, read_state_dict
from nnunet_meddinov3.checkpoints.registry import resolve_weights
from nnunet_meddinov3.network.configs import EncoderConfig, resolve_encoder_config
from nnunet_meddinov3.network.encoder import DINOv3Encoder

from .configs.schema import ModelConfig
from .heads import DINOHead
from .losses import resize_patch_features

ENCODER_KEY_PREFIX = "backbone.encoder."  # where the DINOv3Encoder's own keys sit in an SSLNetwork


def encoder_config(config: ModelConfig, drop_path_rate: float) -> EncoderConfig:
    overrides = {"drop_path_rate": drop_path_rate}
    if config.layer_scale_init is not None:
        overrides["layer_scale_init"] = config.layer_scale_init
    return resolve_encoder_config(config.encoder, **overrides)


class MaskableBackbone(nn.Module):
    """A DINOv3Encoder plus the iBOT mask token; ``forward`` returns the reference's token dict."""

    def __init__(self, encoder: DINOv3Encoder):
        super().__init__()
        self.encoder = encoder
        # (1, D) as in Meta's layout, so a checkpoint's ``mask_token`` can be loaded as is.
        self.mask_token = nn.Parameter(torch.zeros(1, encoder.embed_dim))

    def forward(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """x (B, C, H, W); masks (B, H/16 * W/16) bool or None -> the encoder's token dict
        (:meth:`~nnunet_meddinov3.network.encoder.DINOv3Encoder.forward_tokens`), with the mask token
        in place of the masked patches."""
        return self.encoder.forward_tokens(x, masks, self.mask_token if masks is not None else None)


class SSLNetwork(nn.Module):
    """Backbone + separate DINO (CLS) and iBOT (patch) heads: the student, and the EMA teacher."""

    def __init__(self, backbone: MaskableBackbone, dino_head: DINOHead, ibot_head: DINOHead):
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head

    @classmethod
    def build(cls, config: ModelConfig, drop_path_rate: float) -> SSLNetwork:
        encoder = DINOv3Encoder(encoder_config(config, drop_path_rate), in_channels=1)
        encoder.set_grad_checkpointing(config.grad_checkpointing)
        encoder.set_rope_coordinate_rescaling(config.rope_rescale_coords)
        dim = encoder.embed_dim

        def head(h):
            return DINOHead(dim, h.prototypes, h.hidden_dim, h.bottleneck_dim, h.layers)

        return cls(MaskableBackbone(encoder), head(config.dino_head), head(config.ibot_head))

    @property
    def encoder(self) -> DINOv3Encoder:
        return self.backbone.encoder

    def forward(
        self,
        global_crops: torch.Tensor,
        local_crops: torch.Tensor,
        masks: torch.Tensor,
        mask_indices: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """The student pass: masked global crops and local crops (crop-major rows, see collate).

        Returns ``cls`` (n_global*B, D) and ``patch`` (n_global*B, P, D) backbone outputs of the
        masked global crops, DINO logits ``dino_global`` / ``dino_local`` and iBOT logits
        ``ibot_masked`` (M, K) of the masked patches in ``mask_indices`` order.
        """
        global_out = self.backbone(global_crops, masks)
        cls_tokens = [global_out["x_norm_clstoken"]]
        if local_crops.shape[0]:
            cls_tokens.append(self.backbone(local_crops)["x_norm_clstoken"])
        # one head pass for all CLS tokens, as the reference
        logits = self.dino_head(torch.cat(cls_tokens))
        n_global = global_crops.shape[0]
        patch = global_out["x_norm_patchtokens"]
        masked = patch.flatten(0, 1).index_select(0, mask_indices)
        cls = global_out["x_norm_clstoken"]
        if mask_indices.numel() == 0 or masks is None:
            # keep the mask token in the graph: DDP expects a gradient for every parameter (and Meta's ViT adds
            # 0 x the mask token when nothing is masked, as for a distilled student: its weight decay still acts)
            cls = cls + 0.0 * self.backbone.mask_token.sum()
        return {
            "cls": cls,
            "patch": patch,
            "dino_global": logits[:n_global],
            "dino_local": logits[n_global:],
            "ibot_masked": self.ibot_head(masked),
        }

    @torch.no_grad()
    def teacher_forward(self, global_crops: torch.Tensor, mask_indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """The teacher pass: un-masked global crops; raw logits (centering is the loss's job)."""
        out = self.backbone(global_crops)
        patch = out["x_norm_patchtokens"]
        return {
            "cls": out["x_norm_clstoken"],
            "patch": patch,
            "dino_global": self.dino_head(out["x_norm_clstoken"]),
            "ibot_masked": self.ibot_head(patch.flatten(0, 1).index_select(0, mask_indices)),
        }


def build_student_and_teacher(config: ModelConfig) -> tuple[SSLNetwork, SSLNetwork]:
    """A student (with drop path) and a teacher starting as its exact copy (without drop path)."""
    student = SSLNetwork.build(config, config.drop_path_rate)
    teacher = SSLNetwork.build(config, 0.0)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    teacher.eval()
    return student, teacher


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 DTensor parameter, the tensor itself otherwise."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _resharded(*modules: nn.Module) -> None:
    """FSDP2 keeps a root module's parameters gathered after a forward without backward (the
    teachers); pair shards only after resharding them."""
    for module in modules:
        if hasattr(module, "reshard"):
            module.reshard()


@torch.no_grad()
def update_ema(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher = momentum * teacher + (1 - momentum) * student, parameter by parameter (paired
    by name; under FSDP2 both are sharded alike, so local shards pair up)."""
    _resharded(teacher, student)
    t_named, s_named = dict(teacher.named_parameters()), dict(student.named_parameters())
    if t_named.keys() != s_named.keys():
        raise RuntimeError("teacher and student have different parameters")
    t_params = [_local(t_named[k]) for k in t_named]
    s_params = [_local(s_named[k].detach()) for k in t_named]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


# --- released weights (continued pretraining) --------------------------------------------------------


def load_released_weights(network: SSLNetwork, source: str) -> dict:
    """Load released backbone weights (any DINOv3 layout, strict) into ``network``.

    DINO/iBOT heads and the iBOT mask token are taken from the file when it has them with
    matching shapes (MedDINOv3's training checkpoint has heads; Meta's hub files have a
    ``mask_token`` but no heads). Returns what was loaded and the weights' licence.
    """
    path = resolve_weights(source)  # the file is read once, here
    if path.suffix == ".safetensors":  # this project's format: encoder keys only, licence recorded
        checkpoint = read_checkpoint(path)
        layout = load_encoder_weights(network.encoder, checkpoint)  # its errors name checkpoint.path
        info = {"source": str(source), "layout": layout, "heads_loaded": False, "mask_token_loaded": False}
        info["licence"] = checkpoint.metadata.licence or DINOV3_LICENCE
        info["stages"] = list(checkpoint.metadata.stages)
        return info
    state = read_state_dict(path)
    layout = load_encoder_weights(network.encoder, state, name=f"'{path}'")
    info = {"source": str(source), "layout": layout, "heads_loaded": False, "mask_token_loaded": False}
    info["licence"] = DINOV3_LICENCE  # Meta's and MedDINOv3's released weights
    raw = teacher_state(state)
    for key in ("backbone.mask_token", "mask_token"):
        token = raw.get(key)
        if isinstance(token, torch.Tensor) and token.numel() == network.backbone.mask_token.numel():
            network.backbone.mask_token.data.copy_(token.reshape(network.backbone.mask_token.shape))
            info["mask_token_loaded"] = True
            break
    heads = {}
    for name in ("dino_head", "ibot_head"):
        module = getattr(network, name)
        state = {k[len(name) + 1 :]: v for k, v in raw.items() if k.startswith(f"{name}.")}
        target = module.state_dict()
        if set(state) == set(target) and all(state[k].shape == target[k].shape for k in target):
            heads[name] = state
    if len(heads) == 2:  # both or neither: a half-trained pair would not match
        for name, state in heads.items():
            getattr(network, name).load_state_dict(state)
        info["heads_loaded"] = True
    return info


# --- the Gram teacher ------------------------------------------------------------------------------


def build_gram_teacher(config: ModelConfig) -> DINOv3Encoder:
    """A frozen encoder of the student's architecture (no heads, no drop path)."""
    encoder = DINOv3Encoder(encoder_config(config, 0.0), in_channels=1)
    encoder.requires_grad_(False)
    return encoder.eval()


@torch.no_grad()
def copy_teacher_into_gram(gram_teacher: DINOv3Encoder, teacher: SSLNetwork) -> None:
    """Snapshot the EMA teacher's backbone into the Gram teacher (initialisation and refreshes)."""
    _resharded(gram_teacher, teacher)
    source = dict(teacher.encoder.named_parameters())
    for name, g in gram_teacher.named_parameters():
        _local(g).copy_(_local(source[name]))


def encoder_state_from_training_checkpoint(state: dict) -> dict:
    """The teacher backbone's encoder keys (``vit.*``) of one of our training checkpoints."""
    teacher = state["teacher"]
    return {k[len(ENCODER_KEY_PREFIX) :]: v for k, v in teacher.items() if k.startswith(ENCODER_KEY_PREFIX)}


def gram_teacher_patch_features(
    gram_teacher: DINOv3Encoder, crops: torch.Tensor, grid: tuple[int, int]
) -> torch.Tensor:
    """The Gram teacher's patch features of ``crops`` on the student's patch ``grid``: (B, h*w, D).

    The patch tokens are read from the ``x_norm_patchtokens`` *key* of the token dict (Meta's early
    code read an attribute of it, so its Gram target was not the patch features), then resized
    bicubically from the teacher's larger grid.
    """
    with torch.no_grad():
        tokens = gram_teacher.forward_tokens(crops)["x_norm_patchtokens"]
    patch = gram_teacher.patch_size
    maps = tokens.unflatten(1, (crops.shape[-2] // patch, crops.shape[-1] // patch))
    if tuple(maps.shape[1:3]) != tuple(grid):
        maps = resize_patch_features(maps, grid)
    return maps.flatten(1, 2)


__all__ = [
    "ENCODER_KEY_PREFIX",
    "MaskableBackbone",
    "SSLNetwork",
    "build_gram_teacher",
    "build_student_and_teacher",
    "copy_teacher_into_gram",
    "encoder_state_from_training_checkpoint",
    "gram_teacher_patch_features",
    "load_released_weights",
    "update_ema",
]
