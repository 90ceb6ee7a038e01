"""Checkpoints: atomic files (files.py), the format and its names (format.py), the background writer and when a
checkpoint is due (writer.py), and where a run resumes (resume.py).
"""
