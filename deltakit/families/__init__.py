"""Embedded homologous model families (a base and its fine-tunes, built offline). See :mod:`.build`."""

from __future__ import annotations

from deltakit.families.build import (
    FAMILIES,
    Family,
    MemberSpec,
    build_family,
    dataset_path,
    deltakit_home,
    family_path,
    list_families,
    load_split,
    member_path,
)
from deltakit.families.card import read_card
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
    "list_families",
    "load_split",
    "member_path",
    "read_card",
]
