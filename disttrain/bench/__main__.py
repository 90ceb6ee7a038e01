"""python -m disttrain.bench NAME [options]: the same as `disttrain bench`."""

import sys

from . import main

sys.exit(main(prog="python -m disttrain.bench"))
