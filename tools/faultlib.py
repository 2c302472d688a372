"""Killing one Ray worker of a running stage (for the fault tests): only descendants of the
stage's own process are candidates, so other Ray instances on the machine are never hit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

DIFFGRM = str(Path(sys.executable).parent / "diffgrm")


def descendant(root: int, title: str) -> psutil.Process | None:
    """A live descendant of ``root`` whose process title (Ray sets ``ray::Class.method``)
    contains ``title``."""
    try:
        for child in psutil.Process(root).children(recursive=True):
            try:
                if title in " ".join(child.cmdline()):
                    return child
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
    except psutil.NoSuchProcess:
        return None
    return None


def run_with_one_kill(args: list[str], title: str, delay_s: float = 0.0, timeout_s: float = 600,
                      when: Callable[[], bool] | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    """Runs ``diffgrm ARGS``; once a worker titled ``title`` has run ``delay_s`` seconds (and
    ``when()`` holds, if given) it gets SIGKILL. Returns the finished process and what was
    killed (``killed`` None if the stage ended first)."""
    proc = subprocess.Popen([DIFFGRM, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    report: dict = {"killed": None}

    def killer() -> None:
        while proc.poll() is None:
            target = descendant(proc.pid, title)
            if (target is not None and time.time() - target.create_time() >= delay_s
                    and (when is None or when())):
                try:
                    report["killed"] = {"pid": target.pid, "title": " ".join(target.cmdline())[:80]}
                    target.send_signal(signal.SIGKILL)
                except psutil.NoSuchProcess:
                    report["killed"] = None
                    continue
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    out, _ = proc.communicate(timeout=timeout_s)
    thread.join(timeout=5)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, ""), report
