"""osmseg: segment satellite imagery with OpenStreetMap labels.

The library behind the top-level scripts (prepare.py, train.py, validate.py,
feed_forward.py). Modules are flat and named after what they hold; see DESIGN in
the README for the chain of files between stages.
"""

__version__ = "0.1.0"
