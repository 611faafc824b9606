"""Compatibility with the authors' released checkpoints (EDTalk.pt, EDTalk_lip_pose.pt, Audio2Lip.pt; LIA vox.pt).

config.py: the model configs that reproduce each file's network; layout.py: each file's key/shape layout and its
mapping onto our modules; checkpoint.py: the safe reader and the import into a model folder; audio.py: the
reference's mel, window indexing and lip smoothing.
"""
