"""Command line: argument parsing only; every command calls the Python API.

Exit codes: 0 success (``score``: all clips normal), 1 ``score`` found an anomaly,
2 an error (one line on stderr naming the file and the problem), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stethoscope import __version__
from stethoscope.errors import StethoscopeError
from stethoscope.runtime import keep_freed_memory

EXIT_OK, EXIT_ANOMALY, EXIT_ERROR = 0, 1, 2


def _channels(value: str) -> int | str:
    if value in ("mean", "all"):
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError("channel must be an index, 'mean' or 'all'") from None


def _add_feature_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--channels", type=_channels, default=None,
                   help="channel to use: index (default 0), 'mean' or 'all' (as model inputs)")
    p.add_argument("--resample", action="store_true",
                   help="resample recordings whose sample rate differs from the model's")
    p.add_argument("--cache", type=Path, default=None, metavar="DIR",
                   help="memory-mapped feature cache folder (repeat runs skip the WAVs)")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stethoscope",
        description="Listen to machines and say when one sounds wrong.")
    parser.add_argument("--version", action="version", version=f"stethoscope {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a detector on normal recordings")
    p.add_argument("data", nargs="+", help="WAV files, folders, or a .npy feature array")
    p.add_argument("--out", type=Path, required=True, help="model folder to write")
    p.add_argument("--model", default=None, help="model name (see `stethoscope models`)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threshold", default="mean+2std",
                   help="mean+2std (default), p95, gamma[:0.9], value:X")
    p.add_argument("--pooling", default=None, help="mean, max, topk:0.1, p95 (default: model's)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    _add_feature_args(p)

    p = sub.add_parser("score", help="score recordings; exit 1 when any is anomalous")
    p.add_argument("model", type=Path, help="model folder written by `train`")
    p.add_argument("inputs", nargs="+", help="WAV files or folders")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--resample", action="store_true")

    p = sub.add_parser("evaluate", help="evaluate on labelled recordings and write a report")
    p.add_argument("model", type=Path)
    p.add_argument("data", nargs="+", help="labelled WAVs (MIMII or DCASE layout)")
    p.add_argument("--report", type=Path, required=True, metavar="DIR")
    p.add_argument("--resample", action="store_true")

    p = sub.add_parser("demo", help="simulate a machine, train, evaluate, write a report")
    p.add_argument("--out", type=Path, default=Path("stethoscope-demo"))
    p.add_argument("--machine", default="fan", choices=["fan", "pump", "valve", "slider"])
    p.add_argument("--model", default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("simulate", help="write simulated machine recordings (MIMII layout)")
    p.add_argument("--machine", required=True, choices=["fan", "pump", "valve", "slider"])
    p.add_argument("--normal", type=int, default=100)
    p.add_argument("--abnormal", type=int, default=30)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--snr", type=float, default=6.0, help="signal-to-noise ratio in dB")
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--id", dest="machine_id", default="id_00")

    p = sub.add_parser("datasets", help="download public data sets")
    dsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    d = dsub.add_parser("download", help="download and unpack a public data set")
    d.add_argument("name", choices=["mimii", "dcase2020", "dcase2023", "dcase2024"])
    d.add_argument("--machine", default=None)
    d.add_argument("--id", dest="machine_id", default=None)
    d.add_argument("--snr", default=None, help="MIMII SNR: -6, 0 or 6 (dB)")
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--base-url", default=None, help=argparse.SUPPRESS)

    p = sub.add_parser("lab", help="reproduce the course lab on MNIST")
    p.add_argument("experiment", nargs="?", default="all",
                   choices=["cnn-overfit", "dropout", "dense-ae", "conv-ae", "all"])
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--subset", type=int, default=None, help="train on the first N images")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--data", type=Path, default=None, help="mnist.npz or folder of IDX files")
    p.add_argument("--out", type=Path, default=Path("lab-runs"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                   help="bf16/auto: bf16 autocast on CPUs with native bf16 (faster)")

    p = sub.add_parser("encode", help="run only the encoder half of an autoencoder")
    p.add_argument("model", type=Path, help="detector model folder, or a lab run/model folder")
    p.add_argument("inputs", nargs="+", help="recordings (detector) or a .npy of images (lab)")
    p.add_argument("--out", type=Path, required=True, help=".npy file for the codes")

    p = sub.add_parser("decode", help="run only the decoder half on saved codes")
    p.add_argument("model", type=Path)
    p.add_argument("codes", type=Path, help=".npy written by `encode`")
    p.add_argument("--out", type=Path, required=True, help=".npy file for the outputs")

    sub.add_parser("models", help="list the available models")
    return parser


# ----------------------------------------------------------------------------- commands
def _cmd_train(args: argparse.Namespace) -> int:
    from stethoscope.detector import DEFAULT_MODEL, Detector

    features = {"resample": True} if args.resample else {}
    if args.channels is not None:
        features["channels"] = args.channels
    det = Detector(args.model or DEFAULT_MODEL, features=features, threshold=args.threshold,
                   pooling=args.pooling, epochs=args.epochs, batch_size=args.batch_size,
                   lr=args.lr, seed=args.seed, device=args.device, precision=args.precision,
                   cache_dir=args.cache)
    det.fit(args.data)
    det.save(args.out)
    print(f"trained {det.model} on {det.train_scores_.size} clips; "
          f"threshold {det.threshold_.describe()}")
    print(f"model written to {args.out}")
    return EXIT_OK


def _load_detector(path: Path, resample: bool = False):
    from stethoscope.detector import Detector

    det = Detector.load(path)
    if resample:
        det.feature_config_ = det.feature_config_.replace(resample=True)
    return det


def _cmd_score(args: argparse.Namespace) -> int:
    from stethoscope.datasets import find_clips

    det = _load_detector(args.model, args.resample)
    clips = find_clips(args.inputs)
    scores = det.score_samples(clips)
    flags = det.threshold_.predict(scores)
    rows = [{"path": str(c.path), "score": float(s), "anomalous": bool(f)}
            for c, s, f in zip(clips, scores, flags, strict=True)]
    if args.json:
        print(json.dumps({"threshold": det.threshold_.value_, "clips": rows}, indent=2))
    else:
        width = max(len(r["path"]) for r in rows)
        for r in rows:
            verdict = "ANOMALY" if r["anomalous"] else "normal"
            print(f"{r['path']:<{width}}  {r['score']:12.6g}  {verdict}")
        print(f"{int(flags.sum())} of {len(rows)} anomalous "
              f"(threshold {det.threshold_.value_:.6g})")
    return EXIT_ANOMALY if flags.any() else EXIT_OK


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from stethoscope.evaluation import evaluate_detector
    from stethoscope.metrics import format_table

    det = _load_detector(args.model, args.resample)
    result = evaluate_detector(det, args.data, report_dir=args.report)
    print(format_table(result["metrics"]))
    print(f"report written to {args.report / 'index.html'}")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from stethoscope.demo import run_demo

    report = run_demo(args.out, machine=args.machine, model=args.model, epochs=args.epochs,
                      seed=args.seed)
    print(f"demo report: {report}")
    return EXIT_OK


def _cmd_simulate(args: argparse.Namespace) -> int:
    from stethoscope.simulate import simulate_dataset

    out = simulate_dataset(args.machine, args.normal, args.abnormal, args.out,
                           snr_db=args.snr, channels=args.channels, seed=args.seed,
                           machine_id=args.machine_id)
    print(f"wrote {args.normal} normal and {args.abnormal} abnormal clips under {out}")
    return EXIT_OK


def _cmd_datasets(args: argparse.Namespace) -> int:
    from stethoscope.download import dataset_files, download_dataset

    files = dataset_files(args.name, machine=args.machine, snr=args.snr)
    total = sum(f.approx_gb or 0.0 for f in files)
    print(f"{args.name}: {len(files)} archive(s), about {total:.1f} GB: "
          + ", ".join(f.name for f in files), file=sys.stderr)

    out = download_dataset(args.name, machine=args.machine, machine_id=args.machine_id,
                           snr=args.snr, out=args.out, base_url=args.base_url)
    print(f"{args.name} ready under {out}")
    return EXIT_OK


def _cmd_lab(args: argparse.Namespace) -> int:
    from stethoscope.lab import run_lab

    report = run_lab(args.experiment, data=args.data, out=args.out, epochs=args.epochs,
                     subset=args.subset, batch_size=args.batch_size, seed=args.seed,
                     precision=args.precision)
    print(f"lab report: {report}")
    return EXIT_OK


def _is_lab_model(path: Path) -> bool:
    """Lab (MNIST) model folders say kind=lab in config.json; detector folders do not."""
    from stethoscope.storage import load_model

    for folder in (path / "model", path):  # a lab run folder holds its model in model/
        if (folder / "model.safetensors").is_file():
            return load_model(folder)[0].get("kind") == "lab"
    return False


def _cmd_encode(args: argparse.Namespace) -> int:
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


def _cmd_decode(args: argparse.Namespace) -> int:
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


def _cmd_models(args: argparse.Namespace) -> int:
    from stethoscope.detector import DEFAULT_MODEL
    from stethoscope.models import info, names

    for name in names(kind=None):
        mark = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name:<18} {info(name).kind:<8} {info(name).description}{mark}")
    return EXIT_OK


COMMANDS = {
    "train": _cmd_train, "score": _cmd_score, "evaluate": _cmd_evaluate, "demo": _cmd_demo,
    "simulate": _cmd_simulate, "datasets": _cmd_datasets, "lab": _cmd_lab,
    "encode": _cmd_encode, "decode": _cmd_decode, "models": _cmd_models,
}


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 anomaly found by `score`, 2 error)."""
    args = _build_parser().parse_args(argv)
    keep_freed_memory()
    try:
        return COMMANDS[args.command](args)
    except StethoscopeError as err:
        print(f"stethoscope: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except ValueError as err:  # bad option values (unknown model, threshold rule, …)
        print(f"stethoscope: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("stethoscope: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
