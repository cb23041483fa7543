# GPU image for Ray clusters: Ray's GPU base (Ray version pinned to msnoop's), CUDA torch, msnoop[gpu].
# Build: docker build -t msnoop:0.1.0 .   Use it as the image of every Ray node (head and workers).
# The cellpose segmentation backend needs numpy < 2.1: build Dockerfile.cellpose for it.
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/msnoop
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users msnoop ./msnoop
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users configs ./configs

# torch: the version msnoop is tested on (constraints/cpu.txt; tests/test_packaging.py keeps them equal).
# PyPI's Linux wheels of torch are CUDA builds that bring their CUDA libraries as pip packages.
# msnoop with the gpu extra only (faiss-gpu-cu12): never together with the cpu extra, whose faiss-cpu
# would overwrite the same `faiss` module. ray is already in the image at the pinned version.
RUN pip install --no-cache-dir torch==2.13.0 \
 && pip install --no-cache-dir ".[gpu]" torch==2.13.0 \
 && python -c "import msnoop, torch, ray; print(msnoop.__version__, torch.__version__, ray.__version__)"

# No GPU is visible while the image builds: check the faiss install without counting GPUs (faiss_build()
# refuses faiss-cpu beside faiss-gpu, and a faiss module without GPU code), and that faiss-cpu is absent.
RUN ! pip show faiss-cpu >/dev/null 2>&1 \
 && python -c "from msnoop.evaluate.knn import faiss_build; b = faiss_build(count_gpus=False); assert b == 'gpu', b"

ENV PYTHONUNBUFFERED=1
