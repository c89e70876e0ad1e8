"""User-facing errors: one line naming the thing and the fix, mapped to exit codes by the CLI."""


class PipelineError(Exception):
    """Bad input or an environment problem the user can fix; exit code 2."""

    exit_code = 2


class StageFailed(PipelineError):
    """A stage ran and failed (crash, timeout, unsupported artifact); exit code 1."""

    exit_code = 1


class GateFailed(PipelineError):
    """The quantized model missed its quality gate; exit code 3 (artifact kept)."""

    exit_code = 3


class GateInconclusive(PipelineError):
    """The gate's interval straddles the threshold or too few questions were asked; exit code 4 (artifact kept)."""

    exit_code = 4
