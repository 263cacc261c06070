"""Every `python -m diffmic_jax.main|convert|launch` command of README.md and docs/*.md uses
flags and config fields that exist, a config file that exists, and no stray word (a copied
`[--option]`), so that a renamed flag or field cannot leave the pages behind. The commands are
read from the pages at test time (bash blocks and inline code); nothing is run."""

import functools
import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from absl import flags

from configs import default
from diffmic_jax import convert
from diffmic_jax import launch

from tests import conftest

PAGES = [os.path.join(conftest.REPO, "README.md"),
         *sorted(glob.glob(os.path.join(conftest.REPO, "docs", "*.md")))]
MODULES = ("diffmic_jax.main", "diffmic_jax.convert", "diffmic_jax.launch")


def commands(markdown: str) -> list[list[str]]:
  """The argument lists after `python -m diffmic_jax.<module>` (module first) in a page's bash
  blocks (backslash continuations joined, comments dropped) and inline code spans."""
  texts = [block.replace("\\\n", " ") for block in
           re.findall(r"^```bash\n(.*?)^```$", markdown, flags=re.MULTILINE | re.DOTALL)]
  lines = [line for text in texts for line in text.splitlines()]
  prose = re.sub(r"^```.*?^```$", "", markdown, flags=re.MULTILINE | re.DOTALL)
  lines += [" ".join(span.split())
            for span in re.findall(r"`([^`]*python -m diffmic_jax[^`]*)`", prose)]
  found = []
  for line in lines:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    words = [*lexer, ";"]
    start = 0
    for end, word in enumerate(words):
      if word in (";", "&&", "||", "|"):  # one command of a list or pipeline
        tokens, start = words[start:end], end + 1
        for i in range(len(tokens) - 2):
          if (tokens[i].startswith("python") and tokens[i + 1] == "-m"
              and tokens[i + 2] in MODULES):
            found.append(tokens[i + 2:])
  return found


def _config_field(path: str) -> bool:
  node = default.get_config()
  for part in path.split("."):
    if not hasattr(node, "keys") or part not in node:
      return False
    node = node[part]
  return True


@functools.cache
def main_flags() -> dict[str, bool]:
  """{flag name: boolean} of `diffmic_jax.main`, read in a process of its own: its flags clash
  with those of scripts that other tests import into this one (experiments' benchmark)."""
  code = ("import json; from absl import flags; from diffmic_jax import main; "
          "print(json.dumps({n: f.boolean for n, f in flags.FLAGS._flags().items()}))")
  proc = subprocess.run([sys.executable, "-c", code], cwd=conftest.REPO, capture_output=True,
                        text=True, check=True, env={**os.environ, "PYTHONPATH": conftest.REPO})
  return json.loads(proc.stdout)


def _booleans(flag_values: flags.FlagValues) -> dict[str, bool]:
  return {name: flag.boolean for name, flag in flag_values._flags().items()}  # pylint: disable=protected-access


def stray_or_unknown(args: list[str], known: dict[str, bool]) -> list[str]:
  """The words of `args` that are no flag of `known` ({name: boolean}) (nor a `--config.a.b`
  field of configs/default.py, nor a flag's value), and --config files that do not exist."""
  bad, i = [], 0
  while i < len(args):
    word = args[i]
    i += 1
    if not word.startswith("-"):
      bad += [] if word == "..." else [word]  # `main ...`: the prose's placeholder
      continue
    name, has_value, value = word.lstrip("-").partition("=")
    if name.startswith("config."):
      bad += [] if _config_field(name[len("config."):]) else [word]
      continue
    if name.startswith("no") and known.get(name[2:]):
      continue
    if name not in known:
      bad.append(word)
      continue
    if not known[name] and not has_value:
      value, i = (args[i] if i < len(args) else ""), i + 1
    if name == "config" and not os.path.isfile(os.path.join(conftest.REPO, value)):
      bad.append(f"--config {value} (no such file)")
  return bad


def check(args: list[str]) -> list[str]:
  """What is wrong with one documented command (module first)."""
  module, rest = args[0], args[1:]
  if module == "diffmic_jax.main":
    return stray_or_unknown(rest, main_flags())
  if module == "diffmic_jax.convert":
    own = flags.FlagValues()
    convert.define_flags(own)
    command, *rest = rest
    return ([] if command in convert.COMMANDS else [command]) + stray_or_unknown(rest,
                                                                                _booleans(own))
  try:
    _, forwarded = launch._parse(rest)  # pylint: disable=protected-access
  except SystemExit:
    return [" ".join(rest)]
  return stray_or_unknown(forwarded, main_flags())


def test_commands_reads_blocks_continuations_and_inline_code():
  page = ("Run `python -m diffmic_jax.main --mode\nsummary` or\n```bash\n"
          "python -m diffmic_jax.convert official \\\n    --force  # a comment\nls -l\n```\n")
  assert commands(page) == [["diffmic_jax.convert", "official", "--force"],
                            ["diffmic_jax.main", "--mode", "summary"]]


def test_check_names_stray_words_unknown_flags_fields_and_files():
  assert check(["diffmic_jax.main", "--workdir", "w", "--mode", "predict", "--input", "x/",
                "--overlays", "--nooverlays", "--config.training.num_epochs=2"]) == []
  assert check(["diffmic_jax.main", "--input", "x/", "[--output", "o]", "--ckpt=3",
                "--config.training.epochs=2", "--config", "configs/nope.py"]) == [
                    "[--output", "o]", "--ckpt=3", "--config.training.epochs=2",
                    "--config configs/nope.py (no such file)"]
  assert check(["diffmic_jax.convert", "torchvision", "--arch", "resnet50", "--use-ema"]) == []
  assert check(["diffmic_jax.launch", "--processes", "2", "--", "--mode", "summary"])


@pytest.mark.parametrize("page", PAGES, ids=os.path.basename)
def test_documented_commands_use_flags_and_fields_that_exist(page):
  found = commands(open(page, encoding="utf-8").read())
  problems = {" ".join(args): bad for args in found if (bad := check(args))}
  assert not problems, f"{os.path.relpath(page, conftest.REPO)}: {problems}"


def test_the_pages_hold_the_commands():
  """The reader above finds the pages' commands (a broken reader would pass every page)."""
  found = [args[0] for page in PAGES for args in commands(open(page, encoding="utf-8").read())]
  assert {module: found.count(module) >= 2 for module in MODULES} == dict.fromkeys(MODULES, True)
  assert len(found) >= 15
