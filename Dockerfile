# kiln's container images, built from this repository (no image is pulled or pushed by the
# project's own tooling; README "Deploying" says how to build and push them):
#
#   docker build --target runtime    -t REGISTRY/kiln:0.1.0 .             kiln-auth, kiln-agent, kiln
#   docker build --target toolchains -t REGISTRY/kiln-toolchains:0.1.0 .  kiln-build + what builds run
#
# Both run as the unprivileged uid/gid 10001 with no shell entrypoint; k8s/ sets the
# command per service. The builds that kiln-build runs need compilers and interpreters
# (its default allowlist: cargo/rustc, python3/pip, node/npm, go, make, cc/gcc/g++, clang),
# which is why it gets the larger toolchains image and the others a slim one.

# --- build: the four binaries, release profile, from the lockfile -------------------------
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins \
        -p kiln-auth -p kiln-build -p kiln-agent -p kiln-cli \
    && install -D -m 0755 -t /out target/release/kiln-auth target/release/kiln-build \
        target/release/kiln-agent target/release/kiln

# --- runtime: slim Debian, the binaries, CA certificates, a non-root user -----------------
FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 kiln \
    && useradd --uid 10001 --gid 10001 --home-dir /var/lib/kiln --create-home \
        --shell /usr/sbin/nologin kiln
COPY --from=build /out/ /usr/local/bin/
USER 10001:10001
WORKDIR /var/lib/kiln
EXPOSE 7443
# Health is asked with `kiln-<service> --probe` (which service runs is the command's
# choice, so there is no single HEALTHCHECK); Kubernetes runs it as an exec probe.
# checkov:skip=CKV_DOCKER_2:the image runs one of three services; k8s/ probes each with kiln-<service> --probe
HEALTHCHECK NONE
CMD ["/usr/local/bin/kiln", "--help"]

# --- toolchains: the runtime plus the compilers and interpreters builds run ---------------
FROM runtime AS toolchains
USER root
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        build-essential clang make python3 python3-pip python3-venv nodejs npm golang-go \
        cargo rustc git \
    && rm -rf /var/lib/apt/lists/*
USER 10001:10001
CMD ["/usr/local/bin/kiln-build", "--help"]
