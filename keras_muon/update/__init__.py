"""The arithmetic of the update: formulas, Newton–Schulz and batching."""
