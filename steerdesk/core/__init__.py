"""Qt-free core of steerdesk: models, datasets, extraction, steering, generation, vector files.

Nothing under ``steerdesk.core`` may import PySide6 or pyqtgraph (a test enforces it).
"""
