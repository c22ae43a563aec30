"""Studies of finished runs: tables and plots drawn from result folders.

* `runs`: a workdir loaded as one typed `runs.Run`, the config filter and
  the one pairing of runs by seed;
* `plot`: accuracy curves, skew diagnostics and comparison tables of a sweep
  (``python -m experiments.studies.plot``);
* `study`: the paired "when does SparseOpt help" report
  (``python -m experiments.studies.study``);
* `markdown`: the tables they print;
* `compact`: gzip the logs of finished runs so that a clone stays small
  (``python -m experiments.studies.compact``).

Everything here reads the files `experiments.records` names; nothing here
imports the training code, jax, flax or orbax, so a report can be drawn
while a sweep trains, on a machine without an accelerator stack.
"""
