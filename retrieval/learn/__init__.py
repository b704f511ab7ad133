"""Learning from a few examples: concepts (probe, CoOp) and label sets (Tip-Adapter-F, CoOp).

One module per method, each a function from vectors (and, for CoOp, the text
tower) to weights; `concepts` turns example files into vectors and a learned
direction into a stored concept.
"""
