"""Teachers and the teacher-similarity cache.

    from softalign.teachers import TeacherCache
    cache = TeacherCache.build("cache/coco", captions, image_paths, caption_to_image)   # once
    cache = TeacherCache.load("cache/coco")                                              # every run
    sims = cache.similarities(caption_ids, device=loss_device)   # TeacherSimilarities(image=[B,B], text=[B,B])

Teachers run once, offline by default: the packaged all-MiniLM-L6-v2 for text (``"offline-minilm"``)
and the packaged EfficientNet-Lite0 for images (``"offline-efficientnet-lite0"``); any
sentence-transformers model, any timm model (``"timm:<name>"``) or your own object with ``name``,
``dim`` and ``encode(list) -> Tensor`` work too. ``import_npy`` turns existing feature files (a plain
matrix, or CUSA's ``{image_id: array(1, D)}`` dict) into a cache.
"""

from __future__ import annotations

from softalign._lazy import lazy_exports

_EXPORTS = {
    "TeacherCache": "cache",
    "TeacherSimilarities": "cache",
    "TeacherEmbeddings": "cache",
    "TeacherBatch": "cache",
    "TeacherEnsemble": "ensemble",
    "CacheMismatchError": "cache",
    "IncompleteCacheError": "cache",
    "TextTeacher": "text",
    "resolve_text_teacher": "text",
    "DEFAULT_TEXT_TEACHER": "text",
    "ImageTeacher": "image",
    "EfficientNetLiteTeacher": "image",
    "TimmImageTeacher": "image",
    "resolve_image_teacher": "image",
    "DEFAULT_IMAGE_TEACHER": "image",
    "ImagePreprocessing": "preprocess",
    "import_npy": "importers",
    "read_features": "importers",
}
__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
