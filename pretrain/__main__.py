"""``python -m pretrain`` (also under ``torchrun -m pretrain``)."""

import warnings

# timm's import of torch.jit.interface warns on every start with recent torch; it says nothing about the
# user's run and they cannot act on it (the meddinov3 CLI filters the same message). Before any import of timm.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.interface.* is deprecated")  # Future- or Deprecation-

from .cli import main  # noqa: E402

raise SystemExit(main())
