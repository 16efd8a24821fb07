"""Every decoder-only causal LM of installed transformers, built tiny: find_layers, every strategy, LoRA, KV cache."""
from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
import transformers

import helpers
from helpers.lora import lora_target_modules

import families
from families import BUILT, EXPECTED_FAILURES, MAPPING, NEW, NOT_BUILT, TESTED, families_for

# Every family of transformers, built tiny, takes minutes: `make unit` leaves it out, `make unit-all` runs it.
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models gain nothing from a second thread, and on a busy machine the threads wait on each other.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_the_lists_agree_with_each_other():
    assert not TESTED & set(NOT_BUILT), "a family is both tested and listed as not built"
    assert all(reason for reason in NOT_BUILT.values())
    assert set(EXPECTED_FAILURES) <= TESTED, "an expected failure must be a tested family"
    assert all(check in families.CHECKS and why for check, why in EXPECTED_FAILURES.values())


@pytest.mark.parametrize("model_type", NEW)
def test_a_family_new_in_transformers_is_run_and_reported(model_type):
    # A release that adds a family must not break the suite: the family is run and listed (pytest -rx prints it)
    # until someone adds it to TESTED, EXPECTED_FAILURES or NOT_BUILT in tests/families.py.
    result, detail = families.run_checks(model_type)
    new = f"{model_type} ({MAPPING[model_type]}) is new in transformers {transformers.__version__}"
    if result != "pass":
        pytest.xfail(f"{new} and {result}: {detail[:300]}; list it in tests/families.py")
    warnings.warn(f"{new} and passes every check: add it to TESTED in tests/families.py", UserWarning)


def test_the_pass_rate_is_at_least_90_percent():
    assert 1 - len(EXPECTED_FAILURES) / len(BUILT) >= 0.9


@pytest.mark.parametrize("model_type", [t for t, why in NOT_BUILT.items() if why == families.MULTIMODAL
                                        and t in MAPPING])
def test_listed_multimodal_configs_do_nest_sub_configs(model_type):
    config = families._config(model_type).to_dict()
    assert any(k.endswith("_config") and isinstance(v, dict) for k, v in config.items())


@pytest.mark.parametrize("model_type", families_for("find_layers"))
def test_find_layers(model_type):
    model = families.tiny_model(model_type)
    assert families.tiny_size(model_type) <= families.MAX_PARAMETERS
    assert type(model).__name__ == MAPPING[model_type]
    families.check_find_layers(model)


@pytest.mark.parametrize("model_type", families_for("strategies"))
def test_strategies_flags_and_counts(model_type):
    families.check_strategies(model_type)


@pytest.mark.parametrize("model_type", families_for("lora"))
def test_lora(model_type):
    families.check_lora(model_type)


@pytest.mark.parametrize("model_type", families_for("kv_cache"))
def test_token_by_token_equals_full_sequence(model_type):
    families.check_kv_cache(model_type)


@pytest.mark.parametrize("model_type", sorted(set(EXPECTED_FAILURES) & set(BUILT)))
def test_a_failing_family_fails_with_a_value_error_naming_its_class(model_type):
    model = families.tiny_model(model_type)
    name = type(model).__name__
    check, _ = EXPECTED_FAILURES[model_type]
    if check == "find_layers":
        for strategy in sorted(helpers.STRATEGIES):
            with pytest.raises(ValueError, match=name):
                helpers.apply_strategy(model, strategy)
        for fn in (helpers.find_layers, helpers.trainable_map, lora_target_modules):
            with pytest.raises(ValueError, match=name):
                fn(model)
    elif check == "kv_cache":
        with pytest.raises(ValueError, match=name), torch.no_grad():
            helpers.logits_token_by_token(model, families.INPUT)
    else:
        raise AssertionError(f"no test for an expected failure of {check}")


def test_import_helpers_imports_no_peft():
    # peft costs seconds to import; importing helpers, or applying a strategy other than LoRA, must not pay for it.
    code = (
        "import sys, helpers; assert 'peft' not in sys.modules, 'import helpers'; "
        "from helpers import STRATEGIES, apply_strategy; "
        "assert {'lora', 'gradual_unfreezing'} <= set(STRATEGIES), sorted(STRATEGIES); "
        "assert 'peft' not in sys.modules, 'helpers.strategies'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
