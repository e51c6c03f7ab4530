"""deltakit.widgets: ipywidgets UIs over the library (thin shells; the logic lives in deltakit)."""
