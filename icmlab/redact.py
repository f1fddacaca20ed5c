"""Secrets never written: masking of URLs and secret-named values in records, markers, configs and logs.

What is masked (:data:`MASK`):

- a URL's query string (a pre-signed URL's signature lives there) and its userinfo
  (``https://user:pass@host`` → ``https://***@host``);
- Hugging Face tokens (``hf_...``) anywhere in a text;
- in mappings, the string value of any key naming a secret (``*token*``, ``*key*``, ``*secret*``,
  ``*password*``, ``*credential*``, ``*signature*``; ``tokens_converted``-style counts are not strings).

::

    redact_text("https://u:p@h/x.json?X-Amz-Signature=abc")  # 'https://***@h/x.json?***'
    redact({"hf_token": "hf_abc", "url": "https://h/f?sig=1"})  # {'hf_token': '***', 'url': 'https://h/f?***'}

The masked config (``config.resolved.yaml``) still has to work in the processes icmlab starts
(notebook kernels, training ranks): :func:`remember_secrets` keeps the real values of the masked
keys in this process's environment (``ICMLAB_SECRETS``), which those processes inherit, and
:func:`restore_secrets` puts them back when such a file is loaded. Nothing of it reaches a file.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

MASK = "***"
SECRETS_ENV = "ICMLAB_SECRETS"

_URL = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)([^\s/?#'\"<>]*@)?([^\s?#'\"<>]*)(\?[^\s#'\"<>]*)?")
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{16,}\b")
_SECRET_KEY = re.compile(r"token|key|secret|passw(or)?d|credential|signature|auth", re.IGNORECASE)
_COUNT_KEY = re.compile(r"^(num_|n_)?tokens?(_[a-z]+)*$")  # token counts, not tokens


def redact_text(text: str) -> str:
    """``text`` with URL query strings, URL userinfo and Hugging Face tokens masked."""

    def url(m: re.Match) -> str:
        scheme, userinfo, rest, query = m.groups()
        return scheme + (f"{MASK}@" if userinfo else "") + rest + (f"?{MASK}" if query else "")

    return _HF_TOKEN.sub(MASK, _URL.sub(url, text))


def is_secret_key(key: Any) -> bool:
    """Whether a mapping key names a secret (``hf_token``, ``api_key``, ``client_secret``, ...)."""
    return isinstance(key, str) and bool(_SECRET_KEY.search(key)) and not _COUNT_KEY.match(key)


def redact(obj: Any) -> Any:
    """A copy of nested dicts/lists/strings with every secret masked (see the module docstring)."""
    if isinstance(obj, dict):
        return {k: MASK if is_secret_key(k) and isinstance(v, str) and v else redact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def install_log_redaction() -> None:
    """Mask secrets in every log record this process creates, whatever its logger and handler
    (a record factory; installed by the CLI and the notebooks' config call, idempotent)."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "redacts", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        msg = record.getMessage()
        masked = redact_text(msg)
        if masked != msg:
            record.msg, record.args = masked, None
        return record

    factory.redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def remember_secrets(plain: dict, prefix: str = "") -> None:
    """Keep the real values of the strings :func:`redact` would mask in ``plain`` (a config dict)
    in this process's environment, for the processes it starts (see the module docstring)."""
    found: dict[str, str] = {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                dotted = f"{key}.{k}" if key else str(k)
                if is_secret_key(k) and isinstance(v, str) and v:
                    found[dotted] = v
                else:
                    walk(v, dotted)
        elif isinstance(node, str) and redact_text(node) != node:
            found[key] = node

    walk(plain, prefix)
    if found:
        known = json.loads(os.environ.get(SECRETS_ENV) or "{}")
        os.environ[SECRETS_ENV] = json.dumps(known | found)


def restore_secrets(plain: dict) -> None:
    """Put back, in place, the real values of masked strings of ``plain`` remembered by this
    process or the one that started it (only where the masked form matches)."""
    known = json.loads(os.environ.get(SECRETS_ENV) or "{}")
    for dotted, real in known.items():
        node = plain
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(last), str):
            if node[last] in (redact_text(real), MASK) and node[last] != real:
                node[last] = real
