"""The teacher's targets of one optimiser step, centred over the whole global batch.

Meta's step centres the teacher's outputs with Sinkhorn-Knopp over its whole global batch (every
rank's rows). Under gradient accumulation the same global batch arrives in ``accumulation``
micro-batches, and centring each alone gives Sinkhorn-Knopp that many times fewer rows: on 2 GPUs x
64 images x 4 micro-steps, 256 rows instead of 1024. A DINO head's escape from uniform targets is
sensitive to exactly that count (pretrain/README.md, "Does it learn?"), so the trainer runs the
teacher over every micro-batch first (no gradient) and centres once, as here; the student
micro-steps then learn against these targets. KoLeo stays per micro-batch, Meta's per-GPU batch.

The cost is holding the teacher's head logits of the rank's whole share of the global batch until
the last micro-step; ``loss.centre_over: micro_batch`` trades the centring back for that memory:
the trainer then runs the teacher and centres one micro-batch at a time, as before
(nnunet_meddinov3/benchmark/RESULTS.md measures both at the ViT-B/16 recipe).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..losses import sinkhorn_knopp

GLOBAL_BATCH = "global_batch"  # the values of loss.centre_over
MICRO_BATCH = "micro_batch"


@dataclass
class TeacherPass:
    """What the losses and the monitors need of one micro-batch's teacher pass (crop-major rows)."""

    cls: torch.Tensor  # (n_global * B, D) backbone CLS features
    dino_logits: torch.Tensor  # (n_global * B, K_dino)
    ibot_logits: torch.Tensor  # (M, K_ibot), the masked patches in ``masks.nonzero()`` order


@torch.no_grad()
def teacher_pass(teacher, global_crops: torch.Tensor, mask_indices: torch.Tensor) -> TeacherPass:
    out = teacher.teacher_forward(global_crops, mask_indices)
    # the patch tokens are not kept: n_global * B * P * D per micro-batch, and no loss reads them
    return TeacherPass(out["cls"], out["dino_global"], out["ibot_masked"])


@torch.no_grad()
def centred_targets(passes: list[TeacherPass], teacher_temp: float,
                    n_iterations: int) -> list[dict[str, torch.Tensor]]:
    """Per pass ``{"dino": (n_global * B, K), "ibot": (M, K)}`` Sinkhorn-Knopp probabilities, all
    passes' rows centred together (and every rank's: the Sinkhorn-Knopp sums are all-reduced).
    Consumes the passes' logits (sets them to None), so that they are not held twice.

    Sinkhorn-Knopp treats its rows alike whatever their order, so one micro-batch of N x B images
    and N micro-batches of B give the same targets up to float summation order.
    """
    centred = {}
    for name, attribute in (("dino", "dino_logits"), ("ibot", "ibot_logits")):
        rows = [getattr(p, attribute) for p in passes]
        for p in passes:
            setattr(p, attribute, None)
        sizes = [r.shape[0] for r in rows]
        # straight into the float32 buffer Sinkhorn-Knopp then works in: at most the logits (bf16
        # under autocast) plus that buffer are held at once
        joined = rows[0].new_empty((sum(sizes), rows[0].shape[1]), dtype=torch.float32)
        start = 0
        while rows:  # each piece freed once copied (torch.cat(out=) would add a bf16 temporary)
            piece = rows.pop(0)
            joined[start:start + piece.shape[0]].copy_(piece)
            start += piece.shape[0]
            del piece
        centred[name] = list(sinkhorn_knopp(joined, teacher_temp, n_iterations, in_place=True).split(sizes))
    return [{"dino": d, "ibot": i} for d, i in zip(centred["dino"], centred["ibot"])]
