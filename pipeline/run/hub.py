"""Whether the Hugging Face hub can be reached, asked once and quickly before a loader that would retry for long."""

from __future__ import annotations

PROBE_TIMEOUT_S = 5.0


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE / HF_DATASETS_OFFLINE put ``datasets`` in offline mode."""
    import datasets.config

    return bool(datasets.config.HF_HUB_OFFLINE)


def hub_unreachable(repo_id: str, repo_type: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the hub cannot be reached for `repo_id` (name resolution, connection, timeout, proxy), or None when
    offline mode is on (nothing is asked) or the hub answered. Any answer, "not found" and "gated" included, is
    the loader's to report in its own words. `datasets` retries an unreachable hub for about 25 s."""
    if hub_offline():
        return None
    import httpx
    from huggingface_hub import HfApi

    try:
        HfApi().repo_info(repo_id, repo_type=repo_type, timeout=timeout_s)
    except (httpx.TransportError, OSError) as err:
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    except Exception:  # noqa: BLE001 (an HTTP answer of any kind: the hub is there)
        return None
    return None
