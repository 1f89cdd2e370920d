"""The trainers' environment knobs: bad values name the variable and the expected type."""
import pytest

from nnunet_meddinov3.training.trainer import _env, _flag


def test_unset_or_empty_gives_the_default(monkeypatch):
    monkeypatch.delenv("MEDDINOV3_EPOCHS", raising=False)
    assert _env("MEDDINOV3_EPOCHS", int, 7) == 7
    monkeypatch.setenv("MEDDINOV3_EPOCHS", "")
    assert _env("MEDDINOV3_EPOCHS", int, 7) == 7
    monkeypatch.setenv("MEDDINOV3_EPOCHS", "3")
    assert _env("MEDDINOV3_EPOCHS", int, 7) == 3


def test_bad_values_name_the_variable(monkeypatch):
    monkeypatch.setenv("MEDDINOV3_EPOCHS", "ten")
    with pytest.raises(ValueError, match=r"MEDDINOV3_EPOCHS='ten' is not a valid int"):
        _env("MEDDINOV3_EPOCHS", int, 7)
    monkeypatch.setenv("MEDDINOV3_FREEZE_ENCODER", "maybe")
    with pytest.raises(ValueError, match=r"MEDDINOV3_FREEZE_ENCODER='maybe' is not a valid boolean"):
        _env("MEDDINOV3_FREEZE_ENCODER", _flag, False)
    monkeypatch.setenv("MEDDINOV3_FREEZE_ENCODER", "yes")
    assert _env("MEDDINOV3_FREEZE_ENCODER", _flag, False) is True
