"""Zero-shot and few-shot tagging over stored vectors: label sets, Tip-Adapter, auto-tagging, evaluation."""
