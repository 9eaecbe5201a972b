#!/usr/bin/env bash
# Create .venv inside the project and install the pipeline with its test tools (idempotent).
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch/torchvision pinned exactly (pyproject): on the project's machines they install from local wheels.
# The dev extra brings the test tools and the optional parts the tests cover: faiss-cpu, onnxruntime and onnx.
.venv/bin/python -m pip install --quiet -e '.[dev]'
