"""``python -m graphfold``: the same as the ``graphfold`` command."""

import sys

from graphfold.cli.command import main

sys.exit(main())
