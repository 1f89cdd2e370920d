"""DINOv3 domain-adaptive pretraining on CT slices (self-distillation, Gram anchoring,
high-resolution adaptation), exporting weights that ``nnunet_meddinov3`` fine-tunes from."""
