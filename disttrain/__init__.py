"""disttrain: data-parallel PyTorch training that proves a W-process run equals one device on the global batch."""

__version__ = "0.1.0"
