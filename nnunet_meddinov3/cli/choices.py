"""The names the command line offers as choices, spelled out here so that building a parser (and so
``--help``) imports neither torch nor timm.

The real registries live with the code that builds the things (``network.ENCODER_CONFIGS``,
``network.DECODERS``, ``data.intensity.INTENSITY_PRESETS``,
``visualize.features.INTENSITY_PRESETS``, ``evaluation.probe.PROBE_METHODS``); ``tests/test_cli_matrix.py`` checks that these tuples
equal them, so a new encoder or decoder that is not added here fails a test instead of going unnoticed.
"""

ENCODERS = ("meddinov3_tiny", "meddinov3_vitb16", "meddinov3_vitl16", "meddinov3_vits16",
            "tiny", "vit7b16", "vitb16", "vith16plus", "vitl16", "vitl16plus", "vits16", "vits16plus")
# ViT sizes (the plain names); the planner writes one into the plans
VIT_SIZES = tuple(name for name in ENCODERS if "_" not in name)
DECODERS = ("bottleneck", "multiscale", "single")
PATCH_SIZE = 16  # pixels per ViT patch (network.encoder.PATCH_SIZE)
# intensity conventions a converted checkpoint can record (data.intensity.INTENSITY_PRESETS)
CHECKPOINT_INTENSITIES = ("ct-meddinov3", "nnunet", "imagenet", "unknown")
# intensity conventions `meddinov3 features` can apply (visualize.features.INTENSITY_PRESETS)
FEATURE_INTENSITIES = ("ct-meddinov3", "minmax", "zscore")
FEATURE_DEFAULT_INTENSITY = "ct-meddinov3"     # visualize.features.DEFAULT_INTENSITY
FEATURE_FOREGROUND_THRESHOLD = 0.1             # visualize.features.DEFAULT_FOREGROUND_THRESHOLD
PROBE_METHODS = ("linear", "knn")  # evaluation.probe.PROBE_METHODS
