"""Command line: `python -m ministacks <command> ...` (also installed as `ministacks`).

    demo       every stage that exists, on the embedded default data, then report.md
    pretrain   pretrain the base model from random initialisation (resumes if DIR has a checkpoint)
    compare    Experiment 1: MoE-LoRA vs the parameter-matched single LoRA on chat
    boost      residual boosting rounds on chat until the stop rule
    data       build the domain corpora (cached) and print their sizes
    train      continual domains in curriculum order, null-space projection, forgetting matrices
    route      train the meta-router of a trained run (outcome-based targets)
    eval       base / ungated / routed: test loss and task accuracy per domain
    generate   answer one prompt with a trained run (routed, or any mode / weights)
    chat       interactive: route, generate, force weights, compare the three modes
    repair     undo a run back to before a (damaged) stack, so that `train`/`demo` retrains from there
    bench      speed measurements: `bench pretrain`, `bench moe`, `bench nf4`, `bench nullspace`, `bench route`
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from .presets import PRESETS, get_preset


def _add_common(p: argparse.ArgumentParser, default_out: str | None) -> None:
    p.add_argument("--preset", default="quick", choices=list(PRESETS), help="size of the run (default: quick)")
    if default_out is not None:
        p.add_argument("--out", default=default_out, help=f"run folder (default: {default_out}); resumes if it holds a run")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def positive_int(text: str) -> int:
    """argparse type for a count that must be at least 1 (--max-new-tokens)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return n


def writable_folder(path: str | Path, flag: str = "--out") -> Path:
    """`path` as a folder this process can write (created if missing), checked before any work, so a bad
    --out is one message naming it, not an OSError an hour later about a hidden temporary file."""
    path = Path(path)
    blocker = next((p for p in (path, *path.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        where = "is a file" if blocker == path else f"is inside {blocker}, which is a file"
        raise ValueError(f"{flag} {path} {where}, not a folder: pass a folder (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()  # a real write: permissions alone miss read-only mounts
    except OSError as e:
        raise ValueError(f"{flag} {path} cannot be written ({e.strerror}): pass a folder you can write to") from None
    return path


def cmd_demo(args) -> int:
    from .continual import train_stage
    from .evaluate import eval_stage
    from .experiments import run_boost, run_compare
    from .pipeline import stage_pretrain
    from .report import (boost_section, compare_section, data_section, eval_section, forgetting_section,
                         pretrain_section, router_section, write_report)
    from .routing import route_stage

    preset, out, progress = get_preset(args.preset), writable_folder(args.out), not args.no_progress
    t0 = time.time()
    summary = stage_pretrain(preset, out, progress=progress)
    compare = run_compare(replace(preset, quant="nf4"), out, progress=progress)  # Exp 1 is on the 4-bit base
    boost = run_boost(preset, out, progress=progress)
    forgetting = train_stage(preset, out, compare_nullspace=True, progress=progress)
    run = out / "nullspace"  # the router and the evaluation work on the run with null-space projection
    router = route_stage(run, preset.name, progress=progress)
    evaluation = eval_stage(run, preset.name, progress=progress)
    sections = [
        f"Preset `{preset.name}`; run folder `{out}`; {time.time() - t0:.0f} s for this invocation.\n",
        data_section(summary["data"]),
        pretrain_section(summary),
        compare_section(compare),
        boost_section(boost),
        forgetting_section(forgetting),
        router_section(router, f"{run.name}/router.png"),
        eval_section(evaluation, f"{run.name}/eval.png"),
    ]
    path = write_report(out, sections, title="ministacks demo report")
    print(f"\nvalidation loss {summary['val_loss']:.3f} (unigram entropy {summary['unigram_entropy']:.3f})")
    print(f"report: {path}")
    return 0


def cmd_pretrain(args) -> int:
    from .pipeline import stage_pretrain

    writable_folder(args.out)
    s = stage_pretrain(get_preset(args.preset), args.out, progress=not args.no_progress)
    print(f"validation loss {s['val_loss']:.3f} nats/token (unigram entropy {s['unigram_entropy']:.3f}), "
          f"{s['tokens_per_second']:,.0f} tokens/s, {s['params']:,} params")
    print(f"wrote {Path(args.out) / 'pretrain.json'} and {Path(args.out) / 'pretrain_loss.png'}")
    return 0


def _preset(args):
    """The named preset, with --quant applied where the command has it."""
    preset = get_preset(args.preset)
    quant = getattr(args, "quant", None)
    return replace(preset, quant=quant) if quant else preset


def cmd_compare(args) -> int:
    from .experiments import run_compare

    writable_folder(args.out)
    c = run_compare(_preset(args), args.out, progress=not args.no_progress)
    print(f"final validation loss: MoE-LoRA {c['moe']['final']:.4f}, LoRA {c['lora']['final']:.4f}; "
          f"MoE/LoRA step time {c['speed_ratio_moe_over_lora']:.2f}x")
    print(f"wrote {Path(args.out) / 'compare.json'} and {Path(args.out) / 'compare.png'}")
    return 0


def cmd_boost(args) -> int:
    from .experiments import run_boost

    writable_folder(args.out)
    b = run_boost(_preset(args), args.out, progress=not args.no_progress)
    print("best validation loss per round: " + ", ".join(f"{v:.4f}" for v in b["best"]))
    print(f"wrote {Path(args.out) / 'boost.json'} and {Path(args.out) / 'boost.png'}")
    return 0


def cmd_train(args) -> int:
    from .continual import train_stage

    writable_folder(args.out)
    preset = _preset(args)
    cc = preset.continual
    if args.domains:
        cc = replace(cc, domains=tuple(d.strip() for d in args.domains.split(",") if d.strip()))
    cc = replace(cc, nullspace=not args.no_nullspace, ns_mode=args.ns_mode, ns_basis=args.ns_basis, ns_data=args.ns_data)
    result = train_stage(replace(preset, continual=cc), args.out, args.compare_nullspace, progress=not args.no_progress)
    for name, f in result["runs"].items():
        print(f"forgetting matrix, {name} (rows: after training; columns: {', '.join(f['domains'])}):")
        for d, row in zip(f["domains"], f["matrix"]):
            print(f"  after {d:10s} " + "  ".join("   -  " if v is None else f"{v:6.3f}" for v in row))
    out = Path(args.out)
    print(f"wrote {out / 'forgetting.json'}, {out / 'forgetting.png'}, {out / 'subspaces.png'}")
    return 0


def cmd_route(args) -> int:
    from .routing import route_stage

    if Path(args.run).is_dir():  # a missing one: locate_run's message says what to pass
        writable_folder(args.run, "--run")  # the router is written into the run
    r = route_stage(args.run, args.preset, progress=not args.no_progress, search=args.search)
    print(f"router, against the oracle's targets: single top-1 {r['single_top1']:.3f}, mixed set match "
          f"{r['mixed_set_match']:.3f}, val BCE {r['val_bce']:.3f} (epoch {r['best_epoch']} kept; {r['params']:,} parameters)")
    print(f"router, against the domain labels: top-1 {r['label_top1']:.3f}, set match {r['label_set_match']:.3f}")
    print("oracle's best stack combination, share of each domain's prompts:")
    for d, o in r["oracle"].items():
        print(f"  {d:10s} " + ", ".join(f"{c} {v:.0%}" for c, v in list(o["shares"].items())[:4]))
    print(f"wrote {Path(r['files']['router'])} and {Path(r['files']['json'])}")
    return 0


def cmd_eval(args) -> int:
    from .evaluate import eval_stage
    from .report import eval_table

    if Path(args.run).is_dir():
        writable_folder(args.run, "--run")  # eval.json is written into the run
    e = eval_stage(args.run, args.preset, progress=not args.no_progress)
    print("\n".join(eval_table(e)))
    print(f"wrote {e['files']['json']}")
    return 0


def _answer(sr, text: str, mode, max_new_tokens: int) -> None:
    from .inference import describe_weights

    gen = sr.generate(text, mode, max_new_tokens=max_new_tokens)
    label = mode if isinstance(mode, str) else "forced"
    print(f"[{label}: {describe_weights(gen['weights'])}]\n{gen['completion'].strip()}\n")


def cmd_generate(args) -> int:
    from .inference import MODES, StackedRun, parse_weights

    weights = parse_weights(args.weights) if args.weights is not None else None  # before the (slow) load
    sr = StackedRun(args.run, args.preset, router=args.mode in ("routed", "compare") and weights is None)
    if weights is not None:
        _answer(sr, args.prompt, weights, args.max_new_tokens)  # set_mode checks them against the run's domains
    else:
        for mode in MODES if args.mode == "compare" else (args.mode,):
            _answer(sr, args.prompt, mode, args.max_new_tokens)
    return 0


CHAT_HELP = """commands:
  /route TEXT     show the router's probabilities and weights for TEXT, without generating
  /compare TEXT   answer TEXT in every mode: base, ungated, routed
  /force W        answer with fixed weights from now on, e.g. /force chat=1,math=0.5 (/force off: route again)
  /mode M         answer in mode M from now on: routed (default), base or ungated
  /help, /quit"""


def cmd_repair(args) -> int:
    from .continual import repair_run
    from .inference import locate_run

    domain, sep, round_text = args.from_.partition(":")
    if not sep or not round_text.strip().isdigit():
        raise ValueError(f"--from {args.from_!r}: give DOMAIN:ROUND, e.g. --from code:2")
    path = Path(args.run)
    run = path if (path / "manifest.json").is_file() else locate_run(path).run
    writable_folder(run, "--run")
    removed = repair_run(run, domain.strip(), int(round_text))
    print(f"removed {len(removed)} stack(s) from {run}: {', '.join(removed) or 'none'}")
    print(f"now run the command that trained {run} again (`train --out ...` or `demo --out ...`, same preset): it "
          f"retrains {domain.strip()} from round {int(round_text)} on; then `route` and `eval` again")
    return 0


def cmd_chat(args) -> int:
    from .inference import MODES, StackedRun, describe_weights, parse_weights

    sr = StackedRun(args.run, args.preset)
    mode: str | dict = "routed" if sr.router is not None else "ungated"
    print(f"run {sr.paths.run}: stacks for {', '.join(sr.domains)}; "
          + ("router loaded" if sr.router is not None else "no router yet (`route` first): ungated") + ".")
    print(CHAT_HELP)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:  # Ctrl-D
            print()
            return 0
        except KeyboardInterrupt:  # Ctrl-C: end the prompt's line; main() says bye
            print()
            raise
        if not line:
            continue
        cmd, _, rest = line.partition(" ")
        try:
            if cmd in ("/quit", "/exit"):
                return 0
            elif cmd == "/help":
                print(CHAT_HELP)
            elif cmd == "/route":
                r = sr.route(rest)
                print("p: " + ", ".join(f"{d} {p:.2f}" for d, p in r["probs"].items()))
                print(f"weights: {describe_weights(r['weights'])}")
            elif cmd == "/compare":
                for m in MODES:
                    _answer(sr, rest, m, args.max_new_tokens)
            elif cmd == "/force":
                # parsed (and checked against the run's domains) before it replaces the current setting
                mode = ("routed" if sr.router is not None else "ungated") if rest.strip() == "off" \
                    else parse_weights(rest, sr.domains)
                print(f"now answering with {mode if isinstance(mode, str) else describe_weights(mode)}")
            elif cmd == "/mode":
                if rest.strip() not in MODES:
                    raise ValueError(f"unknown mode {rest.strip()!r}: use one of {', '.join(MODES)}")
                mode = rest.strip()
                print(f"now answering in mode {mode}")
            elif cmd.startswith("/"):
                print(f"unknown command {cmd}; /help lists them")
            else:
                _answer(sr, line, mode, args.max_new_tokens)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}")


def cmd_data(args) -> int:
    from .pipeline import stage_data

    print(json.dumps(stage_data(get_preset(args.preset), progress=not args.no_progress), indent=2))
    return 0


def cmd_bench(args) -> int:
    from .bench import bench_pretrain, format_bench

    if args.what == "pretrain":
        result, text = bench_pretrain(), format_bench
    elif args.what == "moe":
        from .bench_moe import bench_moe, format_bench_moe

        result, text = bench_moe(), format_bench_moe
    elif args.what == "route":
        from .bench_route import bench_route, format_bench_route

        result, text = bench_route(), format_bench_route
    elif args.what == "nullspace":
        from .bench_nullspace import bench_nullspace, format_bench_nullspace

        result, text = bench_nullspace(), format_bench_nullspace
    else:
        from .quant import bench_nf4, format_bench_nf4

        result, text = bench_nf4(), format_bench_nf4
    print(json.dumps(result) if args.json else text(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ministacks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run every stage on the default data and write report.md")
    _add_common(p, "runs/demo")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("pretrain", help="pretrain the base model from random initialisation")
    _add_common(p, "runs/pretrain")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("compare", help="Experiment 1: MoE-LoRA vs the parameter-matched single LoRA")
    _add_common(p, "runs/demo")
    p.add_argument("--quant", choices=["none", "nf4"], default="nf4",
                   help="base precision under the stacks (default nf4: the paper's 4-bit setting for Exp 1)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("boost", help="residual boosting rounds on chat")
    _add_common(p, "runs/demo")
    p.add_argument("--quant", choices=["none", "nf4"], default=None,
                   help="base precision under the stacks (default: the preset's, fp32 — faster on the CPU)")
    p.set_defaults(func=cmd_boost)

    p = sub.add_parser("train", help="continual domains in curriculum order, with null-space projection")
    _add_common(p, "runs/demo")
    p.add_argument("--domains", help="comma-separated, in training order (default: chat,code,math,medical,reasoning)")
    p.add_argument("--no-nullspace", action="store_true", help="train without null-space projection")
    p.add_argument("--compare-nullspace", action="store_true",
                   help="train twice, with and without null-space, into DIR/nullspace and DIR/no_nullspace")
    p.add_argument("--ns-mode", choices=["strict", "reference"], default="strict",
                   help="strict (default): also project every expert's B after each step, so stored stacks are "
                        "orthogonal; reference: the released code (training-time projection only, leaks)")
    p.add_argument("--ns-basis", choices=["per_domain", "sum"], default="per_domain",
                   help="per_domain (paper): K directions per earlier domain; sum (released code): K of the sum")
    p.add_argument("--ns-data", choices=["previous", "new"], default="previous",
                   help="previous (paper): earlier domains' validation examples; new (released code): the new domain's")
    p.add_argument("--quant", choices=["none", "nf4"], default=None, help="base precision (default: the preset's)")
    p.set_defaults(func=cmd_train)

    def add_run(p: argparse.ArgumentParser) -> None:
        p.add_argument("--run", default="runs/demo",
                       help="a trained run: the folder `train --out` or `demo --out` wrote (default: runs/demo)")
        p.add_argument("--preset", choices=list(PRESETS), default=None,
                       help="the preset the run was trained with (default: recognised from the run)")

    p = sub.add_parser("route", help="train the meta-router of a trained run")
    add_run(p)
    p.add_argument("--search", choices=["exhaustive", "greedy"], default=None,
                   help="how the oracle finds each prompt's best stack combination: exhaustive (default, all "
                        "2^D - 1) or greedy (the released code's search)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_route)

    p = sub.add_parser("eval", help="base / ungated / routed: test loss and task accuracy per domain")
    add_run(p)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="answer one prompt with a trained run")
    add_run(p)
    p.add_argument("--prompt", required=True, help="the prompt (it is put into the Alpaca template)")
    p.add_argument("--mode", choices=["routed", "base", "ungated", "compare"], default="routed",
                   help="routed (default): the router's weights; compare: all three modes one after another")
    p.add_argument("--weights", help="fixed weights instead of a mode, e.g. chat=1,math=0.5; each in "
                                     "(0.12, 10]: 0.12 is the skip threshold, above 10 a stack swamps the base")
    p.add_argument("--max-new-tokens", type=positive_int, default=96, help="answer length cap, at least 1 (default 96)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive: routed answers, /route, /compare, /force weights")
    add_run(p)
    p.add_argument("--max-new-tokens", type=positive_int, default=96, help="answer length cap, at least 1 (default 96)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("repair", help="undo a run back to before a stack (a damaged one), to retrain from there")
    p.add_argument("--run", required=True, help="the run folder (`train --out`), a demo folder, or a run inside one")
    p.add_argument("--from", dest="from_", required=True, metavar="DOMAIN:ROUND",
                   help="the first stack to retrain, e.g. code:2; it and every stack trained after it are deleted")
    p.set_defaults(func=cmd_repair)

    p = sub.add_parser("data", help="build the domain corpora and print their sizes")
    _add_common(p, None)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("bench", help="speed measurements")
    p.add_argument("what", choices=["pretrain", "moe", "nf4", "nullspace", "route"],
                   help="pretrain: training tokens/s and model-FLOPs utilisation; moe: MoE-LoRA vs LoRA vs the "
                        "released code's dense form; nf4: 4-bit vs fp32 base; nullspace: the projection's "
                        "step-time overhead and randomized vs full SVD; route: base vs ungated (fused and "
                        "stack by stack) vs routed inference")
    p.add_argument("--json", action="store_true", help="one machine-readable JSON line")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .bench import keep_freed_memory

    keep_freed_memory()  # ~5% faster training steps; fine for a command-line process (see its docstring)
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback; every file is written atomically, so
        # nothing is half-written, and the resumable stages pick up from their last checkpoint
        print(STOPPED.get(args.command, "stopped; run the same command to resume"), file=sys.stderr)
        return 130  # 128 + SIGINT, the shell's convention
    except ValueError as e:  # errors a user can cause: say what and how to fix it
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that cannot be read or written (FileNotFoundError included)
        print(f"error: {e}" if e.filename is None else f"error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2


# what Ctrl-C prints; the other commands resume from their checkpoints and caches
STOPPED = {"chat": "bye", "generate": "stopped", "bench": "stopped"}


if __name__ == "__main__":
    sys.exit(main())
