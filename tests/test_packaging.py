"""Packaging facts: the core imports only torch and numpy, one version source, licence, BibTeX citations."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def test_the_loss_line_imports_only_torch_and_numpy():
    heavy = ["safetensors", "accelerate", "sentence_transformers", "pytorch_metric_learning", "yaml", "matplotlib",
             "datasets", "scipy", "PIL", "transformers"]
    code = ("import sys; import softalign.losses, softalign.mining, softalign.integrations, softalign.distributed; "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(d.split(">")[0].split("=")[0] for d in deps) == ["numpy", "torch"]


def test_one_version_source_and_an_apache_licence():
    import softalign

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "softalign.__version__"}
    assert project["project"]["license"] == "Apache-2.0"
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert not any(ln.startswith("version:") for ln in (ROOT / "CITATION.cff").read_text().splitlines())
    assert softalign.__version__.count(".") == 2


@pytest.mark.parametrize("name", ["SoftAlignLoss", "CSALoss", "USALoss", "CMCLoss", "VSEHingeLoss", "InfoNCELoss"])
def test_every_loss_cites_its_papers_in_bibtex(name):
    import softalign.losses as losses

    text = getattr(losses, name).citation
    entries = [e for e in text.split("\n\n") if e.strip()]
    assert entries
    for e in entries:
        assert e.startswith("@") and e.count("{") == e.count("}") and "title" in e and "year" in e, e
