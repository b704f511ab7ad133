"""The media floor: safe image decoding, folder walking, the DataLoader decode pipeline, synthetic drawings."""
