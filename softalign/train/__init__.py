"""Recipes, reference models and the reference trainer (``softalign train``), and the offline demo
(``softalign demo``).

    from softalign.train import load_recipe, train
    result = train(load_recipe("recipes/demo.yaml", variant="csa_usa"))

Attributes are imported lazily so that building the CLI parser stays cheap.
"""

from __future__ import annotations

from importlib import import_module

_EXPORTS = {
    "Recipe": "softalign.train.recipe",
    "RecipeError": "softalign.train.recipe",
    "load_recipe": "softalign.train.recipe",
    "recipe_from_dict": "softalign.train.recipe",
    "list_variants": "softalign.train.recipe",
    "train": "softalign.train.trainer",
    "load_splits": "softalign.train.trainer",
    "get_teacher_cache": "softalign.train.trainer",
    "evaluate_embeddings": "softalign.train.evaluation",
    "encode_split": "softalign.train.evaluation",
    "load_checkpoint": "softalign.train.checkpoint",
    "save_embeddings": "softalign.train.evaluation",
    "build_model": "softalign.train.model_factory",
    "DualEncoder": "softalign.train.models",
    "Vocabulary": "softalign.train.models",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'softalign.train' has no attribute {name!r}")
