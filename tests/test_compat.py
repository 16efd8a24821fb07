"""helpers.compat.require: outside the versions an internal was written for, one error that names the library."""
import importlib.metadata

import pytest

from helpers.compat import require


def test_require_names_the_library_outside_its_range(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.22.0")
    with pytest.raises(RuntimeError, match=r"helpers' LoRA reads internals of peft .*~=0\.21\.0.* has peft 0\.22\.0"):
        require("peft", "~=0.21.0", "helpers' LoRA")


def test_require_passes_inside_its_range(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.21.2")
    require("peft", "~=0.21.0", "helpers' LoRA")
