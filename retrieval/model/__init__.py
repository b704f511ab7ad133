"""The model floor: what names a model (spec), loading it through open_clip, encoding, and the CPU precision choice."""
