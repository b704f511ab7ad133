"""Development models: the tiny demo/test CLIP model trained here on drawn shapes, its trainer, and the default-model catalog."""
