"""``python -m apex_reward`` = the ``apex-reward`` command."""

import sys

from .cli import main

sys.exit(main())
