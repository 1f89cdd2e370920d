"""The probe's methods, by name: plain data, so ``meddinov3 probe --help`` offers them without torch.

:func:`nnunet_meddinov3.evaluation.probe.probe_encoders` runs them: ``linear`` trains one 1x1
convolution on the frozen features, ``knn`` gives each patch the labels of its nearest training patches.
"""

PROBE_METHODS = ("linear", "knn")
