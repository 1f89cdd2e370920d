"""Stage 0 of continued pretraining: heads first, on a frozen backbone, then the backbone joins.

Released weights come without (matching) DINO/iBOT heads. Training randomly initialised heads
and the backbone together from the first step would push large, meaningless gradients into the
pretrained backbone; instead the backbone's LR is 0 until the DINO loss has settled (a fixed
number of iterations, or a plateau rule), then it warms up linearly. The backbone still runs
forward and backward meanwhile (an LR of 0 keeps DDP/FSDP's gradient bookkeeping unchanged).
"""

from __future__ import annotations

from ..configs.schema import HeadWarmupConfig


class HeadWarmup:
    def __init__(self, config: HeadWarmupConfig, active: bool):
        self.config = config
        self.active = active
        self.unfreeze_iteration: int | None = None
        self.losses: list[float] = []

    @property
    def frozen(self) -> bool:
        return self.active and self.unfreeze_iteration is None

    def backbone_factor(self, iteration: int) -> float:
        """Multiplier of the backbone LR at ``iteration``: 0 while frozen, then a linear warm-up."""
        if not self.active:
            return 1.0
        if self.unfreeze_iteration is None or iteration < self.unfreeze_iteration:
            return 0.0
        warmup = self.config.backbone_warmup_iterations
        return 1.0 if warmup <= 0 else min(1.0, (iteration - self.unfreeze_iteration + 1) / warmup)

    def observe(self, iteration: int, dino_loss: float) -> str | None:
        """Record the (all-reduced) DINO loss of ``iteration``; returns a message when the backbone
        is unfrozen from the next iteration on."""
        if not self.frozen:
            return None
        c, done = self.config, iteration + 1
        settled = False
        if c.plateau_window <= 0:
            settled = done >= c.iterations
            reason = f"after the fixed {c.iterations} head-only iterations"
        else:
            self.losses = (self.losses + [dino_loss])[-2 * c.plateau_window:]
            if len(self.losses) == 2 * c.plateau_window:
                before = sum(self.losses[: c.plateau_window]) / c.plateau_window
                last = sum(self.losses[c.plateau_window:]) / c.plateau_window
                improvement = (before - last) / max(abs(before), 1e-12)
                settled = improvement < c.plateau_tolerance
                reason = f"DINO loss settled (window mean {before:.4f} -> {last:.4f})"
            if not settled and done >= c.max_iterations:
                settled, reason = True, f"head warm-up reached its maximum of {c.max_iterations} iterations"
        if not settled:
            return None
        self.unfreeze_iteration = done
        return f"head warm-up done at iteration {done}: {reason}; the backbone LR warms up over " \
               f"{c.backbone_warmup_iterations} iterations"

    def state_dict(self) -> dict:
        return {"active": self.active, "unfreeze_iteration": self.unfreeze_iteration, "losses": list(self.losses)}

    def load_state_dict(self, state: dict) -> None:
        self.active = bool(state["active"])
        self.unfreeze_iteration = state["unfreeze_iteration"]
        self.losses = [float(v) for v in state["losses"]]
