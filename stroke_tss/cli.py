"""`stroke-tss VERB ...`: a thin dispatcher over `stroke_tss.commands.<verb>` modules.

Each verb module defines `add_arguments(parser)` and `main(args) -> int`; its docstring's first line is the
help. Verb modules are imported only when their verb runs, so `stroke-tss env` does not pay for torch.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys

from hpc.env import finish_process
from stroke_tss.errors import USER_ERRORS
from stroke_tss.logs import setup_logging

# name -> one-line help; the module is stroke_tss.commands.<name with - as _>
VERBS: dict[str, str] = {
    "demo": "The whole method on a phantom cohort: synth -> prep -> cv (2d, 3d, 2d_scratch) -> report + Grad-CAM.",
    "env": "Print versions and what this machine can run (CUDA, DeepSpeed, Slurm).",
    "config": "Print the resolved config as YAML, or with --schema every key with its type, default and meaning.",
    "scan": "Build a cohort manifest from a BIDS or ISLES'22-style tree.",
    "synth": "Generate a phantom cohort with known ground truth on the MNI152 anatomy.",
    "prep": "Validate a manifest and preprocess it into a chunked Zarr store (Dask).",
    "pretrain": "Models Genesis self-supervised pretraining: one per fold (default) or one for the run, into RUN/genesis/.",
    "train": "Run one fold's phase schedule for each (or one) variant.",
    "adapt": "Search the freezing depth of a transferred model (depths as one array), then train at the best.",
    "cv": "Cross-validate: every fold x variant as one job array (Slurm, local processes or in-process).",
    "collect": "Gather a run folder's finished folds into RUN/summary.json (after cv --no-wait).",
    "sweep": "Sweep a hyperparameter grid: points x folds as one array, points ranked by validation AUC.",
    "report": "Table-2 report, ROC/learning/calibration plots, DeLong, readers and baselines from run folders.",
    "explain": "Grad-CAM / attention maps of one subject: NIfTI on the store's grid, PNG montage, lesion overlap.",
    "predict": "Probability of TSS < 4.5 h (and < 3 h), lesion hemisphere and decision for new subjects.",
    "verify": "Check a store or a run folder end to end: what is damaged, by subject or phase, and what to re-run.",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, like every other user mistake
        self.exit(2, f"{self.prog}: error: {message}\n")


def _version() -> str:
    try:
        return importlib.metadata.version("stroke-tss")
    except importlib.metadata.PackageNotFoundError:  # a source tree on sys.path, never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="stroke-tss", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"stroke-tss {_version()}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    sub.required = True
    for name, help_text in VERBS.items():
        sub.add_parser(name, help=help_text, description=help_text)
    return parser


def _module(verb: str):
    return importlib.import_module(f"stroke_tss.commands.{verb.replace('-', '_')}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # First pass finds the verb (unknown verb: exit 2 here); second pass gives the verb its own arguments.
    verb = parser.parse_known_args(argv[:1] or argv)[0].verb
    module = _module(verb)
    verb_parser = _Parser(prog=f"stroke-tss {verb}", description=VERBS[verb])
    module.add_arguments(verb_parser)
    # intermixed: `train CONFIG --fold 0 key=value` puts overrides after options
    args = verb_parser.parse_intermixed_args(argv[1:])

    setup_logging()
    try:
        code = int(module.main(args) or 0)
    except USER_ERRORS as exc:
        print(f"stroke-tss {verb}: error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print(f"stroke-tss {verb}: interrupted", file=sys.stderr)
        code = 130
    # a rank of a distributed job leaves here, past the interpreter teardown that can abort it (hpc.env)
    return finish_process(code)


if __name__ == "__main__":
    sys.exit(main())
