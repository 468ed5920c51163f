"""Class names and ids: one lookup for every place a user names a class (``--labels``, ``--class``)."""

from __future__ import annotations

from typing import Sequence


def resolve_class(item: str | int, class_names: Sequence[str], num_classes: int | None = None,
                  owner: str = "this source") -> int:
    """A class given by name or id -> its id in ``0 .. num_classes - 1`` (default: ``len(class_names)``).

    A string is looked up as a name first (class folders may be named "3"), then as an id; an int is an id.
    ``owner`` names what the classes belong to in the error ("this source", "this model").
    """
    names = [str(c) for c in class_names]
    count = len(names) if num_classes is None else int(num_classes)
    if count == 0:
        raise ValueError(f"{owner} has no classes: --class needs class sub-folders (as `slct encode --labels "
                         "folder`) or a labelled latent dataset")
    text = str(item)
    if not isinstance(item, int) and text in names:
        return names.index(text)
    if text.isdigit() and int(text) < count:
        return int(text)
    known = f" ({', '.join(names[:20])})" if names else ""
    raise ValueError(f"class {text!r} is not one of {owner}'s {count} classes (ids 0..{count - 1}){known}")
