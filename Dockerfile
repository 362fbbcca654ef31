# The one image of compose.yaml: worker (the default command), beat, flower, initdb, health.
#   docker build -t instaqueue:latest .
#   docker run --rm instaqueue:latest python -m instaqueue --help
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# An unprivileged user with a fixed uid and gid, and the data dir it owns (beat's schedule file;
# the embedded broker when INSTAQUEUE_REDIS_URL is unset). A named volume mounted on /data
# starts with this ownership.
RUN groupadd --system --gid 10001 instaqueue \
    && useradd --system --uid 10001 --gid instaqueue --home-dir /home/instaqueue --create-home \
        --shell /bin/bash instaqueue \
    && install -d -o instaqueue -g instaqueue /data

WORKDIR /src
# The dependencies first, read from pyproject.toml alone: a code change reuses this layer.
COPY pyproject.toml README.md ./
RUN python -c "import subprocess, sys, tomllib; \
deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
subprocess.check_call([sys.executable, '-m', 'pip', 'install', *deps])"
# Then the project itself (pyproject.toml: py-modules = ["instaqueue"]).
COPY instaqueue.py ./
RUN pip install --no-deps . \
    && python -c "import instaqueue" \
    && rm -rf /src

ENV INSTAQUEUE_DATA_DIR=/data
WORKDIR /data
USER 10001:10001

# Flower (python -m instaqueue flower) listens here.
EXPOSE 5555
# Celery's warm shutdown; instaqueue bounds it by INSTAQUEUE_SHUTDOWN_GRACE.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "instaqueue", "worker"]
