"""Triton kernels, each beside its pure-torch ``_ref`` twin (see the kernels issue)."""
