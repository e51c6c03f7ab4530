"""Embedded homologous model families (a base and its fine-tunes, built offline, on first use).

What exists: :mod:`.registry`; where it lives on disk and what is complete: :mod:`.layout`; building a member,
the dataset or a split when it is missing: :mod:`.build`. :func:`member_path` is how the rest of deltakit (e.g.
``deltakit.sources.resolve`` for ``family:FAMILY/MEMBER``) gets a member's folder.
"""

from __future__ import annotations

from deltakit.families.build import build_family, dataset_path, family_split, member_path
from deltakit.families.card import read_model_card
from deltakit.families.layout import deltakit_home, family_path, list_families
from deltakit.families.registry import FAMILIES, Family, MemberSpec, get_family
from deltakit.families.train import Recipe

__all__ = [
    "FAMILIES",
    "Family",
    "MemberSpec",
    "Recipe",
    "build_family",
    "dataset_path",
    "deltakit_home",
    "family_path",
    "family_split",
    "get_family",
    "list_families",
    "member_path",
    "read_model_card",
]
