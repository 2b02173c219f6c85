"""`python -m matta ...` (and `torchrun -m matta train ...`): the `matta` command line."""
import sys

from .cli import main

sys.exit(main())
