"""Serving: one endpoint, the shared base model, per-account sparse deltas."""
