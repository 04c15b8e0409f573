"""``python -m diffusion.convert``: the command line and `convert` (any source -> a workdir)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

import numpy as np

from diffusion import io
from diffusion.convert.common import (
    BASES,
    ConversionError,
    _flat,
)
from diffusion.convert.diffusers import DIFFUSERS_WEIGHTS, load_diffusers
from diffusion.convert.tf import load_tf
from diffusion.convert.workdir import write_workdir


def _detect_source(path: str) -> str:
    if io.isdir(path) and io.isfile(io.join(path, DIFFUSERS_WEIGHTS)):
        return "diffusers"
    return "tf"


def convert(
    input_path: str, workdir: str, *, source: str = "auto", base: Optional[str] = None, **tf_kwargs
) -> dict:
    """Converts ``input_path`` into ``workdir`` (local or ``gs://...``); returns the report dict
    (also written to ``<workdir>/convert_report.json``).

    ``workdir`` is checked first (`diffusion.io.probe_writable`: a missing bucket or missing
    permissions is a `diffusion.io.StorageError` naming the fix, before any weight is read).
    """
    io.probe_writable(workdir, what="--workdir")
    source = _detect_source(input_path) if source == "auto" else source
    if source == "diffusers":
        if tf_kwargs.get("image_size") is not None:
            raise ValueError("--image_size is for TF checkpoints (diffusers has sample_size)")
        config, params, ema, step, report = load_diffusers(input_path, base)
    elif source == "tf":
        config, params, ema, step, report = load_tf(input_path, base, **tf_kwargs)
    else:
        raise ValueError(f"source={source!r}: use 'tf', 'diffusers' or 'auto'")
    n = sum(int(np.prod(a.shape)) for a in _flat(params).values())
    report.update(
        num_params=n,
        model={
            k: (list(v) if isinstance(v, tuple) else v) for k, v in config.model.to_dict().items()
        },
        image_size=config.data.image_size,
        dataset=config.data.dataset,
        workdir=io.absolute(workdir),
    )
    report["checkpoint_dir"] = write_workdir(workdir, config, params, ema, step, report)
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line (``python -m diffusion.convert --help``); returns the exit status.

    0: converted. 2: the input or the workdir is wrong (missing, truncated or corrupt files,
    weights that do not fit, an existing or unwritable workdir): ``error: ...`` on stderr
    naming the file and the fix. 1: any other error, as one line ``error: <type>: <text>``
    (``--traceback`` re-raises it instead).
    """
    p = argparse.ArgumentParser(
        prog="python -m diffusion.convert",
        description="Convert released DDPM weights (the authors' TF1 checkpoints or the diffusers "
        "format) into a workdir checkpoint for launch.py --mode sample/evaluate.",
    )
    p.add_argument(
        "--input",
        required=True,
        help="TF: checkpoint prefix (model.ckpt-790000) or its folder; diffusers: the "
        "folder with config.json + diffusion_pytorch_model.safetensors",
    )
    p.add_argument("--workdir", required=True, help="new workdir to write")
    p.add_argument("--source", default="auto", choices=["auto", "tf", "diffusers"])
    p.add_argument(
        "--base",
        default=None,
        help=f"base experiment ({', '.join(BASES)}) or a config .py; default from the "
        "image size (32: cifar10, 256: celebahq256)",
    )
    p.add_argument("--scope", default=None, help="TF: variable scope of the model (auto: 'model')")
    p.add_argument(
        "--image_size",
        type=int,
        default=None,
        help="TF: image size (default: the base experiment's)",
    )
    p.add_argument(
        "--allow-missing-ema",
        action="store_true",
        help="TF: without EMA variables, use the raw weights for ema_params too",
    )
    p.add_argument(
        "--ignore",
        action="append",
        default=[],
        help="TF: regex of checkpoint variables not to convert (repeatable)",
    )
    p.add_argument(
        "--traceback",
        action="store_true",
        help="on an unexpected error, show the traceback instead of the one-line message",
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # quiet Orbax's INFO
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    kw = {}
    if a.source != "diffusers" and _detect_source(a.input) == "tf":
        kw = dict(
            scope=a.scope,
            image_size=a.image_size,
            allow_missing_ema=a.allow_missing_ema,
            ignore=a.ignore,
        )
    try:
        report = convert(a.input, a.workdir, source=a.source, base=a.base, **kw)
    except (ConversionError, FileNotFoundError, FileExistsError, io.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # anything else: one line, not a traceback (unless asked for)
        if a.traceback:
            raise
        print(
            f"error: {type(e).__name__}: {' '.join(str(e).split())} (rerun with --traceback "
            "to see where)",
            file=sys.stderr,
        )
        return 1
    print(
        f"Converted {report['num_params']:,} parameters ({report['source']}, step "
        f"{report['step']}; {report['ema']}) into {report['checkpoint_dir']}"
    )
    if report.get("not_converted"):
        print(
            f"Not converted (optimizer/bookkeeping): {len(report['not_converted'])} variables, "
            "listed in convert_report.json"
        )
    wd = report["workdir"]
    cfg = f"{wd}/config.py"
    if io.is_remote(wd):  # launch.py --config loads a local file
        cfg = "config.py"
        print(
            f"Config:   gcloud storage cp {wd}/config.py {cfg}   (launch.py --config takes a "
            "local file; the copy reads config.json from the workdir)"
        )
    print(f"Sample:   python launch.py --config {cfg} --workdir {wd} --mode sample")
    print(f"Evaluate: python launch.py --config {cfg} --workdir {wd} --mode evaluate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
