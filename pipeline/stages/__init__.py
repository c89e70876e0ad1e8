"""The pipeline's stages, each `run_<stage>(recipe, ctx)`; they never import each other (see README)."""
