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
