"""sa-export: Shared Attention models from Hugging Face to ONNX and TensorRT."""

__version__ = "0.1.0"
