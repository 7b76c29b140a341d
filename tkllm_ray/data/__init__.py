"""Ingestion: raw per-account posts to a validated, split, tokenized, rendered dataset."""
