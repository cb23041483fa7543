# GPU image for Ray clusters: Ray's CUDA base (Ray version pinned to msnoop's), CUDA torch, msnoop[gpu].
# Build: docker build -t msnoop:0.1.0 .   Use it as the image of every Ray node (head and workers).
FROM rayproject/ray:2.60.0-py311-cu121

WORKDIR /home/ray/msnoop
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users msnoop ./msnoop
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users configs ./configs

# torch from the CUDA 12.1 index first (Ray's constraints file pins CPU wheels), then msnoop with the
# GPU extra; ray itself is already in the image at the same version and is not reinstalled.
RUN pip install --no-cache-dir torch --index-url https://download.pytorch.org/whl/cu121 \
 && pip install --no-cache-dir ".[gpu]" \
 && python -c "import msnoop, torch, ray; print(msnoop.__version__, torch.__version__, ray.__version__)"

ENV PYTHONUNBUFFERED=1
