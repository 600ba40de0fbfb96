"""The documentation site builds with ``mkdocs build --strict``: a broken link, a missing
page, an API name mkdocstrings cannot resolve or a malformed docstring fails the test. The
tutorial pages must show the plots stored in the notebooks."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INSTALL_HINT = 'pip install -e ".[docs]" (the test extra includes it)'
PLUGINS = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python", "mkdocs_jupyter")


def test_docs_build_strict(tmp_path: Path) -> None:
    missing = [name for name in PLUGINS if importlib.util.find_spec(name) is None]
    if missing:
        pytest.fail(f"building the docs needs {', '.join(missing)}: {INSTALL_HINT}")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    for page in ("index.html", "reference/index.html", "tutorials/01_image_classification"):
        assert (site / page).exists(), page
    # every notebook is rendered with its stored outputs: at least one inline plot per page
    notebooks = sorted((ROOT / "tutorials").glob("*.ipynb"))
    assert notebooks
    for nb in notebooks:
        html = (site / "tutorials" / nb.stem / "index.html").read_text(encoding="utf-8")
        assert "data:image/png;base64," in html, f"{nb.name} rendered without its plots"
    script = (site / "distributed-script" / "index.html").read_text(encoding="utf-8")
    assert "DistributedDataParallel" in script and "--8&lt;--" not in script
    assert not (site / "tutorials" / "execute.py").exists()
    api = (site / "reference" / "index.html").read_text(encoding="utf-8")
    assert 'id="torchdyn_snopt.SNOpt"' in api and ":class:`" not in api
    changelog = (site / "changelog" / "index.html").read_text(encoding="utf-8")
    assert "0.1.0" in changelog and "--8&lt;--" not in changelog  # CHANGELOG.md included
