"""Benchmarks behind ``torchdyn-snopt bench``: equal-wall-clock comparisons of optimizers.

One small framework runs every bench command; each bench module only describes its models,
data and defaults.

- :mod:`~torchdyn_snopt.bench.task`: :class:`~torchdyn_snopt.bench.task.Task`, what is
  trained (data, model, loss, metric, solver settings);
- :mod:`~torchdyn_snopt.bench.trial`: :class:`~torchdyn_snopt.bench.trial.Trial`, one run
  (task, optimizer, rate, seed, budget), and ``run_trial`` under one of two protocols;
- :mod:`~torchdyn_snopt.bench.loop`: the equal-budget training loop and test evaluation;
- :mod:`~torchdyn_snopt.bench.session`: a command's device, reporter and output folder;
  runs a list of trials and prints the closing table;
- :mod:`~torchdyn_snopt.bench.records`, :mod:`~torchdyn_snopt.bench.outputs`,
  :mod:`~torchdyn_snopt.bench.reporter`, :mod:`~torchdyn_snopt.bench.optimizers`,
  :mod:`~torchdyn_snopt.bench.memory`, :mod:`~torchdyn_snopt.bench.provenance`: what a run
  records, the files written, printed lines and bars, the compared optimizers, peak memory,
  the run's command and machine;
- the benches: ``image``, ``timeseries``, ``cnf``, ``second_order``, ``horizon``, ``suite``
  (tasks in ``suite_tasks``), and the timing benches ``scaling`` and ``refresh_cost``;
- :mod:`~torchdyn_snopt.bench.report` and ``suite_report``: JSON to markdown pages;
- ``torchdyn_snopt.bench.scripts``: stand-alone measurements outside the CLI
  (``python -m torchdyn_snopt.bench.scripts.<name>``).
"""

from torchdyn_snopt.bench.image import bench_image

__all__ = ["bench_image"]
