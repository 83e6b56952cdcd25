"""`generate`: answer one prompt with a trained run — routed, in another mode, or with given weights.

The run is loaded once (run.load_run); the router is loaded only when the answer needs it, and the stacks
only of the domains the answer switches on (inference/offload.py), unless --all-stacks.
"""

from __future__ import annotations

from ..inference.stacked import MODES, StackedRun, describe_weights, parse_weights
from .common import add_engine_args, add_run_args, load_for_answers, positive_int

HELP = "answer one prompt with a trained run"


def answer(sr: StackedRun, text: str, mode, max_new_tokens: int) -> None:
    """Print the answer to `text` in `mode` under a line saying which stacks were on."""
    gen = sr.generate(text, mode, max_new_tokens=max_new_tokens)
    label = mode if isinstance(mode, str) else "forced"
    print(f"[{label}: {describe_weights(gen['weights'])}]\n{gen['completion'].strip()}\n")


def add_max_new_tokens(p) -> None:
    p.add_argument("--max-new-tokens", type=positive_int, default=96, help="answer length cap, at least 1 (default 96)")


def add_args(p) -> None:
    add_run_args(p)
    p.add_argument("--prompt", required=True, help="the prompt (it is put into the Alpaca template)")
    p.add_argument("--mode", choices=[*MODES, "compare"], default="routed",
                   help="routed (default): the router's weights; switched: the domains it switches on at weight 1; "
                        "compare: every mode one after another")
    p.add_argument("--weights", help="fixed weights instead of a mode, e.g. chat=1,math=0.5; each in "
                                     "(0.12, 10]: 0.12 is the skip threshold, above 10 a stack swamps the base")
    add_max_new_tokens(p)
    add_engine_args(p)


def main(args) -> int:
    # a typo in --weights is an error before the base and the stacks load, not after
    weights = parse_weights(args.weights) if args.weights is not None else None
    # the router is loaded only where the answer routes: a run trained but not yet routed can still answer
    sr = load_for_answers(args, router=args.mode in ("routed", "switched", "compare") and weights is None)
    if weights is not None:
        answer(sr, args.prompt, weights, args.max_new_tokens)  # checked against the run's domains there
    else:
        for mode in MODES if args.mode == "compare" else (args.mode,):
            answer(sr, args.prompt, mode, args.max_new_tokens)
    if sr.cache is not None:
        print(f"[stacks from disk: {sr.cache.stats.summary()}]")
    return 0
