"""The recipe: its schema, loading (`extends:`, `--set`, data defaults)."""
