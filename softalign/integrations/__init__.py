"""Integration shims for existing trainers (importable as ``softalign.integrations``).

* :mod:`softalign.integrations.vsepp` -- VSE++ (fartashf/vsepp): ``patch(VSE(opt), SoftAlignLoss(...))``
* :mod:`softalign.integrations.scan` -- SCAN (kuanghuei/SCAN): one cross-attention scorer call per step
* :mod:`softalign.integrations.teran` -- TERAN (mesnico/TERAN): named terms in the returned loss dict
* :mod:`softalign.integrations.generic` -- ``SoftAlignHook``, ``soft_align_step`` and ``patch`` for any trainer

Each ``patch`` wraps the trainer in place and returns it; ``unpatch`` restores it. See docs/integrations.md.
Submodules are imported on demand (``from softalign.integrations import vsepp``).
"""

from __future__ import annotations

__all__ = ["vsepp", "scan", "teran", "generic"]
