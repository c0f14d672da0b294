"""Checkpoint family: hf_mamba2 (being written)."""
