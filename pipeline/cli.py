"""`qpipe` command line: run, validate, recipes (and the stage-level subcommands)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.run_context import LOGGER_NAME

log = logging.getLogger(LOGGER_NAME)


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe name from recipes/ or a path to a YAML file")
    parser.add_argument("--model", help="hub id or local model directory (overrides model.id)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a recipe field (repeatable), e.g. quantize.group_size=64")
    parser.add_argument("--output", type=Path, help="artifacts root (overrides export.output_dir)")


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.recipe import load_recipe
    from pipeline.runner import parse_steps, run_pipeline
    from pipeline.summary import print_summary
    from pipeline.validate import validate_recipe

    recipe, path = load_recipe(args.recipe, args.overrides, args.model)
    steps = parse_steps(args.steps)
    validate_recipe(recipe, args.output)
    ctx = run_pipeline(recipe, path, steps, force=args.force, output=args.output)
    print_summary(ctx)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.recipe import load_recipe
    from pipeline.validate import validate_recipe

    recipe, path = load_recipe(args.recipe, args.overrides, args.model)
    facts = validate_recipe(recipe, args.output)
    print(f"{path}: OK ({recipe.quantize.method} {recipe.quantize.scheme}; {'; '.join(facts)})")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from pipeline.recipe import list_recipe_files, load_recipe

    for path in list_recipe_files():
        recipe, _ = load_recipe(str(path))
        print(f"{path.stem:<14} {recipe.quantize.method:<5} {recipe.quantize.scheme:<12} {recipe.description}")
    return 0


def cmd_demo_model(args: argparse.Namespace) -> int:
    from pipeline.demo_model import ensure_demo_model

    print(ensure_demo_model(args.cache))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qpipe", description="Recipe-driven LLM quantization pipeline.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="calibrate -> quantize -> export -> eval -> smoke")
    _add_recipe_args(run)
    run.add_argument("--steps", help="comma list of stages to run (default: all)")
    run.add_argument("--force", action="store_true", help="redo stages even if their fingerprint matches")
    run.set_defaults(func=cmd_run)

    validate = sub.add_parser("validate", help="check a recipe without loading a model")
    _add_recipe_args(validate)
    validate.set_defaults(func=cmd_validate)

    sub.add_parser("recipes", help="list bundled recipes").set_defaults(func=cmd_recipes)

    demo = sub.add_parser("demo-model", help="build (or find) the embedded demo model and print its path")
    demo.add_argument("--cache", type=Path, help="cache root (default: $QPIPE_CACHE or ~/.cache/qpipe)")
    demo.set_defaults(func=cmd_demo_model)
    return parser


def _configure_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("urllib3", "filelock", "datasets", "httpx", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.debug)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except PipelineError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; finished stages are kept and a re-run resumes", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
