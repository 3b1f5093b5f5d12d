"""The continuously training PyTorch consumer of curated batches."""
