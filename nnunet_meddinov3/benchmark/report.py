"""The results: ratios between entries, the environment, the JSON report and the table."""
from __future__ import annotations

import json
import os
import platform

import torch

from nnunet_meddinov3.benchmark.configs import BASELINE, OURS, REFERENCE, patch_label
from nnunet_meddinov3.durable_files import write_atomically


def _ratio(numerator, denominator):
    return numerator / denominator if numerator is not None and denominator else None


def _patch_key(patch_size):
    """A result's patch as a dict key: an int, or a tuple for a 3D patch (a list once through JSON)."""
    return patch_size if isinstance(patch_size, int) else tuple(patch_size)


def add_baseline_ratios(results: list[dict]) -> None:
    """Each MedDINOv3Net or reference entry gets throughput, step time and memory ratios to the baseline
    of its patch/batch/device/dtype (a 3D patch's baseline is nnU-Net's 3d_fullres network)."""
    def key(r):
        c = r["config"]
        return _patch_key(c["patch_size"]), c["batch_size"], c["device"], c["dtype"]

    baselines = {key(r): r for r in results if r["config"]["network"] == BASELINE}
    for r in results:
        base = baselines.get(key(r))
        if r["config"]["network"] == BASELINE or base is None:
            continue
        ratios = {}
        for phase in ("training", "inference"):
            ours, theirs = r.get(phase, {}), base.get(phase, {})
            ratios[f"{phase}_throughput"] = _ratio(ours.get("images_per_s"), theirs.get("images_per_s"))
            ratios[f"{phase}_step_time"] = _ratio(ours.get("median_step_s"), theirs.get("median_step_s"))
            ratios[f"{phase}_memory"] = _ratio(ours.get("peak_memory_bytes"), theirs.get("peak_memory_bytes"))
        r["ratios_to_baseline"] = ratios


def add_reference_ratios(results: list[dict]) -> None:
    """Each of our entries with a reference entry of the same encoder, decoder, patch, batch and device
    gets ``ratios_to_reference``, ours / the reference's: throughput (>1: ours faster), training step
    time (<1: ours faster) and peak memory (>1: ours uses more)."""
    def key(r):
        c = r["config"]
        return c["encoder"], c["decoder"], _patch_key(c["patch_size"]), c["batch_size"], c["device"]

    references = {key(r): r for r in results if r["config"]["network"] == REFERENCE}
    for r in results:
        reference = references.get(key(r))
        if r["config"]["network"] != OURS or reference is None:
            continue
        ours, theirs = {p: r.get(p, {}) for p in ("training", "inference")}, \
            {p: reference.get(p, {}) for p in ("training", "inference")}
        r["ratios_to_reference"] = {
            "training_throughput": _ratio(ours["training"].get("images_per_s"),
                                          theirs["training"].get("images_per_s")),
            "training_step_time": _ratio(ours["training"].get("median_step_s"),
                                         theirs["training"].get("median_step_s")),
            "training_memory": _ratio(ours["training"].get("peak_memory_bytes"),
                                      theirs["training"].get("peak_memory_bytes")),
            "inference_throughput": _ratio(ours["inference"].get("images_per_s"),
                                           theirs["inference"].get("images_per_s")),
            "inference_memory": _ratio(ours["inference"].get("peak_memory_bytes"),
                                       theirs["inference"].get("peak_memory_bytes")),
        }


def environment(device: str) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_threads": torch.get_num_threads()}
    for module in ("timm", "nnunetv2"):
        try:
            info[module] = __import__(module).__version__
        except (ImportError, AttributeError):
            pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def write_report(path: str | os.PathLike, results: list[dict], meta: dict) -> None:
    """Write the JSON report; replaced in one step, so a run killed mid-write leaves the last one."""
    text = json.dumps({"meta": meta, "results": results}, indent=2)
    write_atomically(os.path.abspath(path), lambda f: f.write(text.encode()))


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def format_table(results: list[dict]) -> str:
    header = ("network", "patch", "bs", "train img/s", "x nnU", "x ref", "train MiB", "x nnU", "infer img/s",
              "x nnU", "infer MiB", "x nnU", "GFLOP/img", "MFU train")
    rows = []
    for r in results:
        c = r["config"]
        train, infer = r.get("training", {}), r.get("inference", {})
        ratios = r.get("ratios_to_baseline", {})
        flops = train.get("flops_per_step")
        mib = 1024 ** 2
        rows.append((
            r["label"], patch_label(c["patch_size"]), str(c["batch_size"]),
            _fmt(train.get("images_per_s"), ".2f", "ERR" if "error" in train else "-"),
            _fmt(ratios.get("training_throughput"), ".2f"),
            _fmt(r.get("ratios_to_reference", {}).get("training_throughput"), ".2f"),
            _fmt(None if train.get("peak_memory_bytes") is None else train["peak_memory_bytes"] / mib, ".0f"),
            _fmt(ratios.get("training_memory"), ".2f"),
            _fmt(infer.get("images_per_s"), ".2f", "ERR" if "error" in infer else "-"),
            _fmt(ratios.get("inference_throughput"), ".2f"),
            _fmt(None if infer.get("peak_memory_bytes") is None else infer["peak_memory_bytes"] / mib, ".0f"),
            _fmt(ratios.get("inference_memory"), ".2f"),
            _fmt(None if flops is None else flops / c["batch_size"] / 1e9, ".1f"),
            _fmt(None if train.get("mfu") is None else 100 * train["mfu"], ".1f"),
        ))
        if "error" in r:
            rows[-1] = (r["label"], patch_label(c["patch_size"]), str(c["batch_size"]),
                        "ERROR: " + r["error"].splitlines()[0], *[""] * (len(header) - 4))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))))
    lines.append("x nnU: ratio to the nnU-Net PlainConvUNet of the same patch and batch (throughput: >1 is "
                 "faster; memory: >1 is more). GFLOP/img: training step (fwd+bwd) per image. MFU: CUDA only.")
    lines.append("x ref: our training throughput over the MedDINOv3 reference's (--reference-repo) of the same "
                 "encoder, decoder, patch and batch (>1: ours faster); on CUDA the reference runs fp16 autocast + "
                 "GradScaler, as its trainer.")
    if any(not isinstance(r["config"]["patch_size"], int) for r in results):
        lines.append("3D patches (S x H x W): img/s counts patches; the baseline is nnU-Net's 3d_fullres network "
                     "planned for that patch.")
    return "\n".join(lines)


def format_baseline_ratios(results: list[dict]) -> str:
    """Per entry with a baseline in the run: training and inference step time and peak memory, each
    ours / the nnU-Net network's (<1: ours faster or smaller; what the run did not measure is left out),
    and a 3D network's context parameters."""
    lines = ["ratios to the nnU-Net network of the same patch and batch, this run (ours / nnU-Net's):"]
    for r in results:
        ratios = r.get("ratios_to_baseline")
        if not ratios:
            continue
        parts = [f"{phase} {what} {ratios[f'{phase}_{key}']:.2f}x"
                 for phase in ("training", "inference") for key, what in (("step_time", "step"), ("memory", "memory"))
                 if ratios.get(f"{phase}_{key}") is not None]
        if "context_parameters" in r:
            parts.append(f"context parameters {r['context_parameters']:,}")
        lines.append(f"  {r['label']} @ {patch_label(r['config']['patch_size'])}: {'; '.join(parts)}")
    return "\n".join(lines) if len(lines) > 1 else ""


def format_step_times(results: list[dict]) -> str:
    """Median training step per entry, and ours over the reference's (the CPU goal's measure)."""
    lines = ["median training step (s):"]
    for r in results:
        step = r.get("training", {}).get("median_step_s")
        if step is None:
            continue
        line = f"  {r['label']}: {step:.3g}"
        to_reference = r.get("ratios_to_reference", {}).get("training_step_time")
        if to_reference is not None:
            line += f" = {to_reference:.2f}x the reference's"
        lines.append(line)
    return "\n".join(lines)


def format_profiles(results: list[dict]) -> str:
    """Each profiled entry's top ops/kernels by self time (``--profile``)."""
    blocks = []
    for r in results:
        profile = r.get("training", {}).get("profile")
        if not profile:
            continue
        lines = [f"{r['label']}: one training step, self {profile['clock']} time {profile['total_self_ms']:.1f} ms; "
                 f"top {len(profile['top'])}:"]
        for entry in profile["top"]:
            share = 100 * entry["self_ms"] / profile["total_self_ms"] if profile["total_self_ms"] else 0.0
            lines.append(f"  {entry['self_ms']:10.2f} ms {share:5.1f} %  {entry['calls']:5d}x  {entry['name'][:90]}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
