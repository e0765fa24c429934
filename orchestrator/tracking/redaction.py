"""What a run may log: flattened params and the resolved config with credentials redacted."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

from orchestrator.config import RunConfig, flatten

SECRET_PATTERN = re.compile(r"(token|secret|password|passwd|api[_-]?key|credential)", re.IGNORECASE)
REDACTED = "***"


# Query parameters whose value is a credential: ?token=..., &sig=... (signed URLs), &X-Amz-Credential=...
_SECRET_QUERY_NAME = re.compile(
    r"(token|secret|password|passwd|pwd|api[_-]?key|access[_-]?key|key|sig|signature|credential|auth)", re.IGNORECASE
)


_URI_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/\s?#]*)@")
_QUERY_PARAM = re.compile(r"(?P<sep>[?&;])(?P<name>[^=&;#\s]+)=(?P<value>[^&;#\s]*)")
_MIN_ENV_SECRET = 8  # shorter values ("1", "true") would redact ordinary text


def environment_snapshot(environ: Mapping[str, str] | None = None, attempts: int = 20) -> dict[str, str]:
    """A copy of the environment (os.environ by default). Copying lists the names, then reads each;
    another thread removing a variable in between (MLflow's telemetry drops _MLFLOW_TELEMETRY_SESSION_ID)
    raises KeyError, so retry: the race is harmless, failing the run over it is not."""
    environ = os.environ if environ is None else environ
    for _ in range(attempts - 1):
        try:
            return dict(environ)
        except KeyError:
            continue
    return {k: v for k in list(environ) if (v := environ.get(k)) is not None}


def _env_secrets(environ=None) -> list[str]:
    """Values of secret-looking environment variables (HF_TOKEN, AWS_SECRET_ACCESS_KEY, ...), longest first.
    Variables naming where a secret lives (*_PATH, *_FILE, *_DIR) are not secrets themselves."""
    values = {
        value
        for name, value in environment_snapshot(environ).items()
        if SECRET_PATTERN.search(name)
        and not name.upper().endswith(("_PATH", "_FILE", "_DIR"))
        and len(value) >= _MIN_ENV_SECRET
    }
    return sorted(values, key=len, reverse=True)


def redact_secrets(text: str, environ=None) -> str:
    """`text` with credentials replaced by ***: the password of a URI (`postgresql://user:***@host/db`; a
    lone user part, often a token, goes whole: `https://***@host`), the values of query parameters named
    like token/secret/key/password/sig, and any value of a secret-looking environment variable."""
    for secret in _env_secrets(environ):
        text = text.replace(secret, REDACTED)

    def userinfo(m: re.Match) -> str:
        user, colon, _ = m["userinfo"].partition(":")
        return f"{m['scheme']}{user}:{REDACTED}@" if colon else f"{m['scheme']}{REDACTED}@"

    def query(m: re.Match) -> str:
        if not _SECRET_QUERY_NAME.search(m["name"]) or not m["value"]:
            return m.group()
        return f"{m['sep']}{m['name']}={REDACTED}"

    text = _URI_USERINFO.sub(userinfo, text)
    return _QUERY_PARAM.sub(query, text)


def redacted_config_json(cfg: RunConfig) -> str:
    """The resolved config as JSON with every string value passed through redact_secrets (for the
    config/resolved.json artifact)."""

    def clean(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: clean(v) for k, v in node.items()}
        if isinstance(node, list):
            return [clean(v) for v in node]
        return redact_secrets(node) if isinstance(node, str) else node

    return json.dumps(clean(cfg.model_dump(mode="json")), indent=2)


def loggable_params(cfg: RunConfig) -> dict[str, str]:
    """Flattened config as MLflow params. Secret-looking keys are never logged, and credentials inside
    values (URI passwords, token query parameters, secret environment values) are redacted."""
    params = {}
    for key, value in flatten(cfg).items():
        if SECRET_PATTERN.search(key):
            continue
        text = "" if value is None else redact_secrets(str(value))
        params[key] = text[:6000]
    params["pipeline"] = redact_secrets(cfg.pipeline_label())
    return params
