"""Benchmark mode: synthetic jobs against the embedded simulator, figures, comparisons, plots.

Modules: ``figures`` (numbers from pipeline events), ``runner`` (one job run), ``wrapper``
(request rewrites: token cap, naive layout), ``prefix`` (cached-token maximum), ``layout`` and
``compare`` (the ``--compare`` variants), ``report`` (results.json, Markdown), ``plots`` (PNG),
``suite`` (the whole benchmark), ``cli`` (``goflow-gpu bench``), ``gpu`` (the prepared GPU
script). Heavy libraries are imported only where a run needs them.
"""
