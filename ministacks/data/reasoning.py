"""Reasoning domain: short logic puzzles from reasoning-gym (Apache-2.0) with checkable answers.

The paper's reasoning data (OpenThoughts, Sky-T1, ...) are long think-then-answer traces. We keep
that *shape* at CPU size: every response is a short trace derived from the generator's own metadata,
then the gym's answer string, which the gym can score:

    <think>
    Premise 1: All parents are lawyers.  ...   (a restatement / derivation, never invented facts)
    </think>
    Yes

Generators (DataConfig.reasoning_tasks), mixed round-robin so each gets an equal share:
syllogism, family_relationships, knights_knaves, letter_counting, leg_counting, count_bits.
(number_sequence was tried and dropped: its rejection sampler needs ~18 ms an item, 20 s a build.)
"""

from __future__ import annotations

import math
import re
from collections import deque
from itertools import zip_longest

from .example import DataConfig, Example


def think(lines: list[str], answer: str) -> str:
    return "<think>\n" + "\n".join(lines) + "\n</think>\n" + answer


def syllogism_trace(meta: dict, answer: str) -> str:
    lines = [f"Premise 1: {meta['premise1']}.", f"Premise 2: {meta['premise2']}.", f"Conclusion to test: {meta['conclusion']}."]
    if meta.get("type") == "inversion":
        lines.append(f"The conclusion swaps the two terms of premise {meta['selected_premise']}.")
    lines.append("So the conclusion " + ("follows." if meta["is_valid"] else "does not follow."))
    return think(lines, answer)


# --- family relationships -----------------------------------------------------------------------
# The story is a list of "A is married to B." / "They have a child called C." / "They have children
# called C, D and E." sentences. We parse it into a small graph and write the shortest chain of
# facts linking the two people.

_MARRIED = re.compile(r"(\w[\w-]*) is married to (\w[\w-]*)\.")
_CHILDREN = re.compile(r"They have (?:a child|children) called ([^.]+)\.")


def _family_graph(story: str) -> dict[str, list[tuple[str, str]]]:
    """person → [(neighbour, sentence stating the link from person's side)]."""
    edges: dict[str, list[tuple[str, str]]] = {}

    def link(a: str, b: str, fact: str) -> None:
        edges.setdefault(a, []).append((b, fact))

    couple: tuple[str, str] | None = None
    for sentence in re.findall(r"[^.]+\.", story):
        sentence = sentence.strip()
        if m := _MARRIED.fullmatch(sentence):
            couple = (m.group(1), m.group(2))
            link(couple[0], couple[1], f"{couple[0]} is married to {couple[1]}.")
            link(couple[1], couple[0], f"{couple[1]} is married to {couple[0]}.")
        elif (m := _CHILDREN.fullmatch(sentence)) and couple is not None:
            for child in re.split(r", | and ", m.group(1)):
                for parent in couple:
                    link(parent, child, f"{parent} is a parent of {child}.")
                    link(child, parent, f"{child} is a child of {parent}.")
    return edges


def family_trace(question: str, meta: dict, answer: str) -> str | None:
    story = question.split("\n\n", 1)[0]
    start, goal = meta["person1"], meta["person2"]
    edges = _family_graph(story)
    # breadth-first search: the shortest chain of stated facts from person1 to person2
    previous: dict[str, tuple[str, str] | None] = {start: None}
    queue = deque([start])
    while queue and goal not in previous:
        person = queue.popleft()
        for neighbour, fact in edges.get(person, []):
            if neighbour not in previous:
                previous[neighbour] = (person, fact)
                queue.append(neighbour)
    if goal not in previous:
        return None
    chain, person = [], goal
    while previous[person] is not None:
        person, fact = previous[person]
        chain.append(fact)
    return think(chain[::-1] + [f"So {start} is {goal}'s {answer}."], answer)


# --- knights and knaves -------------------------------------------------------------------------

def knights_knaves_trace(meta: dict, answer: str) -> str:
    """Check the gym's solution statement by statement: a knight's claim is true, a knave's is false."""
    from reasoning_gym.logic.knights_knaves import KKProblemFormatter, KnightsKnavesDataset

    names = [str(n) for n in meta["names"]]
    terms = {k: str(v) for k, v in meta["knight_knave_terms"].items()}
    solution = tuple(bool(s) for s in meta["solution"])
    # the gym's own formatter, so each claim reads exactly as it does in the question
    formatter = KKProblemFormatter(rand_seed=0, problem=None)
    roles = [terms["a_knight"] if s else terms["a_knave"] for s in solution]
    claims = [f"{n} is {r}" for n, r in zip(names, roles)]
    lines = ["Suppose " + (", ".join(claims[:-1]) + " and " if len(claims) > 1 else "") + claims[-1] + "."]
    for name, statement, is_knight in zip(names, meta["statements"], solution):
        claim = formatter._format_statement(names, terms, statement)
        holds = bool(KnightsKnavesDataset.test_satisfiability(statement, solution))
        fits = "as " + (terms["a_knight"] if is_knight else terms["a_knave"]) + "'s claim must be"
        lines.append(f'{name} says "{claim}": {"true" if holds else "false"}, {fits}.')
    lines.append("Every other assignment contradicts some claim, so this is the only solution.")
    return think(lines, answer)


# --- small counting / pattern tasks ---------------------------------------------------------------

def letter_counting_trace(meta: dict, answer: str) -> str:
    letter = meta["target_letter"]
    counts = [(w, w.lower().count(letter)) for w in meta["span"]]  # the gym counts case-insensitively
    hits = [f"{w}: {n}" for w, n in counts if n]
    lines = [f'Words containing "{letter}": ' + (", ".join(hits) if hits else "none") + ".", f"Total: {answer}."]
    return think(lines, answer)


def leg_counting_trace(meta: dict, answer: str) -> str:
    from reasoning_gym.arithmetic.leg_counting import ANIMALS  # the gym's own legs-per-animal table

    lines = [f"{animal}: {n} × {ANIMALS[animal]} legs = {n * ANIMALS[animal]}" for animal, n in meta["animals"].items()]
    return think(lines + [f"Total: {answer}."], answer)


def count_bits_trace(meta: dict, answer: str) -> str:
    lines = [f"{meta['number']} in binary is {meta['binary']}.", f"It has {answer} ones."]
    return think(lines, answer)


def response_for(task: str, item: dict) -> str | None:
    """The trace + answer for one gym item, or None when it should be skipped."""
    meta, answer = item["metadata"], str(item["answer"]).strip()
    if task == "syllogism":
        return syllogism_trace(meta, answer)
    if task == "family_relationships":
        if answer.endswith("-in-law"):
            # reasoning-gym 0.1.25 labels in-laws the wrong way round: for "What is Sarah to
            # Elizabeth?" (Sarah married Elizabeth's son) it answers "mother-in-law", which is
            # Elizabeth's role, not Sarah's. Training on it would teach a wrong relation; skip.
            return None
        return family_trace(item["question"], meta, answer)
    if task == "knights_knaves":
        return knights_knaves_trace(meta, answer)
    if task == "letter_counting":
        return letter_counting_trace(meta, answer)
    if task == "leg_counting":
        return leg_counting_trace(meta, answer)
    if task == "count_bits":
        return count_bits_trace(meta, answer)
    raise ValueError(f"no trace writer for reasoning task {task!r}")


def build(cfg: DataConfig) -> list[Example]:
    import reasoning_gym  # ~1 s to import: only on a cache miss

    per_task = math.ceil(cfg.max_examples * cfg.oversample / len(cfg.reasoning_tasks))
    columns = []
    for i, task in enumerate(cfg.reasoning_tasks):
        # a different gym seed per task, so two generators never share a random stream by accident
        items = reasoning_gym.create_dataset(task, size=per_task, seed=cfg.seed * 1000 + i)
        column = []
        for item in items:
            answer = item["answer"]
            response = None if answer is None else response_for(task, item)
            if response is not None and str(answer).strip():
                column.append(Example("reasoning", item["question"].strip(), "", response, str(answer).strip(), f"reasoning-gym:{task}"))
        columns.append(column)
    # round-robin: the pipeline shuffles later, but interleaving keeps the mix readable when inspected
    return [ex for row in zip_longest(*columns) for ex in row if ex is not None]
