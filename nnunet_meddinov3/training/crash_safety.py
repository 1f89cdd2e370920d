"""Fine-tuning that no kill, stop signal or half-written file can break.

nnU-Net writes ``checkpoint_latest/best/final.pth`` in place and dies at once on SIGTERM. This module
adds, for any ``nnUNetTrainer`` subclass (:class:`CrashSafeTraining`, placed before ``nnUNetTrainer``
in the bases):

- **atomic checkpoints**: nnU-Net's own ``save_checkpoint`` writes a temporary file in the same folder,
  which is fsynced and renamed onto the target, and the folder is fsynced: a kill at any moment leaves
  either the previous file or the new one, never a truncated one;
- **``--c`` past an unreadable checkpoint**: nnU-Net picks final > latest > best by existence only; a file
  that cannot be read is named in a warning and the next one in that order is used;
- **a finished run stays finished**: ``--c`` on a run whose ``checkpoint_final.pth`` has reached the
  schedule's end trains nothing and leaves that file as it is;
- **SIGTERM / SIGUSR1** (cluster pre-emption, SLURM's warning before a time limit): training stops at the
  end of the current iteration, saves ``checkpoint_latest.pth`` and exits with status 128 + the signal
  number and a message saying how to resume.

Why the end of an iteration and not of the epoch: an nnU-Net epoch (250 iterations and 50 validation
iterations) takes minutes on a GPU, longer than the grace between SIGTERM and SIGKILL of SLURM (30 s by
default) or Kubernetes (30 s). A checkpoint taken inside epoch ``e`` records ``current_epoch = e`` and
the logs of epochs ``0..e-1`` only, so ``--c`` restarts epoch ``e`` from its first iteration with nnU-Net's
own bookkeeping (learning rate of epoch ``e``, one log entry per epoch, best-EMA unchanged); the
iterations epoch ``e`` had already done stay in the weights and optimizer state rather than being thrown
away, so an interrupted run trains at most one epoch more than an uninterrupted one, never less.

The reading of nnU-Net checkpoints lives in :mod:`nnunet_meddinov3.nnunet_checkpoints` (``meddinov3
predict`` checks checkpoints too), the writing, the leftovers and the search for the newest readable file in
:mod:`nnunet_meddinov3.durable_files`, the signal guard in :mod:`nnunet_meddinov3.stop_signals`; this module
is the trainer side only.
"""
from __future__ import annotations

import contextlib
import os
import signal

import torch

from nnunet_meddinov3 import durable_files
from nnunet_meddinov3.durable_files import remove_stale_temporaries, write_atomically
from nnunet_meddinov3.nnunet_checkpoints import CHECKPOINT_ORDER, CheckpointUnreadable, first_line
from nnunet_meddinov3.stop_signals import PREEMPTION_SIGNALS, StopSignals

STOP_NOTICE = ("\n{signal} received: stopping at the end of the current iteration to save checkpoint_latest.pth "
               "(send it again to stop at once)\n")


class TrainingStopped(Exception):
    """Raised at a safe point (before an iteration) after a stop signal."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


class CrashSafeTraining:
    """Mixin for an ``nnUNetTrainer`` subclass (before ``nnUNetTrainer`` in the bases); see the module
    docstring. Subclasses read ``self.continue_training`` (set it before ``nnUNetTrainer.__init__`` pops
    it from the plans) and may override :meth:`finished_run_note`."""

    continue_training = False
    resumed_from: str | None = None  # the checkpoint file load_checkpoint read
    _stop: StopSignals | None = None
    _finished_already = False

    # --- writing -------------------------------------------------------------------------------------

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0 or self.disable_checkpointing:
            super().save_checkpoint(filename)  # writes nothing (and says so when checkpointing is disabled)
            return
        # hidden temporaries: the output folder is one users browse
        write_atomically(filename, super().save_checkpoint, write_to="path", hidden=True)

    # --- reading (--c) -------------------------------------------------------------------------------

    def resume_candidates(self, filename: str) -> list[str]:
        """The files to try, in order, when asked to load ``filename``: for ``--c`` in this run's folder,
        ``filename`` and the older ones after it in nnU-Net's order; otherwise ``filename`` alone (``--val``
        must validate the final model, never an older one)."""
        folder, name = os.path.split(os.path.abspath(filename))
        if not (self.continue_training and name in CHECKPOINT_ORDER
                and folder == os.path.abspath(self.output_folder)):
            return [filename]
        later = CHECKPOINT_ORDER[CHECKPOINT_ORDER.index(name):]
        return [filename] + [os.path.join(folder, n) for n in later[1:] if os.path.isfile(os.path.join(folder, n))]

    def first_readable(self, filename: str, read):
        """(path, read(path)) for the first of :meth:`resume_candidates` that ``read`` can read (it raises
        :class:`CheckpointUnreadable` otherwise), with a warning naming each file passed over."""
        candidates = self.resume_candidates(filename)
        path, result, passed_over = durable_files.first_readable(candidates, read, CheckpointUnreadable)
        bad = [error for _, error in passed_over]
        if path is None:
            if len(candidates) == 1:
                raise bad[0]
            listed = "; ".join(f"{os.path.basename(e.path)}: {e.reason}" for e in bad)
            raise CheckpointUnreadable(os.path.dirname(os.path.abspath(filename)), f"no readable checkpoint: {listed}. "
                                       "Move these files aside to start a new training (nnUNetv2_train without --c), "
                                       "or put back an intact copy")
        for e in bad:
            self.print_to_log_file(f"WARNING: {e}. Going on from {os.path.basename(path)} instead; the bad file "
                                   f"is left in place and replaced when this run next writes it.")
        self.resumed_from = path
        return path, result

    # --- the training loop ---------------------------------------------------------------------------

    def finished_run_note(self) -> str:
        return ""

    def run_training(self):
        if (self.resumed_from is not None and os.path.basename(self.resumed_from) == CHECKPOINT_ORDER[0]
                and self.current_epoch >= self.num_epochs):
            self._finished_already = True
            self.print_to_log_file(
                f"This training is finished: {self.resumed_from} is at epoch {self.current_epoch} of "
                f"{self.num_epochs}. --c does not train it again and leaves checkpoint_final.pth as it is."
                + self.finished_run_note())
            return
        if self.local_rank == 0:
            for path in remove_stale_temporaries(self.output_folder):
                self.print_to_log_file(f"Removed {path}: a checkpoint write that was killed before it finished")
        with StopSignals(PREEMPTION_SIGNALS, notice=STOP_NOTICE) as self._stop:
            try:
                super().run_training()
            except Exception as error:
                if self._stop.requested is None:
                    raise
                self._stop_here(self._stop.requested, error)
        if self._stop.requested is not None:  # it came after the last iteration: the run is complete
            self.print_to_log_file(f"{signal.Signals(self._stop.requested).name} received after the last "
                                   f"iteration: training is finished (checkpoint_final.pth written); the final "
                                   f"validation is skipped. {self._resume_command()} runs it.")
            raise SystemExit(128 + self._stop.requested)

    def _stop_if_requested(self) -> None:
        signum = self._stop.requested if self._stop is not None else None
        if self.is_ddp:  # every rank must stop at the same iteration, or the others wait in all_reduce
            import torch.distributed as dist
            flag = torch.tensor([signum or 0], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item()) or None
        if signum is not None:
            raise TrainingStopped(signum)

    def train_step(self, batch: dict) -> dict:
        self._stop_if_requested()
        return super().train_step(batch)

    def validation_step(self, batch: dict) -> dict:
        self._stop_if_requested()
        return super().validation_step(batch)

    def _resume_command(self) -> str:
        return (f"nnUNetv2_train {self.plans_manager.dataset_name} {self.configuration_name} {self.fold} "
                f"-tr {self.__class__.__name__} -p {self.plans_manager.plans_name} --c")

    def _stop_here(self, signum: int, error: Exception):
        """Save the state of the last finished iteration as checkpoint_latest.pth (epoch ``current_epoch``
        to be restarted, see the module docstring), shut the augmentation workers down, exit."""
        name, epoch = signal.Signals(signum).name, self.current_epoch
        if not isinstance(error, TrainingStopped):  # e.g. the workers got the signal too and died first
            self.print_to_log_file(f"(while stopping: {first_line(error)})", also_print_to_console=False)
        if self.was_initialized:
            for values in self.logger.get_checkpoint().values():
                del values[epoch:]  # one entry per finished epoch, as nnU-Net's logger requires on --c
            self.current_epoch = epoch - 1  # save_checkpoint stores current_epoch + 1, the epoch to start at
            try:
                self.save_checkpoint(os.path.join(self.output_folder, "checkpoint_latest.pth"))
            finally:
                self.current_epoch = epoch
            saved = (f"checkpoint_latest.pth saved; --c restarts epoch {epoch} from its first iteration"
                     if not self.disable_checkpointing else "no checkpoint written (--disable_checkpointing)")
        else:
            saved = "stopped before the network was built; nothing to save"
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            for loader in (getattr(self, "dataloader_train", None), getattr(self, "dataloader_val", None)):
                if hasattr(loader, "_finish"):
                    loader._finish()
        self.print_to_log_file(f"Stopped by {name} in epoch {epoch}: {saved}. Resume with: {self._resume_command()}")
        raise SystemExit(128 + signum)

    def perform_actual_validation(self, save_probabilities: bool = False):
        summary = os.path.join(self.output_folder, "validation", "summary.json")
        validating_final = self.resumed_from is not None and os.path.basename(self.resumed_from) == CHECKPOINT_ORDER[0]
        if self._finished_already and validating_final and os.path.isfile(summary):  # not --val_best
            self.print_to_log_file(f"The final validation was done already ({summary}); "
                                   f"nnUNetv2_train ... --val redoes it.")
            return
        super().perform_actual_validation(save_probabilities)
