"""Training: the single-account fine-tune (reusable step) and, later, the packed multi-tenant engine."""
