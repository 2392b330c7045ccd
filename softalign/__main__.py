from __future__ import annotations

import sys

from softalign.cli import main

sys.exit(main())
