"""Device choice, the device report, matmul throughput, and the training-memory calculator."""
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
