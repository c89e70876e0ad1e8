"""What reads a finished run: verify, publish, the model card."""
