"""cellrcnn: Faster R-CNN cell detection for whole-slide images."""

__version__ = '0.1.0'
