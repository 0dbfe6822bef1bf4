"""``python3 -m exitless.cli``."""
import sys

from . import main

sys.exit(main())
