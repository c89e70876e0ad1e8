"""Model card: model/README.md in Hugging Face form, rendered with Jinja2 from the manifest, recipe and reports.

Sections whose stage did not run say so instead of showing numbers; a failed gate is stated at the top.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jinja2
import yaml

from pipeline.artifact.local_paths import without_local_paths
from pipeline.artifact.verify import CARD_FILE, CARD_STAGE, load_saved_recipe, open_artifact
from pipeline.errors import PipelineError
from pipeline.eval.gate import recovery_ratio, scores
from pipeline.formats import FORMATS, METHOD_NAMES, backend_info
from pipeline.hardware import GPUS, KERNELS, VLLM_COMPRESSED_TENSORS
from pipeline.recipe.schema import Recipe
from pipeline.run.context import RunContext
from pipeline.run.files import format_bytes, sha256_file, write_text_atomic
from pipeline.run.manifest import Manifest, StageRecord, now_iso
from pipeline.vllm import preflight

TEMPLATE = "model_card.md.j2"
WEIGHT_SUFFIXES = (".safetensors", ".bin")
SUMMARY_KEYS = ("alias", "n_samples")
SERVING_REPORT = "reports/serving.json"  # written by `qpipe bench serve`, shown when present
SMOKE_FIGURES = {
    "load_s": "load time (s)",
    "ttft_s": "time to first token (s)",
    "tokens_per_s": "tokens/s",
    "peak_rss_mb": "peak RSS (MiB)",
    "size_bytes": "size on disk",
}


def write_model_card(ctx: RunContext) -> None:
    """Runner hook after the last stage: write model/README.md and record its hash as the `card` record."""
    if not (ctx.model_dir / "config.json").is_file():
        ctx.log.info("card: no exported model, skipped")
        return
    ctx.manifest.stages[CARD_STAGE] = write_card(ctx.run_dir, ctx.manifest, ctx.recipe)
    ctx.save_manifest()
    ctx.log.info("card: wrote %s", ctx.model_dir / CARD_FILE)


def refresh_card(run_dir: Path) -> Path:
    """Re-render the card of an existing run directory (`qpipe card`) and update its manifest record."""
    artifact = open_artifact(run_dir)
    if artifact.published:
        raise PipelineError(f"{run_dir}: a published folder has no reports to render; pass the run directory")
    if not (artifact.model_dir / "config.json").is_file():
        raise PipelineError(f"{run_dir}: model/ has no config.json; run the export stage first")
    recipe = load_saved_recipe(run_dir / "recipe.yaml")
    artifact.manifest.stages[CARD_STAGE] = write_card(run_dir, artifact.manifest, recipe)
    artifact.manifest.save(artifact.manifest_path)
    return artifact.model_dir / CARD_FILE


def write_card(run_dir: Path, manifest: Manifest, recipe: Recipe) -> StageRecord:
    """Render and atomically write the card; the returned record carries its sha256 for `verify`."""
    started, start = now_iso(), time.perf_counter()
    path = run_dir / "model" / CARD_FILE
    write_text_atomic(path, render_card(run_dir, manifest, recipe))
    return StageRecord(
        status="done",
        started=started,
        wall_s=round(time.perf_counter() - start, 3),
        outputs={"path": f"model/{CARD_FILE}", "sha256": sha256_file(path), "size": path.stat().st_size},
    )


def render_card(run_dir: Path, manifest: Manifest, recipe: Recipe) -> str:
    """The card's Markdown from templates/model_card.md.j2 (strict: a missing field is an error, not blank), with
    absolute local paths shortened: the card is written to be published."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("pipeline.artifact", "templates"),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(num=fmt_number, score=fmt_score, pct=fmt_percent, size=fmt_size, cell=fmt_cell)
    return without_local_paths(env.get_template(TEMPLATE).render(card_context(run_dir, manifest, recipe)))


def card_context(run_dir: Path, manifest: Manifest, recipe: Recipe) -> dict[str, Any]:
    """Everything the template shows, gathered from the run directory."""
    config = json.loads((run_dir / "model" / "config.json").read_text(encoding="utf-8"))
    base = base_model(manifest)
    export = manifest.stages.get("export")
    return {
        "title": f"{base['name']}-{recipe.quantize.scheme}",
        "front_matter": front_matter(base, recipe),
        "gate": manifest.gate,
        "base": base,
        "recipe": recipe,
        "recipe_hash": manifest.recipe_hash,
        "quant": quantization_section(recipe, config.get("quantization_config") or {}),
        "calibration": calibration_section(recipe, manifest.stages.get("calibrate")),
        "eval": eval_section(run_dir, manifest),
        "smoke": smoke_section(run_dir, manifest),
        "serving": serving_section(run_dir),
        "needs": serving_needs(run_dir / "model"),
        "size": size_section(manifest, base),
        "versions": export.versions if export else {},
        "command": reproduce_command(manifest.command),
    }


def base_model(manifest: Manifest) -> dict[str, Any]:
    """Identity of the unquantized model, and its license when its own card states one."""
    model = manifest.model
    identity = str(model.get("identity", "unknown"))
    path = Path(model["path"]) if model.get("path") else None
    return {
        "identity": identity,
        "name": identity.rstrip("/").rsplit("/", 1)[-1],
        "kind": model.get("kind"),
        "revision": model.get("revision"),
        "hub_id": identity if model.get("kind") == "hub" else None,
        "path": path,
        "license": base_license(path),
    }


def base_license(path: Path | None) -> str | None:
    """The `license:` of the base model's README front matter, if it has one."""
    if path is None or not (path / "README.md").is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(path / "README.md", ignore_metadata_errors=True).data.license
    except (ValueError, yaml.YAMLError):  # a malformed base card only costs the license line
        return None


def front_matter(base: dict[str, Any], recipe: Recipe) -> str:
    """The card's YAML metadata, serialised by huggingface_hub."""
    from huggingface_hub import ModelCardData

    spec = recipe.quantize
    fmt = backend_info(spec.backend).output_format(spec.method).name
    tags = [fmt, spec.scheme.lower(), spec.method, "quantized", "vllm", "qpipe"]
    if spec.smoothquant_strength is not None:
        tags.append("smoothquant")
    extra = {"base_model": base["hub_id"], "base_model_relation": "quantized"} if base["hub_id"] else {}
    data = ModelCardData(
        library_name="transformers",
        license=base["license"],
        pipeline_tag="text-generation",
        tags=tags,
        **extra,
    )
    return data.to_yaml()


def describe_args(args: dict[str, Any] | None, activations: bool = False) -> str:
    """compressed-tensors quantization args in words, e.g. "int4, symmetric, per group of 128"."""
    if not args:
        return "not quantized (16-bit)"
    parts = [f"{args.get('type')}{args.get('num_bits')}", "symmetric" if args.get("symmetric") else "asymmetric"]
    strategy = args.get("strategy")
    parts.append(f"per group of {args.get('group_size')}" if strategy == "group" else f"per {strategy}")
    if activations:
        parts.append("dynamic (computed at run time)" if args.get("dynamic") else "static (calibrated scales)")
    return ", ".join(parts)


def native_weight_args(qc: dict[str, Any]) -> dict[str, Any]:
    """A native GPTQ/AWQ quantization_config as compressed-tensors-style weight args (AWQ: zero_point)."""
    symmetric = not qc["zero_point"] if "zero_point" in qc else qc.get("sym")
    return {"type": "int", "num_bits": qc.get("bits"), "symmetric": symmetric, "strategy": "group", **qc}


def quantization_section(recipe: Recipe, qc: dict[str, Any]) -> dict[str, Any]:
    """Method and scheme from the recipe; weight/activation details as written in config.json."""
    spec = recipe.quantize
    fmt = qc.get("quant_method")
    group = next(iter((qc.get("config_groups") or {}).values()), {})
    known = FORMATS.get(fmt)
    if known is not None and known.native:
        group = {"weights": native_weight_args(qc)}
    return {
        "method": METHOD_NAMES.get(spec.method, spec.method),
        "scheme": spec.scheme,
        "smoothquant": spec.smoothquant_strength,
        "gptq": {"actorder": spec.actorder, "dampening_frac": spec.dampening_frac} if spec.method == "gptq" else None,
        "weights": describe_args(group.get("weights")),
        "activations": describe_args(group.get("input_activations"), activations=True),
        "group_size": (group.get("weights") or {}).get("group_size"),
        "format_name": fmt,
        "transformers_needs": known.transformers_needs if known else f"the `{fmt}` integration",
        "targets": spec.targets,
        "ignore": spec.ignore,
        "format": f"{qc.get('quant_method')} ({qc.get('format') or 'default'})",
    }


def calibration_section(recipe: Recipe, record: StageRecord | None) -> dict[str, Any]:
    """Calibration set, N x length and seed; or why no calibration data was used."""
    if record is None or record.status != "done":
        reason = (record.note if record else None) or "the calibrate stage did not run"
        return {"used": False, "reason": reason}
    spec = recipe.calibrate
    return {
        "used": True,
        "dataset": spec.dataset,
        "subset": spec.subset,
        "split": spec.split,
        "samples": record.outputs.get("samples", spec.num_samples),
        "max_seq_length": spec.max_seq_length,
        "tokens": record.outputs.get("tokens"),
        "seed": spec.seed,
        "chat_template": record.outputs.get("chat_template"),
    }


def stage_report(run_dir: Path, manifest: Manifest, stage: str, report: str) -> tuple[dict[str, Any] | None, str]:
    """A stage's report, or None and why it is absent (the card states the reason instead of numbers)."""
    record = manifest.stages.get(stage)
    if record is None:
        return None, f"The {stage} stage did not run for this artifact."
    if record.status != "done":
        note = f" ({record.note})" if record.note else ""
        return None, f"No {stage} results: the stage's status is {record.status}{note}."
    path = run_dir / report
    if not path.is_file():
        return None, f"The {stage} stage finished but {report} is missing."
    return json.loads(path.read_text(encoding="utf-8")), ""


def stderr_key(metric: str) -> str:
    """Summary key of a metric's stderr: "acc" -> "acc_stderr", "acc,flex" -> "acc_stderr,flex"."""
    name, sep, filt = metric.partition(",")
    return f"{name}_stderr{sep}{filt}"


def metric_rows(baseline: dict[str, Any], quantized: dict[str, Any]) -> list[dict[str, Any]]:
    """Every metric of every task and group: baseline and quantized with stderr, and recovery."""
    base, quant = scores(baseline), scores(quantized)
    rows = []
    for name in [*quantized.get("groups", {}), *quantized.get("tasks", {})]:
        for metric, value in quant[name].items():
            if metric in SUMMARY_KEYS or "_stderr" in metric or value is None:
                continue
            stderr = stderr_key(metric)
            reference = base.get(name, {}).get(metric)
            rows.append(
                {
                    "task": name,
                    "metric": metric,
                    "baseline": reference,
                    "baseline_stderr": base.get(name, {}).get(stderr),
                    "quantized": value,
                    "quantized_stderr": quant[name].get(stderr),
                    "recovery": None if reference is None else recovery_ratio(reference, value),
                }
            )
    return rows


def eval_section(run_dir: Path, manifest: Manifest) -> dict[str, Any]:
    """Gate checks, every metric, fidelity and settings from reports/eval.json."""
    report, reason = stage_report(run_dir, manifest, "eval", "reports/eval.json")
    if report is None:
        return {"ran": False, "reason": reason}
    return {
        "ran": True,
        "gate": report.get("gate"),
        "min_recovery": report.get("min_recovery"),
        "min_scores": report.get("min_scores") or {},
        "checks": report.get("checks", []),
        "paired": report.get("paired", []),
        "token": report.get("token"),
        "failed": [c for c in report.get("checks", []) if not c.get("passed")],
        "rows": metric_rows(report["baseline"], report["quantized"]),
        "fidelity": report.get("fidelity"),
        "settings": report.get("settings", {}),
        "data": report.get("data", {}),
        "lm_eval": report["quantized"].get("lm_eval_version"),
    }


def smoke_section(run_dir: Path, manifest: Manifest) -> dict[str, Any]:
    """Figures of reports/smoke.json: quantized vs base model in vLLM, with the ratios and detected method."""
    report, reason = stage_report(run_dir, manifest, "smoke", "reports/smoke.json")
    if report is None:
        return {"ran": False, "reason": reason}
    ratios = report.get("ratios") or {}
    baseline = report.get("baseline") if ratios else {}
    rows = [
        {
            "figure": SMOKE_FIGURES.get(key, key),
            "bytes": key.endswith("_bytes"),
            "quantized": value,
            "baseline": baseline.get(key),
            "ratio": ratios.get(key),
        }
        for key, value in (report.get("quantized") or {}).items()
        if value is None or isinstance(value, (int, float))
    ]
    return {
        "ran": True,
        "status": report.get("status"),
        "method": report.get("vllm_method"),
        "token_agreement": report.get("token_agreement"),
        "compared": bool(ratios),
        "rows": rows,
        "problems": report.get("problems") or [],
    }


def serving_section(run_dir: Path) -> str | None:
    """The serving table of reports/serving.json (`qpipe bench serve` on a GPU), or None when not measured."""
    path = run_dir / SERVING_REPORT
    return serving_table(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None


def serving_needs(model_dir: Path) -> dict[str, Any]:
    """The minimum vLLM version and the GPUs of qpipe's table that serve the artifact, by `qpipe preflight`'s
    rules: compute capability per GPU, and the largest max_model_len at vLLM's default GPU share."""
    artifact = preflight.read_artifact(model_dir)
    gpus = []
    for gpu in GPUS.values():
        compute = preflight.compute_rule(artifact.quantization, gpu)
        if compute.status == "fail":
            continue
        plan = preflight.memory_plan(artifact, gpu, preflight.DEFAULT_UTILIZATION)
        largest = min(plan.largest_context, artifact.max_positions or plan.largest_context)
        gpus.append({"gpu": gpu, "fallback": compute.status == "warn", "largest": largest})
    kernels = [KERNELS[k] for k in preflight.layer_kernels(artifact.quantization) if k is not None]
    return {
        "min_vllm": preflight.minimum_vllm_text(artifact.quantization),
        "oldest_vllm": min(VLLM_COMPRESSED_TENSORS, key=preflight.Version),
        "kernels": kernels,
        "gpus": gpus,
        "max_positions": artifact.max_positions,
        "utilization": preflight.DEFAULT_UTILIZATION,
        "allowance": preflight.ALLOWANCE_BYTES,
    }


def size_section(manifest: Manifest, base: dict[str, Any]) -> dict[str, Any]:
    """Size of the quantized weights folder, and of the base model's weights when its folder is here."""
    export = manifest.stages.get("export")
    quantized = export.outputs.get("size_bytes") if export else None
    path = base["path"]
    baseline = None
    if path is not None and path.is_dir():
        baseline = sum(p.stat().st_size for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES) or None
    ratio = quantized / baseline if quantized and baseline else None
    return {"quantized": quantized, "baseline": baseline, "ratio": ratio}


def reproduce_command(command: str) -> str:
    """The recorded command line with the interpreter's absolute path to the script shortened to its name."""
    program, _, rest = command.partition(" ")
    return f"{Path(program).name} {rest}".strip()


def fmt_number(value: Any) -> str:
    """4 significant digits, thousands separated; non-numbers as they are."""
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def fmt_score(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def fmt_percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def fmt_size(num: float | None) -> str:
    return format_bytes(num) if num else "n/a"


def fmt_cell(value: Any) -> str:
    """A value safe inside a Markdown table cell."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def fmt_figure(value: Any, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def serving_row(run: dict[str, Any], levels: list[int]) -> list[str]:
    """The cells of one run of `qpipe bench serve`."""
    name = run["label"] + "".join(f" without {k}" for k in run["disabled_kernels"])
    if run["status"] != "ok":
        return [name, f"{run['status']}: {fmt_cell(run.get('error'))}", *[""] * (6 + len(levels))]
    bound = run["decode_bound"]
    decode = fmt_figure(run["decode_tokens_per_s"])
    if bound:
        decode += f" ({fmt_figure(bound['tokens_per_s'])}, {run['decode_of_bound']:.0%})"
    sweep = {s["requests"]: s["output_tokens_per_s"] for s in run["sweep"]}
    return [
        name,
        ", ".join(run["kernels"]) or "–",
        fmt_figure(run["load_s"]),
        fmt_figure(run["weights_gib"], 2),
        fmt_figure(run["kv_cache_tokens"], 0),
        fmt_figure(run["max_concurrency"]),
        fmt_figure(run["ttft_s"] * 1000),
        decode,
        *(fmt_figure(sweep.get(n)) for n in levels),
    ]


def serving_table(report: dict[str, Any]) -> str:
    """Markdown for a `qpipe bench serve` report: one row per run, output throughput per concurrency last."""
    settings = report["settings"]
    levels = settings["concurrency"]
    head = ["model", "kernels", "load s", "weights GiB", "KV cache tokens", "max seqs", "TTFT ms"]
    head += ["decode tok/s (bound, share)", *(f"out tok/s @{n}" for n in levels)]
    rows = [head, ["---"] * len(head), *(serving_row(run, levels) for run in report["runs"])]
    device = next((r["device"] for r in report["runs"] if r.get("device")), "unknown device")
    return (
        f"Serving in vLLM on {device}: {settings['prompt_tokens']} prompt + {settings['output_tokens']} output "
        f"tokens per request (`ignore_eos`), max_model_len {settings['max_model_len']}, CUDA graphs.\n\n"
        + "\n".join(f"| {' | '.join(row)} |" for row in rows)
        + "\n"
    )
