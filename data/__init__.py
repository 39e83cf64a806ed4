"""The names dataset, verified and cached (see dataset.py)."""
