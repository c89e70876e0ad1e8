"""Evaluation engines behind the eval stage: lm-eval, local MMLU, next-token fidelity, the gate."""
