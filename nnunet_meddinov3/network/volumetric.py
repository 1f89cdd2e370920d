"""MedDINOv3Net3D: the 2D MedDINOv3 network on nnU-Net's 3d_fullres patches, slice by slice, with
cross-slice context that starts as the identity.

nnU-Net hands a 3d_fullres network (B, C, S0, S1, S2) with the coarsest axis first, so the plane of
the last two axes is the plane the 2D weights were trained on. The 2D encoder runs unchanged on
every slice of that plane (slices folded into the batch), which is why any 2D weights file loads
into ``net.encoder`` exactly as into :class:`MedDINOv3Net`'s; the context's parameters live in
``net.slice_context``, outside the encoder. Context kinds (:mod:`.slice_context`):

- ``"slice_attention"``: attention across slices after each tapped block, inside the encoder, so
  later blocks build on it: the placement of the published methods that beat nnU-Net (MA-SAM,
  TimeSformer-style divided attention; see the notes on lifting 2D ViTs to 3D);
- ``"depth_conv"``: a (3, 1, 1) convolution across slices on each tapped feature map, decoder side:
  cheaper, and weaker in the literature;
- ``"none"``: exactly the 2D network on each slice.

Both context kinds are zero-initialised residual branches: at the start of fine-tuning the network
computes exactly what the 2D network computes on each slice.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nnunet_meddinov3.network.meddinov3_net import MedDINOv3Net
from nnunet_meddinov3.network.slice_context import CONTEXT_KINDS, SliceContext
from nnunet_meddinov3.network.timm_adapter import embed_tokens, run_block, run_checkpointed, transformer_blocks


class MedDINOv3Net3D(MedDINOv3Net):
    """(B, C, S, H, W) patches -> (B, num_classes, S, H, W) float32 logits, the 2D encoder and
    decoder run on every (H, W) slice, with ``context`` mixing information across slices.

    Takes every argument of :class:`MedDINOv3Net` (positional or keyword, same meaning, same
    checks), plus ``context`` (one of ``CONTEXT_KINDS``) and ``context_heads`` (heads of the slice
    attention; default: the encoder's). H and W are padded to a multiple of 16 and the logits cropped
    back, as in 2D; S is not padded. The slice attention acts on the patch tokens only: the cls and
    storage tokens are per-image summaries with no position to line up across slices, and each
    slice's next block spreads the context into them anyway.

    Stochastic depth (``drop_path_rate``) drops a block's branch for a random subset of the B*S
    slices, i.e. per slice, as the 2D recipe drops it per image.
    """

    def __init__(self, input_channels: int, num_classes: int, *args, context: str = "slice_attention",
                 context_heads: int | None = None, **kwargs):
        if context not in CONTEXT_KINDS:
            raise ValueError(f"unknown context '{context}'; choose one of {CONTEXT_KINDS}")
        super().__init__(input_channels, num_classes, *args, **kwargs)
        self.context = context
        config = self.encoder.config
        self.slice_context = None if context == "none" else SliceContext(
            context, config.embed_dim, self.feature_layers, context_heads or config.num_heads, config.norm_eps)

    def context_parameter_count(self) -> int:
        """Parameters the cross-slice context adds to the 2D network (0 for ``context='none'``)."""
        return 0 if self.slice_context is None else sum(p.numel() for p in self.slice_context.parameters())

    def _check_volume(self, x: torch.Tensor) -> None:
        if x.dim() != 5:
            raise ValueError(f"MedDINOv3Net3D takes (B, C, S, H, W) patches, got shape {tuple(x.shape)}; "
                             f"for 2D data use MedDINOv3Net / the 2d configuration")
        if x.shape[1] != self.encoder.in_channels:
            raise ValueError(f"MedDINOv3Net3D was built for {self.encoder.in_channels} input channel(s), got "
                             f"{x.shape[1]} (input shape {tuple(x.shape)})")
        if self.slice_context is not None and x.shape[2] < 2:
            raise ValueError(f"context '{self.context}' mixes slices and needs S >= 2 slices per patch, got "
                             f"{x.shape[2]}: plan more slices per patch or build the network with context='none'")

    def slice_features(self, slices: torch.Tensor, num_slices: int) -> list[torch.Tensor]:
        """The tokens the decoder gets: per tapped block, in block order, (B*S, h*w, D) patch tokens.

        ``slices``: (B*S, C, H, W), H and W multiples of 16, the S slices of each volume adjacent.
        The blocks run one at a time so the slice attention can write into the residual stream; each
        tap is the final norm's patch-token part, as ``forward_intermediates(norm=True)`` computes it.
        Without context, or at initialisation, this equals ``encoder.intermediate_tokens`` on each slice.
        """
        encoder, context = self.encoder, self.slice_context
        n_prefix = 1 + encoder.config.n_storage_tokens
        taps = sorted(self.feature_layers)  # timm returns the blocks in block order, whatever the order asked
        tokens, rope = embed_tokens(encoder.vit, slices)
        features = []
        for index, block in enumerate(transformer_blocks(encoder.vit)[:taps[-1] + 1]):
            tokens = run_block(encoder.vit, block, tokens, rope)
            if index not in taps:
                continue
            if context is not None and context.in_residual_stream:
                patches = run_checkpointed(encoder.vit, context, index, tokens[:, n_prefix:], num_slices)
                tokens = torch.cat([tokens[:, :n_prefix], patches], dim=1)
            patches = encoder.final_norm(tokens)[:, n_prefix:]
            if context is not None and not context.in_residual_stream:
                patches = run_checkpointed(encoder.vit, context, index, patches, num_slices)
            features.append(patches)
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_volume(x)
        batch, _, num_slices, height, width = x.shape
        p = self.encoder.patch_size
        x = F.pad(x, (0, -width % p, 0, -height % p)) if height % p or width % p else x
        slices = x.transpose(1, 2).flatten(0, 1)  # (B*S, C, H, W), the slices of a volume adjacent
        with self._precision(x):
            features = self.slice_features(slices, num_slices)
            logits = self.decoder.forward_tokens(features, (slices.shape[-2] // p, slices.shape[-1] // p))
        logits = logits.unflatten(0, (batch, num_slices)).transpose(1, 2)
        return logits[..., :height, :width].float().contiguous()

    def extra_repr(self) -> str:
        return f"context={self.context!r}, context_parameters={self.context_parameter_count():,}"


# How nnU-Net plans refer to this class (``architecture.network_class_name``, resolved by import).
NETWORK_3D_CLASS_NAME = f"{MedDINOv3Net3D.__module__}.{MedDINOv3Net3D.__qualname__}"
