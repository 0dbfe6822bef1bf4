"""``python3 -m exitless``: the ``exitless`` command."""
import sys

from .cli import main

sys.exit(main())
