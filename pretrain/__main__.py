"""``python -m pretrain`` (also under ``torchrun -m pretrain``)."""

from .cli import main

raise SystemExit(main())
