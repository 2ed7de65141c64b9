"""``python -m accumfn`` runs the ``accumfn`` command."""

import sys

from .cli import main

sys.exit(main())
