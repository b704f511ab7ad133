"""Test-only models trained on real data (CIFAR-10 from ../shared/data); never installed."""
