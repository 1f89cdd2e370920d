"""``meddinov3 weights``: list, inspect, convert, verify and fetch encoder checkpoints.

    meddinov3 weights list
    meddinov3 weights info FILE
    meddinov3 weights convert SRC DST [--encoder NAME] [--intensity ct-meddinov3|nnunet|...] [--licence TEXT]
    meddinov3 weights verify FILE
    meddinov3 weights fetch NAME
    meddinov3 weights merge-lora CHECKPOINT --output FILE

Every file the trainer should load is converted once into this project's format (safetensors with
a metadata header, see ``nnunet_meddinov3/checkpoints/format.py``); ``convert`` accepts Meta's hub
``.pth``, MedDINOv3/dinov3 training checkpoints, dinov3 DCP directories, timm and Hugging Face files.
Heavy imports (torch, timm, huggingface_hub) happen inside the subcommands that need them.
"""
from __future__ import annotations

import re
import shlex
from collections import defaultdict
from pathlib import Path

from nnunet_meddinov3.checkpoints.download import FetchError, download_from_hub
from nnunet_meddinov3.data.intensity import INTENSITY_PRESETS as CHECKPOINT_INTENSITIES


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="weights_command", metavar="ACTION")
    sub.add_parser("list", help="registered checkpoints, their licence and whether they are cached")

    p = sub.add_parser("info", help="metadata and tensor summary of a checkpoint (any supported layout)")
    p.add_argument("file", help="checkpoint file or dinov3 DCP directory")

    p = sub.add_parser("convert", help="convert any supported layout (file or DCP directory) to this project's format")
    p.add_argument("src", help="source checkpoint: .pth/.pt/.bin, .safetensors, or a DCP directory")
    p.add_argument("dst", help="output .safetensors file")
    p.add_argument("--encoder", help="named encoder config (default: inferred from layout and shapes)")
    p.add_argument("--intensity", choices=CHECKPOINT_INTENSITIES,
                   help="intensity convention of the pretraining (default: imagenet for Meta's releases, else unknown)")
    p.add_argument("--licence", help="licence text to record (default: the DINOv3 License)")
    p.add_argument("--citation", help="citation to record")
    p.add_argument("--resolution", type=int, help="pretraining resolution (pixels) to record")
    p.add_argument("--force", action="store_true", help="overwrite DST if it exists")

    p = sub.add_parser("verify", help="rebuild the encoder from a file's metadata, check its hashes, run a forward pass")
    p.add_argument("file", help="a .safetensors file in this project's format (meddinov3 weights convert writes one)")
    p.add_argument("--in-channels", type=int, default=1, help="input channels for the test forward pass (default 1)")

    p = sub.add_parser("fetch", help="download a registered checkpoint (Hugging Face) and convert it into the cache")
    p.add_argument("name", help="registry name (see `meddinov3 weights list`)")
    p.add_argument("--force", action="store_true", help="convert again even if the converted file exists")

    p = sub.add_parser("merge-lora", help="write the encoder of a LoRA fine-tuning run (nnU-Net checkpoint), "
                                          "adapters merged, in this project's format")
    p.add_argument("checkpoint", help="checkpoint_final.pth (or _best/_latest) of a run with lora_rank > 0")
    p.add_argument("--output", required=True, help="output .safetensors file")
    p.add_argument("--force", action="store_true", help="overwrite the output if it exists")
    parser.set_defaults(weights_parser=parser)


def run(args) -> int:
    action = getattr(args, "weights_command", None)
    if action is None:
        args.weights_parser.print_help()
        return 2
    # errors (FileNotFoundError, ValueError, FetchError, ...) carry their message to meddinov3's main
    return {"list": cmd_list, "info": cmd_info, "convert": cmd_convert, "verify": cmd_verify,
            "fetch": cmd_fetch, "merge-lora": cmd_merge_lora}[action](args)


def checkpoint_path(value: str | Path, *, folder_ok: bool = True) -> Path:
    """``value`` as a path that exists and can hold weights, or a ValueError/FileNotFoundError saying what
    to give instead: no empty file, and a folder only where a dinov3 DCP checkpoint folder is accepted."""
    from nnunet_meddinov3.durable_files import is_safetensors_file
    from pretrain.engine.checkpoint import is_training_checkpoint

    path = Path(value).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    if is_training_checkpoint(path):
        what = "a pretraining run folder" if path.is_dir() else "a pretraining checkpoint (student, teacher, optimizer)"
        raise ValueError(f"'{path}' is {what}, not an encoder weights file. Export its EMA teacher first: "
                         f"python -m pretrain export --run {shlex.quote(str(path))} --output encoder.safetensors "
                         "(it records the architecture, intensity convention and provenance); `meddinov3 probe "
                         "--weights` also takes the run folder as it is")
    if path.is_dir() and not folder_ok:
        raise ValueError(f"'{path}' is a folder; give a checkpoint file (.safetensors in this project's format)")
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"'{path}' is empty (0 bytes), not a checkpoint; an interrupted download or copy leaves "
                         "such files: copy or fetch it again")
    if path.is_file() and path.suffix != ".safetensors" and is_safetensors_file(path):
        raise ValueError(f"'{path}' holds a safetensors file under a '{path.suffix}' name, and the file name decides "
                         f"how it is read: rename it to {path.with_suffix('.safetensors').name}")
    return path


# --- list --------------------------------------------------------------------------------------

UNSUPPORTED = "(none)"


def cmd_list(args) -> int:
    from nnunet_meddinov3.checkpoints.registry import cache_dir, find_cached, registry_entries

    entries = registry_entries()
    print(f"weights cache: {cache_dir()}")
    rows = [("NAME", "ENCODER", "LAYOUT", "LICENCE", "ACCESS", "CACHED")]
    for name, entry in entries.items():
        cached = find_cached(name, entry)
        access = re.split(r"[;(]", entry.get("access") or "-")[0].strip()
        rows.append((name, entry.get("encoder") or UNSUPPORTED, entry.get("layout") or "-",
                     entry.get("licence") or "not recorded", access, str(cached) if cached else "no"))
    # every column as wide as its longest entry: a licence is never cut
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print(" ".join(f"{cell:{width}}" for cell, width in zip(row, widths)) + " " + row[-1])
    unsupported = [name for name, entry in entries.items() if not entry.get("encoder")]
    if unsupported:
        print(f"\nENCODER {UNSUPPORTED}: this version cannot build that architecture yet (e.g. the SwiGLU MLP of "
              f"the ViT-S+/H+ models), so {', '.join(unsupported)} cannot be converted or trained; they are listed "
              "for completeness.")
    return 0


# --- info --------------------------------------------------------------------------------------

def key_summary(state: dict, limit: int = 40) -> list[str]:
    """One line per key with block indices folded (``blocks.*``): shape, dtype and how many blocks."""
    groups = defaultdict(list)
    for key, value in state.items():
        folded = re.sub(r"(^|\.)(blocks|layer)\.\d+\.", r"\1\2.*.", key)
        groups[folded].append(value)
    lines = []
    for folded, values in groups.items():
        shapes = {tuple(v.shape) for v in values}
        dtypes = {str(v.dtype).replace("torch.", "") for v in values}
        shape = str(next(iter(shapes))) if len(shapes) == 1 else "various"
        count = f" x{len(values)}" if len(values) > 1 else ""
        lines.append(f"  {folded:48} {shape:22} {'/'.join(sorted(dtypes))}{count}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"  ... {len(lines) - limit} more"]
    return lines


def tensors_of(stored: dict, prefix: str = "") -> tuple[dict, list[str]]:
    """The tensors of a checkpoint as stored, nested dicts flattened to dotted keys (a dinov3 training
    checkpoint is ``{'teacher': {...}, 'iteration': ...}``), and the keys of entries that are no tensors."""
    import torch

    tensors, other = {}, []
    for key, value in stored.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            tensors[name] = value
        elif isinstance(value, dict):
            inner, inner_other = tensors_of(value, f"{name}.")
            tensors.update(inner)
            other += inner_other
        else:
            other.append(name)
    return tensors, other


def _sizes(state: dict) -> str:
    n = sum(v.numel() for v in state.values())
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    return f"{len(state)} tensors, {n / 1e6:.2f}M values, {nbytes / 2 ** 20:.1f} MiB"


def _model_notes(facts: dict, raw: dict) -> list[str]:
    """What sets the DINOv3 family members apart, in words: the feed-forward layer and untied norms."""
    notes = []
    if facts.get("ffn") == "swiglu":
        notes.append(f"feed-forward: SwiGLU, {facts['ffn_hidden_features']} wide (ViT-S+/L+/H+/7B)")
    elif facts.get("ffn") == "mlp":
        notes.append(f"feed-forward: GELU MLP, {facts['ffn_hidden_features']} wide")
    if facts.get("untie_cls_and_patch_norms"):
        notes.append("untied cls norm (cls_norm): loaded; the cls and storage tokens get a final norm of their own")
    stored, _ = tensors_of(raw)
    if any(".local_cls_norm." in f".{k}" for k in stored):
        notes.append("untied global/local cls norm (local_cls_norm, SAT ViT-L / 7B): used on local crops in "
                     "training only; not loaded, it changes no feature")
    return notes


def cmd_info(args) -> int:
    from nnunet_meddinov3.checkpoints.converters import LayoutError, infer_encoder_config
    from nnunet_meddinov3.checkpoints.conversion import hf_config_hints as _hf_config_hints
    from nnunet_meddinov3.checkpoints.keys import LAYOUT_NAMES
    from nnunet_meddinov3.checkpoints.loading import describe_checkpoint, fitting_configs, read_source

    path = checkpoint_path(args.file)
    source = read_source(path)
    print(f"file: {path}")
    if source.metadata is not None:
        md = source.metadata
        print(f"format: meddinov3 safetensors v{md.format_version} (tensor and metadata sha256 verified)")
        print("architecture:")
        for key, value in md.architecture.items():
            print(f"  {key}: {value}")
        print(f"rope periods: {md.rope_periods}")
        print(f"intensity: {md.intensity}")
        print(f"input channels (stored kernel): {md.in_channels}")
        print(f"pretraining resolution: {md.pretraining_resolution or 'not recorded'}")
        print(f"stages: {md.stages if md.stages else 'none recorded'}")
        print(f"data manifest sha256: {md.data_manifest_sha256 or 'not recorded'}")
        print(f"licence: {md.licence or 'not recorded'}")
        print(f"citation: {md.citation or 'not recorded'}")
        print(f"source: {md.source or 'not recorded'}")
        print(f"tensor sha256: {md.tensor_sha256}")
    else:
        print(f"layout: {source.layout} ({LAYOUT_NAMES.get(source.layout, 'dinov3 sharded checkpoint')})"
              + (f" {source.details}" if source.details else ""))
        facts = describe_checkpoint(source.state)
        print(f"architecture from shapes: {facts}")
        for line in _model_notes(facts, source.raw):
            print(line)
        try:
            config = infer_encoder_config(source.state, source.layout, **_hf_config_hints(path))
            print(f"inferred architecture (layout defaults for what shapes do not show): {config.to_dict()}")
        except LayoutError as e:
            print(f"inferred architecture: not possible ({e})")
        fits = fitting_configs(facts)
        print(f"named configs that fit the shapes: {', '.join(fits) if fits else 'none'}")
        print(f"convert with: meddinov3 weights convert {shlex.quote(str(path))} OUT.safetensors")
    shown, not_tensors = tensors_of(source.raw if source.metadata is None else source.state)
    print(f"tensors ({'as stored' if source.metadata is None else 'encoder keys'}): {_sizes(shown)}")
    print("\n".join(key_summary(shown)))
    if not_tensors:
        print(f"  other entries (not tensors): {', '.join(not_tensors[:10])}"
              + (f" ... {len(not_tensors) - 10} more" if len(not_tensors) > 10 else ""))
    return 0


# --- convert / verify --------------------------------------------------------------------------

def cmd_convert(args) -> int:
    from nnunet_meddinov3.checkpoints.conversion import convert_checkpoint

    checkpoint_path(args.src)
    dst = Path(args.dst)
    if dst.is_dir():
        raise ValueError(f"'{dst}' is a folder; give the output file's name, e.g. {dst / 'encoder.safetensors'}")
    if dst.suffix != ".safetensors":
        raise ValueError(f"the output must be a .safetensors file, got '{dst}'")
    if dst.exists() and not args.force:
        raise ValueError(f"'{dst}' exists; pass --force to overwrite it")
    metadata = convert_checkpoint(args.src, dst, encoder=args.encoder, intensity=args.intensity,
                                  licence=args.licence, citation=args.citation,
                                  pretraining_resolution=args.resolution)
    arch = metadata.architecture
    print(f"converted {args.src} ({metadata.source['layout']}) -> {dst}")
    print(f"  architecture: {arch['embed_dim']}-dim, {arch['depth']} blocks, {arch['num_heads']} heads, "
          f"{arch['n_storage_tokens']} storage tokens, qkv_bias={arch['qkv_bias']}, norm_eps={arch['norm_eps']}, "
          f"rope_dtype={arch['rope_dtype']}")
    print(f"  intensity: {metadata.intensity}; licence: {metadata.licence}")
    print(f"  tensor sha256: {metadata.tensor_sha256} (verified by a strict load)")
    return 0


def cmd_verify(args) -> int:
    import torch

    from nnunet_meddinov3.checkpoints import build_encoder_from_checkpoint, read_checkpoint
    from nnunet_meddinov3.durable_files import file_kind
    from nnunet_meddinov3.network.configs import default_feature_layers

    path = checkpoint_path(args.file, folder_ok=False)
    if path.suffix != ".safetensors":
        what = ("a PyTorch (torch.save) checkpoint" if file_kind(path) in ("zip", "pickle")
                else "neither a safetensors file nor a PyTorch checkpoint")
        raise ValueError(f"'{path}' is {what}; verify checks .safetensors files in this project's format. Convert a "
                         f"checkpoint with `meddinov3 weights convert {shlex.quote(str(path))} OUT.safetensors`, "
                         "then verify OUT.safetensors")
    checkpoint = read_checkpoint(path)  # checks both hashes
    encoder = build_encoder_from_checkpoint(checkpoint, in_channels=args.in_channels).eval()
    layers = default_feature_layers(encoder.depth)
    x = torch.randn(1, args.in_channels, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = encoder.intermediate_features(x, layers)
    bad = [i for i, f in zip(layers, features) if not torch.isfinite(f).all()]
    if bad:
        raise RuntimeError(f"forward pass gave non-finite features in blocks {bad}")
    md = checkpoint.metadata
    print(f"ok: {args.file}")
    print(f"  hashes: tensor and metadata sha256 match ({md.tensor_sha256[:16]}...)")
    print(f"  encoder rebuilt from metadata and loaded strictly: {md.architecture['embed_dim']}-dim, "
          f"{md.architecture['depth']} blocks, rope_dtype={md.architecture['rope_dtype']}, "
          f"norm_eps={md.architecture['norm_eps']}")
    print(f"  forward pass on 1x{args.in_channels}x32x32: blocks {list(layers)} -> "
          f"{[tuple(f.shape) for f in features]}, all finite")
    return 0


def cmd_merge_lora(args) -> int:
    from nnunet_meddinov3.training.lora_export import export_merged_encoder

    source = checkpoint_path(args.checkpoint, folder_ok=False)
    output = Path(args.output)
    if output.suffix != ".safetensors" or output.is_dir():
        raise ValueError(f"the output must be a .safetensors file, got '{output}'")
    if output.exists() and not args.force:
        raise ValueError(f"'{output}' exists; pass --force to overwrite it")
    metadata = export_merged_encoder(source, output)
    stage = metadata.stages[-1]
    print(f"merged the LoRA adapters of {source} ({stage['lora']}) -> {output}")
    print(f"  architecture: {metadata.architecture['embed_dim']}-dim, {metadata.architecture['depth']} blocks; "
          f"tensor sha256: {metadata.tensor_sha256} (verified by a strict load)")
    return 0


# --- fetch -------------------------------------------------------------------------------------

def cmd_fetch(args) -> int:
    from nnunet_meddinov3.checkpoints.registry import cache_dir, converted_path, registry_entries

    entries = registry_entries()
    if args.name not in entries:
        raise FetchError(f"'{args.name}' is not registered; known: {', '.join(sorted(entries))}")
    entry = entries[args.name]
    target = converted_path(args.name)
    if target.exists() and not args.force:
        print(f"already converted: {target} (pass --force to fetch and convert again)")
        return 0
    if not entry.get("hf_repo") or not entry.get("hf_filename"):
        raise FetchError(f"'{args.name}' cannot be fetched automatically ({entry.get('access', 'no download source')}). "
                         f"Put the original file at {cache_dir() / (entry.get('file') or args.name + '.pth')} or run "
                         f"`meddinov3 weights convert FILE {target}`")
    if not entry.get("encoder"):
        raise FetchError(f"'{args.name}' has no encoder config this project can build ({entry.get('description', '')})")

    downloaded = download_from_hub(entry["hf_repo"], entry["hf_filename"], entry.get("hf_revision"))
    from nnunet_meddinov3.checkpoints import convert_checkpoint, file_sha256

    actual = file_sha256(downloaded)
    expected = entry.get("sha256")
    if expected and actual != expected:
        raise FetchError(f"sha256 of the downloaded {downloaded} is {actual}, the registry says {expected}: "
                         "refusing to convert a file that is not the registered one")
    print(f"downloaded {entry['hf_repo']}/{entry['hf_filename']} -> {downloaded}")
    print(f"  sha256 {actual}" + (" (matches the registry)" if expected else " (the registry has no checksum to compare)"))
    metadata = convert_checkpoint(
        downloaded, target, encoder=entry["encoder"], intensity=entry.get("intensity"),
        licence=entry.get("licence"), citation=entry.get("citation"),
        pretraining_resolution=entry.get("pretraining_resolution"),
        source_extra={"registry_name": args.name, "hf_repo": entry["hf_repo"], "hf_filename": entry["hf_filename"],
                      "hf_revision": entry.get("hf_revision")})
    print(f"converted ({metadata.source['layout']}) -> {target}")
    print(f"use it with: MEDDINOV3_WEIGHTS={args.name}  (or the path above)")
    return 0
