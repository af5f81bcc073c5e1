"""MNIST digit classifier, pytorch/examples style: `idx` (data files), `download`, `net` (the CNN),
`train` (train/test loops yielding progress events), `predict` (your own images, re-evaluation).

Importing this package is cheap: torch and numpy are imported by the submodules that need them.
"""
