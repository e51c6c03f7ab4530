"""Finding fine-tunes of a base model: on the Hugging Face Hub, or among the embedded families when offline.

A fine-tune's model card names its parent (``base_model: org/name``, optionally ``base_model_relation: finetune``),
and the Hub turns that into the tag ``base_model:finetune:org/name`` -- the "model tree" link on a model's page is
a search for exactly that tag. :func:`find_finetunes` runs that search with ``HfApi.list_models``; the result
lists homologous candidates (same parent), which is what a delta (fine-tune minus base) needs. Homology is only
*claimed* by the card: ``deltakit.pairing.pair_models`` still checks names and shapes before any delta is taken.

Offline (``HF_HUB_OFFLINE`` set, or the endpoint unreachable or not answering within
:func:`deltakit.hubhttp.hub_timeouts`) there is no search to run, so the fine-tunes of the embedded families
(:mod:`deltakit.families`, built locally) are listed instead, and the result says why. A
``family:FAMILY/MEMBER`` base lists that family's fine-tunes without touching the network.

Every result row carries a ``ref`` that :func:`deltakit.sources.resolve` accepts as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from deltakit.hubhttp import bound_hub_requests, hub_network_errors
from deltakit.refs import ModelRef, SourceError

__all__ = ["FinetuneSearch", "embedded_finetunes", "find_finetunes", "finetune_filter", "SORT_KEYS"]

#: Columns of :attr:`FinetuneSearch.finetunes`, whatever the source.
COLUMNS = ("ref", "model_id", "source", "task", "downloads", "likes", "last_modified")

#: Sort orders ``find_finetunes`` accepts (the Hub's own keys; the embedded listing keeps registry order).
SORT_KEYS = ("downloads", "likes", "lastModified", "createdAt", "trendingScore")


@dataclass(frozen=True)
class FinetuneSearch:
    """The fine-tunes found for one base.

    Attributes:
        base: the base as searched (a Hub repo id without revision, or a ``family:FAMILY/MEMBER`` reference).
        source: ``"hub"`` (a Hub search ran) or ``"embedded"`` (the embedded families were listed).
        finetunes: one row per candidate with columns :data:`COLUMNS`; ``ref`` is a model reference.
        note: one sentence saying where the list comes from, and why when the Hub was not asked.
    """

    base: str
    source: str
    finetunes: pd.DataFrame
    note: str

    @property
    def refs(self) -> list[str]:
        """The candidates' model references, in listing order."""
        return list(self.finetunes["ref"])


def finetune_filter(repo_id: str) -> str:
    """The Hub search filter that selects full fine-tunes of ``repo_id``: ``base_model:finetune:<repo_id>``."""
    return f"base_model:finetune:{repo_id}"


def embedded_finetunes(family: str | None = None) -> pd.DataFrame:
    """The fine-tuned members of the embedded families, from the registry (nothing is built or read).

    Args:
        family: one family name; None lists every registered family.

    Returns:
        Columns :data:`COLUMNS`; ``ref`` is ``family:FAMILY/MEMBER``, ``task`` the member's task, the Hub
        counters are missing values.

    Raises:
        KeyError: unknown family (the message lists the registered ones).
    """
    from deltakit.families import FAMILIES

    if family is not None and family not in FAMILIES:
        raise KeyError(f"unknown family {family!r}; available families: {', '.join(FAMILIES)} "
                       "(see `deltakit family list`).")
    rows = []
    for fam in FAMILIES.values():
        if family is not None and fam.name != family:
            continue
        for spec in fam.finetunes:
            ref = ModelRef("family", family=fam.name, member=spec.name)
            rows.append(dict(ref=str(ref), model_id=fam.model_id(spec.name), source="embedded", task=spec.task,
                             downloads=None, likes=None, last_modified=None))
    return pd.DataFrame(rows, columns=list(COLUMNS))


def find_finetunes(base: str, *, limit: int = 50, sort: str = "downloads") -> FinetuneSearch:
    """List fine-tunes of ``base``: a Hub search, or the embedded families when the Hub cannot be asked.

    Args:
        base: ``org/name`` (a revision suffix ``@rev`` is ignored: the model tree links repos, not commits), or a
            ``family:FAMILY/MEMBER`` reference (that family's fine-tunes are listed, offline).
        limit: at most this many Hub results (1 to 1000).
        sort: Hub sort order, one of :data:`SORT_KEYS` (descending).

    Returns:
        The candidates and a note saying where they come from. An empty Hub result is a valid answer (a base
        without declared fine-tunes), not an error.

    Raises:
        ValueError: ``base`` is neither a Hub repo id nor a family reference (a malformed reference is a
            SourceError; a local folder's fine-tunes cannot be searched), ``limit`` outside 1..1000, or an unknown
            ``sort``.
        KeyError: a ``family:`` reference to an unknown family.
    """
    if not 1 <= int(limit) <= 1000:
        raise ValueError(f"limit={limit} is outside 1..1000; pass the number of Hub results to list.")
    if sort not in SORT_KEYS:
        raise ValueError(f"sort={sort!r} is not a Hub sort order; use one of {', '.join(SORT_KEYS)}.")
    text = str(base).strip()
    ref = ModelRef.parse(text)  # SourceError (a ValueError) on a malformed reference
    if ref.kind == "family":
        return FinetuneSearch(text, "embedded", embedded_finetunes(ref.family),
                              f"fine-tunes of the embedded family {ref.family!r} (from the registry; no network "
                              "needed).")
    if ref.kind == "local":
        raise ValueError(f"{text!r} is a local path: fine-tunes can only be searched for a Hub repo id (org/name) "
                         "or an embedded family (family:FAMILY/base).")
    repo_id = ref.repo_id

    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return FinetuneSearch(repo_id, "embedded", embedded_finetunes(),
                              "HF_HUB_OFFLINE is set, so the Hub was not searched; these are the embedded "
                              "families' fine-tunes (each of its own family base).")
    bound_hub_requests()
    try:
        infos = list(HfApi().list_models(filter=finetune_filter(repo_id), sort=sort, limit=int(limit)))
    except (SourceError, *hub_network_errors()) as err:  # SourceError: the Hub did not answer in time
        return FinetuneSearch(repo_id, "embedded", embedded_finetunes(),
                              f"the Hub at {constants.ENDPOINT} could not be reached ({type(err).__name__}: {err}); "
                              "these are the embedded families' fine-tunes (each of its own family base).")
    rows = [dict(ref=i.id, model_id=i.id, source="hub", task=i.pipeline_tag, downloads=i.downloads, likes=i.likes,
                 last_modified=i.last_modified) for i in infos]
    found = f"{len(rows)} fine-tune(s)" if rows else "no fine-tunes"
    return FinetuneSearch(repo_id, "hub", pd.DataFrame(rows, columns=list(COLUMNS)),
                          f"{found} of {repo_id} on {constants.ENDPOINT} (filter {finetune_filter(repo_id)}, "
                          f"sorted by {sort}).")
