"""Checkpoint family: hf_bamba (being written)."""
