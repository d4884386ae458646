"""goflow-gpu."""
