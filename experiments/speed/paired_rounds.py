"""Speed-ups from paired rounds: the official code and ours timed alternately on one machine.

A cloud VM's speed drifts (25 % within an hour on the Zen 5 dev VM), and the official PyTorch
code and ours drift unequally, so the ratio of two runs made a quarter of an hour apart says
as much about the VM as about the code. Paired rounds interleave the two: each round times the
official training steps, ours, our inference, then the official inference (O J J O), and each
row's speed-up is taken within its round; the spread over rounds shows what the drift leaves.

  python experiments/speed/paired_rounds.py DIR --run --official-dir /tmp/DiffMIC [--rounds 3]
      # about 10 min a round on 2 Zen 5 cores, then the table
  python experiments/speed/paired_rounds.py DIR          # the table of the rounds already in DIR

`--run` appends rounds to DIR (numbered after those already there, so nothing is overwritten)
and runs, in each, the four commands below (`round_commands`), each command's output in a
`.log` beside its JSON; it stops at the first command that fails, naming it and its log. The
same loop by hand:

  for r in 1 2 3; do
    python experiments/speed/official_timing.py --official-dir /tmp/DiffMIC --threads 2 \
        --only training --json $DIR/round${r}_1_official_training.json
    python experiments/speed/benchmark.py --only training --noflops \
        --json $DIR/round${r}_2_ours_training.json
    python experiments/speed/benchmark.py --only inference --batch-size 32 --noflops \
        --json $DIR/round${r}_3_ours_inference.json
    python experiments/speed/official_timing.py --official-dir /tmp/DiffMIC --threads 2 \
        --only inference --batches 32 --repeats 2 --json $DIR/round${r}_4_official_inference.json
  done

(The Zen 5 rounds in experiments/speed/results/ added `--extra-path /tmp/tvlib` to the official
harness: torchvision installed apart, as its docstring describes; `--run` passes it on.)
Nothing else should run on the machine meanwhile: a second process on a 2-core VM slows
whichever side is running and the round's ratio with it.

Files are grouped into rounds by the `round<N>_` at the start of their names; within a round,
the official harness's JSONs (they name their `official_commit`) are told from ours. Prints a
markdown table: per row (`benchmark.row_key`) each round's official and our seconds per batch
and their ratio, then the median ratio and its range over rounds; then, for the rows with a
speed-up target (inference ≥ 15× on AVX-512 and ≥ 25× on AMD, joint step ≥ 1.5× and ≥ 2×,
warm-up step ≥ 1.2×), in how many rounds the target was met (`speed_goals.py`'s targets for
the CPU our JSONs name).
"""

import argparse
import os
import re
import statistics
import subprocess
import sys

_EXPERIMENTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(_EXPERIMENTS)))

import benchmark  # pylint: disable=wrong-import-position
import speed_goals  # pylint: disable=wrong-import-position
from diffmic_jax.platform import errors  # pylint: disable=wrong-import-position

_ROUND = re.compile(r"round(\d+)_")


def load_rounds(directory: str) -> dict:
  """The rows of every round's JSONs in `directory`.

  Returns:
    {round number: {'official': {row_key: row}, 'ours': {row_key: row}, 'cpu': the CPU our
    JSONs of that round name, or None}}.

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
    entry = rounds.setdefault(int(match.group(1)), {"official": {}, "ours": {}, "cpu": None})
    entry[side].update(benchmark.rows_by_key(content, path))
    if side == "ours" and entry["cpu"] is None:
      entry["cpu"] = content.get("cpu")
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


def goal_table(rounds: dict, pairs: dict) -> str:
  """For each paired row with a speed-up goal (`speed_goals.row_targets` of the CPU our JSONs
  name), in how many rounds it was met; '' when no paired row has one or no JSON names its CPU.

  Raises:
    errors.UserError: our JSONs of different rounds name different CPU models.
  """
  cpus = [entry["cpu"] for entry in rounds.values() if entry["cpu"]]
  models = {cpu.get("model") for cpu in cpus}
  if len(models) > 1:
    raise errors.UserError(f"our JSONs name different CPUs ({', '.join(sorted(map(str, models)))}"
                           "): give the rounds of one machine")
  if not cpus:
    return ""
  cpu = cpus[0]
  lines = [f"Speed-up targets on {cpu.get('model')} "
           f"({' '.join(cpu.get('vector_extensions', []))}):", "",
           "| goal | rounds met | median speed-up |", "|---|---|---|"]
  for key, goals in speed_goals.row_targets(cpu).items():
    if key not in pairs:
      continue
    ratios = [ratio for *_, ratio in pairs[key]]
    for target, kind in goals:
      met = sum(ratio >= target for ratio in ratios)
      lines.append(f"| {_name(key)} ≥ {target:g}× ({kind}) | {met} of {len(ratios)} | "
                   f"{statistics.median(ratios):.2f}× |")
  return "\n".join(lines) if len(lines) > 4 else ""


def next_round(directory: str) -> int:
  """1 + the highest round number of the files in `directory` (1 if none or no directory)."""
  if not os.path.isdir(directory):
    return 1
  numbers = [int(m.group(1)) for m in map(_ROUND.match, os.listdir(directory)) if m]
  return max(numbers, default=0) + 1


def round_commands(number: int, directory: str, official_dir: str, extra_path: str | None,
                   threads: int, python: str = sys.executable) -> list[tuple[str, list[str]]]:
  """Round `number`'s four commands in their order (official training, our training, our
  inference, official inference): [(the JSON it writes, argv)]."""
  official = [python, os.path.join(_EXPERIMENTS, "official_timing.py"),
              "--official-dir", official_dir, "--threads", str(threads)]
  if extra_path:
    official += ["--extra-path", extra_path]
  ours = [python, os.path.join(_EXPERIMENTS, "benchmark.py"), "--noflops"]

  steps = [("1_official_training", official, ["--only", "training"]),
           ("2_ours_training", ours, ["--only", "training"]),
           ("3_ours_inference", ours, ["--only", "inference", "--batch-size", "32"]),
           ("4_official_inference", official, ["--only", "inference", "--batches", "32",
                                               "--repeats", "2"])]
  commands = []
  for name, base, args in steps:
    json_path = os.path.join(directory, f"round{number}_{name}.json")
    commands.append((json_path, base + args + ["--json", json_path]))
  return commands


def run_rounds(directory: str, count: int, official_dir: str, extra_path: str | None = None,
               threads: int = 2, runner=subprocess.run) -> list[int]:
  """Runs `count` new rounds into `directory` (created if missing), numbered after the rounds
  already there; each command's stdout and stderr go to a `.log` beside its JSON.

  Args:
    runner: called as runner(argv, stdout=log file, stderr=subprocess.STDOUT, check=False) and
      returning an object with `returncode` (subprocess.run; tests pass a stand-in).

  Returns:
    The numbers of the rounds run.

  Raises:
    errors.UserError: `official_dir` holds no official code, or a command failed or wrote no
      JSON (naming the command's JSON and its log; the files of earlier commands are kept).
  """
  if not os.path.isfile(os.path.join(official_dir, "diffusion_trainer.py")):
    raise errors.UserError(f"--official-dir {official_dir}: expected the official DiffMIC "
                           "code (its diffusion_trainer.py)")
  os.makedirs(directory, exist_ok=True)
  first = next_round(directory)
  numbers = list(range(first, first + count))
  for number in numbers:
    for json_path, argv in round_commands(number, directory, official_dir, extra_path, threads):
      log = json_path[:-len(".json")] + ".log"
      print(f"round {number}: {os.path.basename(json_path)} (log {log})", flush=True)
      with open(log, "w") as out:
        code = runner(argv, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
      if code != 0:
        raise errors.UserError(f"round {number}: the command for {json_path} exited with "
                               f"status {code}; its output is in {log}")
      if not os.path.isfile(json_path):
        raise errors.UserError(f"round {number}: the command for {json_path} wrote no JSON; "
                               f"its output is in {log}")
  return numbers


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(
      prog="python experiments/speed/paired_rounds.py",
      description="Speed-ups of paired rounds with the official code (see the module docstring).")
  parser.add_argument("directory", metavar="DIR", help="the rounds' JSONs (round<N>_*.json)")
  parser.add_argument("--run", action="store_true",
                      help="first run --rounds new rounds into DIR (needs --official-dir)")
  parser.add_argument("--rounds", type=int, default=3, help="rounds to run (default 3)")
  parser.add_argument("--official-dir", help="the official DiffMIC code (official_timing.py)")
  parser.add_argument("--extra-path", help="passed to official_timing.py (e.g. torchvision)")
  parser.add_argument("--threads", type=int, default=2,
                      help="the official code's torch threads (default 2)")
  args = parser.parse_args(argv)
  try:
    if args.run:
      if not args.official_dir:
        raise errors.UserError("--run needs --official-dir (the official DiffMIC code)")
      if args.rounds < 1:
        raise errors.UserError(f"--rounds {args.rounds}: expected at least 1")
      run_rounds(args.directory, args.rounds, args.official_dir, args.extra_path, args.threads)
    rounds = load_rounds(args.directory)
    pairs = paired_speedups(rounds)
    if not pairs:
      raise errors.UserError(f"{args.directory}: no row was measured by both sides in one round")
    goals = goal_table(rounds, pairs)
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(format_table(pairs))
  if goals:
    print("\n" + goals)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
