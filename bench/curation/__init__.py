"""The parts of ``bench.curated_vs_raw``: the corpus and its held-out split, the arms'
batches, the training runs and their evaluation, and the tables."""
