"""Checking someone else's training script: launch it at W ranks and as one process, record every optimizer
step through a hook it cannot see, compare, report (with verify's verdict)."""

from .report import CheckReport
from .run import run_check

__all__ = ["CheckReport", "run_check"]
