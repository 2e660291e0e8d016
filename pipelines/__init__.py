"""The Kubeflow pipeline (``segmentation``) and how it runs: locally through kfp.local or on a
cluster through kfp.Client (``run``). The CLI is ``segcore pipeline``."""
