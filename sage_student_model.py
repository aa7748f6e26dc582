"""The SAGE student model: `python sage_student_model.py [--preset NAME]` prints a preset's
parameter breakdown, counted without allocating the weights.

The model itself (the student, the probe, their blocks and the dihedral view operations) lives in
sage/model.py; this file is the top-level entry users expect and re-exports its public names, so
`from sage.model import SageStudent, StudentConfig, build_model` keeps working.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

import torch

from sage.model import (
    PREDATING_DEFAULTS,
    PRESETS,
    SageProbe,
    SageStudent,
    StudentConfig,
    StudentOutput,
    build_model,
    parameter_breakdown,
)

__all__ = ["PREDATING_DEFAULTS", "PRESETS", "SageProbe", "SageStudent", "StudentConfig", "StudentOutput",
           "build_model", "parameter_breakdown"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="sage-44m", choices=sorted(PRESETS))
    args = parser.parse_args(argv)
    cfg = PRESETS[args.preset]
    with torch.device("meta"):  # count without allocating
        model = SageStudent(cfg)
    print(f"preset {args.preset}: {asdict(cfg)}")
    counts = parameter_breakdown(model)
    for name, n in counts.items():
        print(f"  {name:<16} {n:>12,}")
    print(f"total parameters: {sum(counts.values()):,}")


if __name__ == "__main__":
    main()
