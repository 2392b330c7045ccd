"""softalign: plug-in soft-label alignment for image-text retrieval trainers.

One loss line adds CUSA's cross-modal and uni-modal soft-label alignment (CSA, USA), TGDT's
consistent multi-modal contrastive loss (CMC) and id-aware hard-negative mining to a
VSE++/SCAN/TERAN-style trainer, fed by a teacher-similarity cache built once.
"""

from __future__ import annotations

__version__ = "0.1.0"
