"""`chat`: an interactive session with a trained run — routed answers, and commands to look inside.

Each line is answered in the current mode (routed, or ungated when the run has no router yet); the
slash commands show the route without answering, compare the modes, force weights or change
the mode. A mistyped command or weight prints the error and the session goes on.
"""

from __future__ import annotations

from ..inference.stacked import MODES, describe_weights, parse_weights
from .common import add_engine_args, add_run_args, load_for_answers
from .generate import add_max_new_tokens, answer

HELP = "interactive: routed answers, /route, /compare, /force weights"

CHAT_HELP = """commands:
  /route TEXT     show the router's probabilities and weights for TEXT, without generating
  /compare TEXT   answer TEXT in every mode: base, ungated, routed, switched
  /force W        answer with fixed weights from now on, e.g. /force chat=1,math=0.5 (/force off: route again)
  /mode M         answer in mode M from now on: routed (default), switched (routed domains at weight 1),
                  base or ungated
  /stats          what the engine has done: domains loaded from disk, cache hits and misses, router time
  /help, /quit"""


def add_args(p) -> None:
    add_run_args(p)
    add_max_new_tokens(p)
    add_engine_args(p)


def main(args) -> int:
    sr = load_for_answers(args)
    # before `route` has run there is no router: the session answers with every stack on instead
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
                    answer(sr, rest, m, args.max_new_tokens)
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
            elif cmd == "/stats":
                print(sr.cache.stats.summary() + f"; in memory: {', '.join(sr.cache.resident) or 'no stack'}"
                      if sr.cache is not None else "every stack is in memory (--all-stacks)")
            elif cmd.startswith("/"):
                print(f"unknown command {cmd}; /help lists them")
            else:
                answer(sr, line, mode, args.max_new_tokens)
        # a mistyped line must not end the session, nor a damaged stack the engine loads (DamagedStacksError)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}")
