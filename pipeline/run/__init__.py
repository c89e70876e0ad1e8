"""Plumbing every stage uses: run context, manifest and fingerprints, files, child processes, resources."""
