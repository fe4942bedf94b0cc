"""The project's Triton kernels, each with a PyTorch reference (see README.md beside this file).

The package is ``rnd1.kernels``, not a top-level ``kernels``: that import name belongs to Hugging
Face's ``kernels`` package, which transformers requires, and a top-level folder of ours would
shadow it whenever Python runs from the repository root."""
