"""The models: the built-in ones by name (registry.py: mlp.py, cnn.py) and users' by import path (build.py).

Every model is built by build.build_model under a private RNG seeded from the config, so every rank builds the
same weights.
"""
