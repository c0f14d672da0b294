"""Checkpoint family: mamba_ssm (being written)."""
