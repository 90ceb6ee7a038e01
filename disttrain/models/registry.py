"""The built-in models by name: the one place a model's name is listed.

A model is one module in models/ with ``build(cfg: ModelConfig, input_shape, num_classes) -> nn.Module`` plus one
line in :data:`MODELS`. This module imports nothing, so the validator reads the names without importing torch.
"""

MODELS = {
    "mlp": "mlp",  # name -> module in disttrain.models, imported when the model is built
    "cnn": "cnn",
    "gpt": "gpt",
}

__all__ = ["MODELS"]
