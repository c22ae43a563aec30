r"""Gzip the metrics logs of finished runs, so that results stay small.

  python -m experiments.studies.compact experiments/results/fmnist_when ...

Every workdir found under the given folders (at any depth; a workdir itself
will do) whose run has finished (``summary.json``) and that still holds a
plain ``metrics.jsonl`` gets it replaced by ``metrics.jsonl.gz``
(`records.compress_metrics`), which every reader accepts in its place.
Unfinished runs are left alone: training appends to the plain log, and
resumes by cutting it back. The output depends only on the log's bytes, so
running the command again changes nothing.
"""

from collections.abc import Iterator, Sequence
import os
import sys

from experiments import records


def workdirs(roots: Sequence[str]) -> Iterator[str]:
  """Folders under ``roots`` (``roots`` included) that hold a plain log."""
  for root in roots:
    for folder, subfolders, files in os.walk(root):
      subfolders.sort()  # Report in a stable order.
      if records.METRICS in files:
        yield folder


def compact(roots: Sequence[str]) -> tuple[list[str], list[str]]:
  """Compresses the logs of the finished runs under ``roots``.

  Returns:
    The workdirs compressed, and those left alone as unfinished.
  """
  done, unfinished = [], []
  for workdir in workdirs(roots):
    if not records.is_finished(workdir):
      unfinished.append(workdir)
    elif records.compress_metrics(workdir):
      done.append(workdir)
  return done, unfinished


def main(argv: Sequence[str]) -> int:
  roots = argv[1:]
  if not roots or any(r.startswith("-") for r in roots):
    print("usage: " + __doc__.strip().splitlines()[2].strip(), file=sys.stderr)
    return 2
  missing = [r for r in roots if not os.path.isdir(r)]
  if missing:
    print(f"Not a folder: {', '.join(missing)}", file=sys.stderr)
    return 2
  done, unfinished = compact(roots)
  for workdir in unfinished:
    print(f"unfinished, left as is: {workdir}")
  print(f"compressed {len(done)} metrics log(s)")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
