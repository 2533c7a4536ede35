"""The stages, one room each: frozen settings, a pure core function callable without the
pipeline, a typed artifact with its save/load, and its registration (:mod:`lowrank.pipeline.stage`).

Importing this package registers every stage, in pipeline order.
"""

from . import (  # noqa: F401
               analyze,
               bench,
               calibrate,
               evaluate,
               export,
               factorize,
               gate,
               int8,
               plan,
               recover,
               scores,
               sensitivity,
)
