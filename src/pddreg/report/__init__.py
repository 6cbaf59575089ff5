"""Reports: pictures of registrations (:mod:`.figures`), the HTML report (:mod:`.html`), the
demo (:mod:`.demo`), 2D+t tracking (:mod:`.track`) and evaluation tables (:mod:`.evaluate`).

Submodules are imported on use (matplotlib is loaded only by :mod:`.figures`).
"""

from __future__ import annotations
