# Sourced by scripts/test-containers: local stand-ins for the base images
# that Dockerfile and docker-compose.yml name, built from this machine's
# Debian packages and Rust toolchain, because no image registry is reachable
# here. They carry exactly the names the shipped files use, so the shipped
# files are built and run unmodified. A test device only: users pull the
# real images.
#
#   rust:1.95-slim-bookworm          minbase Debian + gcc + this machine's toolchain
#                                    and CA bundle (cargo fetches crates through
#                                    the proxy these machines use; never baked
#                                    into the shipped Dockerfile)
#   gcr.io/distroless/cc-debian12:nonroot   essential Debian + user nonroot (65532)
#   redis:7-alpine                   Debian's redis-server; like the official image,
#                                    protected mode off (it listens on a private network)
#   nginx:1.27-alpine                Debian's nginx-light, `nginx -g 'daemon off;'`
#
# An image that exists is kept (STANDINS_REBUILD=1 rebuilds them).

standin_exists() {
  [ "${STANDINS_REBUILD:-0}" != 1 ] && podman image exists "$1"
}

# debootstrap NAME VARIANT PACKAGES [mmdebstrap options...]: a root file
# system as a tarball on stdout.
standin_root() {
  local variant=$1 include=$2
  shift 2
  mmdebstrap --quiet --variant="$variant" ${include:+--include="$include"} \
    --customize-hook='rm -rf "$1"/usr/share/doc/* "$1"/usr/share/man/* "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/*' \
    "$@" bookworm - http://deb.debian.org/debian
}

standin_rust() {
  local toolchain
  toolchain=$(rustc --print sysroot)
  standin_root minbase gcc,libc6-dev,ca-certificates \
    --customize-hook="cp /etc/ssl/certs/ca-certificates.crt \"\$1/etc/ssl/certs/ca-certificates.crt\"" \
    --customize-hook="cp -a '$toolchain/bin' '$toolchain/lib' \"\$1/usr/local/\"" \
    --customize-hook='mkdir -p "$1/usr/local/cargo"' |
    podman import --quiet \
      --change 'ENV CARGO_HOME=/usr/local/cargo' \
      --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'CMD ["bash"]' \
      - docker.io/library/rust:1.95-slim-bookworm >/dev/null
}

standin_distroless() {
  standin_root essential ca-certificates \
    --customize-hook='echo "nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin" >> "$1/etc/passwd"' \
    --customize-hook='echo "nonroot:x:65532:" >> "$1/etc/group"' \
    --customize-hook='install -d -o 65532 -g 65532 "$1/home/nonroot"' |
    podman import --quiet --change 'USER 65532' --change 'WORKDIR /home/nonroot' \
      - gcr.io/distroless/cc-debian12:nonroot >/dev/null
}

standin_redis() {
  standin_root essential redis-server,redis-tools \
    --customize-hook='printf "%s\n" "#!/bin/sh" "if [ \"\$1\" = redis-server ]; then shift; exec redis-server --protected-mode no \"\$@\"; fi" "exec \"\$@\"" > "$1/usr/local/bin/docker-entrypoint.sh" && chmod +x "$1/usr/local/bin/docker-entrypoint.sh"' |
    podman import --quiet \
      --change 'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]' \
      --change 'CMD ["redis-server"]' --change 'EXPOSE 6379' \
      - docker.io/library/redis:7-alpine >/dev/null
}

standin_nginx() {
  standin_root essential nginx-light \
    --customize-hook='rm -f "$1"/etc/nginx/sites-enabled/*' |
    podman import --quiet \
      --change 'CMD ["nginx", "-g", "daemon off;"]' --change 'EXPOSE 80' \
      --change 'STOPSIGNAL SIGQUIT' \
      - docker.io/library/nginx:1.27-alpine >/dev/null
}

# Builds the missing stand-ins, all at once (mostly waiting on downloads).
build_standins() {
  local t0=$SECONDS failed=0 pids=() names=() i
  local -A build=(
    [docker.io/library/rust:1.95-slim-bookworm]=standin_rust
    [gcr.io/distroless/cc-debian12:nonroot]=standin_distroless
    [docker.io/library/redis:7-alpine]=standin_redis
    [docker.io/library/nginx:1.27-alpine]=standin_nginx
  )
  for image in "${!build[@]}"; do
    standin_exists "$image" && continue
    echo "   building stand-in $image"
    (set -o pipefail; "${build[$image]}") &
    pids+=($!)
    names+=("$image")
  done
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || { echo "stand-in ${names[$i]} failed" >&2; failed=1; }
  done
  [ $failed -eq 0 ] || return 1
  echo "   stand-ins ready in $((SECONDS - t0)) s"
}
