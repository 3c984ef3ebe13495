"""Names for a generator's class labels, and finding a class by (part of) its name.

ImageNet generators get ImageNet-1k's 1,000 names (``imagenet_classes.txt``, shipped with the
package, in label order: 0 tench ... 207 golden retriever ... 999 toilet tissue; torchvision's
wording). Generators trained here record their dataset's class names (the sorted class folders)
in their checkpoint; those name their labels otherwise.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cache
from importlib import resources

from titok_core.errors import UsageError

IMAGENET_NUM_CLASSES = 1000
_WNID = re.compile(r"n\d{8}")  # ImageNet's class folders are WordNet ids, n01440764 ...
_CHOICE = re.compile(r"(\d+)(:.*)?")  # "207" or "207: golden retriever"


@cache
def imagenet_class_names() -> tuple[str, ...]:
    """ImageNet-1k's 1,000 class names, index = label."""
    text = resources.files("sampling").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    names = tuple(text.splitlines())
    assert len(names) == IMAGENET_NUM_CLASSES, f"imagenet_classes.txt has {len(names)} names"
    return names


def class_names(num_classes: int, recorded: Sequence[str] = ()) -> list[str]:
    """Names for labels 0..num_classes-1.

    recorded: the class names a checkpoint carries (its training data's class folders), or none.
    1,000 classes with nothing recorded (the released ImageNet generators) or with ImageNet's
    WordNet ids recorded in their sorted order -> ImageNet's names; otherwise the recorded names;
    without any -> "class <i>".
    """
    recorded = list(recorded)
    if num_classes == IMAGENET_NUM_CLASSES and (
        not recorded or (all(_WNID.fullmatch(r) for r in recorded) and recorded == sorted(recorded))
    ):
        return list(imagenet_class_names())
    if len(recorded) == num_classes:
        return recorded
    return [f"class {i}" for i in range(num_classes)]


def class_choice(label: int, name: str) -> str:
    """The text a class is listed as on the page: '207: golden retriever'."""
    return f"{label}: {name}"


def _norm(text: str) -> str:
    return " ".join(text.lower().replace("_", " ").split())


def find_class(query: str | int | None, names: Sequence[str]) -> int:
    """The label a user means: a listed choice ('207: golden retriever'), an id ('207'), a whole
    name in any case ('Golden Retriever'; '_' and ' ' alike), or part of exactly one name.

    Raises ValueError with a short message when nothing or several classes match.
    """
    text = "" if query is None else str(query).strip()
    if not text:
        raise UsageError("no class picked: type part of a class name and pick one")
    found = _CHOICE.fullmatch(text)
    if found:
        label = int(found[1])
        if not 0 <= label < len(names):
            raise UsageError(f"class {label} is out of range: this generator has classes 0..{len(names) - 1}")
        return label
    wanted = _norm(text)
    exact = [i for i, name in enumerate(names) if _norm(name) == wanted]
    if exact:
        return exact[0]
    hits = [i for i, name in enumerate(names) if wanted in _norm(name)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise UsageError(f"no class name contains {text!r}")
    shown = ", ".join(names[i] for i in hits[:4]) + (", ..." if len(hits) > 4 else "")
    raise UsageError(f"{text!r} is part of {len(hits)} class names ({shown}): pick one")
