# Sourced by scripts/test-containers: installs and configures podman on a
# fresh Debian machine.

need() { command -v "$1" >/dev/null 2>&1; }

install_tools() {
  local missing=()
  need podman || missing+=(podman)
  need runc || missing+=(runc)
  need mmdebstrap || missing+=(mmdebstrap)
  need docker-compose || missing+=(docker-compose)
  [ -x /usr/lib/podman/aardvark-dns ] || [ -x /usr/libexec/podman/aardvark-dns ] || missing+=(aardvark-dns)
  need netavark || [ -x /usr/lib/podman/netavark ] || missing+=(netavark)
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
      echo "scripts/test-containers: ${missing[*]} missing and not root to install it" >&2
      exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${missing[@]}" >/dev/null
  fi
}

# This sandbox has no systemd, runs containers with runc only, and refuses
# to raise resource limits above the current ones: podman works once told so
# (the same settings, written once per machine, serve every podman command,
# including `podman build`'s RUN steps and the API service compose talks to).
configure_podman() {
  local conf=/etc/containers/containers.conf
  if ! grep -q 'wshub: scripts/test-containers' "$conf" 2>/dev/null; then
    if [ -s "$conf" ]; then
      echo "scripts/test-containers: $conf exists and is not ours; it needs runtime = \"runc\", cgroup_manager = \"cgroupfs\" and default_ulimits no higher than nofile=1024, nproc=1000" >&2
    else
      mkdir -p /etc/containers
      cat >"$conf" <<'EOF'
# wshub: scripts/test-containers. No systemd, runc only, and limits no higher
# than the sandbox's own.
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1000:1000"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
    fi
  fi
}
