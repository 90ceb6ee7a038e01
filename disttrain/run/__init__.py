"""One training run: build its parts (build.py), the trainer loop with its hooks (train.py), the step function
(step.py), mixed precision (precision.py), stopping on a signal (stop.py), and training as a task on launched ranks
(tasks.py).
"""
