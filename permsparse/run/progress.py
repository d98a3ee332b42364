"""Progress bars that also leave a line in the log.

Every long step (statistics, searches, training, evaluation) shows a tqdm bar with an ETA; when the bar
closes, its final state (what, how many, how long, the last loss and temperature) goes to the
``permsparse`` logger, which the command line writes to ``DIR/log.txt``. A disabled bar (``--quiet``)
counts nothing and logs nothing.
"""
from __future__ import annotations

import logging

from tqdm.auto import tqdm

log = logging.getLogger("permsparse")


class Bar(tqdm):
    """A tqdm bar that logs its final state when it closes."""

    def close(self) -> None:
        if not getattr(self, "_logged", True) and not self.disable:
            self._logged = True
            elapsed = self.format_dict.get("elapsed", 0.0)
            postfix = f" ({self.postfix})" if self.postfix else ""
            log.info("%s: %s/%s in %.1f s%s", self.desc, self.n, self.total, elapsed, postfix)
        super().close()

    def __init__(self, *args, **kwargs):
        self._logged = False
        super().__init__(*args, **kwargs)


def bar(iterable=None, **kwargs) -> Bar:
    """A :class:`Bar` over ``iterable`` (tqdm's keyword arguments: ``desc``, ``total``, ``disable``...)."""
    return Bar(iterable, **kwargs)
