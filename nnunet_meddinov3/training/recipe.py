"""The MedDINOv3 fine-tuning recipe's numbers, in one module that imports nothing heavy: the
trainer, the planner, the benchmark and the command line all read them from here."""

ENCODER = "vitb16"
DECODER = "multiscale"
DROP_PATH_RATE = 0.2
ENCODER_LR = 3e-5
DECODER_LR = 3e-4
WEIGHT_DECAY = 0.05
HIGHRES_PATCH = 896  # longest side of the 2d_highres patch
PLANS_NAME = "nnUNetPlansMedDINOv3"
