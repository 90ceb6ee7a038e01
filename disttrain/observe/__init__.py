"""What a run reports: per-step metrics reduced over ranks (metrics.py) into metrics.jsonl (runlog.py reads it),
TensorBoard event files (tensorboard.py), the progress bar (progress.py) and plots (plot.py).
"""
