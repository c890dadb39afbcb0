"""What every script shares: absl flags, `--help`, and user errors reported in one line.

    def define_flags(fv, argv):
      cli.define_config(fv, argv, required=True)
      flags.DEFINE_string("workdir", None, "...", flag_values=fv)

    def run(fv, args):
      ...                              # raise cli.UserError("...") for a user mistake
      return 0

    if __name__ == "__main__":
      cli.exit_with(cli.main(__doc__, define_flags, run))

`main` parses the flags into a fresh `FlagValues` (so tests may call a script's `main(argv)`
in-process), prints the script's docstring and its flags for `--help` (exit 0), and turns user
errors (a bad flag or config key, a missing file, a config that does not fit the checkpoint...)
into one line `error: ...` on stderr with a non-zero exit status: 2 for the command line, 1 for
the rest. `--debug` (or FOCUS_DETR_DEBUG=1) shows the traceback instead. Anything else is a bug
and keeps its traceback.
"""

import logging
import os
import re
import sys
import traceback
import types
from typing import Callable, List, Sequence

from absl import flags
from ml_collections import config_flags
from ml_collections.config_flags import config_flags as _config_flags_impl

DEBUG_ENV = "FOCUS_DETR_DEBUG"
HELP_ARGS = ("--help", "-h", "-?", "--helpfull", "--helpshort")
USAGE_STATUS = 2
ERROR_STATUS = 1

# Exceptions of other modules that mean "the user gave something wrong", by qualified class name,
# so that this module imports none of them (and `--help` stays fast).
# (ConversionError and CheckpointFormatError are ValueErrors already.)
_LIBRARY_USER_ERRORS = (
    "focus_detr_jax.convert.torch_io.UnsafePickleError",
    "focus_detr_jax.data.coco_folder.BadImage",
)


class UserError(Exception):
  """A mistake in the command line, the config or the input files: reported in one line."""


class UsageError(UserError):
  """A mistake in the command line itself (exit status 2)."""


def define_config(fv: flags.FlagValues, argv: Sequence[str], *, required: bool,
                  help_text: str = "config file (configs/*.py), then `--config.<key>=value` "
                  "overrides") -> None:
  """The `--config` flag (an ml_collections config file, locked: unknown keys fail)."""
  config_flags.DEFINE_config_file("config", None, help_text, flag_values=fv, lock_config=True,
                                  sys_argv=list(argv))
  if required:
    flags.mark_flag_as_required("config", flag_values=fv)


def main(doc: str, define_flags: Callable[[flags.FlagValues, List[str]], None],
         run: Callable[[flags.FlagValues, List[str]], int], argv=None) -> int:
  """Parse `argv` (default sys.argv), call `run(flag_values, positional_args)`; exit status."""
  argv = list(sys.argv if argv is None else argv)
  debug = (os.environ.get(DEBUG_ENV, "") not in ("", "0") or
           any(a in ("--debug", "--debug=true", "--debug=1") for a in argv[1:]))
  if not debug:
    # Background threads of orbax/tensorstore may leave unraisable exceptions (`Event loop is
    # closed`) behind a failed restore: logged at debug level, not printed as tracebacks.
    sys.unraisablehook = lambda u: logging.debug("exception ignored in %r: %r", u.object,
                                                 u.exc_value)
    # Their asyncio futures may also fail unobserved (`Future exception was never retrieved`,
    # logged by asyncio with a traceback): the restore error itself is reported by our code.
    logging.getLogger("asyncio").addFilter(_demote_async_tracebacks)
  fv = flags.FlagValues()
  define_flags(fv, argv)
  flags.DEFINE_boolean("debug", False, f"show tracebacks of user errors (also: {DEBUG_ENV}=1)",
                       flag_values=fv)
  if any(a in HELP_ARGS for a in argv[1:]):
    print(help_text(doc, fv))
    return 0
  try:
    positional = _parse(fv, argv)
  except UserError as e:
    return report(e, debug, USAGE_STATUS)
  try:
    return int(run(fv, positional) or 0)
  except Exception as e:  # pylint: disable=broad-except  # re-raised unless a user error
    if not is_user_error(e) or debug:
      raise
    return report(e, debug, USAGE_STATUS if isinstance(e, UsageError) else ERROR_STATUS)


def exit_with(status: int) -> None:
  """`sys.exit` for a script's `__main__`. After an error the process leaves at once, so that
  background threads of orbax/tensorstore (a failed restore) cannot print `Event loop is closed`
  tracebacks below the `error:` line."""
  if status:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)   # pylint: disable=protected-access
  sys.exit(status)


def namespace(fv: flags.FlagValues, names: Sequence[str]):
  """The values of flags `names` as attributes (`reference-dir` -> `.reference_dir`)."""
  return types.SimpleNamespace(**{n.replace("-", "_"): fv[n].value for n in names})


def help_text(doc: str, fv: flags.FlagValues) -> str:
  """The script's docstring, then its flags with their defaults."""
  flag_help = fv.get_help(include_special_flags=False).strip()
  return f"{(doc or '').strip()}\n\nflags:\n{flag_help}\n"


def report(error: BaseException, debug: bool, status: int) -> int:
  """Print `error: <one line>` (and, with debug, the traceback before it); return `status`."""
  if debug:
    traceback.print_exception(error)
  hint = "" if debug else f" (--debug or {DEBUG_ENV}=1 for the traceback)"
  print(f"error: {one_line(error)}{hint if status == ERROR_STATUS else ''}", file=sys.stderr)
  return status


def one_line(error: BaseException) -> str:
  """The message of `error` on one line (a KeyError's quotes dropped)."""
  message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
  lines = [line.strip() for line in message.splitlines() if line.strip()]
  return " ".join(lines) or type(error).__name__


def is_user_error(error: BaseException) -> bool:
  """A user mistake (reported in one line) rather than a bug (reported with its traceback)."""
  if isinstance(error, (UserError, flags.Error, OSError, ValueError)):
    return True
  names = {f"{c.__module__}.{c.__qualname__}" for c in type(error).__mro__}
  return bool(names & set(_LIBRARY_USER_ERRORS))


def configure_logging() -> None:
  """INFO logs on stderr, without absl's `--logtostderr` machinery."""
  formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
  logging.basicConfig(level=logging.INFO)
  for handler in logging.getLogger().handlers:
    # Also the plain stderr handler an import may have added first (orbax does); handlers of
    # other types (a test runner's) keep theirs.
    if type(handler) is logging.StreamHandler:   # pylint: disable=unidiomatic-typecheck
      handler.setFormatter(formatter)
  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)   # "no TPU backend" noise
  absl_logger = logging.getLogger("absl")
  absl_logger.setLevel(logging.WARNING)   # orbax/TFDS bookkeeping at INFO
  absl_logger.addFilter(lambda record: not str(record.msg).startswith(
      "Using custom data configuration"))   # TFDS, once per COCO-folder/synthetic dataset read


def _demote_async_tracebacks(record: logging.LogRecord) -> bool:
  """asyncio records that carry a traceback go to debug level without it (False: dropped)."""
  if record.exc_info or "never retrieved" in str(record.msg):
    logging.debug("asyncio: %s", str(record.getMessage()).splitlines()[0])
    return False
  return True


def _parse(fv: flags.FlagValues, argv: List[str]) -> List[str]:
  """Parse the flags and load every config flag; command-line mistakes become UsageError."""
  try:
    positional = fv(argv)[1:]
  except flags.Error as e:
    message = one_line(e)
    if "is not supported for overriding" in message:
      message = message.split(". Currently supported types")[0] + " (give it a typed default)"
    raise UsageError(message) from e
  except AttributeError as e:   # ml_collections: an override of a key the config lacks
    raise UsageError(_unknown_key_message(e, argv)) from e
  for name in fv:
    if not (isinstance(fv[name], _config_flags_impl._ConfigFlag)  # pylint: disable=protected-access
            and fv[name].value is not None):
      continue
    try:
      _ = fv[name].value.keys()   # a config file that fails to load raises only here
    except (OSError, ImportError, SyntaxError, AttributeError, TypeError, ValueError) as e:
      raise UsageError(_config_load_message(name, fv, e)) from e
  return positional


def _unknown_key_message(error: AttributeError, argv: Sequence[str]) -> str:
  """`unknown config key config.train.max_minutse (did you mean config.train.max_minutes?)`."""
  text = str(error.args[0]) if error.args else str(error)
  key = re.search(r"'([^'\\]+)\\?'", text)
  key = key.group(1) if key else text.strip("'\"")
  suggestion = re.search(r'Did you mean "([^"]+)"', text)
  full = next((a[2:].split("=", 1)[0] for a in argv
               if a.startswith("--") and re.search(rf"\.{re.escape(key)}(=|$|\.)", a)), key)
  message = f"unknown config key {full}"
  if suggestion:
    message += f" (did you mean {full.rsplit('.', 1)[0]}.{suggestion.group(1)}?)" \
        if full.endswith("." + key) else f" (did you mean {suggestion.group(1)}?)"
  return message


def _config_load_message(name: str, fv: flags.FlagValues, error: BaseException) -> str:
  """`cannot load --config=FILE: <the last line of the loader's message>`."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  reason = lines[-1] if lines else type(error).__name__
  reason = re.sub(r"^\[Errno \d+\] ", "", reason)
  try:
    source = fv[name].config_filename
  except Exception:  # pylint: disable=broad-except  # not recorded when loading failed
    source = ""
  return f"cannot load --{name}{'=' + source if source else ''}: {reason}"
