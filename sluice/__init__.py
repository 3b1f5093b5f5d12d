"""sluice: curate a live Kafka stream of code and text into training batches."""

__version__ = "0.1.0"
