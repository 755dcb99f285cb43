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
ABOVE = ("xllama_cli.checkpoint", "xllama_cli.download", "xllama_cli.cli", "typer", "rich",
         "huggingface_hub", "torch.distributed")


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
    above = [m for m in new if any(m == a or m.startswith(a + ".") for a in ABOVE)]
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
                        and isinstance(node.value, ast.Name) and node.value.id == "torch"
                        for node in ast.walk(tree))
        if named or attribute:
            users.append(path.name)
    assert users == ["parallel.py"]


def test_core_errors_name_no_flags_and_the_cli_words_them_as_flags():
    """The library says "unknown attention layout 'XQA'"; the command line says
    "unknown --attn 'XQA'"."""
    import torch

    from xllama_cli.cli import FLAGS
    from xllama_cli.config import ModelConfig
    from xllama_cli.errors import SettingError
    from xllama_cli.layout import regroup_kv, target_kv_heads
    from xllama_cli.loading import resolve_dtype
    from xllama_cli.quantize import check_quantize
    from xllama_cli.rope import with_rope

    cfg = ModelConfig(dim=64, n_heads=8, n_kv_heads=8, hidden_dim=96)
    failing = [
        (lambda: target_kv_heads(8, 8, "XQA", None),
         "unknown --attn 'XQA'; choose one of: MHA, GQA, MQA"),
        (lambda: target_kv_heads(8, 8, "MQA", 2),
         "--groups 2 contradicts --attn MQA (which means 1 KV heads)"),
        (lambda: target_kv_heads(8, 8, "GQA", 3), "--groups 3 does not divide the 8 query heads; "
                                                  "valid group counts: 1, 2, 4, 8"),
        (lambda: regroup_kv(torch.zeros(8, 4), 8, 4, "median"), "unknown --method 'median'"),
        (lambda: with_rope(cfg, "spiral", None), "unknown --rope 'spiral'"),
        (lambda: with_rope(cfg, "linear", None), "--rope linear needs --rope-factor F (e.g. 2.0)"),
        (lambda: with_rope(cfg, None, 2.0), "--rope-factor needs --rope linear|dynamic|llama3"),
        (lambda: check_quantize("int3", torch.bfloat16), "unknown --quantize 'int3'; choose: int8, int4"),
        (lambda: check_quantize("int8", torch.float32), "use --dtype bfloat16"),
        (lambda: resolve_dtype("float8", torch.device("cpu")), "unknown --dtype 'float8'"),
    ]
    for call, cli_text in failing:
        with pytest.raises(SettingError) as e:
            call()
        assert "--" not in str(e.value), str(e.value)
        assert cli_text in e.value.worded(FLAGS), e.value.worded(FLAGS)
