"""Patch features: ImageNet backbones and the multi-stage feature extractor (resize, crop, tiles)."""
