"""``meddinov3 probe``: a frozen-encoder dense linear probe that ranks encoder checkpoints on any nnU-Net
dataset (its preprocessed 2D data and fold split).

    meddinov3 probe -d 501 --weights random:meddinov3_tiny pretrain_runs/tiny_stage1 my_export.safetensors

A weights source is a registry name, a checkpoint file in any known layout, a pretraining run folder
or checkpoint (its EMA teacher), or ``random:ENCODER`` (a random initialisation of a named encoder
config, seeded). Prints per-class Dice on the fold's validation cases and writes probe.json and
probe.png (image, reference, each checkpoint's prediction) to --output. Method and scores:
:mod:`nnunet_meddinov3.evaluation.probe`.
"""
from __future__ import annotations

import sys
from pathlib import Path

from nnunet_meddinov3.evaluation.probe_methods import PROBE_METHODS

RANDOM_PREFIX = "random:"


def add_arguments(parser) -> None:
    parser.add_argument("-d", "--dataset", required=True, help="dataset id or DatasetXXX_Name, preprocessed by nnU-Net")
    parser.add_argument("--weights", nargs="+", required=True, metavar="SOURCE",
                        help="checkpoints to compare: registry names, files, pretraining run folders or checkpoints, "
                             f"or {RANDOM_PREFIX}ENCODER[,option=value...] for a random init (e.g. "
                             f"{RANDOM_PREFIX}meddinov3_tiny,layer_scale_init=1.0)")
    parser.add_argument("-c", "--configuration", default="2d", help="a 2D configuration of the plans (default 2d)")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("-f", "--fold", type=int, default=0, help="fold whose validation cases are scored (default 0)")
    parser.add_argument("--layers", nargs="+", type=int, default=None, metavar="BLOCK",
                        help="0-based blocks whose normed patch tokens are concatenated (default: 4 evenly spaced "
                             "blocks ending at the last, as the MedDINOv3 decoder)")
    parser.add_argument("--method", choices=PROBE_METHODS, default="linear",
                        help="linear: one trained 1x1 convolution; knn: each validation patch takes the label shares "
                             "of its --k most similar training patches (nothing trained) (default linear)")
    parser.add_argument("--k", type=int, default=20, help="neighbours of the k-NN probe (default 20)")
    parser.add_argument("--steps", type=int, default=300, help="training steps of the linear layer (default 300)")
    parser.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate of the linear layer (default 1e-2)")
    parser.add_argument("--max-slices", type=int, default=16, metavar="N",
                        help="at most N evenly spaced slices per training case (default 16; 0 = all)")
    parser.add_argument("--encoder", default=None, metavar="CONFIG",
                        help="encoder config for weights files that record no architecture (bare encoder state dicts)")
    parser.add_argument("--channel", type=int, default=0, help="input channel of the dataset to probe (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inits and the linear layers (default 0)")
    parser.add_argument("-o", "--output", default="probe_results",
                        help="folder for probe.json and probe.png (default ./probe_results)")


def encoder_for(source: str, seed: int, encoder_name: str | None = None):
    """(encoder, description) for one weights source; raises ValueError/FileNotFoundError with the reason."""
    import torch

    from nnunet_meddinov3.network.configs import ENCODER_CONFIGS, resolve_encoder_config
    from nnunet_meddinov3.network.encoder import DINOv3Encoder

    if source.startswith(RANDOM_PREFIX):
        import yaml

        name, *options = source[len(RANDOM_PREFIX):].split(",")
        if name not in ENCODER_CONFIGS:
            raise ValueError(f"'{source}': unknown encoder '{name}'; known: {', '.join(sorted(ENCODER_CONFIGS))}")
        overrides = {}
        for option in options:
            key, sep, value = option.partition("=")
            if not sep:
                raise ValueError(f"'{source}': '{option}' is not option=value")
            overrides[key.strip()] = yaml.safe_load(value)
        try:
            config = resolve_encoder_config(name, **overrides)
        except TypeError as e:
            raise ValueError(f"'{source}': {e}") from None
        torch.manual_seed(seed)
        return DINOv3Encoder(config, in_channels=1).eval(), f"random init of {name}" + \
            "".join(f", {k}={v}" for k, v in overrides.items())
    path = Path(source).expanduser()
    if path.exists():
        from pretrain.engine.checkpoint import is_training_checkpoint

        if is_training_checkpoint(path):
            from pretrain.export import teacher_encoder

            return teacher_encoder(path), "pretraining run: EMA teacher of its latest checkpoint"
        if path.is_dir() and not (path / ".metadata").is_file():
            raise ValueError(f"'{path}' is neither a pretraining run folder with checkpoints (checkpoints/"
                             "checkpoint_N.pt) nor a dinov3 DCP checkpoint folder")
    from nnunet_meddinov3.checkpoints import (LayoutError, build_encoder_from_checkpoint, infer_encoder_config,
                                              load_encoder_weights, read_source, resolve_weights)

    resolved = resolve_weights(source)
    checkpoint = read_source(resolved)
    if checkpoint.metadata is not None:  # this project's format records the architecture
        return build_encoder_from_checkpoint(resolved).eval(), f"{resolved} (this project's format)"
    try:
        config = infer_encoder_config(checkpoint.state, checkpoint.layout)
    except LayoutError:
        if encoder_name is None:
            raise LayoutError(f"'{resolved}' records no architecture ({checkpoint.layout} layout); name it with "
                              f"--encoder (one of {', '.join(sorted(ENCODER_CONFIGS))})") from None
        config = resolve_encoder_config(encoder_name)
    encoder = DINOv3Encoder(config, in_channels=1)
    load_encoder_weights(encoder, checkpoint.state, name=f"'{resolved}'")
    return encoder.eval(), f"{resolved} (layout {checkpoint.layout})"


def run(args) -> int:
    import json
    import logging

    from nnunet_meddinov3.checkpoints import CheckpointMismatchError, LayoutError
    from nnunet_meddinov3.evaluation.probe import (ProbeError, draw, format_table, load_slices, preprocessed_split,
                                                   probe_encoders)

    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def fail(message: str) -> int:
        print(f"meddinov3 probe: error: {message}", file=sys.stderr)
        return 1

    if args.steps < 1:
        return fail("--steps must be at least 1")
    if len(set(args.weights)) != len(args.weights):
        return fail("a weights source is given twice")
    try:
        split = preprocessed_split(args.dataset, args.configuration, args.plans, args.fold)
        encoders, described = {}, {}
        for source in args.weights:
            encoders[source], described[source] = encoder_for(source, args.seed, args.encoder)
        print(f"dataset:  {split.folder} (fold {split.fold}: {len(split.train)} training, {len(split.val)} "
              f"validation cases; split: {split.splits_source})")
        for source, text in described.items():
            print(f"weights:  {source}: {text}")
        train = load_slices(split.folder, split.train, split.class_names, args.max_slices or None, args.channel)
        val = load_slices(split.folder, split.val, split.class_names, None, args.channel)
        results = probe_encoders(encoders, train, val, layers=args.layers, steps=args.steps, lr=args.lr,
                                 seed=args.seed, method=args.method, k=args.k)
    except (ProbeError, CheckpointMismatchError, LayoutError, FileNotFoundError, ValueError, KeyError) as e:
        return fail(str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e))

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    record = {
        "dataset": str(split.folder), "fold": split.fold, "split": split.splits_source,
        "train_cases": split.train, "validation_cases": split.val, "train_slices": int(train.images.shape[0]),
        "validation_slices": int(val.images.shape[0]), "method": args.method,
        **({"k": args.k} if args.method == "knn" else {"steps": args.steps, "lr": args.lr}), "seed": args.seed,
        "command": "meddinov3 " + " ".join(getattr(args, "argv", [])),
        "results": {source: {"weights": described[source], "layers": r["layers"], "dice": r["dice"],
                             "per_case": {case: {split.class_names[c]: v for c, v in scores.items()}
                                          for case, scores in r["per_case"].items()}}
                    for source, r in results.items()},
    }
    (output / "probe.json").write_text(json.dumps(record, indent=1))
    picture = draw(val, results, output / "probe.png")
    how = f"k-NN probe Dice (k = {args.k})" if args.method == "knn" else "Linear probe Dice"
    detail = "" if args.method == "knn" else f"{args.steps} steps, "
    print(f"\n{how}, fold {split.fold} validation ({len(split.val)} cases, {detail}seed {args.seed}):")
    print(format_table(results, split.class_names))
    print(f"\nWrote {output / 'probe.json'} and {picture}")
    return 0
