"""The package's import graph has no cycle, `import helpers` imports nothing, and its name list matches the modules."""
from __future__ import annotations

import ast
import re
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import helpers

PACKAGE = Path(helpers.__file__).parent

SUBMODULES_ONLY = {
    "compare", "compat", "doctor", "engine", "families", "finetune", "gguf_cache", "progress", "sweep", "sweep_results",
    "widgets",
}
"""Modules none of whose names `helpers.<name>` gives: the commands and the tooling, reached as `helpers.compare.x`."""

NOT_AT_TOP = {
    "data": {"default_corpus_path", "default_general_path", "deterministic_split"},
    "device": {"synchronize"},
    "evaluation": {"next_token_nll", "windows"},
    "experiment": {"check_context", "history_records"},
    "kv_cache": {"intra_op_threads"},
    "lora": {"lora", "lora_parameter_table"},  # the strategy itself is reached by name, through apply_strategy
    "memory": {"activation_bytes", "loss_bytes"},
    "models": {"default_gguf_path", "resolve_model"},
    "plotting": {"new_figure"},
    "strategies": {"adapter_layers", "freeze_embeddings", "freeze_lower_layers", "full_fine_tuning", "unwrap"},
    "training": {"evaluate_loss", "lr_factor", "trained_state"},
    "unfreezing": {"gradual_unfreezing"},
}
"""Public functions and classes of the listed modules that stay at `helpers.<module>.<name>` on purpose."""


def _modules() -> list[str]:
    return sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def _target(name: str, modules: set[str]) -> str | None:
    """Return the helpers module that `name` (".x", "helpers.x", "x" after `from . import`) refers to, if any."""
    name = name.removeprefix("helpers").lstrip(".").split(".")[0]
    return name if name in modules else None


def _import_module_arg(node: ast.Call) -> str:
    """Return the module an importlib.import_module(...) call names: ".x", "helpers.x" or f"{__package__}.x"."""
    arg = node.args[0] if node.args else None
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and isinstance(arg.values[-1], ast.Constant):
        return "." + str(arg.values[-1].value).lstrip(".")  # f"{__package__}.lora" -> ".lora"
    raise ValueError(f"line {node.lineno}: import_module of a computed name hides an import from the import graph; "
                     "import the module by its name")


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Return the helpers modules that file `path` imports anywhere: top level, in functions, under TYPE_CHECKING."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names if alias.name.split(".")[0] == "helpers"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level and not base or base == "helpers":  # from . import x / from helpers import x
                names = [alias.name for alias in node.names]
            elif node.level or base.startswith("helpers."):
                names = [base]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            try:
                names = [_import_module_arg(node)]
            except ValueError as error:
                raise ValueError(f"{path.name}, {error}") from None
        found |= {t for t in (_target(n, modules) for n in names) if t}
    return found


def import_graph(folder: Path = PACKAGE) -> dict[str, set[str]]:
    """Return {module: the helpers modules it imports} for the modules of `folder`, bar __init__ (it loads lazily)."""
    modules = {p.stem for p in folder.glob("*.py")} - {"__init__"}
    return {m: imports_of(folder / f"{m}.py", modules) - {m} for m in sorted(modules)}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """Return one import cycle as [a, b, ..., a], or None when the graph has none."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once every path from it is explored

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_package_imports_downward_only():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"helpers modules import each other in a circle: {' -> '.join(cycle)}"


def test_every_import_form_is_seen_and_a_cycle_is_named(tmp_path):
    for name in ("a", "b", "c", "d", "e", "f"):
        (tmp_path / f"{name}.py").write_text("")
    (tmp_path / "a.py").write_text("def f():\n    from .b import x\n")
    (tmp_path / "b.py").write_text("from . import c\n")
    (tmp_path / "c.py").write_text("import importlib\nimportlib.import_module(f'{__package__}.d')\n")
    (tmp_path / "d.py").write_text("import helpers.e\n")
    (tmp_path / "e.py").write_text("import importlib\n\ndef g():\n    importlib.import_module('.a', 'helpers')\n")
    graph = import_graph(tmp_path)
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"d"}, "d": {"e"}, "e": {"a"}, "f": set()}
    assert find_cycle(graph) == ["a", "b", "c", "d", "e", "a"]
    (tmp_path / "e.py").write_text("from helpers.f import y\n")
    assert find_cycle(import_graph(tmp_path)) is None
    computed = "import importlib\nfor m in ('a',):\n    importlib.import_module(f'.{m}', 'helpers')\n"
    (tmp_path / "f.py").write_text(computed)
    with pytest.raises(ValueError, match="f.py, line 3: import_module of a computed name"):
        import_graph(tmp_path)


def test_importing_helpers_imports_nothing_and_changes_nothing():
    code = ("import sys, helpers; print(sorted(m for m in sys.modules if m.startswith('helpers.')), "
            "'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "False"], out


def _public_definitions(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")}


def test_every_listed_name_is_defined_in_its_module():
    for module, names in helpers._EXPORTS.items():
        loaded = importlib.import_module(f"helpers.{module}")
        tree = ast.parse((PACKAGE / f"{module}.py").read_text())
        defined = _public_definitions(module) | {
            t.id for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)
        }
        missing = [n for n in names if n not in defined or not hasattr(loaded, n)]
        assert not missing, f"helpers/__init__.py lists {missing} under {module!r}, which does not define them"
        assert len(set(names)) == len(names), f"helpers/__init__.py lists a name of {module!r} twice"


@pytest.mark.parametrize("module", _modules())
def test_every_public_function_and_class_is_listed_or_deliberately_not(module):
    if module in SUBMODULES_ONLY:
        assert module not in helpers._EXPORTS, f"{module} is in SUBMODULES_ONLY and in helpers._EXPORTS"
        return
    assert module in helpers._EXPORTS, (f"helpers.{module} is new: list its names in helpers/__init__.py _EXPORTS, "
                                        "or add it to SUBMODULES_ONLY in tests/test_imports.py")
    unlisted = _public_definitions(module) - set(helpers._EXPORTS[module]) - NOT_AT_TOP.get(module, set())
    assert not unlisted, (f"helpers.{module} defines {sorted(unlisted)}: list them in helpers/__init__.py _EXPORTS, "
                          f"or in NOT_AT_TOP[{module!r}] in tests/test_imports.py to keep them at helpers.{module}")
    gone = NOT_AT_TOP.get(module, set()) - _public_definitions(module)
    assert not gone, f"NOT_AT_TOP[{module!r}] in tests/test_imports.py names {sorted(gone)}, which {module} lacks"


TEACHING_CORE = {"data", "evaluation", "strategies", "training", "lora", "unfreezing", "kv_cache", "memory", "recipe"}
"""The modules whose code the notebooks write out (README, "The package")."""

CORE_SUPPORT = {"families", "engine", "device", "progress", "compat"}
"""What the core may lean on: other families' quirks, the Accelerate engine, devices, progress bars, version checks."""

TOOLING = {"sweep", "sweep_results", "finetune", "gguf_cache", "doctor"}
"""The sweep runner, the command lines, the conversion cache and the environment check; compare's command sits
beside its notebook code."""


def test_the_teaching_core_stands_apart_from_the_tooling():
    graph = import_graph()
    for module in sorted(TEACHING_CORE):
        outside = graph[module] - TEACHING_CORE - CORE_SUPPORT
        assert not outside, f"teaching-core module {module} imports {sorted(outside)}, outside the core and its support"
    for module in sorted(set(graph) - TOOLING):
        tooling = graph[module] & (TOOLING - {"gguf_cache"} if module == "models" else TOOLING)
        assert not tooling, f"{module} imports the tooling modules {sorted(tooling)}; only the tooling may"


NAMES_ITS_NOTEBOOK = re.compile(r"notebooks? \d\d|python -m helpers\.")


@pytest.mark.parametrize("module", _modules())
def test_every_public_docstring_says_in_its_first_paragraph_which_notebook_uses_it(module):
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    methods = [n for c in tree.body if isinstance(c, ast.ClassDef) and not c.name.startswith("_") for n in c.body]
    unnamed = [node.name for node in tree.body + methods
               if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_")
               and not NAMES_ITS_NOTEBOOK.search((ast.get_docstring(node) or "").split("\n\n")[0])]
    assert not unnamed, (f"helpers.{module}: the docstrings of {unnamed} do not name the notebook that writes them out "
                         "or first uses them (\"(notebook 03)\"), as d2l's do")
