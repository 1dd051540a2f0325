# nuttconch in a container: the README's install command, a non-root user, keys on a volume.
#   docker build -t nuttconch .
#   docker run -d -p 2222:2222 -v nuttconch-keys:/var/lib/nuttconch/keys nuttconch
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/nuttconch \
        --shell /usr/sbin/nologin nuttconch \
    && install -d -o nuttconch -g nuttconch -m 0700 /var/lib/nuttconch /var/lib/nuttconch/keys

WORKDIR /usr/src/nuttconch
COPY . .
# The same install command as the README's first line (tests/test_ops.py checks it).
RUN pip install .

# ./nuttssh.ini (optional) and ./keys are read relative to the working directory;
# mount a config at /var/lib/nuttconch/nuttssh.ini or set NUTTSSH_CONFIG_FILE.
WORKDIR /var/lib/nuttconch
USER nuttconch
VOLUME ["/var/lib/nuttconch/keys"]
EXPOSE 2222

# Healthy when the SSH port answers with an SSH-2.0 banner.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import socket; s = socket.create_connection(('127.0.0.1', 2222), 4); s.settimeout(4); raise SystemExit(0 if s.recv(256).startswith(b'SSH-2.0-') else 1)"]

# `nuttconch` is `twistd -n nuttconch` without a pid file; SIGTERM stops it gracefully.
STOPSIGNAL SIGTERM
CMD ["nuttconch"]
