"""Operating the system: the delta registry and scheduled retraining."""
