"""Examples of bringing your own model and data to disttrain (imported by path from the repository root)."""
