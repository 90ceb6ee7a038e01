"""The optimizer (optimizer.py), gradient clipping on the global gradient (clip.py), and learning-rate schedules
as pure functions of the optimizer step (schedule.py).
"""
