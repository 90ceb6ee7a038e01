"""Is a W-rank run the one-device run? Whole-run verification (whole.py), step-wise verification from checkpoints
(stepwise.py) and its report (report.py), both judged against the run's own rounding noise: the reference's rounding
twin (twin.py, chunked.py) and the calibrated verdict (verdict.py).
"""
