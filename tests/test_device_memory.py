"""Device choice, the device report, matmul throughput, and the training-memory calculator."""
import os
import platform
import subprocess
import sys

import pytest
import torch

import helpers


def test_device_falls_back_to_cpu_and_honours_a_choice():
    assert helpers.get_device("cpu") == torch.device("cpu")
    assert helpers.available_devices()[-1] == torch.device("cpu")
    if not torch.cuda.is_available():
        assert helpers.get_device().type in {"cpu", "mps"}


def test_device_report_names_versions():
    report = helpers.device_report()
    assert report["torch"] == torch.__version__
    assert {"transformers", "chosen device", "cuda available"} <= set(report)


def test_matmul_gflops_is_positive():
    assert helpers.matmul_gflops("cpu", n=128, seconds=0.05) > 0


def _memory_kept_in_new_process(**env) -> str:
    code = "import helpers; print(helpers.CPU_MEMORY_KEPT, helpers.device_report()['freed CPU memory kept for reuse'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return out.stdout.strip()


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_importing_helpers_keeps_freed_memory_unless_told_not_to():
    assert _memory_kept_in_new_process(TUTORIAL_MALLOC="") == "True True"
    assert _memory_kept_in_new_process(TUTORIAL_MALLOC="system") == "False False"


def test_training_memory_adds_up():
    n = 1_000_000
    mem = helpers.training_memory(n, precision="fp32")
    gib = 2**30
    assert mem["weights"] == pytest.approx(4 * n / gib)
    assert mem["gradients"] == pytest.approx(4 * n / gib)
    assert mem["AdamW states"] == pytest.approx(8 * n / gib)
    assert mem["total"] == pytest.approx(mem.drop("total").sum())


def test_full_fine_tuning_of_qwen2_0_5b_does_not_fit_8_gb():
    config = helpers.qwen2_0_5b_config()
    n = sum(p.numel() for p in helpers.meta_model(config).parameters())
    # Weights, gradients and two Adam moments alone are 16 bytes a parameter: about 7.4 GiB.
    assert helpers.training_memory(n, precision="fp32")["total"] > 7
    assert helpers.training_memory(n, config, seq=512, precision="fp32")["total"] > 8 * 10**9 / 2**30


def test_unknown_precision_is_named():
    with pytest.raises(ValueError, match="Unknown precision 'int3'"):
        helpers.training_memory(10, precision="int3")
