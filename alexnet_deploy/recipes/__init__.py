"""Training recipes shipped with the package (read with importlib.resources)."""
