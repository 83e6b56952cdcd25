"""The paper's data sets for an experiment, or, where they cannot be had, ministacks' embedded corpora — said
plainly, before any work, and recorded in the report.

The sets and how each row becomes an Alpaca example (the first turn only, responses cut at 2000 characters)
are `ministacks.data.hub`'s; here is only the choice between them and the fallback.
"""

from __future__ import annotations

from dataclasses import replace

from ministacks.data import DataConfig
from ministacks.data.hub import hub_unavailable, sets_of


def paper_data(family: str, domains, cfg: DataConfig, embedded: bool = False) -> tuple[DataConfig, str]:
    """(the DataConfig to train on, a sentence saying which data that is). `embedded=True` (the tiny runs)
    takes the embedded corpora without asking the hub."""
    ids = sorted({s.id for s in sets_of(family, domains)})
    if embedded:
        return cfg, "ministacks' embedded corpora (a tiny run does not ask the hub)."
    reason = hub_unavailable(family, domains)
    if reason is not None:
        note = (f"ministacks' embedded corpora, not the paper's data sets ({', '.join(ids)}): they cannot be had "
                f"here ({reason}) and are not in the local datasets cache.")
        print(f"note: {note} Where the hub is reachable the same command downloads and uses them.")
        return cfg, note
    return replace(cfg, hub=family), f"the paper's data sets from the Hugging Face hub: {', '.join(ids)}."
