"""Client-side handlers fedcl's continual strategies ask for (registered on the default app)."""

from __future__ import annotations
