"""deltakit.widgets: ipywidgets UIs over the library (thin shells; the logic lives in deltakit).

- :class:`ModelPicker`: a base and a fine-tune (id + optional revision), "find fine-tunes of this base", resolution
  and pairing errors shown in place.
- :class:`StatsDashboard`: compute or load delta statistics; a table, the |delta| histogram, the layer x module-kind
  heatmap and the cross-fine-tune similarity matrix, with fine-tune / module-kind / layer selectors.
- :class:`SweepPanel`: methods from the registry, rates, seeds, evaluation data, Run / Cancel; the metric-versus-rate
  curve grows point by point while the sweep runs in a worker thread.
- :class:`MergePanel`: 2 to 8 fine-tunes of one base (the family's members, or any references), merge methods from
  the registry, rates, lambdas, seeds, Run / Cancel; one live figure per task and a task-by-task table.

A dashboard or panel takes its models as references or as resolved ``Snapshot``s; built with ``picker=``, it
follows the picker's fields and uses the snapshots the picker resolved, so no model is resolved twice.

Each is an ``ipywidgets.VBox``: display it as a cell's last expression. Long work runs in a worker thread; pass
``blocking=True`` to ``find`` / ``resolve`` / ``compute`` / ``load`` / ``run`` (or call ``widget.job.join()``) to wait.
This package lives in the repository's top-level ``widgets/`` folder and is installed as ``deltakit.widgets``
(``pip install "deltakit[widgets]"``).
"""

from __future__ import annotations

from deltakit.widgets.merge import MergePanel
from deltakit.widgets.picker import ModelPicker
from deltakit.widgets.stats import StatsDashboard
from deltakit.widgets.sweep import SweepPanel

__all__ = ["MergePanel", "ModelPicker", "StatsDashboard", "SweepPanel"]
