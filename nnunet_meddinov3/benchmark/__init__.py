"""Throughput and peak-memory benchmark of MedDINOv3Net variants against the stock nnU-Net 2D network.

``meddinov3 bench`` is the command line; :mod:`nnunet_meddinov3.benchmark.bench` holds the
configurations, the per-configuration worker process and the report. Nothing is imported here:
the worker runs as ``python -m nnunet_meddinov3.benchmark.bench``, and a package that imported
that module first would make ``runpy`` warn about executing an already imported module.
"""
