"""The core package imports none of the optional (extra) dependencies, and the places that
need one name the extra to install when it is missing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

#: Modules of the extras (bench, cde) that ``import torchdyn_snopt`` must not import.
OPTIONAL = ("matplotlib", "sklearn", "sktime", "tqdm", "torchcde")

# torch imports tqdm (torch.hub) and torchdyn 1.0.6 imports torchcde and, through
# pytorch-lightning, matplotlib. So the check is twofold, in a fresh interpreter: no module of
# torchdyn_snopt asks for an optional module while the package is imported (an import hook
# that sees who imports what, also through importlib.import_module), and importing the package
# adds none of them to sys.modules beyond what torch and torchdyn already loaded.
_PROBE = r"""
import builtins, importlib, json, sys

optional = set(json.loads(sys.argv[1]))
requested = []
_import, _import_module = builtins.__import__, importlib.import_module


def _note(importer, name):
    if importer.startswith("torchdyn_snopt") and name.partition(".")[0] in optional:
        requested.append(f"{importer} imports {name}")


def spy_import(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0:
        _note((globals or {}).get("__name__", ""), name)
    return _import(name, globals, locals, fromlist, level)


def spy_import_module(name, package=None):
    _note(sys._getframe(1).f_globals.get("__name__", ""), name)
    return _import_module(name, package)


import torch, torchdyn.core, torchdyn.models, torchdyn.nn, torchdyn.numerics  # noqa: E401

before = sorted(m for m in optional if m in sys.modules)
builtins.__import__, importlib.import_module = spy_import, spy_import_module
import torchdyn_snopt  # noqa: E402

builtins.__import__, importlib.import_module = _import, _import_module
after = sorted(m for m in optional if m in sys.modules)
print(json.dumps({"requested": requested, "before": before, "after": after,
                  "file": torchdyn_snopt.__file__}))
"""


def test_import_pulls_no_optional_dependency() -> None:
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(OPTIONAL)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert Path(report["file"]).resolve().parent == root / "torchdyn_snopt"
    assert report["requested"] == []
    assert set(report["after"]) == set(report["before"]), "import torchdyn_snopt added modules"
    # Neither torch nor torchdyn imports these two: they must be absent outright.
    assert "sklearn" not in report["after"] and "sktime" not in report["after"]


def _block(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Make ``import <module>`` fail as if the package were not installed."""
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def test_neural_cde_names_the_cde_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchdyn_snopt.models import NeuralCDE

    _block(monkeypatch, "torchcde")
    with pytest.raises(ModuleNotFoundError, match=r"torchdyn-snopt\[cde\]"):
        NeuralCDE(channels=3, num_classes=2)


def test_datasets_name_their_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchdyn_snopt.data import load_digits, load_tabular

    _block(monkeypatch, "sklearn", "sklearn.datasets", "river", "river.datasets")
    with pytest.raises(ModuleNotFoundError, match=r"torchdyn-snopt\[bench\]"):
        load_digits()
    with pytest.raises(ModuleNotFoundError, match=r"torchdyn-snopt\[data\]"):
        load_tabular("shuttle")


def test_cli_names_the_extra_of_a_missing_dependency(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from torchdyn_snopt.__main__ import main

    _block(monkeypatch, "sklearn", "sklearn.datasets")
    assert main(["demo", "--iterations", "1", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "sklearn is not installed" in err
    assert 'pip install "torchdyn-snopt[bench]"' in err
