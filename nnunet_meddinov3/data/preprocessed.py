"""Find a configuration of an nnU-Net dataset in ``nnUNet_preprocessed``: the checks every command that reads
preprocessed data makes first (the probe, the loader bench), with messages that say what to run."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


class PreprocessedNotFound(ValueError):
    """The dataset, its plans or the configuration's data are not in nnUNet_preprocessed; the message says
    what to run."""


@dataclass
class PreprocessedConfiguration:
    name: str  # DatasetXXX_Name
    base: Path  # nnUNet_preprocessed/DatasetXXX_Name
    plans_manager: object  # nnU-Net's PlansManager
    configuration_manager: object  # nnU-Net's ConfigurationManager
    folder: Path  # the configuration's preprocessed cases


def find_preprocessed(dataset: str | int, configuration: str, plans: str,
                      preprocessed: str | None = None) -> PreprocessedConfiguration:
    """``configuration`` of ``plans`` for ``dataset`` (an id or DatasetXXX_Name) under ``preprocessed``
    (default ``$nnUNet_preprocessed``), after checking that each exists."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    preprocessed = preprocessed or os.environ.get("nnUNet_preprocessed")
    if not preprocessed:
        raise PreprocessedNotFound("nnUNet_preprocessed is not set; export it (and nnUNet_raw) as for nnUNetv2_train "
                                   "(see `meddinov3 env`)")
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except (RuntimeError, ValueError, AssertionError):
        raise PreprocessedNotFound(f"dataset '{dataset}' not found in nnUNet_preprocessed ({preprocessed}), "
                                   "nnUNet_raw or nnUNet_results. Give its id or DatasetXXX_Name as nnU-Net knows "
                                   "it") from None
    base = Path(preprocessed) / name
    if not base.is_dir():
        raise PreprocessedNotFound(f"{name} is not preprocessed ({base} does not exist). Run "
                                   f"nnUNetv2_plan_and_preprocess -d {dataset} -c {configuration} (or meddinov3 "
                                   "plan_and_preprocess) first")
    plans_file = base / f"{plans}.json"
    if not plans_file.is_file():
        there = sorted(p.stem for p in base.glob("*.json") if "Plans" in p.stem)
        raise PreprocessedNotFound(f"no plans '{plans}' for {name} ({plans_file} is missing); plans there: "
                                   f"{', '.join(there) or 'none'}. Run nnUNetv2_plan_and_preprocess -d {dataset} "
                                   f"-c {configuration} first, or choose other plans with -p")
    plans_manager = PlansManager(str(plans_file))
    if configuration not in plans_manager.available_configurations:
        raise PreprocessedNotFound(f"plans '{plans}' of {name} have no configuration '{configuration}'; they have "
                                   f"{', '.join(plans_manager.available_configurations)}")
    configuration_manager = plans_manager.get_configuration(configuration)
    folder = base / configuration_manager.data_identifier
    if not folder.is_dir():
        raise PreprocessedNotFound(f"configuration '{configuration}' of {name} is planned but not preprocessed "
                                   f"({folder} does not exist). Run nnUNetv2_preprocess -d {dataset} -plans_name "
                                   f"{plans} -c {configuration}")
    return PreprocessedConfiguration(name, base, plans_manager, configuration_manager, folder)
