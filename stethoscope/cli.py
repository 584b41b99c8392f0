"""Command line: argument parsing only; every command calls the Python API.

Exit codes (every command): 0 success (``score``: all recordings normal), 1 ``score`` found
an anomaly, 2 an error (one line on stderr per problem, naming the file; ``--debug`` adds
the traceback), 130 interrupted. stdout carries results only; progress, warnings and
errors go to stderr.

Adding a command: write ``_<name>_arguments(parser)`` (every option with a help text) and
``_cmd_<name>(args) -> exit code``, then register them with the :func:`command` decorator.
A module that brings several commands lists itself in :data:`COMMAND_MODULES`; it provides
``add_commands(subparsers)`` and a ``COMMANDS`` dict ``{name: run}``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stethoscope import __version__
from stethoscope.errors import StethoscopeError

EXIT_OK, EXIT_ANOMALY, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_CODES = ("exit codes: 0 ok (score: every recording normal), 1 score found an anomaly, "
              "2 error (one line on stderr naming the file and the problem), 130 interrupted")
MACHINES = ("fan", "pump", "valve", "slider")
NPY_MAGIC = b"\x93NUMPY"
# Modules that register commands of their own: add_commands(subparsers) and COMMANDS.
COMMAND_MODULES: tuple[str, ...] = ("stethoscope.service.cli",)  # serve, tokens


# ----------------------------------------------------------------------------- parsing
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help with every option's default (unless its text already says it) and the
    description and epilog kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text.lower():
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text + " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose sub-commands inherit the help format and the exit codes,
    and whose usage errors are one line (exit 2)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("epilog", EXIT_CODES)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D102  (argparse's hook)
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


@dataclass(frozen=True)
class Command:
    """One sub-command: its help line, how it adds its arguments, and what runs it."""

    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None]
            ) -> Callable[[Callable[[argparse.Namespace], int]], Callable]:
    """Register ``run(args) -> exit code`` as sub-command ``name`` (in help order)."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable:
        COMMANDS[name] = Command(name, help, arguments, run)
        return run

    return register


def _global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """--quiet and --debug, accepted before or after the command name."""
    default = {} if top else {"default": argparse.SUPPRESS}
    parser.add_argument("--quiet", "-q", action="store_true", **default,
                        help="no progress bars or step messages (results and errors only)")
    parser.add_argument("--debug", action="store_true", **default,
                        help="show the Python traceback of an error")


def build_parser() -> Parser:
    """The whole command line: the built-in commands and those of COMMAND_MODULES."""
    parser = Parser(prog="stethoscope",
                    description="Listen to machines and say when one sounds wrong.")
    parser.add_argument("--version", action="version", version=f"stethoscope {__version__}",
                        help="print the version and exit")
    _global_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.arguments(p)
        _global_options(p, top=False)
    for module in _command_modules():
        before = set(sub.choices)
        module.add_commands(sub)
        for name in set(sub.choices) - before:
            _global_options(sub.choices[name], top=False)
    return parser


def _command_modules() -> list[Any]:
    return [importlib.import_module(name) for name in COMMAND_MODULES]


def _runner(name: str) -> Callable[[argparse.Namespace], int]:
    if name in COMMANDS:
        return COMMANDS[name].run
    for module in _command_modules():
        if name in module.COMMANDS:
            return module.COMMANDS[name]
    raise KeyError(name)


def _channels(value: str) -> int | str:
    if value in ("mean", "all"):
        return value
    try:
        index = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError("channel must be an index, 'mean' or 'all'") from None
    if index < 0:
        raise argparse.ArgumentTypeError("channel index must be 0 or more")
    return index


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def _count(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {number}")
    return number


def _channels_option(p: argparse.ArgumentParser, scoring: bool) -> None:
    what = ("channel of each recording to score (default: the one the model was trained on)"
            if scoring else "channel to train on (default: 0)")
    p.add_argument("--channels", type=_channels, default=None, metavar="CH",
                   help=f"{what}: an index, 'mean' (average of all channels) or 'all'")
    p.add_argument("--resample", action="store_true",
                   help="resample recordings whose sample rate differs from the model's")


def _threshold_option(p: argparse.ArgumentParser, default: str | None) -> None:
    rules = ("gumbel:RATE (a Gumbel law fitted to the held-out normal scores, cut at that "
             "false-alarm rate), mean+2std, mean+3std, pQ (e.g. p99), gamma:Q (e.g. "
             "gamma:0.9), fpr:RATE (the threshold with that false-alarm rate on the model's "
             "held-out normal scores, e.g. fpr:0.01) or value:X")
    if default is None:
        p.add_argument("--threshold", default=None, metavar="RULE",
                       help=f"decision rule refitted on the model's held-out normal scores, "
                            f"no retraining: {rules} (default: the model's own)")
    else:
        p.add_argument("--threshold", default=None, metavar="RULE",
                       help=f"decision rule fitted on held-out normal scores: {rules} "
                            f"(default: {default})")


def _force_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--force", action="store_true",
                   help=f"replace an existing {what} that stethoscope wrote (never anything "
                        "else)")


def _json_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="print the result as JSON on stdout instead of text")


# ----------------------------------------------------------------------------- output
def _strict(value: Any) -> Any:
    """JSON-ready data: numpy scalars to Python, NaN and infinities to null, paths to text."""
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _print_json(data: dict) -> None:
    print(json.dumps(_strict(data), indent=2, allow_nan=False))


def _say(message: str) -> None:
    """A progress or status line on stderr (silenced by --quiet)."""
    from stethoscope.progress import progress_enabled

    if progress_enabled():
        print(message, file=sys.stderr)


def _error_line(message: str) -> str:
    return "stethoscope: error: " + " ".join(str(message).split())


# ----------------------------------------------------------------------------- checks
def _check_model_name(name: str | None) -> str:
    """The model name (default when None), or the one-line error with a "did you mean"
    before any simulation or feature extraction."""
    from stethoscope.models import registry

    if name is None:
        from stethoscope.detector import DEFAULT_MODEL

        return DEFAULT_MODEL
    registry.info(name)
    return name


def _threshold_rule(spec: str | None):
    from stethoscope.scoring import parse_threshold

    return None if spec is None else parse_threshold(spec)


def _load_detector(path: Path, *, resample: bool = False, channels: int | str | None = None,
                   threshold: str | None = None):
    """A saved detector with the command's overrides: resampling, channel choice and a
    threshold rule refitted on its held-out normal scores."""
    from stethoscope.detector import Detector
    from stethoscope.errors import ModelFileError

    rule = _threshold_rule(threshold)  # a bad rule fails before the model is read
    det = Detector.load(path, channels=channels, resample=True if resample else None)
    if rule is not None:
        det.refit_threshold(rule)
    value = det.threshold_.value_
    if value is None or not math.isfinite(value):
        raise ModelFileError("config.json holds no usable threshold value; retrain, or pass "
                             "--threshold RULE to fit one on the model's held-out normal "
                             "scores", path)
    return det


def _threshold_json(threshold) -> dict:
    return {"rule": threshold.spec(), "value": threshold.value_,
            "description": threshold.describe(),
            "held_out_false_alarm_rate": threshold.stats_.get("false_alarm_rate")}


# ----------------------------------------------------------------------------- train
def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", nargs="+",
                   help="normal recordings: WAV files, folders, .txt lists, or one .npy "
                        "feature array (N, mels, frames) or (N, channels, mels, frames)")
    p.add_argument("--out", type=Path, required=True,
                   help="model folder to write (new, empty, or a model with --force)")
    p.add_argument("--model", default=None,
                   help="model name, see `stethoscope models` (default: the one marked "
                        "default there)")
    p.add_argument("--epochs", type=_positive_int, default=None,
                   help="training epochs (default: the model's)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="clips per training batch (default: the model's)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same model)")
    _threshold_option(p, "the model's registered rule, gumbel:0.03 for clip-ensemble, "
                         "else mean+2std")
    p.add_argument("--pooling", default=None,
                   help="how a clip's error map becomes its score: mean, max, median, "
                        "topk:0.1 or p95 (default: the model's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "auto"],
                   help="training precision; bf16/auto: bf16 autocast where the CPU or GPU "
                        "has it (default: the model's: auto for seed-conv-ae, else fp32)")
    _channels_option(p, scoring=False)
    p.add_argument("--window", type=_seconds, default=None, metavar="SECONDS",
                   help="cut recordings into windows of this length, e.g. 10s (default: the "
                        "shortest training recording)")
    p.add_argument("--hop", type=_seconds, default=None, metavar="SECONDS",
                   help="seconds between window starts, e.g. 5s (default: the window, back "
                        "to back)")
    p.add_argument("--pad", action="store_true",
                   help="pad recordings shorter than a window with silence instead of "
                        "refusing them")
    p.add_argument("--window-pooling", default="max",
                   help="how a recording's window scores become its score: max, mean, "
                        "median, topk:0.1 or p95")
    p.add_argument("--cache", type=Path, default=None, metavar="DIR",
                   help="memory-mapped feature cache folder, so repeat runs skip the WAVs "
                        "(default: none)")
    _force_option(p, "model folder")
    _json_option(p)


@command("train", "train a detector on normal recordings", _train_arguments)
def _cmd_train(args: argparse.Namespace) -> int:
    from stethoscope.atomic import prepare_output
    from stethoscope.detector import Detector
    from stethoscope.scoring import check_pooling_rule

    model = _check_model_name(args.model)
    _threshold_rule(args.threshold)
    if args.pooling is not None:
        check_pooling_rule(args.pooling)
    _resolve_device(args.device)
    prepare_output(args.out, "model", force=args.force)
    features: dict[str, Any] = {"resample": True} if args.resample else {}
    if args.channels is not None:
        features["channels"] = args.channels
    window = {"window_s": args.window or None, "window_hop_s": args.hop or None,
              "pad_short": args.pad or None}
    features.update({k: v for k, v in window.items() if v is not None})
    check_pooling_rule(args.window_pooling)
    from stethoscope import distributed

    # Under torchrun (its environment variables set) this process is one rank of DDP
    # training on cuda:LOCAL_RANK or the CPU, and rank 0 alone saves and prints; else rank
    # is None and training runs here alone (stethoscope.distributed).
    with distributed.process_group(args.device) as rank:
        det = Detector(model, features=features, threshold=args.threshold,
                       pooling=args.pooling, window_pooling=args.window_pooling,
                       epochs=args.epochs, batch_size=args.batch_size,
                       lr=args.lr, seed=args.seed, device=rank.device if rank else args.device,
                       precision=args.precision, cache_dir=args.cache,
                       progress=False if rank and not rank.is_main else None)
        det.fit(args.data)
        if rank is not None and not rank.is_main:
            return EXIT_OK
        det.save(args.out)
    if args.json:
        _print_json({"model": det.model, "out": args.out,
                     "recordings": det.train_input_["recordings"],
                     "windows": det.train_input_["windows"],
                     "window_s": det.feature_config_.window_s,
                     "threshold": _threshold_json(det.threshold_),
                     "threshold_source": getattr(det, "threshold_source_", None)})
    else:
        windows = det.train_input_["windows"]
        print(f"trained {det.model} on {det.train_input_['recordings']} recordings "
              f"({windows} windows); "
              f"threshold {det.threshold_.describe()}")
        print(f"model written to {args.out}")
    return EXIT_OK


def _resolve_device(device: str) -> None:
    """Fail on an unknown or absent device now, not after feature extraction."""
    try:
        from stethoscope.compute import resolve_device
    except ImportError:
        from stethoscope.training import resolve_device
    resolve_device(device)


# ----------------------------------------------------------------------------- score
def _score_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="model folder written by `train`")
    p.add_argument("inputs", nargs="+", help="WAV files, folders or .txt lists of paths")
    _threshold_option(p, None)
    _channels_option(p, scoring=True)
    _json_option(p)


@command("score", "score recordings; exit 1 when any is anomalous, 2 when any cannot be "
         "scored", _score_arguments)
def _cmd_score(args: argparse.Namespace) -> int:
    det = _load_detector(args.model, resample=args.resample, channels=args.channels,
                         threshold=args.threshold)
    results = det.score_recordings(args.inputs, on_error="collect")
    scored = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    flagged = sum(bool(r.anomalous) for r in scored)
    for r in failed:
        print(_error_line(r.error), file=sys.stderr)
    if args.json:
        _print_json({"threshold": det.threshold_.value_,
                     "threshold_rule": _threshold_json(det.threshold_),
                     "clips": [r.to_dict() for r in scored],
                     "errors": [{"path": r.path, "error": r.error} for r in failed],
                     "summary": {"recordings": len(results), "scored": len(scored),
                                 "anomalous": flagged, "errors": len(failed)}})
    else:
        _print_score_table(scored)
        if scored:
            print(f"{flagged} of {len(scored)} anomalous (threshold "
                  f"{det.threshold_.value_:.6g}, {det.threshold_.spec()})")
    if failed:
        if len(results) > 1:
            print(f"stethoscope: {len(failed)} of {len(results)} recordings could not be "
                  "scored", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_ANOMALY if flagged else EXIT_OK


def _print_score_table(scored: list) -> None:
    if not scored:
        return
    width = max(len(str(r.path)) for r in scored)
    for r in scored:
        verdict = "ANOMALY" if r.anomalous else "normal"
        windows = ""
        if len(r.windows) > 1:
            bad = sum(w.anomalous for w in r.windows)
            windows = f"  ({bad} of {len(r.windows)} windows anomalous)"
        print(f"{str(r.path):<{width}}  {r.score:12.6g}  {verdict}{windows}")


# ----------------------------------------------------------------------------- evaluate
def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="model folder written by `train`")
    p.add_argument("data", nargs="+", help="labelled recordings (MIMII or DCASE layout)")
    p.add_argument("--report", type=Path, default=None, metavar="DIR",
                   help="write the HTML/Markdown report folder here (new, empty, or a "
                        "report with --force; default: no report)")
    _threshold_option(p, None)
    _channels_option(p, scoring=True)
    _force_option(p, "report folder")
    _json_option(p)


@command("evaluate", "evaluate on labelled recordings and write a report", _evaluate_arguments)
def _cmd_evaluate(args: argparse.Namespace) -> int:
    from stethoscope.atomic import prepare_output
    from stethoscope.metrics import format_table
    from stethoscope.report import threshold_choices, threshold_statement

    if args.report is not None:
        prepare_output(args.report, "report", force=args.force)
    det = _load_detector(args.model, resample=args.resample, channels=args.channels,
                         threshold=args.threshold)
    result, failed = _evaluate_readable(det, args.data, args.report)
    for r in failed:
        print(_error_line(r.error), file=sys.stderr)
    statement = threshold_statement(det.threshold_, result["scores"], result["labels"])
    choices = threshold_choices(det.threshold_, det.train_scores_, result["scores"],
                                result["labels"])
    if args.json:
        _print_json({"metrics": result["metrics"], "threshold": _threshold_json(det.threshold_),
                     "threshold_choices": choices,
                     "report": None if args.report is None else args.report / "index.html",
                     "errors": [{"path": r.path, "error": r.error} for r in failed]})
    else:
        print(format_table(result["metrics"]))
        print(statement)
        _print_choices(choices)
        if args.report is not None:
            print(f"report written to {args.report / 'index.html'}")
    if failed:
        print(f"stethoscope: {len(failed)} recordings could not be evaluated", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def _print_choices(choices: list[dict]) -> None:
    print("threshold choices (fitted on the model's held-out normal scores; --threshold RULE):")
    print(f"  {'rule':<17} {'value':>10} {'false alarms held-out':>22} {'test normals':>13} "
          f"{'anomalies found':>16}")
    for row in choices:
        cells = [row["false alarms, held-out normals"], row["false alarms, test normals"],
                 row["anomalies found"]]
        held, test, found = ("-" if c is None else f"{100 * c:.1f} %" for c in cells)
        print(f"  {row['rule']:<17} {row['value']:>10.4g} {held:>22} {test:>13} {found:>16}")


def _evaluate_readable(det, data: list[str], report: Path | None) -> tuple[dict, list]:
    """Evaluate every readable recording; those that cannot be scored come back apart."""
    from stethoscope.evaluation import evaluate_detector

    result = evaluate_detector(det, data, report_dir=report)
    return result, result["errors"]


# ----------------------------------------------------------------------------- demo
def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("stethoscope-demo"),
                   help="demo folder to write: data/, model/, report/, summary.json")
    p.add_argument("--machine", default="fan", choices=MACHINES, help="machine to simulate")
    p.add_argument("--model", default=None,
                   help="model name, see `stethoscope models` (default: the default model)")
    p.add_argument("--epochs", type=_positive_int, default=None,
                   help="training epochs (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="random seed of simulation and training")
    _force_option(p, "demo folder")


@command("demo", "simulate a machine, train, evaluate, write a report", _demo_arguments)
def _cmd_demo(args: argparse.Namespace) -> int:
    from stethoscope.atomic import prepare_output
    from stethoscope.demo import run_demo

    model = _check_model_name(args.model)
    prepare_output(args.out, "demo", force=args.force)
    report = run_demo(args.out, machine=args.machine, model=model, epochs=args.epochs,
                      seed=args.seed)
    print(f"demo report: {report}")
    return EXIT_OK


# ----------------------------------------------------------------------------- simulate
def _simulate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--machine", required=True, choices=MACHINES, help="machine to simulate")
    p.add_argument("--normal", type=_count, default=100, help="normal clips to write")
    p.add_argument("--abnormal", type=_count, default=30, help="abnormal clips to write")
    p.add_argument("--out", type=Path, required=True,
                   help="data set root; clips go to OUT/<machine>/<id>/{normal,abnormal}/")
    p.add_argument("--snr", type=float, default=6.0, help="signal-to-noise ratio in dB")
    p.add_argument("--channels", type=_positive_int, default=1, help="microphone channels")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--id", dest="machine_id", default="id_00", help="machine id folder")
    _force_option(p, "simulated machine folder")


@command("simulate", "write simulated machine recordings (MIMII layout)", _simulate_arguments)
def _cmd_simulate(args: argparse.Namespace) -> int:
    from stethoscope.atomic import prepare_output
    from stethoscope.demo import SIMULATION_KIND, simulate_into

    target = prepare_output(args.out / args.machine / args.machine_id, SIMULATION_KIND,
                            force=args.force)
    simulate_into(target, args.machine, args.normal, args.abnormal, snr_db=args.snr,
                  channels=args.channels, seed=args.seed, machine_id=args.machine_id)
    print(f"wrote {args.normal} normal and {args.abnormal} abnormal clips under {target}")
    return EXIT_OK


# ----------------------------------------------------------------------------- datasets
def _datasets_arguments(p: argparse.ArgumentParser) -> None:
    dsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    d = dsub.add_parser("download", help="download and unpack a public data set",
                        description="download and unpack a public data set")
    d.add_argument("name", choices=["mimii", "dcase2020", "dcase2023", "dcase2024"],
                   help="data set")
    d.add_argument("--machine", default=None, help="only this machine type (default: all)")
    d.add_argument("--id", dest="machine_id", default=None,
                   help="only this machine id, MIMII and DCASE 2020 (default: all)")
    d.add_argument("--snr", default=None, help="MIMII SNR: -6, 0 or 6 dB (default: all three)")
    d.add_argument("--out", type=Path, required=True, help="folder to unpack into")
    d.add_argument("--base-url", default=None, help=argparse.SUPPRESS)
    _global_options(d, top=False)


@command("datasets", "download public data sets", _datasets_arguments)
def _cmd_datasets(args: argparse.Namespace) -> int:
    from stethoscope.download import dataset_files, download_dataset, total_size_text

    files = dataset_files(args.name, machine=args.machine, snr=args.snr)
    _say(f"{args.name}: {len(files)} archive(s), {total_size_text(files)}: "
         + ", ".join(f.name for f in files))
    out = download_dataset(args.name, machine=args.machine, machine_id=args.machine_id,
                           snr=args.snr, out=args.out, base_url=args.base_url)
    print(f"{args.name} ready under {out}")
    return EXIT_OK


# ----------------------------------------------------------------------------- lab
LAB_EXPERIMENTS = ("cnn-overfit", "dropout", "dense-ae", "conv-ae", "all")


def _lab_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", nargs="?", default="all", choices=LAB_EXPERIMENTS,
                   help="experiment to run")
    p.add_argument("--epochs", type=_positive_int, default=None,
                   help="epochs (default: the course notebook's)")
    p.add_argument("--subset", type=_positive_int, default=None,
                   help="train on the first N images (default: all 60000)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="batch size (default: the notebook's)")
    p.add_argument("--data", type=Path, default=None,
                   help="mnist.npz or folder of IDX files (default: the caches, else a "
                        "one-time download)")
    p.add_argument("--out", type=Path, default=Path("lab-runs"),
                   help="lab folder: one folder per experiment and the report")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                   help="bf16/auto: bf16 autocast on CPUs with native bf16 (faster)")
    _force_option(p, "experiment folder")


@command("lab", "reproduce the course lab on MNIST", _lab_arguments)
def _cmd_lab(args: argparse.Namespace) -> int:
    from stethoscope.atomic import check_replaceable, prepare_output
    from stethoscope.lab import run_lab
    from stethoscope.lab.experiments import LAB_KIND, RUN_KIND, expand_experiments

    check_replaceable(args.out, LAB_KIND)
    for name in expand_experiments(args.experiment):
        prepare_output(args.out / name, RUN_KIND, force=args.force)
    report = run_lab(args.experiment, data=args.data, out=args.out, epochs=args.epochs,
                     subset=args.subset, batch_size=args.batch_size, seed=args.seed,
                     precision=args.precision)
    print(f"lab report: {report}")
    return EXIT_OK


# ----------------------------------------------------------------------------- encode/decode
def _is_lab_model(path: Path) -> bool:
    """Lab (MNIST) model folders say kind=lab in config.json; detector folders do not."""
    from stethoscope.storage import load_model

    for folder in (path / "model", path):  # a lab run folder holds its model in model/
        if (folder / "model.safetensors").is_file():
            return load_model(folder)[0].get("kind") == "lab"
    return False


def _encode_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="detector model folder, or a lab run/model folder")
    p.add_argument("inputs", nargs="+", help="recordings (detector) or a .npy of images (lab)")
    p.add_argument("--out", type=Path, required=True, help=".npy file for the codes")
    _force_option(p, ".npy file")


@command("encode", "run only the encoder half of an autoencoder", _encode_arguments)
def _cmd_encode(args: argparse.Namespace) -> int:
    from stethoscope.atomic import prepare_output_file

    prepare_output_file(args.out, magic=NPY_MAGIC, what=".npy array", force=args.force)
    if _is_lab_model(args.model):
        from stethoscope.evaluation import load_npy, save_npy
        from stethoscope.lab import encode as lab_encode

        codes = lab_encode(args.model, load_npy(Path(args.inputs[0])))
        save_npy(args.out, codes)
    else:
        from stethoscope.evaluation import encode

        codes = encode(_load_detector(args.model), args.inputs, args.out)
    print(f"wrote codes of shape {codes.shape} to {args.out}")
    return EXIT_OK


def _decode_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="detector model folder, or a lab run/model folder")
    p.add_argument("codes", type=Path, help=".npy written by `encode`")
    p.add_argument("--out", type=Path, required=True, help=".npy file for the outputs")
    _force_option(p, ".npy file")


@command("decode", "run only the decoder half on saved codes", _decode_arguments)
def _cmd_decode(args: argparse.Namespace) -> int:
    from stethoscope.atomic import prepare_output_file

    prepare_output_file(args.out, magic=NPY_MAGIC, what=".npy array", force=args.force)
    if _is_lab_model(args.model):
        from stethoscope.evaluation import load_npy, save_npy
        from stethoscope.lab import decode as lab_decode

        outputs = lab_decode(args.model, load_npy(args.codes))
        save_npy(args.out, outputs)
    else:
        from stethoscope.evaluation import decode

        outputs = decode(_load_detector(args.model), args.codes, args.out)
    print(f"wrote outputs of shape {outputs.shape} to {args.out}")
    return EXIT_OK


# ----------------------------------------------------------------------------- models
def _models_arguments(p: argparse.ArgumentParser) -> None:
    _json_option(p)


@command("models", "list the available models", _models_arguments)
def _cmd_models(args: argparse.Namespace) -> int:
    from stethoscope.detector import DEFAULT_MODEL
    from stethoscope.models import info, names

    rows = [{"name": n, "kind": info(n).kind, "description": info(n).description,
             "default": n == DEFAULT_MODEL} for n in names(kind=None)]
    if args.json:
        _print_json({"models": rows})
        return EXIT_OK
    for row in rows:
        mark = " (default)" if row["default"] else ""
        print(f"{row['name']:<18} {row['kind']:<8} {row['description']}{mark}")
    return EXIT_OK


# ----------------------------------------------------------------------------- monitoring
def _seconds(value: str) -> float:
    try:
        number = float(value.removesuffix("s"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not math.isfinite(number) or number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, not {value}")
    return number


def _server_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--server", default=None, metavar="URL",
                   help=f"post {what} as WAV to this monitoring service (POST "
                        "URL/v1/machines/MACHINE/recordings)")
    p.add_argument("--token", default=os.environ.get("STETHOSCOPE_TOKEN"),
                   help="bearer token for --server (default: $STETHOSCOPE_TOKEN)")
    p.add_argument("--machine", default=None, help="the machine's name in the service")


def _watch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", type=Path, help="folder where new WAV recordings appear")
    p.add_argument("--model", type=Path, default=None,
                   help="model folder, or a .onnx file from `stethoscope export`")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON-lines file each result is appended to (its state file, "
                        "OUT.state.sqlite, lies beside it)")
    _server_options(p, "each new recording")
    p.add_argument("--state", type=Path, default=None,
                   help="SQLite file remembering which recordings are done (default: beside "
                        "--out; needed with --server alone)")
    p.add_argument("--settle", type=_seconds, default=2.0, metavar="SECONDS",
                   help="a file is complete when its size stays the same this long (or at "
                        "once when renamed into the folder)")
    p.add_argument("--interval", type=_seconds, default=1.0, metavar="SECONDS",
                   help="seconds between looks at the folder when polling")
    p.add_argument("--recursive", action="store_true", help="watch subfolders too")
    p.add_argument("--poll", action="store_true",
                   help="poll the folder even when watchdog's file-system events are available")
    p.add_argument("--once", action="store_true",
                   help="score the recordings there now, then exit")


@command("watch", "score every new WAV of a folder once, restart-safe", _watch_arguments)
def _cmd_watch(args: argparse.Namespace) -> int:
    import signal
    import threading

    from stethoscope.watch import watch_folder

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        scored = watch_folder(args.folder, model=args.model, output=args.out,
                              server=args.server, token=args.token, machine=args.machine,
                              state=args.state, settle_s=args.settle,
                              interval_s=max(args.interval, 0.01), recursive=args.recursive,
                              events=False if args.poll else None, once=args.once, stop=stop)
    except KeyboardInterrupt:
        stop.set()
        return EXIT_OK
    _say(f"scored {scored} recording(s)")
    return EXIT_OK


def _stream_arguments(p: argparse.ArgumentParser) -> None:
    from stethoscope.stream import STREAM_FORMATS

    p.add_argument("--model", type=Path, default=None,
                   help="model folder, or a .onnx file from `stethoscope export`")
    p.add_argument("--format", default="s16le", choices=STREAM_FORMATS,
                   help="stdin's samples: raw little-endian PCM, or a WAV stream (a raw "
                        "stream that starts with a WAV header is read as WAV)")
    p.add_argument("--rate", type=_positive_int, default=None,
                   help="sample rate of raw stdin in Hz (default: the model's)")
    p.add_argument("--channels", type=_positive_int, default=1,
                   help="interleaved channels of raw stdin")
    p.add_argument("--window", type=_seconds, default=None, metavar="SECONDS",
                   help="seconds per scored window (default: the model's window)")
    p.add_argument("--hop", type=_seconds, default=None, metavar="SECONDS",
                   help="seconds between window starts (default: the window, back to back)")
    p.add_argument("--device", default=None, metavar="N",
                   help="record from sound card N (its index or name) through sounddevice "
                        "instead of reading stdin")
    p.add_argument("--resample", action="store_true",
                   help="convert each window from the stream's --rate to the model's (e.g. a "
                        "48 kHz sound card and a 16 kHz model)")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="compute threads for the model (default 1: a 10 s window takes a "
                        "few ms on one core, and more threads slow down, not up, when the "
                        "machine is busy with other work)")
    _server_options(p, "each window")


@command("stream", "score raw PCM or a WAV stream from stdin (or a sound card), one JSON line "
                   "per window", _stream_arguments)
def _cmd_stream(args: argparse.Namespace) -> int:
    from stethoscope.stream import run_stream

    device = args.device
    if device is not None and device.isdigit():
        device = int(device)
    try:
        count = run_stream(model=args.model, encoding=args.format, rate=args.rate,
                           channels=args.channels, window_s=args.window or None,
                           hop_s=args.hop or None, device=device, server=args.server,
                           token=args.token, machine=args.machine, threads=args.threads,
                           resample=args.resample)
    except KeyboardInterrupt:
        return EXIT_OK
    _say(f"scored {count} window(s)")
    return EXIT_OK


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="model folder written by `train`")
    p.add_argument("--onnx", type=Path, required=True,
                   help="ONNX file to write: the whole scoring path, waveform window to score")
    p.add_argument("--no-check", action="store_true",
                   help="skip scoring one test window with PyTorch and onnxruntime to compare")
    _force_option(p, "ONNX file")


@command("export", "export a model's scoring path (log-mel, model, pooling) to ONNX",
         _export_arguments)
def _cmd_export(args: argparse.Namespace) -> int:
    from stethoscope.export import check_export, export_onnx

    out = export_onnx(args.model, args.onnx, force=args.force)
    print(f"wrote {out}")
    if not args.no_check:
        reference, exported = check_export(args.model, out)
        print(f"check: one test window scores {reference:.7g} in PyTorch and {exported:.7g} "
              f"in onnxruntime (difference {abs(reference - exported):.2g})")
    return EXIT_OK


# ----------------------------------------------------------------------------- fleet
def _fleet_common(p: argparse.ArgumentParser) -> None:
    """The tree to work on and the engine to run on (dask is imported only when chosen)."""
    p.add_argument("root", type=Path,
                   help="MIMII tree (<type>/id_XX/{normal,abnormal}/*.wav) or DCASE tree "
                        "(<type>/{train,test}/section_XX_*.wav)")
    p.add_argument("--engine", default="local", choices=["local", "dask"],
                   help="local: a process pool here; dask: a Dask LocalCluster, or the "
                        "scheduler at --address")
    p.add_argument("--workers", type=_positive_int, default=None,
                   help="worker processes (default: one per usable core, at most one per "
                        "machine)")
    p.add_argument("--address", default=None,
                   help="Dask scheduler of a running cluster, e.g. tcp://10.0.0.5:8786; its "
                        "workers must see the recordings under the same paths (default: a "
                        "new LocalCluster)")
    p.add_argument("--shared-storage", action="store_true",
                   help="with --address: the workers also see the model folders under the "
                        "same paths (a shared filesystem), so they read and write them "
                        "themselves instead of sending them through the driver")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="torch/BLAS threads per worker")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N, in the workers")
    _json_option(p)
    _global_options(p, top=False)


def _fleet_arguments(p: argparse.ArgumentParser) -> None:
    fsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = fsub.add_parser("train", help="train one model per machine: MODELS/<machine>/",
                        description="train one model per machine: MODELS/<machine>/ "
                                    "(the layout `serve --models` reads)")
    _fleet_common(t)
    t.add_argument("--out", type=Path, required=True, metavar="MODELS",
                   help="folder of model folders, one per machine")
    t.add_argument("--model", default=None, help="model name (default: the default model)")
    t.add_argument("--epochs", type=_positive_int, default=None,
                   help="training epochs (default: the model's)")
    t.add_argument("--seed", type=int, default=0, help="random seed (same seed, same models)")
    _threshold_option(t, "the model's registered rule, gumbel:0.03 for clip-ensemble, "
                         "else mean+2std")
    t.add_argument("--precision", default=None, choices=["fp32", "bf16", "auto"],
                   help="training precision (default: the model's: auto for seed-conv-ae, "
                        "else fp32)")
    _force_option(t, "machine model folders")
    s = fsub.add_parser("score", help="score every machine's test recordings into one table",
                        description="score every machine's test recordings with its model "
                                    "into one table (CSV or Parquet)")
    _fleet_common(s)
    s.add_argument("--models", type=Path, required=True,
                   help="folder of model folders written by `fleet train`")
    s.add_argument("--out", type=Path, required=True,
                   help="score table to write: .csv or .parquet, one row per recording")
    _force_option(s, "score table")


@command("fleet", "train or score one model per machine of a MIMII/DCASE tree, in parallel",
         _fleet_arguments)
def _cmd_fleet(args: argparse.Namespace) -> int:
    from stethoscope import fleet

    found = fleet.find_machines(args.root)
    if found.ignored:
        _say(f"ignoring {len(found.ignored)} recording(s) under {args.root} whose path names "
             f"no machine (first: {found.ignored[0]})")
    _say(f"{len(found.machines)} machine(s) under {args.root}, engine {args.engine}")
    options = {"engine": args.engine, "workers": args.workers, "address": args.address,
               "threads": args.threads, "force": args.force,
               "shared_files": True if args.shared_storage else None}
    if args.action == "train":
        return _fleet_train(args, found, options)
    return _fleet_score(args, found, options)


def _fleet_train(args: argparse.Namespace, found, options: dict) -> int:
    from stethoscope import fleet

    settings = {"model": _check_model_name(args.model), "epochs": args.epochs,
                "seed": args.seed, "threshold": args.threshold, "device": args.device,
                "precision": args.precision}
    _threshold_rule(args.threshold)
    _resolve_device(args.device)
    results = fleet.train_fleet(found, args.out, settings=settings, **options)
    failed = [r for r in results if not r.ok]
    if args.json:
        _print_json({"models": args.out, "engine": args.engine,
                     "machines": [r.summary() for r in results],
                     "failed": [r.machine for r in failed]})
    else:
        print(fleet.format_train_table(results))
        print(f"{len(results) - len(failed)} of {len(results)} machine models written "
              f"under {args.out}")
    for r in failed:
        print(_error_line(f"{r.machine}: {r.error}"), file=sys.stderr)
    return EXIT_ERROR if failed else EXIT_OK


def _fleet_score(args: argparse.Namespace, found, options: dict) -> int:
    from stethoscope import fleet

    _resolve_device(args.device)
    rows, results = fleet.score_fleet(found, args.models, args.out, device=args.device,
                                      **options)
    failed = [r for r in results if not r.ok]
    unscored = [row for r in results if r.ok for row in r.rows if row["error"] is not None]
    if args.json:
        _print_json({"table": args.out, "recordings": len(rows),
                     "machines": [r.summary() for r in results],
                     "failed": [r.machine for r in failed]})
    else:
        print(fleet.format_score_table(results))
        print(f"scores of {len(rows)} recording(s) written to {args.out}")
    for r in failed:
        print(_error_line(f"{r.machine}: {r.error}"), file=sys.stderr)
    for row in unscored:
        print(_error_line(f"{row['machine']}: {row['error']}"), file=sys.stderr)
    return EXIT_ERROR if failed or unscored else EXIT_OK


# ----------------------------------------------------------------------------- main
def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one stderr line each, not Python's two-line source echo."""
    try:
        print(f"stethoscope: warning: {' '.join(str(message).split())}", file=sys.stderr)
    except (OSError, ValueError):
        pass


def _describe_error(err: BaseException) -> str:
    """One line for any exception: the user's problem, or what went wrong inside."""
    if isinstance(err, StethoscopeError):
        return str(err)
    if isinstance(err, MemoryError) or "can't allocate memory" in str(err) or (
            isinstance(err, RuntimeError) and "out of memory" in str(err).lower()):
        return ("out of memory; use fewer or shorter recordings, a smaller --batch-size, or "
                "a machine with more memory")
    if isinstance(err, OSError):
        where = ": ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
        reason = err.strerror or str(err)
        return f"{where}: {reason}" if where else reason
    if isinstance(err, ValueError | argparse.ArgumentTypeError):
        return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return (f"internal error: {type(err).__name__}{': ' + first if first else ''} "
            "(run with --debug for the traceback)")


class _StderrHandler(logging.Handler):
    """Log records as ``stethoscope: warning: ...`` lines on the current stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = " ".join(record.getMessage().split())
            print(f"stethoscope: {record.levelname.lower()}: {message}", file=sys.stderr)
        except (OSError, ValueError):
            pass


def _route_logs(debug: bool) -> None:
    logger = logging.getLogger("stethoscope")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler())
        logger.propagate = False
    logger.setLevel(logging.DEBUG if debug else logging.WARNING)


def _silence_stdout() -> None:
    """The reader of stdout went away (``| head``): drop what is left to write."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 anomaly found by `score`, 2 error)."""
    from stethoscope.atomic import clean_stale_scratch
    from stethoscope.progress import set_quiet
    from stethoscope.runtime import keep_freed_memory

    args = build_parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    set_quiet(bool(getattr(args, "quiet", False)))
    warnings.showwarning = _one_line_warning
    _route_logs(debug)
    keep_freed_memory()
    clean_stale_scratch()
    try:
        code = _runner(args.command)(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("stethoscope: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # every error: one line, exit 2 (the traceback with --debug)
        if debug:
            traceback.print_exc()
        try:
            print(_error_line(_describe_error(err)), file=sys.stderr)
        except (OSError, ValueError):
            pass
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
