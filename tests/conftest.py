import locale
import warnings
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"

warnings.filterwarnings("ignore", message=".*torch.jit.interface.*")


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def reference_inputs() -> dict:
    return torch.load(FIXTURES / "inputs.pt", weights_only=True)


@pytest.fixture(scope="session")
def stock_planned_ct(tmp_path_factory) -> dict:
    """Dataset501_SyntheticCT planned by the stock nnUNetv2_plan_and_preprocess, once per session
    (e2e_helpers.stock_planned_ct): planning and preprocessing cost more than a tiny training, and several
    end-to-end modules train on the same stock plans. tests/test_e2e_nnunet.py owns its ``root`` (its
    results, predictions and our plans go there); any other module points nnUNet_results and
    MEDDINOV3_CACHE at a folder of its own and only reads raw and pre (nnU-Net's splits_final.json, written
    on a first training, is the same whichever module writes it)."""
    from e2e_helpers import stock_planned_ct as plan

    return plan(tmp_path_factory.mktemp("stock_ct"))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _keep_locale():
    # Native libraries (ITK/GDCM) may reset the C locale to "C"; Python then decodes subprocess
    # output as ASCII and later tests fail on nnU-Net's progress bars. Restore it after each test.
    saved = locale.setlocale(locale.LC_CTYPE)
    yield
    if locale.setlocale(locale.LC_CTYPE) != saved:
        locale.setlocale(locale.LC_CTYPE, saved)
