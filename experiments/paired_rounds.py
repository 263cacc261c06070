"""Speed-ups from paired rounds: the official code and ours timed alternately on one machine.

A cloud VM's speed drifts (25 % within an hour on the Zen 5 dev VM), and the official PyTorch
code and ours drift unequally, so the ratio of two runs made a quarter of an hour apart says
as much about the VM as about the code. Paired rounds interleave the two: each round times the
official training steps, ours, our inference, then the official inference (O J J O), and each
row's speed-up is taken within its round; the spread over rounds shows what the drift leaves.

  DIR=experiments/results/perf/<cpu>_<date>_paired
  for r in 1 2 3; do
    python experiments/official_timing.py --official-dir /tmp/DiffMIC --threads 2 \
        --only training --json $DIR/round${r}_1_official_training.json
    python experiments/benchmark.py --only training --noflops \
        --json $DIR/round${r}_2_ours_training.json
    python experiments/benchmark.py --only inference --batch-size 32 --noflops \
        --json $DIR/round${r}_3_ours_inference.json
    python experiments/official_timing.py --official-dir /tmp/DiffMIC --threads 2 \
        --only inference --batches 32 --repeats 2 --json $DIR/round${r}_4_official_inference.json
  done                                              # about 10 min a round on 2 Zen 5 cores
  python experiments/paired_rounds.py $DIR

(The Zen 5 rounds in experiments/results/perf/ added `--extra-path /tmp/tvlib` to the official
harness: torchvision installed apart, as its docstring describes.)

Files are grouped into rounds by the `round<N>_` at the start of their names; within a round,
the official harness's JSONs (they name their `official_commit`) are told from ours. Prints a
markdown table: per row (`benchmark.row_key`) each round's official and our seconds per batch
and their ratio, then the median ratio and its range over rounds.
"""

import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import benchmark  # pylint: disable=wrong-import-position
from diffmic_jax import errors  # pylint: disable=wrong-import-position

_ROUND = re.compile(r"round(\d+)_")


def load_rounds(directory: str) -> dict:
  """The rows of every round's JSONs in `directory`.

  Returns:
    {round number: {'official': {row_key: row}, 'ours': {row_key: row}}}.

  Raises:
    errors.UserError: naming the directory or file, if the directory cannot be listed, holds
      no `round<N>_*.json`, or a file is not a JSON with this benchmark's rows.
  """
  try:
    names = sorted(os.listdir(directory))
  except OSError as e:
    raise errors.UserError(f"{directory}: cannot list it ({e.strerror})") from e
  rounds = {}
  for name in names:
    match = _ROUND.match(name)
    if not match or not name.endswith(".json"):
      continue
    path = os.path.join(directory, name)
    content = benchmark.read_json(path, path)
    side = "official" if isinstance(content, dict) and "official_commit" in content else "ours"
    rounds.setdefault(int(match.group(1)), {"official": {}, "ours": {}})[side].update(
        benchmark.rows_by_key(content, path))
  if not rounds:
    raise errors.UserError(f"{directory}: no round<N>_*.json files")
  return rounds


def paired_speedups(rounds: dict) -> dict:
  """{row_key: [(round, official s, ours s, official s / ours s)]} (seconds per batch, the
  batch over the row's median images/s) for every row that both sides measured in the same
  round, rounds in order."""
  pairs = {}
  for number in sorted(rounds):
    official, ours = rounds[number]["official"], rounds[number]["ours"]
    for key in official.keys() & ours.keys():
      batch = key[-1]
      theirs = batch / official[key]["images_per_s"]
      mine = batch / ours[key]["images_per_s"]
      pairs.setdefault(key, []).append((number, theirs, mine, theirs / mine))
  return pairs


def _name(key: tuple) -> str:
  if key[0] == "inference":
    return f"inference, {key[1]}:{key[2]}, batch {key[3]}"
  return f"{key[1]} step, batch {key[2]}"


def format_table(pairs: dict) -> str:
  """One markdown row per measured row: each round, then the median ratio (min–max)."""
  lines = ["| what | rounds: official s / ours s = speed-up | median speed-up (range) |",
           "|---|---|---|"]
  for key in sorted(pairs, key=str):
    cells = "; ".join(f"{number}: {theirs:.2f} / {mine:.2f} = {ratio:.2f}×"
                      for number, theirs, mine, ratio in pairs[key])
    ratios = [ratio for *_, ratio in pairs[key]]
    lines.append(f"| {_name(key)} | {cells} | **{statistics.median(ratios):.2f}×** "
                 f"({min(ratios):.2f}–{max(ratios):.2f}) |")
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  if len(argv) != 1 or argv[0].startswith("-"):
    print("usage: python experiments/paired_rounds.py DIR", file=sys.stderr)
    return 2
  try:
    pairs = paired_speedups(load_rounds(argv[0]))
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if not pairs:
    print(f"error: {argv[0]}: no row was measured by both sides in one round", file=sys.stderr)
    return 1
  print(format_table(pairs))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
