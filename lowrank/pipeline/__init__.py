"""The pipeline: the stage protocol (:mod:`.stage`), specs — pipeline files, the default pipeline
and the one ``compress`` builds (:mod:`.spec`) — the content-addressed cache (:mod:`.cache`) and
the runner (:mod:`.runner`).

Names are resolved lazily: stage modules import :mod:`.stage`, and the runner imports the
stages, so this package imports nothing when a stage asks for the protocol.
"""

import importlib

_WHERE = {"STAGES": "stage", "Stage": "stage", "register_stage": "stage",
          "PipelineSpec": "spec", "compress_spec": "spec", "default_pipeline": "spec",
          "read_pipeline": "spec", "default_cache_dir": "cache", "RunResult": "runner",
          "execute": "runner", "run_pipeline": "runner"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
