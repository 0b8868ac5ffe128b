"""The PySide6 window. Modules here import torch/transformers lazily so the window paints first."""
