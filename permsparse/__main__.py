"""``python -m permsparse`` (and ``torchrun -m permsparse``): the command line."""
import sys

from .cli import main

sys.exit(main())
