"""Runners (torch reference, onnxruntime, tensorrt) and the StreamingSession API."""
