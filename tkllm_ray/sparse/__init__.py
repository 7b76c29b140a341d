"""Gradient-Surgical sparse fine-tuning (GSPF): sensitivity, selection, the sparse-delta linear op."""
