"""Kafka plumbing: topics, the Avro serde, the producer, connections and the Faust app."""
