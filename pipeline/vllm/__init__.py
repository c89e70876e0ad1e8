"""vLLM, reached only through child processes in its own environment (worker, serve check, lm-eval)."""
