"""The work of each command, a function (Preset, run folder) -> JSON summary, resumable; each module also offers
the command's `add_args(parser)` and `main(args)` (the table in ministacks/__main__.py)."""
