"""Is a W-rank run the one-device run? Whole-run verification (whole.py), step-wise verification from checkpoints
(stepwise.py) and its report (report.py).
"""
