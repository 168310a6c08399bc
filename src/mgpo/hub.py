"""Can the HuggingFace hub be used right now? One answer, within seconds, for models and datasets alike.

Without it, a hub name on a machine with no network would hang in the libraries' retries for minutes before
failing; with it, the caller fails at once with a message naming the offline alternatives.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request

PROBE_TIMEOUT_S = 5.0
_TRUE = ("1", "true", "yes", "on")


def offline_reason(variables: tuple[str, ...] = ("HF_HUB_OFFLINE",), probe: bool = True) -> str | None:
    """Why the hub cannot be used (an offline variable is set, or the endpoint does not answer), else None."""
    for var in variables:
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var} is set"
    if not probe:
        return None
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return None  # the server answered
    except (urllib.error.URLError, OSError) as err:
        return f"cannot reach {endpoint}: {getattr(err, 'reason', err)}"
    return None
