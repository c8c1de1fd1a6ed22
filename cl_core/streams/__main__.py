"""`python -m cl_core.streams list | build ...`: the task-stream stage of the research pipeline."""

from __future__ import annotations

import argparse
import sys

from cl_core.errors import ContinualError
from cl_core.streams.registry import DEFAULT_SEQUENCE, available_tasks, build_stream, save_stream


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cl_core.streams", description="Build task streams.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="print the known task names (the default sequence is marked with *)")
    build = sub.add_parser("build", help="build a stream of tasks and write it to a JSON file")
    build.add_argument("--tasks", default=",".join(DEFAULT_SEQUENCE),
                       help="comma-separated task names, in training order (default: the default sequence)")
    build.add_argument("--n-train", type=int, default=200, help="train examples per task")
    build.add_argument("--n-test", type=int, default=50, help="test examples per task")
    build.add_argument("--seed", type=int, default=0, help="seed of the splits (and of generated tasks)")
    build.add_argument("--out", required=True, help="output JSON file (written atomically)")
    args = parser.parse_args(argv)

    if args.command == "list":
        for name in available_tasks():
            print(("* " if name in DEFAULT_SEQUENCE else "  ") + name)
        return 0
    names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    try:
        tasks = build_stream(names, n_train=args.n_train, n_test=args.n_test, seed=args.seed)
    except ContinualError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    path = save_stream(tasks, args.out, n_train=args.n_train, n_test=args.n_test, seed=args.seed)
    for task in tasks:
        print(f"{task.name}: {len(task.train)} train, {len(task.test)} test, {len(task.labels)} labels, "
              f"scoring={task.scoring}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
