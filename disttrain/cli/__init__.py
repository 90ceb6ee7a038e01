"""The command line: ``disttrain train|verify|config|bench|demo|plot|data`` (main.py).
"""

from .main import main

__all__ = ["main"]
