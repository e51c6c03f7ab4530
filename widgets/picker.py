"""ModelPicker: choose a base and one fine-tune of it, find candidate fine-tunes, resolve both with errors in place.

A thin shell over :func:`deltakit.hubsearch.find_finetunes` (the Hub's ``base_model:finetune:<id>`` filter, or the
embedded families offline), :func:`deltakit.sources.resolve`, :class:`deltakit.tensors.TensorReader` (each model's
weight headers are read right after it is resolved, so a corrupt file is reported under its own field) and
:func:`deltakit.pairing.pair_models`.
"""

from __future__ import annotations

import html
import threading

import ipywidgets as w
import pandas as pd
import traitlets

from deltakit.hubsearch import find_finetunes
from deltakit.pairing import pair_models
from deltakit.sources import ModelRef, Snapshot, SourceError, resolve
from deltakit.tensors import TensorReader
from deltakit.widgets._common import BackgroundJob, error_html, report_error

__all__ = ["ModelPicker", "candidate_label", "join_ref", "split_ref"]


def split_ref(ref: str) -> tuple[str, str]:
    """The id and revision fields for a reference: ``"org/name@rev"`` -> ``("org/name", "rev")``.

    Family references, folders and text that is no valid reference stay whole in the id field (Resolve then says
    what is wrong with it, under the field).
    """
    text = ref.strip()
    try:
        parsed = ModelRef.parse(text)
    except SourceError:
        return text, ""
    return (parsed.repo_id, parsed.revision or "") if parsed.kind == "hub" else (text, "")


def join_ref(repo_id: str, revision: str) -> str:
    """The model reference for an id field and an optional revision field (blank revision: none)."""
    repo_id, revision = repo_id.strip(), revision.strip()
    return f"{repo_id}@{revision}" if repo_id and revision else repo_id


class ModelPicker(w.VBox):
    """Base and fine-tune fields (id + optional revision), a fine-tune search, and a Resolve button.

    The traits ``base_ref`` and ``fine_tune_ref`` always hold the references the fields spell (link other
    widgets to them); after a successful :meth:`resolve`, ``base_snapshot``, ``fine_tune_snapshot`` and
    ``pairing`` hold the library's results until a field is edited. Widgets built with ``picker=`` use these
    snapshots instead of resolving the same references again.

    Args:
        base: initial base reference (``org/name[@rev]``, a folder, or ``family:FAMILY/base``).
        fine_tune: initial fine-tune reference.
        search_limit: at most this many Hub results per search.
    """

    base_ref = traitlets.Unicode("")
    fine_tune_ref = traitlets.Unicode("")

    def __init__(self, base: str = "", fine_tune: str = "", *, search_limit: int = 20) -> None:
        self.search_limit = search_limit
        self.job = BackgroundJob("model-picker", on_error=self._failed, busy=self._busy)
        self.base_snapshot: Snapshot | None = None
        self.fine_tune_snapshot: Snapshot | None = None
        self.pairing = None
        self.search = None

        base_id, base_rev = split_ref(base)
        ft_id, ft_rev = split_ref(fine_tune)
        self.base_id = w.Text(value=base_id, description="base",
                              placeholder="org/name, a folder, or family:FAMILY/base", layout=w.Layout(width="28em"))
        self.base_revision = w.Text(value=base_rev, description="revision", placeholder="optional: branch, tag, sha",
                                    layout=w.Layout(width="20em"))
        self.base_error = w.HTML()
        self.fine_tune_id = w.Text(value=ft_id, description="fine-tune",
                                   placeholder="org/name, a folder, or family:FAMILY/MEMBER",
                                   layout=w.Layout(width="28em"))
        self.fine_tune_revision = w.Text(value=ft_rev, description="revision",
                                         placeholder="optional: branch, tag, sha", layout=w.Layout(width="20em"))
        self.fine_tune_error = w.HTML()
        self.find_button = w.Button(description="Find fine-tunes of this base", icon="search",
                                    layout=w.Layout(width="20em"))
        self.candidates = w.Select(options=[], rows=5, description="found", layout=w.Layout(width="48em"))
        self.search_note = w.HTML()
        self.resolve_button = w.Button(description="Resolve", icon="check", button_style="primary")
        self.status = w.HTML()
        self.output = w.Output()

        for field in (self.base_id, self.base_revision, self.fine_tune_id, self.fine_tune_revision):
            field.observe(self._on_field, names="value")
        self.candidates.observe(self._on_candidate, names="value")
        self.find_button.on_click(lambda _: self.find())
        self.resolve_button.on_click(lambda _: self.resolve())
        self._on_field(None)

        super().__init__([
            w.HBox([self.base_id, self.base_revision]), self.base_error,
            w.HBox([self.fine_tune_id, self.fine_tune_revision]), self.fine_tune_error,
            w.HBox([self.find_button, self.resolve_button]), self.search_note, self.candidates,
            self.status, self.output,
        ])
        self.add_class("deltakit-model-picker")
        self.status.add_class("deltakit-status")  # stable hooks for browser tests and custom CSS

    # --- reactions ------------------------------------------------------------------------------------------
    def _on_field(self, change: dict | None) -> None:
        self.base_ref = join_ref(self.base_id.value, self.base_revision.value)
        self.fine_tune_ref = join_ref(self.fine_tune_id.value, self.fine_tune_revision.value)
        if change is not None:  # an edit makes the last resolution stale
            self.base_snapshot = self.fine_tune_snapshot = self.pairing = None
            if change["owner"] in (self.base_id, self.base_revision):
                self.base_error.value = ""
            else:
                self.fine_tune_error.value = ""

    def _on_candidate(self, change: dict) -> None:
        if change["new"]:
            ft_id, ft_rev = split_ref(change["new"])
            self.fine_tune_revision.value = ft_rev
            self.fine_tune_id.value = ft_id

    def _busy(self, busy: bool) -> None:
        self.find_button.disabled = self.resolve_button.disabled = busy

    def _failed(self, err: Exception) -> None:
        self.status.value = error_html("failed: " + report_error(self.output, err))

    # --- actions --------------------------------------------------------------------------------------------
    def find(self, *, blocking: bool = False) -> None:
        """List fine-tunes of the base in ``candidates`` (Hub search, or the embedded families offline).

        Args:
            blocking: wait for the search to finish (it runs in a worker thread).
        """
        if not self.base_id.value.strip():
            self.base_error.value = error_html("Type a base model first (org/name or family:FAMILY/base).")
            return
        base = self.base_ref

        def work(cancel: threading.Event) -> None:
            self.search_note.value = f"searching fine-tunes of <code>{html.escape(base)}</code> ..."
            try:
                search = find_finetunes(base, limit=self.search_limit)
            except Exception as err:  # the base is what the search could not use: say so under it
                self.base_error.value = error_html(report_error(self.output, err))
                self.search_note.value = ""
                return
            self.search = search
            rows = search.finetunes.to_dict("records")
            self.candidates.options = [(candidate_label(r), r["ref"]) for r in rows]
            self.candidates.value = None
            self.search_note.value = html.escape(search.note)

        self.job.start(work, blocking=blocking)

    def resolve(self, *, blocking: bool = False) -> None:
        """Resolve both references (downloading or building them if needed) and check that they pair.

        Errors appear under the field they concern; on success ``status`` summarises the pairing.

        Args:
            blocking: wait for the resolution to finish (it runs in a worker thread).
        """
        base_ref, ft_ref = self.base_ref, self.fine_tune_ref
        self.base_error.value = self.fine_tune_error.value = ""
        self.base_snapshot = self.fine_tune_snapshot = self.pairing = None
        missing = [(f, name) for f, name in ((self.base_error, "base"), (self.fine_tune_error, "fine-tune"))
                   if not (base_ref if name == "base" else ft_ref)]
        for field, name in missing:
            field.value = error_html(f"Type a {name} model reference.")
        if missing:
            return

        def work(cancel: threading.Event) -> None:
            self.status.value = "resolving (an embedded family is built on first use; that can take minutes) ..."
            loaded = [self._load(base_ref, self.base_error), self._load(ft_ref, self.fine_tune_error)]
            if None in loaded:
                self.status.value = "not resolved: see the messages under the fields."
                return
            (base, base_reader), (ft, ft_reader) = loaded
            try:
                pairing = pair_models(base, ft, base_reader=base_reader, ft_reader=ft_reader)
            except Exception as err:  # the fine-tune is measured against the base: say so under the fine-tune
                self.fine_tune_error.value = error_html(report_error(self.output, err))
                self.status.value = "resolved, but the fine-tune does not pair with the base."
                return
            self.base_snapshot, self.fine_tune_snapshot, self.pairing = base, ft, pairing
            self.status.value = _pairing_summary(base, ft, pairing)

        self.job.start(work, blocking=blocking)

    def _load(self, ref: str, field: w.HTML) -> tuple[Snapshot, TensorReader] | None:
        """Resolve ``ref`` and read its weights' headers; on an error, show it under ``field`` and return None."""
        try:
            snapshot = resolve(ref)
            return snapshot, TensorReader(snapshot.path)
        except Exception as err:  # any library error (SourceError, CorruptCheckpointError, OSError, ...)
            field.value = error_html(report_error(self.output, err))
            return None


def candidate_label(row: dict) -> str:
    """How a found fine-tune is listed: its reference, its task, and its downloads for a Hub model."""
    parts = [row["ref"]]
    if row.get("task"):
        parts.append(str(row["task"]))
    if row["source"] == "hub" and pd.notna(row.get("downloads")):
        parts.append(f"{int(row['downloads']):,} downloads")
    return " · ".join(parts)


def _pairing_summary(base: Snapshot, ft: Snapshot, pairing) -> str:
    def where(s: Snapshot) -> str:
        return html.escape(f"commit {s.commit[:10]}" if s.commit else str(s.path))

    prunable = pairing.prunable()
    lines = [
        f"<b>base</b> {html.escape(base.label)} ({where(base)})",
        f"<b>fine-tune</b> {html.escape(ft.label)} ({where(ft)})",
        f"{len(pairing.pairs)} paired tensors, {len(prunable)} prunable "
        f"({sum(p.numel for p in prunable):,} parameters)"
        + (f"; unpaired (new in the fine-tune): {html.escape(', '.join(pairing.unpaired))}"
           if pairing.unpaired else ""),
    ]
    lines += [f"note: {html.escape(m)}" for m in pairing.warnings]
    return "<br>".join(lines)
