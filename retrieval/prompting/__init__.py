"""Words into vectors: prompt templates, the CLIP paper's ensembles and CuPL descriptions; used by query and tagging alike."""
