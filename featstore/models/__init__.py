"""Encoders: the preset registry (names users know, with their authors' preprocessing), building
timm/torchvision models and their feature views, and loading checkpoints safely in each
codebase's layout."""
