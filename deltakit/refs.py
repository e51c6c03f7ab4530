"""Model references and resolved snapshots: what a reference means and what a resolved one holds.

A model reference (:class:`ModelRef`, parsed once by :meth:`ModelRef.parse`) is one of (checked in this order):

* ``family:FAMILY/MEMBER`` -- a member of an embedded family (``deltakit family list``);
* a local directory (an existing folder, or a path starting with ``.``, ``/`` or ``~``) holding a Hub-style
  checkpoint;
* ``org/name`` or ``org/name@REVISION`` -- a Hub repo, optionally pinned to a branch, tag or commit.

:func:`deltakit.sources.resolve` turns a reference into a :class:`Snapshot` (a local folder with its config and
model card). This module holds no I/O beyond reading a card, so every layer may use it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["CARD_FILE", "FAMILY_PREFIX", "ModelRef", "Snapshot", "SourceError", "read_card_front_matter"]

#: The prefix of a reference to a member of an embedded family, ``family:FAMILY/MEMBER``.
FAMILY_PREFIX = "family:"
#: The model card: YAML front matter between two ``---`` lines, then markdown (the Hub's convention).
CARD_FILE = "README.md"
_PATH_STARTS = (".", "/", "~")
_FORMS = ("Use 'org/name', 'org/name@revision', an existing local directory, or 'family:FAMILY/MEMBER' "
          "(see `deltakit family list`).")


class SourceError(ValueError):
    """A model reference could not be resolved to a usable local snapshot."""


_KIND_FIELDS = {"family": ("family", "member"), "local": ("path",), "hub": ("repo_id", "revision")}


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference: which kind of source it names, and the parts that locate it.

    Build one with :meth:`parse`; constructing one directly checks the parts of its kind the same way.
    ``str(ref)`` spells it back: ``family:FAMILY/MEMBER``, the folder (``./`` before a relative one), or
    ``org/name[@revision]``.

    Attributes:
        kind: ``"family"``, ``"local"`` or ``"hub"``.
        family: the embedded family (kind ``family``); whether it exists is the family layer's to say.
        member: the family member, ``base`` or a fine-tune (kind ``family``).
        path: the folder, ``~`` expanded (kind ``local``); :func:`resolve` checks that it exists.
        repo_id: the Hub repo, ``org/name`` or ``name`` (kind ``hub``).
        revision: a branch, tag or commit of ``repo_id``; None for the default branch (kind ``hub``).

    Raises:
        SourceError: an unknown kind, a part another kind uses, or malformed parts (the message names the
            reference and the accepted forms).
    """

    kind: str
    family: str | None = None
    member: str | None = None
    path: Path | None = None
    repo_id: str | None = None
    revision: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KIND_FIELDS:
            raise SourceError(f"unknown reference kind {self.kind!r}; kinds: {', '.join(_KIND_FIELDS)}. "
                              "Build references with ModelRef.parse(text).")
        stray = [name for kind, names in _KIND_FIELDS.items() if kind != self.kind for name in names
                 if getattr(self, name) is not None]
        if stray:
            raise SourceError(f"a {self.kind} reference has no {', '.join(stray)}; set only "
                              f"{', '.join(_KIND_FIELDS[self.kind])}.")
        if self.kind == "family" and not (self.family and self.member):
            raise SourceError(f"{str(self)!r}: a family reference is 'family:FAMILY/MEMBER', "
                              "e.g. family:tiny/sentiment3 (see `deltakit family list`).")
        if self.kind == "local" and self.path is None:
            raise SourceError("a local reference needs the folder's path.")
        if self.kind == "hub":
            parts = (self.repo_id or "").split("/")
            if len(parts) > 2 or not all(parts) or self.revision == "" or any(c.isspace() for c in str(self)):
                raise SourceError(f"{str(self)!r} is not a model reference. {_FORMS}")

    @classmethod
    def parse(cls, text: str | os.PathLike[str]) -> ModelRef:
        """Parse a model reference: ``family:FAMILY/MEMBER``, then a folder, then ``org/name[@revision]``.

        A folder is text naming an existing directory, or any text starting with ``.``, ``/`` or ``~`` (a path
        that may not exist yet: :func:`resolve` says so). Nothing is downloaded or built.

        Args:
            text: the reference as written.

        Returns:
            The parsed reference.

        Raises:
            SourceError: a malformed reference (the message names it and the accepted forms).
        """
        text = os.fspath(text)
        if text.startswith(FAMILY_PREFIX):
            family, slash, member = text[len(FAMILY_PREFIX):].partition("/")
            return cls("family", family=family, member=member if slash else None)
        path = Path(text).expanduser()
        if text.startswith(_PATH_STARTS) or (text and path.is_dir()):
            return cls("local", path=path)
        repo_id, _, revision = text.partition("@")
        return cls("hub", repo_id=repo_id, revision=revision or None)

    def __str__(self) -> str:
        if self.kind == "family":
            return f"{FAMILY_PREFIX}{self.family or ''}" + ("" if self.member is None else f"/{self.member}")
        if self.kind == "local":  # "./" keeps a relative folder a folder when the text is parsed again
            text = str(self.path)
            return text if text.startswith(_PATH_STARTS) else f"./{text}"
        return (self.repo_id or "") + ("" if self.revision is None else f"@{self.revision}")


@dataclass(frozen=True)
class Snapshot:
    """A resolved model reference.

    Attributes:
        ref: the reference as the user wrote it.
        path: the local folder with the checkpoint files.
        kind: ``"hub"``, ``"local"`` or ``"family"``.
        repo_id: the Hub repo id (hub), else the ``model_id`` of the folder's card (every family member has one).
        commit: the resolved 40-hex commit (hub) or None.
        config: the parsed ``config.json`` ({} if absent).
        card: the YAML front matter of ``README.md`` ({} if absent).
        streamed: a Hub snapshot resolved with ``stream=True``: ``path`` holds only the small files (config, card,
            index, tokenizer) and the weights are read from the Hub by byte ranges
            (:class:`deltakit.hubstream.HubTensorReader`).
    """

    ref: str
    path: Path
    kind: str
    repo_id: str | None = None
    commit: str | None = None
    config: dict[str, Any] = field(default_factory=dict, compare=False)
    card: dict[str, Any] = field(default_factory=dict, compare=False)
    streamed: bool = False

    @property
    def label(self) -> str:
        """A short human name: the member / repo id, or the folder name."""
        if self.kind == "family":
            ref = ModelRef.parse(self.ref)
            return f"{ref.family}/{ref.member}"
        return self.repo_id or self.path.name


def read_card_front_matter(folder: Path) -> dict[str, Any]:
    """The YAML front matter of ``folder/README.md``, whoever wrote it.

    Args:
        folder: a model folder (a snapshot, a local checkpoint, a family member).

    Returns:
        The front matter as a dict; {} when there is no README.md, no front matter, or it is not a YAML mapping.
    """
    readme = Path(folder) / CARD_FILE
    if not readme.is_file():
        return {}
    lines = readme.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    for end, line in enumerate(lines[1:], start=1):
        if line.strip() == "---":
            try:
                data = yaml.safe_load("\n".join(lines[1:end]))
            except yaml.YAMLError:
                return {}
            return data if isinstance(data, dict) else {}
    return {}
