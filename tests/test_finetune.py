"""helpers.finetune: training through Accelerate in one process (the numbers of helpers.train) and in two CPU
processes with gloo under torchrun (the numbers of one process with the same global batch), and its refusals."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import apply_strategy, train
from helpers.engine import check_launch, launched_processes, make_accelerator, shard
from helpers.finetune import main
from helpers.training import TrainConfig

from conftest import FAMILIES, char_tokenizer, tiny_config, tiny_model
from distributed_worker import TEXT
from distributed_worker import loaders as _loaders

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny runs, one torch thread

HERE = Path(__file__).parent


def _torchrun(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_process_gives_the_numbers_of_helpers_train(family):
    tokenizer = char_tokenizer(bos=False)
    config = TrainConfig(steps=5, lr=3e-3, warmup_steps=1, eval_every=2, grad_accum=2, progress=False)
    model = apply_strategy(tiny_model(family), "freeze_embeddings")
    twin = copy.deepcopy(model)
    torch.manual_seed(0)
    expected = train(twin, *_loaders(tokenizer), config)
    torch.manual_seed(0)
    history = train(model, *_loaders(tokenizer), config, accelerator=make_accelerator(cpu=True))
    assert history.attrs["world_size"] == 1 and history.attrs["distributed_type"] == "NO"
    for column in ("train_loss", "val_loss"):
        assert history[column].tolist() == pytest.approx(expected[column].tolist(), rel=1e-6, abs=0, nan_ok=True)
    assert history.attrs["tokens"] == expected.attrs["tokens"] > 0
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(model.parameters(), twin.parameters()))


def test_early_stopping_keeps_the_best_weights_as_helpers_train_does():
    tokenizer = char_tokenizer(bos=False)
    config = TrainConfig(steps=12, lr=0.3, warmup_steps=0, eval_every=1, patience=2, progress=False)
    model = tiny_model("qwen2")
    start = copy.deepcopy(model)
    history = train(model, *_loaders(tokenizer), config, accelerator=make_accelerator(cpu=True))
    expected = train(start, *_loaders(tokenizer), config)
    assert history.attrs["best_step"] == expected.attrs["best_step"]
    assert history.attrs["stopped_early_at"] == expected.attrs["stopped_early_at"]
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(model.parameters(), start.parameters()))


def test_shard_splits_the_global_batch_into_disjoint_slices():
    batch = (torch.arange(12).reshape(6, 2),)
    parts = [shard(batch, rank, 4)[0] for rank in range(4)]
    assert torch.equal(torch.cat(parts), batch[0]) and [len(p) for p in parts] == [2, 2, 1, 1]
    as_dict = shard({"input_ids": batch[0], "attention_mask": torch.ones(6, 2)}, 1, 2)
    assert as_dict["input_ids"].tolist() == [[6, 7], [8, 9], [10, 11]] and as_dict["attention_mask"].shape == (3, 2)


def test_the_single_process_trap_is_refused():
    assert launched_processes({}) == 1 and launched_processes({"WORLD_SIZE": "4"}) == 4
    check_launch(1, {})
    check_launch(2, {"WORLD_SIZE": "2"})
    with pytest.raises(RuntimeError, match="2 duplicate runs instead of one.*cpu=True"):
        check_launch(1, {"WORLD_SIZE": "2"})


@pytest.mark.slow  # launches processes
def test_two_cpu_processes_train_like_one_with_the_same_global_batch(tmp_path):
    out = tmp_path / "report.json"
    done = _torchrun(str(HERE / "distributed_worker.py"), str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and report["distributed_type"].endswith("MULTI_CPU")
    assert set(report["cases"]) == set(FAMILIES)
    for family, case in report["cases"].items():
        assert len(case["digests"]) == 2 and case["digests"][0] == case["digests"][1], family  # bit-identical ranks
        assert case["loss_pairs"] == 6 + 3  # every train loss (steps 1-6) and validation loss (steps 0, 3, 6)
        assert case["max_loss_diff"] < 1e-5, (family, case)
        assert case["tokens"] == case["reference_tokens"] > 0
    assert "changes which tensors train" in report["gradual_refused"]


@pytest.mark.slow  # launches processes
def test_torchrun_without_the_cpu_setting_is_refused_not_run_twice():
    # Accelerate's default on a machine without a GPU: each of the two processes would train alone.
    code = ("from accelerate import Accelerator; from helpers.engine import check_launch; "
            "check_launch(Accelerator().num_processes)")
    done = _torchrun("--no-python", sys.executable, "-c", code)
    assert done.returncode != 0 and "duplicate runs instead of one" in done.stderr


def _tiny_model_and_corpus(tmp_path: Path) -> tuple[Path, Path]:
    model_dir, corpus = tmp_path / "model", tmp_path / "corpus"
    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(model_dir)
    char_tokenizer(bos=True).save_pretrained(model_dir)
    corpus.mkdir()
    for i in range(6):
        (corpus / f"doc{i}.md").write_text(TEXT[i * 60:] + TEXT)
    return model_dir, corpus


@pytest.mark.slow  # launches processes
def test_the_command_under_torchrun_writes_one_result_with_identical_ranks(tmp_path):
    (model_dir, corpus), out = _tiny_model_and_corpus(tmp_path), tmp_path / "out"
    done = _torchrun("-m", "helpers.finetune", "--model", str(model_dir), "--corpus", str(corpus), "--steps", "3",
                     "--lr", "1e-3", "--block-size", "32", "--eval-every", "0", "--out", str(out), "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and result["identical_on_all_ranks"] and len(result["rank_digests"]) == 2
    assert (out / "trained.safetensors").is_file()
    assert done.stdout.count("trained weights identical on all 2 ranks: True") == 1  # rank 0 alone reports


@pytest.mark.slow  # launches processes
def test_accelerate_launch_gives_two_cpu_ranks_only_with_multi_gpu(tmp_path):
    # What notebook 10 and the README tell a reader: on a machine without a GPU, `--cpu --num_processes 2` starts one
    # process, and `--multi_gpu --num_processes 2` starts two, which make_accelerator joins as CPU ranks.
    model_dir, corpus = _tiny_model_and_corpus(tmp_path)
    runs = {}
    for name, flags in (("cpu", ["--cpu"]), ("multi_gpu", ["--multi_gpu"])):
        command = [sys.executable, "-m", "accelerate.commands.launch", *flags, "--num_processes", "2", "--num_machines",
                   "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "helpers.finetune", "--model",
                   str(model_dir), "--corpus", str(corpus), "--steps", "2", "--lr", "1e-3", "--block-size", "32",
                   "--eval-every", "0", "--out", str(tmp_path / name), "--no-progress", "--cpu"]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=HERE)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = json.loads((tmp_path / name / "result.json").read_text())
    assert runs["cpu"]["world_size"] == 1
    assert runs["multi_gpu"]["world_size"] == 2 and runs["multi_gpu"]["identical_on_all_ranks"]


def test_the_command_refuses_bad_input(tmp_path, capsys):
    assert main(["--steps", "0", "--out", str(tmp_path)]) == 2
    assert "--steps must be at least 1" in capsys.readouterr().err
    assert main(["--strategy", "freeze_everything", "--out", str(tmp_path)]) == 2
    assert "unknown strategy 'freeze_everything'" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert "the recipe's learning rates were tuned for SmolLM2-135M-Instruct only: pass --lr" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "none"), "--lr", "1e-3", "--out", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["--fsdp", "--out", str(tmp_path)]) == 2
        assert "FSDP through Accelerate needs a GPU" in capsys.readouterr().err


def test_fsdp_on_the_cpu_is_refused_with_the_reason():
    # Accelerate's FSDP plugin needs an accelerator device; on a CPU it would fail deep inside with another message.
    with pytest.raises(ValueError, match="FSDP through Accelerate needs a GPU.*Drop --fsdp"):
        make_accelerator(fsdp=True, cpu=True)


def test_a_batch_smaller_than_the_world_is_refused():
    from unittest import mock

    tokenizer = char_tokenizer(bos=False)
    accelerator = make_accelerator(cpu=True)
    with mock.patch.object(type(accelerator), "num_processes", new_callable=mock.PropertyMock, return_value=3), \
            mock.patch("helpers.engine.check_launch"):
        with pytest.raises(ValueError, match="batch of 2 rows cannot be split over 3 processes"):
            train(tiny_model("gpt2"), *_loaders(tokenizer, batch_size=2),
                  TrainConfig(steps=1, warmup_steps=0, progress=False), accelerator=accelerator)


@pytest.mark.slow  # launches processes
def test_help_names_every_option_and_the_launchers():
    done = subprocess.run([sys.executable, "-m", "helpers.finetune", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0
    for option in ("--strategy", "--model", "--corpus", "--steps", "--out", "--bf16", "--checkpointing", "--fsdp",
                   "--grad-accum", "--cpu"):
        assert option in done.stdout
    assert "torchrun --nproc_per_node" in done.stdout and "accelerate launch" in done.stdout


# --- the loop's promises hold on both paths: plain and through Accelerate -------------------------------------------

ENGINES = {"plain": lambda: None, "accelerate": lambda: make_accelerator(cpu=True)}


@pytest.mark.parametrize("engine", ENGINES)
def test_gradient_checkpointing_is_turned_off_again_after_training(engine):
    model = tiny_model("llama")
    config = TrainConfig(steps=2, warmup_steps=0, eval_every=0, gradient_checkpointing=True, progress=False)
    history = train(model, *_loaders(char_tokenizer(bos=False)), config, accelerator=ENGINES[engine]())
    assert history.attrs["gradient_checkpointing"] and not model.is_activation_checkpointing
    # A model that had it on before keeps it on.
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    train(model, *_loaders(char_tokenizer(bos=False)), config, accelerator=ENGINES[engine]())
    assert model.is_activation_checkpointing


@pytest.mark.parametrize("engine", ENGINES)
def test_ctrl_c_returns_the_history_so_far_with_the_mode_restored(engine, capsys):
    model = tiny_model("qwen2")  # in eval mode, as tiny_model builds it
    seen = []

    def stop_at_step_2(row: dict) -> None:
        seen.append(row["step"])
        if row["step"] == 2:
            raise KeyboardInterrupt

    config = TrainConfig(steps=5, warmup_steps=0, eval_every=1, progress=False)
    history = train(model, *_loaders(char_tokenizer(bos=False)), config, accelerator=ENGINES[engine](),
                    callback=stop_at_step_2)
    assert seen == [1, 2] and history.attrs["interrupted"]
    assert history["step"].tolist() == [0, 1, 2]  # step 2 was done when Ctrl-C came during its report
    assert not model.training and "interrupted after 2 of 5 steps" in capsys.readouterr().out
    assert all(p.grad is None for p in model.parameters())
