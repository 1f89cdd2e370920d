"""Trainers and the 2D planner: thin subclasses of nnU-Net's classes.

Import the submodules directly (``nnunet_meddinov3.training.trainer`` / ``.planner``); this
package does not import nnU-Net eagerly so that the network can be used without it.
"""
