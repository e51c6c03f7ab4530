"""What every deltakit widget shares: one background job at a time, errors shown in place, figures redrawn in place,
and the snapshots already resolved (handed in, or by a ModelPicker), so that no model is resolved twice.

Long work (resolving or building models, statistics, sweeps) runs in a worker thread so that the kernel keeps
processing widget messages -- a Cancel click must arrive while a sweep runs. The worker only sets widget traits
(progress values, label texts, HTML, an Output's ``outputs``, FigureWidget data): with ipykernel >= 7, prints and
``display()`` calls from other threads are no longer routed to the cell, while trait updates always reach the
frontend (ipywidgets#4020).
"""

from __future__ import annotations

import html
import re
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import ipywidgets as w
import plotly.graph_objects as go

from deltakit.sources import Snapshot, resolve

if TYPE_CHECKING:
    from deltakit.widgets.picker import ModelPicker

__all__ = ["BackgroundJob", "KnownSnapshots", "draw_into", "error_html", "parse_numbers", "reference",
           "report_error"]


class BackgroundJob:
    """Runs one function at a time in a daemon worker thread, with a fresh cancel event per run.

    Nothing escapes the worker: an exception the work lets out goes to ``on_error``, which shows it in the widget.

    Args:
        name: the job's name, for messages and the thread's name.
        on_error: shows an error in the widget (called from the worker, or at once when a run is refused).
        busy: ``busy(True)`` before a run starts, ``busy(False)`` after it ended (e.g. to disable buttons).

    Attributes:
        thread: the last worker thread (None before the first run).
        cancel: the event of the current (or last) run; ``work`` should check it between steps.
    """

    def __init__(self, name: str, *, on_error: Callable[[Exception], None], busy: Callable[[bool], None]) -> None:
        self.name = name
        self.on_error = on_error
        self.busy = busy
        self.thread: threading.Thread | None = None
        self.cancel = threading.Event()

    @property
    def running(self) -> bool:
        """Whether a worker is alive."""
        return self.thread is not None and self.thread.is_alive()

    def start(self, work: Callable[[threading.Event], None], *, blocking: bool = False) -> bool:
        """Run ``work(cancel_event)`` in a new worker thread, unless a previous run is still going.

        Args:
            work: the job; what it raises is passed to ``on_error``.
            blocking: wait for the worker to finish (tests, scripts).

        Returns:
            Whether the run started; when a previous run is still going, ``on_error`` gets a RuntimeError instead.
        """
        if self.running:
            self.on_error(RuntimeError(f"{self.name} is still running; wait for it or cancel it, then try again."))
            return False
        self.cancel = threading.Event()
        self.busy(True)
        self.thread = threading.Thread(target=self._run, args=(work, self.cancel), name=f"deltakit-{self.name}",
                                       daemon=True)
        self.thread.start()
        if blocking:
            self.thread.join()
        return True

    def _run(self, work: Callable[[threading.Event], None], cancel: threading.Event) -> None:
        try:
            work(cancel)
        except Exception as err:  # the worker has nobody to raise to: the widget shows it
            self.on_error(err)
        finally:
            self.busy(False)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the current worker (returns at once when none runs)."""
        if self.thread is not None:
            self.thread.join(timeout)


def reference(model: str | Snapshot) -> str:
    """The reference a text field shows for a model handed in as a reference or as a resolved snapshot."""
    return model.ref if isinstance(model, Snapshot) else model


class KnownSnapshots:
    """The snapshots a widget already has, by reference: those handed to it, and those its ModelPicker resolved.

    :meth:`get` returns one of them while a field still spells its reference, so what was resolved (downloaded,
    built, pinned to a commit) is used as it is; any other reference is resolved then.

    Args:
        models: the models handed to the widget; the snapshots among them are kept, plain references skipped.
        picker: a ModelPicker whose current ``base_snapshot`` and ``fine_tune_snapshot`` count as known (a picker
            forgets them when a field is edited).
    """

    def __init__(self, models: Iterable[str | Snapshot] = (), picker: ModelPicker | None = None) -> None:
        self.given = {m.ref: m for m in models if isinstance(m, Snapshot)}
        self.picker = picker

    def get(self, ref: str, *, stream: bool = False) -> Snapshot:
        """The known snapshot whose reference is ``ref``, else ``deltakit.sources.resolve(ref, stream=stream)``.

        Raises:
            deltakit.sources.SourceError: ``ref`` is unknown and cannot be resolved (and what resolve raises).
        """
        known = dict(self.given)
        if self.picker is not None:
            picked = (self.picker.base_snapshot, self.picker.fine_tune_snapshot)
            known |= {s.ref: s for s in picked if s is not None}
        return known[ref] if ref in known else resolve(ref, stream=stream)


def error_html(message: str) -> str:
    """An error message as HTML for an ``ipywidgets.HTML`` shown next to the control it is about."""
    return f"<span style='color:#b00020'>{html.escape(message)}</span>"


def report_error(output: w.Output, err: BaseException) -> str:
    """Append ``err`` to an Output area (stderr) and return it as one line, ``"Type: message"``.

    ``Output.append_stderr`` sets the widget's ``outputs`` trait, which works from any thread (unlike
    ``with output: print(...)``, which depends on the kernel routing the worker's output). A KeyError's message
    is shown without the quotes its repr adds; line breaks in a message become spaces.
    """
    message = err.args[0] if isinstance(err, KeyError) and err.args else err
    text = " ".join(f"{type(err).__name__}: {message}".split())
    output.append_stderr(text + "\n")
    return text


def draw_into(widget: go.FigureWidget, figure: go.Figure) -> None:
    """Replace the traces and layout of ``widget`` with those of ``figure``, in one update message.

    The FigureWidget stays the same object (the front end keeps its view); only its content changes.
    """
    with widget.batch_update():
        widget.data = ()
        widget.layout = figure.layout
        widget.add_traces(figure.data)


_SEPARATORS = re.compile(r"[,\s;]+")


def parse_numbers(text: str, kind: type[float] | type[int], what: str) -> list:
    """Numbers typed in a text field, separated by commas or spaces (``"0.1, 0.5 0.9"``).

    Args:
        text: the field's value.
        kind: ``float`` or ``int``.
        what: the field's name, for the message.

    Returns:
        The numbers in the order typed (range checks are the library's job).

    Raises:
        ValueError: an item that is not a number of that kind (named in the message), or no number at all.
    """
    items = [t for t in _SEPARATORS.split(text.strip()) if t]
    if not items:
        raise ValueError(f"{what}: type at least one number, e.g. {'0.1, 0.5, 0.9' if kind is float else '0, 1'}.")
    out = []
    for item in items:
        try:
            out.append(kind(item))
        except ValueError:
            name = "a number" if kind is float else "an integer"
            raise ValueError(f"{what}: {item!r} is not {name}; separate values by commas or spaces.") from None
    return out
