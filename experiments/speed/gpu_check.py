"""The GPU check: one command for a CUDA machine without network, done within 8 minutes.

  python3 experiments/speed/gpu_check.py --out "$OUT" [--wheels .whl]  # on the CUDA machine
  python experiments/speed/gpu_check.py --dry-run --out /tmp/gpu_check  # CPU, tiny sizes (CI)
  python experiments/speed/gpu_check.py --prepare-wheels .whl   # before, where pip works

It runs, each stage in its own process under its own time budget:
  1. environment: Python, JAX and its backend, the GPU, the CUDA plugins, and every module the
     benchmark and the tests import; without --dry-run it stops there (one `error:` line,
     exit 1) unless JAX's backend is 'gpu' and nothing is missing;
  2. benchmark.py (beside this script) at the paper configuration (configs/ham10000.py):
     inference, official_truncated 100 steps at batch 32 and 256, then the warm-up and joint
     training steps at batch 32 and 64, in float32 and in bfloat16
     (`--config.model.dtype=bfloat16`); FLOPs are counted for float32 inference only (the
     others pass --noflops);
  3. the tests marked `device` (`pytest -m device`: sampler, denoiser, diffusion maths, losses,
     models, fast_conv, bfloat16, parity with the torch fixtures, training end to end), with
     JAX_DEFAULT_MATMUL_PRECISION=highest (their float32 tolerances are for float32
     arithmetic, while XLA's default on Ampere and later GPUs computes float32 dots and
     convolutions in TF32) and XLA_PYTHON_CLIENT_PREALLOCATE=false. The benchmark keeps both
     defaults (what a user gets).
and prints one table of every benchmark row. A stage may use its own budget plus whatever the
stages before it left unused, never the time reserved for those after it, so the whole run ends
within --budget-s. The benchmark rewrites its JSON after every row, so a stage stopped at its
budget still shows the rows it finished ("timed out" in the stage list).

--out receives at most 7 files, within what the device tool brings back (8 files, two folders
deep): gpu_check.md (the table), gpu_check.json (environment and stages), gpu_check.log (every
stage's output) and the benchmark's JSONs {inference,training}_{float32,bfloat16}.json. It must
be empty or absent: nothing there is overwritten.

What it needs there: a Python whose `jax` sees the GPU (jax with a CUDA plugin: `jax[cuda12]`,
the project's `.[cuda]` extra, or the jax-cuda13 plugin the lent machines' image ships), which
it uses as it finds it: a jaxlib with its CUDA plugin is far over the 64 MiB that travels with
the working tree. The rest, where missing, travels as wheels (about 10 MB): the lent machines'
image (device tool's KINDS.md, 2026-11) has jax, flax, optax, orbax-checkpoint, scikit-learn,
matplotlib, Pillow, tqdm, absl-py and pytest, and lacks the `_CARRIED` distributions below.
`--prepare-wheels DIR` downloads those here, at the versions installed here, for CPython 3.12
on x86-64 Linux (promise has no wheel: it is built, pure Python); then with DIR in the device
tool's `carry`, `--wheels DIR` installs them there into a temporary folder (pip --no-index
--no-deps --target) that every stage's PYTHONPATH starts with. DIR must be git-ignored
(`.whl/` is).

--dry-run runs the same stages on the CPU at tiny sizes (configs/test.py; inference
official_truncated 5 steps and both training steps at batch 2; the tests only collected), so
that CI runs the plumbing (tests/gpu_check_test.py).
"""

import argparse
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(os.path.dirname(_HERE))
_BENCHMARK = os.path.join(_HERE, "benchmark.py")

# Distributions the benchmark's and the tests' imports need that the lent machines' image
# lacks (device tool's KINDS.md package list, read 2026-11-17), each at the version installed
# here; 10 MB of wheels for CPython 3.12.
_CARRIED = ("array_record", "googleapis-common-protos", "grain", "immutabledict",
            "importlib_resources", "ml_collections", "portpicker", "promise", "tensorboardX",
            "tensorflow-datasets", "tensorflow-metadata", "toml")
_BUILT = ("promise",)  # sdist only on the registry: built into a (pure Python) wheel here
_WHEELS_LIMIT_MIB = 40  # of the 64 MiB that travel (the working tree is about 12 MiB)
_PLATFORM_ARGS = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                  "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_27_x86_64",
                  "--platform", "manylinux_2_24_x86_64", "--platform", "manylinux_2_17_x86_64",
                  "--platform", "manylinux2014_x86_64", "--platform", "manylinux1_x86_64"]

# Modules probed one by one, so that the first run names every missing one at once.
_MODULES = ("jax", "flax", "optax", "orbax.checkpoint", "ml_collections", "grain",
            "tensorflow_datasets", "tensorboardX", "importlib_resources", "sklearn", "scipy",
            "matplotlib", "PIL", "tqdm", "absl", "pytest")

# The paper configuration (configs/ham10000.py, the benchmark's default) and the dry run's.
_PAPER = {"config": [], "samplers": "official_truncated:100", "batches": "32,256",
          "train_batches": "32,64", "repeats": "2", "matmul": [], "tests": []}
_DRY = {"config": ["--config", os.path.join(_REPO, "configs", "test.py")],
        "samplers": "official_truncated:5", "batches": "2", "train_batches": "2",
        "repeats": "1", "matmul": ["--matmul-size", "128", "--matmul-repeats", "1"],
        "tests": ["--collect-only"]}

# (stage, budget in seconds): the GPU's (15 s of the 480 left for --wheels), then the dry run's
# (2 shared CPU cores in CI: an upper bound, where a busy machine makes every compile several
# times slower).
_BUDGETS = {"environment": (30, 120), "inference_float32": (85, 180),
            "training_float32": (90, 240), "inference_bfloat16": (70, 180),
            "training_bfloat16": (80, 240), "tests": (110, 120)}
_TOTAL_S = (480, 1140)


class UserError(Exception):
  """Bad input: main prints `error: <message>` and exits 1."""


def stages(dry_run: bool, out: str) -> list[dict]:
  """The stages in order: name, command and budget (the environment probe comes first and is
  run by `probe_environment`)."""
  sizes = _DRY if dry_run else _PAPER
  todo = []
  for dtype in ("float32", "bfloat16"):
    for kind in ("inference", "training"):
      name = f"{kind}_{dtype}"
      command = [sys.executable, _BENCHMARK, *sizes["config"], "--only", kind,
                 "--repeats", sizes["repeats"], *sizes["matmul"],
                 "--json", os.path.join(out, f"{name}.json")]
      if kind == "inference":
        command += ["--samplers", sizes["samplers"], "--batch-size", sizes["batches"]]
      else:
        command += ["--train-batch-size", sizes["train_batches"]]
      if dtype != "float32":
        command.append(f"--config.model.dtype={dtype}")
      if (kind, dtype) != ("inference", "float32"):
        command.append("--noflops")
      todo.append({"name": name, "command": command, "json": os.path.join(out, f"{name}.json")})
  order = ["inference_float32", "training_float32", "inference_bfloat16", "training_bfloat16"]
  todo.sort(key=lambda s: order.index(s["name"]))
  # `-o addopts=`: one process (pytest.ini asks for two, through pytest-xdist, which a GPU
  # machine may lack; the device tests share one GPU anyway).
  todo.append({"name": "tests", "command": [sys.executable, "-m", "pytest", "-q", "-m", "device",
                                            "-o", "addopts=", "-p", "no:cacheprovider",
                                            *sizes["tests"],
                                            os.path.join(_REPO, "tests")],
               # Some tests start `python -m diffmic_jax.main` processes of their own: none may
               # take 75 % of the GPU's memory at its start, as JAX does by default.
               "env": {"JAX_DEFAULT_MATMUL_PRECISION": "highest",
                       "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}})
  for stage in todo:
    stage["budget_s"] = _BUDGETS[stage["name"]][dry_run]
  return todo


def run_stage(command: list[str], env: dict, timeout_s: float, log, shown=None) -> dict:
  """Runs `command` (cwd: the repository) with its output appended to the open file `log`.

  `shown`: the command as the log shows it (default: `command`).

  Returns:
    {'status': 'ok' | 'failed (exit N)' | 'timed out after N s', 'seconds', 'last_line': the
    output's last non-empty line}. A command past `timeout_s` is stopped with its whole process
    group (SIGTERM, then SIGKILL after 10 s).
  """
  log.write(f"$ {shown or ' '.join(command)}\n")
  log.flush()
  start = time.monotonic()
  with tempfile.TemporaryFile("w+") as output:
    proc = subprocess.Popen(command, cwd=_REPO, env=env, stdout=output, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
      rc = proc.wait(timeout=max(timeout_s, 1))
      status = "ok" if rc == 0 else f"failed (exit {rc})"
    except subprocess.TimeoutExpired:
      _stop(proc)
      status = f"timed out after {timeout_s:.0f} s"
    output.seek(0)
    text = output.read()
  log.write(text + ("" if text.endswith("\n") else "\n"))
  log.flush()
  lines = [line for line in text.splitlines() if line.strip()]
  return {"status": status, "seconds": round(time.monotonic() - start, 1),
          "last_line": lines[-1].strip() if lines else ""}


def _stop(proc) -> None:
  """SIGTERM to the stage's process group (its own session), SIGKILL if still there in 10 s."""
  for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
    try:
      os.killpg(proc.pid, sig)
    except ProcessLookupError:
      return
    try:
      proc.wait(timeout=wait_s)
      return
    except subprocess.TimeoutExpired:
      continue


_PROBE = r"""
import importlib, importlib.metadata as md, json, sys
out = {"python": sys.version.split()[0], "executable": sys.executable, "missing": []}
for name in sys.argv[2:]:
  try:
    importlib.import_module(name)
  except ImportError as e:
    out["missing"].append(getattr(e, "name", None) or name)
sys.path.insert(0, sys.argv[1])
try:
  sys.argv = sys.argv[:1]
  import benchmark
except ImportError as e:
  out["missing"].append(getattr(e, "name", None) or str(e))
out["missing"] = sorted(set(out["missing"]))
out["versions"] = {}
for dist in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
  try:
    out["versions"][dist] = md.version(dist)
  except md.PackageNotFoundError:
    pass
out["cuda_plugins"] = sorted({f"{d.metadata['Name']} {d.version}" for d in md.distributions()
                              if (d.metadata["Name"] or "").lower().replace("_", "-")
                              .startswith(("jax-cuda", "jax-rocm"))})
try:
  import jax
  out["backend"] = jax.default_backend()
  out["devices"] = [f"{d.platform}:{getattr(d, 'device_kind', '')}" for d in jax.devices()]
except Exception as e:  # pylint: disable=broad-except
  out["backend"], out["jax_error"] = None, f"{type(e).__name__}: {e}"
print("PROBE " + json.dumps(out))
"""


def probe_environment(env: dict, timeout_s: float, log) -> dict:
  """Python, JAX's backend and devices, CUDA plugins, missing modules (a child process with the
  stages' environment), and nvidia-smi's view of the GPU where it exists."""
  command = [sys.executable, "-c", _PROBE, _HERE, *_MODULES]
  stage = run_stage(command, env, timeout_s, log,
                    shown=f"{sys.executable} -c <gpu_check._PROBE> {' '.join(command[3:])}")
  found = {}
  if stage["last_line"].startswith("PROBE "):
    found = json.loads(stage["last_line"][len("PROBE "):])
    stage["last_line"] = ""  # shown in the report's header
  if shutil.which("nvidia-smi"):
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=30,
                         check=False)
    found["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
  return {**stage, **found}


def check_environment(found: dict, dry_run: bool) -> None:
  """Raises UserError unless the stages can run: nothing missing and, without --dry-run, JAX on
  a GPU."""
  if found.get("missing"):
    raise UserError(
        f"missing Python modules there: {', '.join(found['missing'])} (python "
        f"{found.get('executable', sys.executable)}); carry them as wheels: "
        "`python experiments/speed/gpu_check.py --prepare-wheels .whl` where the registry is "
        "reachable, then `--wheels .whl` with .whl carried along")
  if found.get("backend") is None:
    raise UserError(f"the environment probe failed ({found['status']}: "
                    f"{found.get('jax_error') or found['last_line']}); see gpu_check.log")
  if not dry_run and found["backend"] != "gpu":
    raise UserError(
        f"JAX sees no GPU (backend {found['backend']!r}, jax "
        f"{found.get('versions', {}).get('jax')}, CUDA plugins: "
        f"{', '.join(found.get('cuda_plugins', [])) or 'none'}; nvidia-smi: "
        f"{found.get('nvidia_smi', 'absent')}): the check needs a jax with a CUDA plugin "
        "installed there (pip 'jax[cuda12]', the project's '.[cuda]' extra); --dry-run runs the "
        "plumbing on the CPU")


def install_wheels(directory: str, log) -> str:
  """Installs every wheel of `directory` into a new temporary folder (no index, no
  dependencies) and returns that folder, for the stages' PYTHONPATH."""
  wheels = sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".whl"))
  if not wheels:
    raise UserError(f"--wheels {directory}: no .whl files there")
  site = tempfile.mkdtemp(prefix="gpu_check_site_")
  command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
             "--no-compile", "--no-cache-dir", "--upgrade", "--target", site, *wheels]
  stage = run_stage(command, dict(os.environ), 120, log)
  if stage["status"] != "ok":
    raise UserError(f"--wheels {directory}: pip could not install them ({stage['status']}: "
                    f"{stage['last_line']})")
  return site


def prepare_wheels(directory: str) -> list[str]:
  """Downloads (or, for `_BUILT`, builds) the `_CARRIED` wheels for CPython 3.12 on x86-64
  Linux into `directory`, at the versions installed here. Returns the wheels' names.

  Raises:
    UserError: `directory` is not empty (two versions of one wheel stop pip there), a
      distribution is not installed here, pip fails, or the wheels pass _WHEELS_LIMIT_MIB.
  """
  if os.path.isdir(directory) and os.listdir(directory):
    raise UserError(f"--prepare-wheels {directory}: not empty (remove it first: two versions "
                    "of one distribution stop the install there)")
  pins = {}
  for dist in _CARRIED:
    try:
      pins[dist] = f"{dist}=={importlib.metadata.version(dist)}"
    except importlib.metadata.PackageNotFoundError as e:
      raise UserError(f"--prepare-wheels: {dist} is not installed here; install the project "
                      "first (pip install -e '.[test]')") from e
  os.makedirs(directory, exist_ok=True)
  pip = [sys.executable, "-m", "pip"]
  for command in (
      [*pip, "download", "-q", "--no-deps", *_PLATFORM_ARGS, "-d", directory,
       *(pin for dist, pin in pins.items() if dist not in _BUILT)],
      [*pip, "wheel", "-q", "--no-deps", "-w", directory, *(pins[dist] for dist in _BUILT)]):
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode:
      raise UserError(f"--prepare-wheels: `{' '.join(command[3:5])} ...` failed: "
                      f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
  names = sorted(n for n in os.listdir(directory) if n.endswith(".whl"))
  size = sum(os.path.getsize(os.path.join(directory, n)) for n in names)
  if size > _WHEELS_LIMIT_MIB * 2**20:
    raise UserError(f"--prepare-wheels {directory}: {size / 2**20:.1f} MiB of wheels, over "
                    f"{_WHEELS_LIMIT_MIB} MiB")
  print(f"{len(names)} wheels, {size / 2**20:.1f} MiB, in {directory}:\n  " + "\n  ".join(names))
  return names


def read_result(path: str) -> dict | None:
  """A benchmark JSON (complete or partial), or None where the stage left none."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _gb(value) -> str:
  return "" if not value else f"{value / 1e9:.2f}"


def table(results: dict) -> str:
  """One Markdown table of every benchmark row: `results` maps a stage name to its JSON. The
  dtype column is the one each JSON's config names (what was measured)."""
  head = ("| dtype | what | batch | compile s | s/batch (median) | images/s | ms/image | "
          "achieved TFLOP/s | peak mem GB | XLA buffers GB |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for result in results.values():
    if not result:
      continue
    dtype = result["config"]["dtype"]
    rows = [(r, f"{r['sampler']} {r['steps']} steps", r["seconds_per_batch"])
            for r in result.get("inference", [])]
    rows += [(r, f"{r['stage']} step", r["seconds_per_step"]) for r in result.get("training", [])]
    for r, what, seconds in rows:
      gflop = r.get("gflop_per_image")
      achieved = f"{gflop * r['images_per_s'] / 1e3:.3g}" if gflop else ""
      lines.append(f"| {dtype} | {what} | {r['batch']} | {r['compile_s']:.1f} | {seconds:.3g} | "
                   f"{r['images_per_s']:.4g} | {1e3 / r['images_per_s']:.3g} | {achieved} | "
                   f"{_gb(r.get('peak_memory_bytes'))} | {_gb(r.get('xla_memory_bytes'))} |")
  return "\n".join(lines)


def report(found: dict, done: dict, results: dict, dry_run: bool) -> str:
  """The header (machine, software, each stage's outcome) and the table."""
  first = next((r for r in results.values() if r), {})
  lines = [f"# GPU check{' (dry run: CPU, tiny sizes)' if dry_run else ''}", "",
           f"device: {first.get('device') or ', '.join(found.get('devices', []))}"
           + (f"; nvidia-smi: {found['nvidia_smi']}" if found.get("nvidia_smi") else ""),
           f"python {found.get('python')}; " + ", ".join(
               f"{k} {v}" for k, v in found.get("versions", {}).items())
           + f"; CUDA plugins: {', '.join(found.get('cuda_plugins', [])) or 'none'}",
           f"float32 matmul peak (XLA default precision): " + ", ".join(
               f"{r['matmul_peak_gflops'] / 1e3:.3g} TFLOP/s ({name})"
               for name, r in results.items() if r and "matmul_peak_gflops" in r), "",
           "stages:"]
  for name, stage in done.items():
    rows = results.get(name)
    count = (f", {len(rows.get('inference', [])) + len(rows.get('training', []))} rows"
             + ("" if rows.get("complete") else " (partial)")) if rows else ""
    tail = f": {stage['last_line']}" if name == "tests" or stage["status"] != "ok" else ""
    lines.append(f"- {name}: {stage['status']} in {stage['seconds']:.0f} s{count}{tail}")
  lines += ["", "Peak memory: on a GPU the device's high-water mark since the stage's process "
            "started (rows in order), on a CPU the row's own resident peak; XLA buffers: the "
            "executable's own estimate.", "", table(results)]
  return "\n".join(lines)


def _child_env(site: str | None, dry_run: bool) -> dict:
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env["PYTHONPATH"] = os.pathsep.join(p for p in (site, _REPO, env.get("PYTHONPATH")) if p)
  if dry_run:
    env["JAX_PLATFORMS"] = "cpu"
  return env


def check(out: str, dry_run: bool, wheels: str | None, total_s: float) -> int:
  """Runs every stage into `out` and prints the report. Returns the exit status: 0 when every
  stage succeeded."""
  deadline = time.monotonic() + total_s
  todo = stages(dry_run, out)
  done, results, found = {}, {}, {}
  log_path = os.path.join(out, "gpu_check.log")
  with open(log_path, "w") as log:
    try:
      site = install_wheels(wheels, log) if wheels else None
      env = _child_env(site, dry_run)
      reserved = sum(s["budget_s"] for s in todo)
      found = probe_environment(env, deadline - time.monotonic() - reserved, log)
      done["environment"] = {k: found[k] for k in ("status", "seconds", "last_line")}
      check_environment(found, dry_run)
      for i, stage in enumerate(todo):
        reserved = sum(s["budget_s"] for s in todo[i + 1:])
        timeout_s = deadline - time.monotonic() - reserved
        print(f"[gpu_check] {stage['name']}: up to {timeout_s:.0f} s", flush=True)
        log.write(f"\n== {stage['name']} (up to {timeout_s:.0f} s)\n")
        done[stage["name"]] = run_stage(stage["command"], {**env, **stage.get("env", {})},
                                        timeout_s, log)
        if "json" in stage:
          results[stage["name"]] = read_result(stage["json"])
        print(f"[gpu_check] {stage['name']}: {done[stage['name']]['status']}", flush=True)
    finally:
      _write_summary(out, found, done)
  text = report(found, done, results, dry_run)
  with open(os.path.join(out, "gpu_check.md"), "w") as f:
    f.write(text + "\n")
  print("\n" + text, flush=True)
  return 0 if all(s["status"] == "ok" for s in done.values()) else 1


def _write_summary(out: str, found: dict, done: dict) -> None:
  with open(os.path.join(out, "gpu_check.json"), "w") as f:
    json.dump({"environment": found, "stages": done}, f, indent=2)


def _prepare_out(out: str | None) -> str:
  if not out:
    raise UserError("--out: give the output folder (default $OUT, unset here)")
  if os.path.isdir(out) and os.listdir(out):
    raise UserError(f"--out {out}: not empty; give an empty or new folder (nothing is "
                    "overwritten)")
  if os.path.exists(out) and not os.path.isdir(out):
    raise UserError(f"--out {out}: not a folder")
  os.makedirs(out, exist_ok=True)
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=os.environ.get("OUT"),
                      help="empty or new folder for the table, log and JSONs (default: $OUT)")
  parser.add_argument("--dry-run", action="store_true",
                      help="the same stages on the CPU at tiny sizes (configs/test.py)")
  parser.add_argument("--wheels", help="install this folder's wheels first (see --prepare-wheels)")
  parser.add_argument("--budget-s", type=float, default=None,
                      help=f"the whole run's limit (default {_TOTAL_S[0]} s, dry run "
                           f"{_TOTAL_S[1]} s); each stage keeps its own budget within it")
  parser.add_argument("--prepare-wheels", metavar="DIR",
                      help="only download the wheels the lent machines lack into DIR, and stop")
  args = parser.parse_args(argv)
  try:
    if args.prepare_wheels:
      prepare_wheels(args.prepare_wheels)
      return 0
    if args.wheels and not os.path.isdir(args.wheels):
      raise UserError(f"--wheels {args.wheels}: no such folder")
    total_s = args.budget_s or _TOTAL_S[args.dry_run]
    needed = sum(b[args.dry_run] for b in _BUDGETS.values())
    if total_s < needed:
      raise UserError(f"--budget-s {total_s:g}: the stages' budgets need {needed} s")
    return check(_prepare_out(args.out), args.dry_run, args.wheels, total_s)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
