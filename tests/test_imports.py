"""Start-up: `import boundflow` and `boundflow --help` load no heavy library (torch, TVM,
XGBoost, OR-Tools, SQLAlchemy), so every command pays only for what it uses."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ["torch", "tvm", "xgboost", "ortools", "sqlalchemy", "onnx", "numpy", "rich"]


def _loaded(code: str) -> list[str]:
    probe = f"{code}\nimport sys, json\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    return json.loads(out.splitlines()[-1])


def test_import_boundflow_loads_nothing_heavy():
    assert _loaded("import boundflow") == []


def test_help_and_argument_parsing_load_nothing_heavy():
    code = ("import contextlib, io\nfrom boundflow.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    main(['--help']); main(['verify', '--help']); main(['tune', '--help'])")
    assert _loaded(code) == []


def test_public_names_resolve_on_first_use():
    import boundflow as bf

    for name in bf.__all__:
        assert getattr(bf, name) is not None
    assert "compute_bounds" in dir(bf)
