"""The direction of imports: the model core imports nothing above it (no file reader, downloader,
command line or distributed code), and only parallel.py speaks torch.distributed."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

SRC = ROOT / "src" / "xllama_cli"
CORE = ("model", "attention", "rope", "kv_cache", "config")
LEAVES = ("errors",)  # what the core may import of the package besides itself
ABOVE = ("xllama_cli.checkpoint", "xllama_cli.download", "xllama_cli.cli", "typer", "rich", "huggingface_hub")


def _new_modules(module: str) -> list[str]:
    """The modules that importing xllama_cli.`module` loads in a fresh interpreter, torch's own
    excepted: `import torch` loads torch.distributed itself, whoever asks for torch."""
    code = ("import sys, json, torch\nbefore = set(sys.modules)\n"
            f"import xllama_cli.{module}\nprint(json.dumps(sorted(set(sys.modules) - before)))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", CORE)
def test_importing_a_core_module_loads_nothing_above_it(module):
    new = _new_modules(module)
    assert f"xllama_cli.{module}" in new  # the check itself saw the import happen
    above = [m for m in new if any(m == a or m.startswith(a + ".") for a in (*ABOVE, "torch.distributed"))]
    assert above == [], f"xllama_cli.{module} loads {above}"


def _imports(path) -> list[tuple[int, str]]:
    """(relative level, module) of every import in a file, inside functions too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found += [(node.level, f"{node.module}.{alias.name}" if node.module else alias.name)
                      for alias in node.names]
    return found


@pytest.mark.parametrize("module", CORE)
def test_a_core_module_imports_only_the_core(module):
    """Lazy imports inside functions included, which importing the module alone would not run."""
    ours = [name for level, name in _imports(SRC / f"{module}.py") if level == 1]
    outside = [name for name in ours if name.split(".")[0] not in CORE + LEAVES]
    assert outside == [], f"{module}.py imports {outside}"


def test_only_parallel_py_uses_torch_distributed():
    """`import torch` loads torch.distributed anyway, so the modules' text is what can tell."""
    users = []
    for path in sorted(SRC.glob("*.py")):
        tree = ast.parse(path.read_text())
        imports = [name for _, name in _imports(path)]
        named = any(n == "torch.distributed" or n.startswith("torch.distributed.") for n in imports)
        attribute = any(isinstance(node, ast.Attribute) and node.attr == "distributed"
                        and isinstance(node.value, ast.Name) and node.value.id == "torch" for node in ast.walk(tree))
        if named or attribute:
            users.append(path.name)
    assert users == ["parallel.py"]
