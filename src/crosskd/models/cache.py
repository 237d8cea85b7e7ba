"""Where crosskd keeps models it builds itself (the reference pair, the tiny test pair)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV_VAR = "CROSSKD_CACHE"


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: an explicit argument (the CLI's --cache-dir) > $CROSSKD_CACHE > the platform's user cache dir."""
    if cache_dir:
        return Path(cache_dir).expanduser().resolve()
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR]).expanduser().resolve()
    import platformdirs

    return Path(platformdirs.user_cache_dir("crosskd")).resolve()
