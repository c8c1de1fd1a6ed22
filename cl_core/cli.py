"""Command line: `python -m cl_core model prepare | demo | experiment run|report|plots`."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cl_core", description="Continual learning for LLMs served by vLLM.")
    sub = parser.add_subparsers(dest="command", required=True)
    model = sub.add_parser("model", help="manage the embedded default model")
    model_sub = model.add_subparsers(dest="action", required=True)
    prepare = model_sub.add_parser("prepare", help="fetch, convert and verify SmolLM2-135M-Instruct (idempotent)")
    prepare.add_argument("--force", action="store_true", help="convert again even if already prepared")
    demo = sub.add_parser("demo", help="correct a wrong answer live and show that nothing else was forgotten")
    demo.add_argument("--serving-mode", choices=["lora", "merged"], default="lora")
    from cl_core.research.runner import add_parser as add_experiment_parser

    add_experiment_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    if args.command == "model":
        from cl_core.models import default_model_dir, is_prepared, prepare_default_model

        was_ready = is_prepared(default_model_dir()) and not args.force
        path = prepare_default_model(force=args.force)
        print(f"default model {'ready' if was_ready else 'prepared'}: {path}")
        return 0
    if args.command == "demo":
        from cl_core.config import ContinualConfig
        from cl_core.demo import run_demo

        result = run_demo(ContinualConfig(serving_mode=args.serving_mode, max_model_len=1024))
        if not result.correction_stuck:
            return 1
        return 0 if result.retention_kept else 2
    if args.command == "experiment":
        from cl_core.errors import ContinualError
        from cl_core.research.runner import main as experiment_main

        try:
            return experiment_main(args)
        except ContinualError as exc:  # bad input: say what and how to fix it, no traceback
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
