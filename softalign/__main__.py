import sys

from softalign.cli import main

sys.exit(main())
