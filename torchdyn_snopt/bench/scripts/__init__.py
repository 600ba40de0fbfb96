"""Stand-alone benchmark scripts: measurements outside the ``bench`` commands.

Each is a module with its own command line, run as
``python -m torchdyn_snopt.bench.scripts.<name> --help``:

- ``core_overhead``: per-iteration time and peak memory of SNOpt vs Adam (the measure of
  per-iteration cost);
- ``timeseries_overhead``: the same on the time-series models, interleaved;
- ``iteration_phases``: forward, backward and step time of Adam vs SNOpt;
- ``hvp_cost``: one exact Hessian-vector product vs one gradient;
- ``table1``: Table 1, recursive adjoint vs Theorem 1 against ground truth;
- ``ncde_stability``: the Neural CDE diagnosis behind ``bench timeseries``' path scale;
- ``cnf_damping``: SNOpt's damping and refresh interval on a ``bench cnf`` set.
"""
