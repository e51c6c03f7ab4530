"""What every deltakit widget shares: one background job at a time, errors shown in place, figures redrawn in place.

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
from collections.abc import Callable

import ipywidgets as w
import plotly.graph_objects as go

__all__ = ["BackgroundJob", "draw_into", "error_html", "parse_numbers", "report_error"]


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
