"""ONNX export of extracted models: portable, opset27 and tensorrt flavors."""
