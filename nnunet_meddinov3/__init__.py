"""nnU-Net v2 plugin: DINOv3 / MedDINOv3 vision transformers for 2D and 3D medical image segmentation."""

__version__ = "0.1.0"
