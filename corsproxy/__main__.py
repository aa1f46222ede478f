"""``python -m corsproxy`` is the ``corsproxy`` command."""

import sys

from corsproxy.cli import main

sys.exit(main())
