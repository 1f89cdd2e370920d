"""The folder nnU-Net's ``nnUNet_extTrainer`` points at (``meddinov3 env`` prints it).

nnU-Net imports every module in this folder under its bare file name and drops it from
``sys.modules`` afterwards, so the folder holds one uniquely named module with absolute
re-exports only; the classes themselves live in :mod:`nnunet_meddinov3.training.trainer`.
"""
