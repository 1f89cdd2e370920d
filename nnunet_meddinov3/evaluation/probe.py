"""Frozen-encoder dense linear probe on an nnU-Net dataset: does a checkpoint's feature map already
separate the classes?

The slices are nnU-Net's own preprocessed 2D data (its normalisation, spacing and fold split), so
the probe sees what fine-tuning would feed the encoder. Each checkpoint's normed patch tokens of
the chosen blocks are computed once; one linear layer (a 1x1 convolution over the concatenated
tokens, standardised with the training slices' statistics) is trained for a fixed number of steps
with cross-entropy on the labels, its logits upsampled bilinearly to the slice. Scores are per-class
Dice per validation case (all its slices stacked), averaged over cases; a class absent from both the
reference and the prediction of a case does not count for that case (nnU-Net's convention).
Everything is seeded: the same inputs give the same numbers.

The k-NN variant (``method="knn"``) trains nothing: every validation patch token takes the
similarity-weighted label distribution of its k most similar training patch tokens (cosine similarity,
weights exp(similarity / 0.07) as in DINO's k-NN evaluation; a token's distribution is the share of
each class among its 16 x 16 pixels), upsampled bilinearly like the linear probe's logits. It asks
whether the features already place same-class patches near each other, with no optimiser in between.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_meddinov3.data.preprocessed import PreprocessedNotFound, find_preprocessed
from nnunet_meddinov3.evaluation.probe_methods import PROBE_METHODS
from nnunet_meddinov3.network.configs import PATCH_SIZE, default_feature_layers

log = logging.getLogger(__name__)

IGNORE = -1  # label of padding pixels


class ProbeError(ValueError):
    """Input the probe cannot use; the message says what to do."""


@dataclass
class ProbeSlices:
    """2D slices of preprocessed cases, padded to multiples of the patch size.

    ``images`` (N, 1, H, W) float32, ``labels`` (N, H, W) int64 with IGNORE on padding, ``cases`` the
    case of each slice and ``class_names`` the dataset's foreground labels by value.
    """

    images: torch.Tensor
    labels: torch.Tensor
    cases: list[str]
    class_names: dict[int, str] = field(default_factory=dict)


@dataclass
class ProbeSplit:
    folder: Path  # the preprocessed data of the configuration
    train: list[str]
    val: list[str]
    class_names: dict[int, str]
    fold: int
    splits_source: str


def preprocessed_split(dataset: str | int, configuration: str = "2d", plans: str = "nnUNetPlans",
                       fold: int = 0, preprocessed: str | None = None) -> ProbeSplit:
    """The fold's training and validation cases of an nnU-Net dataset preprocessed with ``plans``.

    The split is ``splits_final.json`` when nnU-Net has written it, else the split nnU-Net would write
    (its seeded 5-fold split of all preprocessed cases), so the probe's validation cases are the
    ones ``nnUNetv2_train ... FOLD`` validates on. ``preprocessed`` defaults to ``$nnUNet_preprocessed``.
    """
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    try:
        found = find_preprocessed(dataset, configuration, plans, preprocessed)
    except PreprocessedNotFound as e:
        raise ProbeError(str(e)) from None
    name, base, config, folder = found.name, found.base, found.configuration_manager, found.folder
    if len(config.patch_size) != 2:
        raise ProbeError(f"configuration '{configuration}' is not 2D; the probe works on nnU-Net's 2D "
                         "configurations (e.g. -c 2d)")
    dataset_json = json.loads((base / "dataset.json").read_text())
    class_names = {int(v): k for k, v in dataset_json.get("labels", {}).items()
                   if isinstance(v, int) and v > 0}
    if not class_names:
        raise ProbeError(f"{name}'s dataset.json names no foreground label; the probe needs labelled classes")
    identifiers = sorted(infer_dataset_class(str(folder)).get_identifiers(str(folder)))
    if len(identifiers) < 2:
        raise ProbeError(f"{folder} holds {len(identifiers)} preprocessed case(s); the probe needs at least two "
                         "(one to train on, one to validate)")
    splits_file = base / "splits_final.json"
    if splits_file.is_file():
        splits, source = json.loads(splits_file.read_text()), str(splits_file)
    else:
        splits, source = generate_crossval_split(identifiers, seed=12345, n_splits=5), "nnU-Net's default 5-fold split"
    if not 0 <= fold < len(splits):
        raise ProbeError(f"fold {fold} does not exist; the split has folds 0-{len(splits) - 1}")
    return ProbeSplit(folder, sorted(splits[fold]["train"]), sorted(splits[fold]["val"]), class_names, fold, source)


def load_slices(folder: Path, cases: list[str], class_names: dict[int, str], max_slices_per_case: int | None = None,
                channel: int = 0) -> ProbeSlices:
    """Axial slices (first spatial axis, as nnU-Net's 2D configurations) of ``cases``; with
    ``max_slices_per_case`` an evenly spaced subset of each case's slices."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    dataset = infer_dataset_class(str(folder))(str(folder), list(cases))
    images, labels, owners = [], [], []
    for case in cases:
        data, seg, *_ = dataset.load_case(case)
        data, seg = np.asarray(data), np.asarray(seg)
        if not 0 <= channel < data.shape[0]:
            raise ProbeError(f"channel {channel} does not exist; the dataset has {data.shape[0]} channel(s)")
        n = data.shape[1]
        index = np.arange(n) if not max_slices_per_case or n <= max_slices_per_case else \
            np.unique(np.linspace(0, n - 1, max_slices_per_case).round().astype(int))
        for z in index:
            images.append(torch.from_numpy(np.ascontiguousarray(data[channel, z], dtype=np.float32)))
            labels.append(torch.from_numpy(np.ascontiguousarray(seg[0, z]).astype(np.int64)))
            owners.append(case)
    height = max(math.ceil(i.shape[0] / PATCH_SIZE) * PATCH_SIZE for i in images)
    width = max(math.ceil(i.shape[1] / PATCH_SIZE) * PATCH_SIZE for i in images)
    image_batch = torch.zeros(len(images), 1, height, width)
    label_batch = torch.full((len(images), height, width), IGNORE, dtype=torch.int64)
    for k, (image, label) in enumerate(zip(images, labels)):
        image_batch[k, 0, : image.shape[0], : image.shape[1]] = image
        label = label.clone()
        label[label < 0] = IGNORE  # nnU-Net marks outside-the-crop voxels with -1
        label_batch[k, : label.shape[0], : label.shape[1]] = label
    return ProbeSlices(image_batch, label_batch, owners, class_names)


@torch.no_grad()
def encode(encoder, images: torch.Tensor, layers: list[int], batch_size: int = 8) -> torch.Tensor:
    """(N, 1, H, W) -> (N, C * len(layers), H/16, W/16): the normed patch tokens of ``layers``."""
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    chunks = []
    for start in range(0, images.shape[0], batch_size):
        maps = encoder.intermediate_features(images[start:start + batch_size].to(device), layers)
        chunks.append(torch.cat(maps, dim=1).float().cpu())
    encoder.train(was_training)
    return torch.cat(chunks)


def train_linear_head(features: torch.Tensor, labels: torch.Tensor, n_classes: int, steps: int = 300,
                      lr: float = 1e-2, batch_size: int = 16, seed: int = 0) -> torch.nn.Module:
    """A 1x1 convolution on standardised ``features`` (N, C, h, w), trained with cross-entropy on the
    upsampled logits against ``labels`` (N, H, W); returns it with the standardisation folded in."""
    generator = torch.Generator().manual_seed(seed)
    mean = features.mean(dim=(0, 2, 3), keepdim=True)
    std = features.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    normed = (features - mean) / std
    torch.manual_seed(seed)
    head = torch.nn.Conv2d(features.shape[1], n_classes, kernel_size=1)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    n = features.shape[0]
    for _ in range(steps):
        index = torch.randperm(n, generator=generator)[:batch_size]
        logits = F.interpolate(head(normed[index]), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, labels[index], ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():  # fold the standardisation into the convolution: head(x) on raw features
        weight = head.weight / std.view(1, -1, 1, 1)
        bias = head.bias - (weight * mean.view(1, -1, 1, 1)).sum(dim=(1, 2, 3))
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return head.eval()


@torch.no_grad()
def predict(head: torch.nn.Module, features: torch.Tensor, size: tuple[int, int], batch_size: int = 16) -> torch.Tensor:
    out = [F.interpolate(head(features[s:s + batch_size]), size=size, mode="bilinear", align_corners=False).argmax(1)
           for s in range(0, features.shape[0], batch_size)]
    return torch.cat(out)


def patch_label_distributions(labels: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H, W) labels -> ((N, h*w, n_classes) share of each class among each patch's labelled pixels,
    (N, h*w) bool: the patch has labelled pixels), with h, w = H/16, W/16."""
    valid = labels != IGNORE
    one_hot = F.one_hot(labels.clamp_min(0), n_classes).permute(0, 3, 1, 2).float() * valid[:, None]
    counts = F.avg_pool2d(one_hot, PATCH_SIZE) * PATCH_SIZE ** 2  # (N, K, h, w) labelled pixels per class
    total = counts.sum(dim=1)
    shares = counts / total.clamp_min(1)[:, None]
    return shares.flatten(2).transpose(1, 2), total.flatten(1) > 0


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, features: torch.Tensor,
                size: tuple[int, int], n_classes: int, k: int = 20, temperature: float = 0.07,
                max_train_tokens: int = 100_000, seed: int = 0, chunk: int = 256) -> torch.Tensor:
    """(M, H, W) label map of ``features`` (M, C, h, w) by k-NN over the training patch tokens.

    Training tokens without labelled pixels (padding) are left out; above ``max_train_tokens`` a seeded
    random subset is kept, so that memory stays bounded on large datasets."""
    shares, labelled = patch_label_distributions(train_labels, n_classes)
    keys = F.normalize(train_features.flatten(2).transpose(1, 2), dim=-1)[labelled]  # (T, C)
    shares = shares[labelled]
    if keys.shape[0] > max_train_tokens:
        keep = torch.randperm(keys.shape[0], generator=torch.Generator().manual_seed(seed))[:max_train_tokens]
        keys, shares = keys[keep], shares[keep]
    k = min(k, keys.shape[0])
    m, _, h, w = features.shape
    queries = F.normalize(features.flatten(2).transpose(1, 2), dim=-1).reshape(m * h * w, -1)
    probabilities = []
    for start in range(0, queries.shape[0], chunk):
        similarity, index = (queries[start:start + chunk] @ keys.T).topk(k, dim=-1)
        weights = (similarity / temperature).softmax(dim=-1)  # exp(s / T), normalised per query
        probabilities.append(torch.einsum("qk,qkc->qc", weights, shares[index]))
    maps = torch.cat(probabilities).reshape(m, h, w, n_classes).permute(0, 3, 1, 2)
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False).argmax(1)


def dice_per_case(prediction: torch.Tensor, labels: torch.Tensor, cases: list[str], classes: list[int]) -> dict:
    """{case: {class: Dice or nan}} over each case's stacked slices; padding is not counted."""
    valid = labels != IGNORE
    scores = {}
    for case in dict.fromkeys(cases):
        rows = torch.tensor([c == case for c in cases])
        pred, ref, keep = prediction[rows], labels[rows], valid[rows]
        scores[case] = {}
        for cls in classes:
            p, r = (pred == cls) & keep, (ref == cls) & keep
            total = int(p.sum() + r.sum())
            scores[case][cls] = float("nan") if total == 0 else 2.0 * int((p & r).sum()) / total
    return scores


def summarise(per_case: dict, class_names: dict[int, str]) -> dict:
    """Mean (nan-aware) per class over cases, and their mean."""
    per_class = {}
    for cls, name in class_names.items():
        values = [s[cls] for s in per_case.values() if not math.isnan(s[cls])]
        per_class[name] = float(np.mean(values)) if values else float("nan")
    finite = [v for v in per_class.values() if not math.isnan(v)]
    return {"per_class": per_class, "mean": float(np.mean(finite)) if finite else float("nan")}


def probe_encoders(encoders: dict, train: ProbeSlices, val: ProbeSlices, layers: list[int] | None = None,
                   steps: int = 300, lr: float = 1e-2, seed: int = 0, method: str = "linear", k: int = 20) -> dict:
    """Probe each of ``encoders`` ({label: DINOv3Encoder}) with a linear layer or ``method="knn"``;
    returns {label: {"dice", "per_case", "layers", "prediction"}} where ``prediction`` is the (N, H, W)
    validation label map."""
    if method not in PROBE_METHODS:
        raise ProbeError(f"unknown probe method '{method}'; one of {', '.join(PROBE_METHODS)}")
    if k < 1:
        raise ProbeError(f"k must be at least 1, not {k}")
    classes = sorted(train.class_names)
    n_classes = max(classes) + 1
    results = {}
    for label, encoder in encoders.items():
        chosen = list(layers) if layers else list(default_feature_layers(encoder.depth))
        bad = [i for i in chosen if not 0 <= i < encoder.depth]
        if bad:
            raise ProbeError(f"layers {bad} are out of range for '{label}' ({encoder.depth} blocks: 0-"
                             f"{encoder.depth - 1})")
        log.info("probing %s (blocks %s)", label, chosen)
        train_features, size = encode(encoder, train.images, chosen), tuple(val.labels.shape[-2:])
        if method == "knn":
            prediction = knn_predict(train_features, train.labels, encode(encoder, val.images, chosen), size,
                                     n_classes, k=k, seed=seed)
        else:
            head = train_linear_head(train_features, train.labels, n_classes, steps=steps, lr=lr, seed=seed)
            prediction = predict(head, encode(encoder, val.images, chosen), size)
        per_case = dice_per_case(prediction, val.labels, val.cases, classes)
        results[label] = {"dice": summarise(per_case, train.class_names), "per_case": per_case, "layers": chosen,
                          "prediction": prediction}
    return results


def draw(val: ProbeSlices, results: dict, path: str | Path) -> Path:
    """PNG: the validation slice with the most foreground, its reference and each checkpoint's prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    foreground = ((val.labels > 0).flatten(1).sum(1))
    k = int(foreground.argmax())
    n_classes = max(val.class_names) + 1
    panels = [("image", val.images[k, 0], "gray"), ("reference", val.labels[k].clamp_min(0), "tab10")]
    panels += [(label, r["prediction"][k], "tab10") for label, r in results.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.3))
    for ax, (title, array, cmap) in zip(np.atleast_1d(axes), panels):
        kwargs = {} if cmap == "gray" else {"vmin": 0, "vmax": max(n_classes - 1, 1), "interpolation": "nearest"}
        ax.imshow(array.numpy(), cmap=cmap, **kwargs)
        ax.set_title(title if len(title) <= 28 else "..." + title[-25:], fontsize=8)
        ax.axis("off")
    fig.suptitle(f"validation case {val.cases[k]}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_table(results: dict, class_names: dict[int, str]) -> str:
    names = [class_names[c] for c in sorted(class_names)]
    width = max(12, *(len(n) + 2 for n in names))
    label_width = max(10, *(len(label) + 2 for label in results))
    header = f"{'weights':<{label_width}}" + "".join(f"{n:>{width}}" for n in names) + f"{'mean':>{width}}"
    rows = [header, "-" * len(header)]
    for label, r in results.items():
        dice = r["dice"]
        rows.append(f"{label:<{label_width}}" + "".join(f"{dice['per_class'][n]:>{width}.4f}" for n in names)
                    + f"{dice['mean']:>{width}.4f}")
    return "\n".join(rows)
