"""The embedded demo model and its corpus (offline, seeded)."""
