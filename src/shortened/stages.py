"""Resumable stages for ``shortened run``: each stage writes its own folder atomically with a
``stage.json`` of the settings it ran with; a re-run with the same settings (and unchanged inputs)
skips it, a changed setting re-runs it and every stage that depends on it. The temporary folder of a
stage whose run was killed (``.<stage>.tmp-*``) is removed by the next runner, unless a live process
holds that stage's lock."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .io import atomic_output_dir, now_iso, read_json, remove_stale_temporaries, write_json

STAGE_FILE = "stage.json"


def fingerprint(obj: Any) -> str:
    """A short stable hash of JSON-serialisable settings."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StageRunner:
    """Runs named stages under ``root``, skipping those already finished with the same settings."""

    def __init__(self, root: Path, *, force: bool = False, log: Callable[[str], None] = print):
        self.root = Path(root)
        self.force = force
        self.log = log
        self.skipped: list[str] = []
        self.ran: list[str] = []
        self.seconds: dict[str, float] = {}
        if self.root.is_dir():
            remove_stale_temporaries(self.root)

    def folder(self, name: str) -> Path:
        return self.root / name

    def done(self, name: str, settings: dict[str, Any]) -> bool:
        """Whether ``name`` finished earlier with ``settings`` (always False under ``force``)."""
        return not self.force and self._matches(name, settings)

    def _matches(self, name: str, settings: dict[str, Any]) -> bool:
        marker = self.folder(name) / STAGE_FILE
        if not marker.is_file():
            return False
        try:
            return read_json(marker).get("fingerprint") == fingerprint(settings)
        except Exception:  # an unreadable marker means the stage must run again
            return False

    def run(self, name: str, settings: dict[str, Any], work: Callable[[Path], None]) -> Path:
        """Run ``work(tmp_folder)`` unless ``name`` finished earlier with ``settings``; return its folder.

        Downstream stages should include ``self.token(name)`` in their settings, so that they re-run
        whenever this one does.
        """
        folder = self.folder(name)
        if (name in self.ran or name in self.skipped) and self._matches(name, settings):
            return folder  # already run, or reported as skipped, earlier in this same run
        if self.done(name, settings):
            self.log(f"[{name}] finished earlier with the same settings: skipped ({folder})")
            self.skipped.append(name)
            return folder
        self.log(f"[{name}] running")
        start = time.perf_counter()
        with atomic_output_dir(folder, overwrite=True) as tmp:
            work(tmp)
            write_json(tmp / STAGE_FILE, {"stage": name, "settings": settings,
                                          "fingerprint": fingerprint(settings), "finished": now_iso(),
                                          "seconds": round(time.perf_counter() - start, 2)})
        self.seconds[name] = round(time.perf_counter() - start, 2)
        self.ran.append(name)
        self.log(f"[{name}] done in {self.seconds[name]:.1f} s")
        return folder

    def token(self, name: str) -> str:
        """Identifies one finished run of stage ``name`` (changes whenever it re-runs)."""
        marker = read_json(self.folder(name) / STAGE_FILE)
        return f"{marker['fingerprint']}@{marker['finished']}"
