"""python -m disttrain ... (also what torchrun runs with `torchrun ... -m disttrain train CONFIG`)."""

import sys

from .cli.main import main

sys.exit(main())
