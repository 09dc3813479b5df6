"""`stepx jobs`: the generation queue from the command line (list with position and time, cancel)."""

from __future__ import annotations

import argparse
import time

from stepx.commands_base import CliError, checked_store, print_rows


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.0f} s"


def cmd_jobs(args: argparse.Namespace) -> int:
    from jobs import queue

    root = checked_store(args)
    if args.action == "cancel":
        if args.job_id is None:
            raise CliError("stepx jobs cancel: give the job id (see `stepx jobs`)", 2)
        status = queue.cancel(root, args.job_id)
        done = "cancelled" if status == "cancelled" else "cancelling; its worker stops it at the next step"
        print(f"job {args.job_id}: {done}")
        return 0
    if args.job_id is not None:
        raise CliError("stepx jobs list: takes no job id (did you mean `stepx jobs cancel ID`?)", 2)
    now = time.time()
    rows = [
        (
            j.job_id,
            j.status,
            j.position or "",
            f"{j.step}/{j.total_steps or '?'}" if j.status in queue.ACTIVE else "",
            _seconds(j.elapsed_s(now)) or f"waiting {_seconds(j.waited_s(now))}",
            " ".join(str(j.request.get("prompt", j.request.get("kind", ""))).split())[:50],
            j.run_id or "",
            j.error or "",
        )
        for j in queue.recent(root, args.limit)
    ]
    print_rows(["job_id", "status", "position", "step", "elapsed", "prompt", "run_id", "error"], rows, "table")
    return 0
