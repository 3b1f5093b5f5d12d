"""The curation stages: pure, separately tested logic, and the thin Faust agents over it."""
