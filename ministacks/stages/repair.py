"""`repair`: undo a run back to just before a (damaged) stack, so that the command that trained it
retrains from there (training/continual.py's `repair_run` says what is removed and why)."""

from __future__ import annotations

from pathlib import Path

from ..run import locate_run
from ..training.continual import repair_run
from .common import writable_folder

HELP = "undo a run back to before a stack (a damaged one), to retrain from there"


def add_args(p) -> None:
    p.add_argument("--run", required=True, help="the run folder (`train --out`), a demo folder, or a run inside one")
    p.add_argument("--from", dest="from_", required=True, metavar="DOMAIN:ROUND",
                   help="the first stack to retrain, e.g. code:2; it and every stack trained after it are deleted")


def main(args) -> int:
    domain, sep, round_text = args.from_.partition(":")
    if not sep or not round_text.strip().isdigit():
        raise ValueError(f"--from {args.from_!r}: give DOMAIN:ROUND, e.g. --from code:2")
    path = Path(args.run)
    # a run whose base is gone can still be repaired: its own folder is enough
    run = path if (path / "manifest.json").is_file() else locate_run(path).run
    writable_folder(run, "--run")  # checked before anything is deleted
    removed = repair_run(run, domain.strip(), int(round_text))
    print(f"removed {len(removed)} stack(s) from {run}: {', '.join(removed) or 'none'}")
    print(f"now run the command that trained {run} again (`train --out ...` or `demo --out ...`, same preset): it "
          f"retrains {domain.strip()} from round {int(round_text)} on; then `route` and `eval` again")
    return 0
