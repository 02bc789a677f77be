"""The command-line layer every script shares: typed settings become flags, one error format, one log format.

Settings (colintern/settings/) are frozen dataclasses, one per concern; each field is one flag:

    @dataclass(frozen=True, kw_only=True)
    class LoraOptions(Options):
        "LoRA adapters"                                    # the --help group's title
        lora_r: int = option(32, help="LoRA rank", at_least=1)

    config = parse_config(TrainConfig, argv)              # flags > --config FILE > the fields' defaults
    save_config(config, out_dir / "train_config.yaml")    # the resolved settings, to re-run exactly

From Python no parser is involved: `TrainConfig(model_id=..., train_hub=..., lr=1e-4)` checks the same rules
(`at_least`, `choices` and each concern's `check`) and raises `UserError` with the flag's name. The package reads
these objects, never an `argparse.Namespace`.

- `run_cli(main, argv)`: a `UserError` (bad input the user must fix) becomes exactly one line `error: ...` on stderr
  and exit status 2, never a traceback; Ctrl-C exits 130 with one warning; argparse's exits become statuses.
- `setup_logging(verbose)`: the same timestamped format for every script, on the `colintern` logger hierarchy
  (every script logs as `colintern.<script>`); `-v` shows details.

No torch here: `--help` and the plot scripts start quickly.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import errno
import json
import logging
import sys
import time
import types
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from colintern.errors import UserError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_DATEFMT = "%H:%M:%S"
# bitsandbytes warns on every CPU import that its 4-bit CPU kernels are missing (ColIntern never runs 4-bit on a
# CPU); shown with -v only.
QUIET_LIBRARIES = ("bitsandbytes",)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted (so captured and redirected stderr both work)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(verbose: bool = False, *, quiet: bool = False, default: int = logging.INFO) -> None:
    """Send the `colintern` loggers to stderr in one format: `default` level (INFO for jobs, WARNING for the plot
    scripts), DEBUG with verbose (INFO for scripts whose default is WARNING), WARNING when quiet (e.g. ranks > 0)."""
    level = logging.WARNING if quiet else (max(logging.DEBUG, default - 10) if verbose else default)
    logger = logging.getLogger("colintern")
    logger.handlers[:] = [h for h in logger.handlers if not isinstance(h, _StderrHandler)]
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt=LOG_DATEFMT))
    logger.addHandler(handler)
    logger.setLevel(level)
    for name in QUIET_LIBRARIES:  # their warnings are about features ColIntern does not use
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.ERROR)


# Faults of the output location the user can fix (a full disk, no permission, a file where a folder should be).
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
                 errno.EEXIST}


def output_error_message(err: OSError, out_flag: str) -> str:
    """One line for an OSError of OUTPUT_ERRNOS: what happened, to which file, and what to do."""
    where = err.filename or "an output file"
    reason = (err.strerror or str(err)).lower()
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on device while writing {where}; free space or choose another {out_flag}"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {where}: {reason}; choose another {out_flag}"
    return f"cannot write {where}: {reason} (a file stands where a folder should, or the " \
           f"reverse); choose another {out_flag}"


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None,
            out_flag: str = "output location") -> int:
    """Run a script's main(argv) and return its exit status: a UserError, or a fault of the output location
    (full disk, no permission, a file in the way; `out_flag` is the flag to change), becomes one 'error: ...' line
    on stderr and status 2; argparse's exits (--help: 0, a usage error: 2, its message printed) become statuses."""
    try:
        return main(argv) or 0
    except SystemExit as exit_:
        return 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 1
    except UserError as err:
        message = str(err).replace("\n", " ")  # always exactly one line
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 2
    except OSError as err:
        if err.errno not in OUTPUT_ERRNOS:
            raise  # not the user's to fix: a bug, with its traceback
        print(f"error: {output_error_message(err, out_flag)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        logging.getLogger("colintern").warning("interrupted")
        return 130


# ---------------------------------------------------------------------------------------------------------
# Progress off a terminal

LOG_PROGRESS_EVERY = 10.0  # seconds between progress lines when stderr is not a terminal


class LogProgress:
    """tqdm's interface (update, set_postfix, close; a context manager) for a stderr that is not a terminal (a log
    file, a CI job, a pipe), where tqdm's redrawn line would be one long line of carriage returns: a log line every
    LOG_PROGRESS_EVERY seconds and one at the end, each with the count, the share done, the rate and the ETA."""

    def __init__(self, total: int, desc: str, unit: str, logger: logging.Logger):
        self.total, self.desc, self.unit, self.log = total, desc, unit, logger
        self.n, self.postfix = 0, ""
        self.start = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= LOG_PROGRESS_EVERY and self.n < self.total:
            self.last = now
            self._line(now)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def _line(self, now: float) -> None:
        rate = self.n / max(now - self.start, 1e-9)
        eta = (self.total - self.n) / rate if rate > 0 else float("inf")
        self.log.info("%s: %d/%d %s (%.0f %%), %.1f %s/s, ETA %s%s", self.desc, self.n, self.total, self.unit + "s",
                      100 * self.n / max(self.total, 1), rate, self.unit, _clock(eta),
                      f"; {self.postfix}" if self.postfix else "")

    def close(self) -> None:
        if self.n:
            self._line(time.perf_counter())

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _clock(seconds: float) -> str:
    if seconds == float("inf"):
        return "unknown"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


def progress(total: int, desc: str, unit: str, enabled: bool = True, logger: logging.Logger | None = None) -> Any:
    """A progress display for a long loop: tqdm's bar (rate and ETA) on a terminal, LogProgress lines elsewhere,
    nothing when not enabled."""
    from tqdm.auto import tqdm

    if enabled and not sys.stderr.isatty():
        return LogProgress(total, desc, unit, logger or logging.getLogger("colintern"))
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, disable=not enabled)


# ---------------------------------------------------------------------------------------------------------
# Settings classes -> flags, --config files, resolved settings

C = TypeVar("C", bound="Options")
CONFIG_FLAG = "--config"


def option(default: Any = MISSING, *, help: str, flags: tuple[str, ...] = (), choices: tuple[Any, ...] | None = None,
           at_least: float | None = None, metavar: str | None = None, positional: bool = False,
           repeat: bool = False, cli: bool = True) -> Any:
    """A settings field: its default (none: required), the help text (" (default: X)" is added unless the help
    speaks of the default itself), extra spellings of its flag (`flags`, e.g. ("--device_map",), or ("-v",)), the
    allowed values, a lower bound, a positional argument instead of a flag (a list: zero or more when it has a
    default, else one or more), a list flag given once per item (`repeat`: --meta a=1 --meta b=2), and cli=False
    for a field set by code only."""
    return _field(default, {"help": help, "flags": flags, "choices": choices, "at_least": at_least,
                            "metavar": metavar, "positional": positional, "repeat": repeat, "cli": cli})


def _field(default: Any, meta: dict[str, Any]) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def with_default(base: type, name: str, default: Any, positional: bool | None = None) -> Any:
    """The field `name` of concern class `base` with another default (one script's default, e.g. mine.py's
    --fn_filter 0.95; MISSING: required), or as a positional argument: the help, type and rules stay written once,
    in `base`."""
    original = {f.name: f for f in dataclasses.fields(base)}[name]
    home = original.metadata.get("home") or next(k for k in base.__mro__ if name in k.__dict__.get("__annotations__", {}))
    meta = {**original.metadata, "home": home}
    if positional is not None:  # e.g. the output folder as the first argument (python -m colintern.testing.tiny OUT)
        meta["positional"] = positional
    return _field(default, meta)


@dataclass(frozen=True, kw_only=True)
class Options:
    """Base of every settings class: checks the fields' rules when an object is made (from flags, a file or
    Python), then each concern's own `check(self)` (cross-field rules, derived values)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, bound = getattr(self, f.name), f.metadata.get("at_least")
            choices = f.metadata.get("choices")
            for item in (value if isinstance(value, list) else [value]):
                if choices is not None and item is not None and item not in choices:
                    raise UserError(f"{flag_of(f.name)} must be one of {', '.join(map(str, choices))}, got {item!r}")
            if bound is not None and value is not None and value < bound:
                what = "must not be negative" if bound == 0 else f"must be at least {bound:g}"
                raise UserError(f"{flag_of(f.name)} {what}, got {value}")
        for klass in reversed(type(self).__mro__):
            check = klass.__dict__.get("check")
            if check is not None:
                check(self)

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (checked again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def flag_of(name: str) -> str:
    return f"--{name}"


def _base_type(hint: Any) -> tuple[Any, bool]:
    """(the type without None, whether it is a list) of a field annotation such as `int | None` or `list[str]`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def _help(f: dataclasses.Field, default: Any) -> str:
    text = f.metadata["help"]
    if "default" in text or default is MISSING or default is False:
        return text
    shown = "none" if default is None else " ".join(map(str, default)) if isinstance(default, list) else default
    return f"{text} (default: {shown})"


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def add_options(parser: argparse.ArgumentParser, cls: type[Options], given: dict[str, Any] | None = None) -> None:
    """One argument group per concern class of `cls`, one flag per field. A required field whose value the config
    file gives (`given`) is not required on the command line."""
    hints, given = typing.get_type_hints(cls), given or {}
    final = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)}
    home = {}  # a field's group: the most basic class that declares it (a with_default override stays there)
    for klass in cls.__mro__:
        for name in klass.__dict__.get("__annotations__", {}):
            if name in final:
                home[name] = final[name].metadata.get("home") or klass
    groups: dict[str, argparse._ArgumentGroup] = {}
    own_homes = [home[name] for name in cls.__dict__.get("__annotations__", {}) if name in home]  # its own first
    for klass in dict.fromkeys([*own_homes, *cls.__mro__, *home.values()]):
        own = [name for name in final if home[name] is klass]  # the concerns in the order the class lists them
        if not own:
            continue
        title = (klass.__doc__ or klass.__name__).strip().splitlines()[0]
        if title not in groups:  # a concern that extends another (train's hardware) shares its group
            groups[title] = parser.add_argument_group(title)
        group = groups[title]
        for name in own:
            f, (kind, is_list) = final[name], _base_type(hints[name])
            default = _default_of(f)
            kwargs: dict[str, Any] = {"dest": name, "help": _help(f, default)}
            if kind is bool:
                kwargs["action"] = "store_true" if default is False else argparse.BooleanOptionalAction
            else:
                kwargs["type"] = kind
                if is_list and f.metadata.get("repeat"):
                    kwargs["action"] = "append"
                elif is_list:
                    kwargs["nargs"] = "*" if f.metadata.get("positional") and default is not MISSING else "+"
                if f.metadata.get("choices") is not None:
                    kwargs["choices"] = f.metadata["choices"]
                if f.metadata.get("metavar"):
                    kwargs["metavar"] = f.metadata["metavar"]
            if f.metadata.get("positional"):
                del kwargs["dest"]
                group.add_argument(name, **kwargs, **({} if default is MISSING else {"default": default}))
                continue
            if default is MISSING:
                kwargs["required"] = name not in given
            else:
                kwargs["default"] = None if f.metadata.get("repeat") else default  # append adds to a fresh list
            spellings = sorted([flag_of(name), *f.metadata["flags"]], key=lambda s: s.startswith("--"))  # -v first
            group.add_argument(*spellings, **kwargs)


def read_config_file(path: str | Path, cls: type[Options]) -> dict[str, Any]:
    """The settings a YAML or JSON file gives: a mapping of field names to values, each checked against the
    field's type. Unknown names, wrong types and unreadable files are one-line errors naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{CONFIG_FLAG} {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{CONFIG_FLAG} {path}: cannot read it ({err})") from None
    if path.suffix.lower() == ".json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    else:
        import yaml  # type: ignore[import-untyped]  # PyYAML ships no type information

        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise UserError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', None) or err})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a mapping of settings (name: value), got {type(values).__name__}")
    fields_ = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)}
    hints = typing.get_type_hints(cls)
    checked = {}
    for name, value in values.items():
        if name not in fields_:
            close = difflib.get_close_matches(str(name), list(fields_), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"{path}: unknown setting {name!r}{hint}; see --help for the names")
        checked[name] = _coerce(value, hints[name], f"{path}: {name}")
    return checked


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """A file's value as the field's type (YAML reads 5e-5 as a string: it becomes a float here)."""
    kind, is_list = _base_type(hint)
    if value is None:
        return None
    if is_list:
        items = value if isinstance(value, list) else [value]
        return [_coerce(v, kind, where) for v in items]
    if kind is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return value
    if kind in (int, float) and isinstance(value, bool):
        raise UserError(f"{where}: expected a number, got {value!r}")
    try:
        converted = kind(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: expected {kind.__name__}, got {value!r}") from None
    if kind is int and isinstance(value, float) and converted != value:
        raise UserError(f"{where}: expected a whole number, got {value!r}")
    return converted


def build_parser(cls: type[Options], description: str | None, given: dict[str, Any] | None = None,
                 extra: typing.Callable[[argparse.ArgumentParser], None] | None = None,
                 **parser_kwargs: Any) -> argparse.ArgumentParser:
    """The command line of a settings class: --config FILE, then its groups (`extra` adds script-only flags;
    parser_kwargs go to ArgumentParser: prog, epilog)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     **parser_kwargs)
    parser.add_argument(CONFIG_FLAG, metavar="FILE", default=None,
                        help="read settings from a YAML or JSON file (field: value, the flag names without --; a run's "
                             "resolved *_config.yaml re-runs it); flags given as well override the file")
    if extra is not None:
        extra(parser)
    add_options(parser, cls, given)
    return parser


def parse_config(cls: type[C], argv: list[str] | None, description: str | None = None,
                 extra: typing.Callable[[argparse.ArgumentParser], None] | None = None, **parser_kwargs: Any) -> C:
    """Settings from the command line: the fields' defaults, overridden by --config FILE, overridden by flags."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument(CONFIG_FLAG, default=None)
    file_name = pre.parse_known_args(argv)[0].config
    given = read_config_file(file_name, cls) if file_name else {}
    parser = build_parser(cls, description, given, extra, **parser_kwargs)
    parser.set_defaults(**given)
    namespace = parser.parse_args(argv)
    fields_ = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)}
    values = {k: v for k, v in vars(namespace).items() if k in fields_}
    for name, f in fields_.items():  # a repeated flag not given: the file's list, else the field's default
        if f.metadata.get("repeat") and values.get(name) is None:
            values[name] = given.get(name, _default_of(f))
    return cls(**values)


def to_argv(config: Options) -> list[str]:
    """The command line that parses back into `config` (parse_config(type(config), to_argv(config)) == config): the
    positional fields first, then a flag for every field that differs from its default. Scripts that run other
    commands (the demos, the ablation grid) build settings objects, checked when made, and run this."""
    positional: list[str] = []
    flags: list[str] = []
    order = {action.dest: i for i, action in enumerate(build_parser(type(config), None)._actions)}  # --help's order
    for f in sorted(dataclasses.fields(config), key=lambda f: order.get(f.name, len(order))):
        if not f.metadata.get("cli", True):
            continue
        value, default = getattr(config, f.name), _default_of(f)
        if f.metadata.get("positional"):
            positional += [str(v) for v in value] if isinstance(value, list) else [str(value)]
            continue
        if value == default or value is None:
            continue
        if isinstance(value, bool):
            flags.append(flag_of(f.name) if value else f"--no-{f.name}")
        elif isinstance(value, list) and f.metadata.get("repeat"):
            for item in value:
                flags += [flag_of(f.name), str(item)]
        elif isinstance(value, list):
            flags += [flag_of(f.name), *map(str, value)]
        else:
            flags += [flag_of(f.name), str(value)]
    return positional + flags


def config_text(config: Options, command: str) -> str:
    """The resolved settings as YAML, with a first line saying how to re-run them."""
    import yaml

    header = f"# resolved settings of this run; re-run it exactly with: {command} --config THIS_FILE\n"
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.metadata.get("cli", True)}
    return header + yaml.safe_dump(values, sort_keys=False, allow_unicode=True)


def save_config(config: Options, path: str | Path, command: str) -> Path:
    """Write the resolved settings atomically (a run's `*_config.yaml`)."""
    from colintern.files import atomic_write_text

    atomic_write_text(path, config_text(config, command))
    return Path(path)


def parse_command(commands: dict[str, type[Options]], argv: list[str] | None, description: str | None,
                  prog: str) -> tuple[str, Options]:
    """(command, its settings) of a command line such as `search.py query --index IDX TEXT`: one settings class per
    command, whose docstring's first line ("search.py query: what it does") is its help."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    name = argv[0] if argv and not argv[0].startswith("-") else None
    if name not in commands:  # --help, no command or an unknown one: argparse prints the help or the usage error
        top = argparse.ArgumentParser(prog=prog, description=description,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
        sub = top.add_subparsers(dest="command", required=True)
        for command, cls in commands.items():
            sub.add_parser(command, help=_summary(cls))
        top.parse_args(argv)
        raise UserError(f"unknown command {name!r}")  # not reached: argparse exits first
    cls = commands[name]
    return name, parse_config(cls, argv[1:], _summary(cls), prog=f"{prog} {name}")


def _summary(cls: type) -> str:
    """'what it does' from a docstring 'search.py query: what it does'."""
    return (cls.__doc__ or "").strip().splitlines()[0].partition(": ")[2]
