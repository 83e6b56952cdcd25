"""Execute the notebooks in order at the `quick` preset and write their outputs back into them.

    .venv/bin/python notebooks/regenerate.py                 # all of them, in order
    .venv/bin/python notebooks/regenerate.py --preset smoke  # a dry run in a few minutes: writes nothing

The notebooks are committed executed at `quick`, so a reader sees the expected figures without running
them. They run in order in one working folder: notebook 01 pretrains the base into
`runs/notebooks-quick/` there, 02 and 03 train on that base, 04's continual run is the one 05 routes
and evaluates (each notebook run alone makes what it needs: `ensure_base` pretrains a missing base).
By default a fresh temporary folder, not notebooks/runs/, because the stages reuse whatever results a
folder already holds; `--workdir DIR` keeps the folder (and a second call with it resumes there).

Each notebook is written back only when every cell of it ran; the first failure stops the run (the later
notebooks read what the earlier ones trained) and leaves that notebook as it was. What is written: the
outputs, progress bars reduced to their last state (as a terminal shows them), and
`metadata["ministacks"]` = {"preset", "seconds"} (tests/test_notebooks.py checks the preset), and the
measured run times into the prose: a code cell tagged `time:NAME` (cell metadata "tags") is timed, and in
the markdown the text between `<!--time:NAME-->` and `<!--/time-->` becomes that cell's time in this run
(the tags' times summed where several cells share one).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
# in the order they build on each other; tests/test_notebooks.py checks this against notebooks/*.ipynb
NOTEBOOKS = (
    "01_transformer_and_pretraining",
    "02_moe_lora",
    "03_residual_boosting",
    "04_continual_nullspace",
    "05_meta_router",
    "06_psn",
    "07_rl",
    "08_scale",
)


def terminal_text(text: str) -> str:
    """A stream's text as a terminal would leave it: on every line, only what follows the last carriage
    return (a progress bar's final state instead of its hundreds of redraws); a bar that cleared itself
    when it closed (tqdm's leave=False) leaves no line."""
    lines = []
    for line in text.split("\n"):
        if "\r" not in line:
            lines.append(line)
        elif line.rsplit("\r", 1)[-1].strip():
            lines.append(line.rsplit("\r", 1)[-1].rstrip())
    return "\n".join(lines)


def clean_outputs(nb) -> None:
    """Consecutive pieces of one stream (stdout, stderr) as one output, as a terminal would show them."""
    for cell in nb.cells:
        merged = []
        for out in cell.get("outputs", []):
            if (out.get("output_type") == "stream" and merged and merged[-1].get("output_type") == "stream"
                    and merged[-1]["name"] == out["name"]):
                merged[-1]["text"] += out["text"]
            else:
                merged.append(out)
        for out in merged:
            if out.get("output_type") == "stream":
                out["text"] = terminal_text(out["text"])
        if "outputs" in cell:
            cell["outputs"] = [o for o in merged if o.get("output_type") != "stream" or o["text"].strip()]


def cell_seconds(cell) -> float | None:
    """The cell's execution time from the timestamps nbclient records (record_timing)."""
    t = cell.get("metadata", {}).get("execution", {})
    start, end = t.get("iopub.status.busy"), t.get("iopub.status.idle")
    if not start or not end:
        return None
    parse = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))  # noqa: E731
    return (parse(end) - parse(start)).total_seconds()


TIME_SPAN = re.compile(r"<!--time:([\w-]+)-->(.*?)<!--/time-->", re.S)


def spoken(seconds: float) -> str:
    """A run time as the prose gives it: "about 40 s", "about 3.5 min"."""
    return f"about {seconds:.0f} s" if seconds < 90 else f"about {seconds / 60:.1f} min"


def tagged_seconds(nb) -> dict[str, float]:
    """The time of every `time:NAME` tag: the executed code cells carrying it, summed."""
    times: dict[str, float] = {}
    for cell in nb.cells:
        for tag in cell.get("metadata", {}).get("tags", []):
            if tag.startswith("time:") and cell.cell_type == "code":
                times[tag[5:]] = times.get(tag[5:], 0.0) + (cell_seconds(cell) or 0.0)
    return times


def fill_times(nb) -> None:
    """Every `<!--time:NAME-->...<!--/time-->` span in the markdown set to the tagged cells' time; a span whose
    tag no code cell carries is an error (the prose would quote a time nothing measured)."""
    times = tagged_seconds(nb)
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        for name in TIME_SPAN.findall(cell.source):
            if name[0] not in times:
                raise ValueError(f"the prose quotes the time of {name[0]!r}, but no code cell is tagged time:{name[0]}")
        cell.source = TIME_SPAN.sub(lambda m: f"<!--time:{m[1]}-->{spoken(times[m[1]])}<!--/time-->", cell.source)


def first_line(cell) -> str:
    src = cell.source.strip().splitlines()
    return src[0][:70] if src else ""


def run(names: list[str], preset: str, workdir: Path, write: bool, timeout: int, into: Path = HERE) -> int:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, DeadKernelError

    env = dict(os.environ)
    env.pop("CI", None)  # the notebooks pick `smoke` under CI
    if preset == "smoke":
        env["CI"] = "1"
    os.environ.clear()
    os.environ.update(env)  # the kernel inherits this process's environment
    total = 0.0
    for name in names:
        path = HERE / f"{name}.ipynb"
        nb = nbformat.read(path, as_version=4)
        print(f"=== {name} ({preset}, in {workdir})", flush=True)
        t0 = time.time()
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(workdir)}})
        try:
            client.execute()
        except (CellExecutionError, DeadKernelError) as e:
            print(f"{name} failed after {time.time() - t0:.0f} s; it is left as it was:\n{e}", file=sys.stderr)
            return 1
        seconds = time.time() - t0
        total += seconds
        for i, cell in enumerate(nb.cells):
            s = cell_seconds(cell) if cell.cell_type == "code" else None
            if s is not None and s >= 1:
                print(f"  [{i:2d}] {s:7.1f} s  {first_line(cell)}")
        print(f"  {name}: {seconds:.0f} s", flush=True)
        if write:
            clean_outputs(nb)
            fill_times(nb)
            nb.metadata["ministacks"] = {"preset": preset, "seconds": round(seconds)}
            nbformat.write(nb, into / path.name)
    print(f"all {len(names)} notebooks: {total:.0f} s ({total / 60:.1f} min)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=["quick", "smoke"], default="quick",
                   help="quick (default): the committed outputs; smoke: a fast dry run")
    p.add_argument("--only", nargs="+", choices=NOTEBOOKS, metavar="NAME",
                   help="run only these notebooks (each makes what it needs that an earlier one would have)")
    p.add_argument("--workdir", type=Path,
                   help="the notebooks' working folder, kept afterwards (default: a fresh temporary folder, removed)")
    p.add_argument("--write", action=argparse.BooleanOptionalAction, default=None,
                   help="write the outputs into the notebooks (default: at quick only)")
    p.add_argument("--into", type=Path, default=HERE,
                   help="write the executed notebooks into this folder instead of notebooks/ (implies --write)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds one cell may take (default 3600)")
    args = p.parse_args(argv)
    names = [n for n in NOTEBOOKS if not args.only or n in args.only]
    into = args.into.resolve()
    write = (args.preset == "quick" or into != HERE) if args.write is None else args.write
    into.mkdir(parents=True, exist_ok=True)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return run(names, args.preset, args.workdir.resolve(), write, args.timeout, into)
    workdir = Path(tempfile.mkdtemp(prefix="ministacks-notebooks-"))
    try:
        return run(names, args.preset, workdir, write, args.timeout, into)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
