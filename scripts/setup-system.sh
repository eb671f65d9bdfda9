#!/usr/bin/env bash
# Installs the system packages corral needs, or says exactly what to install.
# Run by `make setup` (and so by `make demo` and `make test`).
set -euo pipefail

need=()
command -v python3 >/dev/null || need+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
command -v bwrap >/dev/null || need+=(bubblewrap)
# libseccomp is what the sandbox's seccomp filter is compiled with. (No `grep -q`:
# it exits at the first match, ldconfig gets SIGPIPE, and pipefail calls that failure.)
ldconfig -p 2>/dev/null | grep 'libseccomp\.so\.2' >/dev/null || need+=(libseccomp2)
command -v bash >/dev/null || need+=(bash)
# The demo's agent installs a package with the system's pip, inside its sandbox.
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
# `make test` runs real tools inside sandboxes to prove what fails there.
if [ "${1:-}" = "--test" ]; then
  command -v ip >/dev/null || need+=(iproute2)
  command -v strace >/dev/null || need+=(strace)
  command -v unshare >/dev/null || need+=(util-linux)
  # The egress proxy's tests run real servers and real clients (tests/egress/servers.py).
  command -v openssl >/dev/null || need+=(openssl)
  command -v curl >/dev/null || need+=(curl)
  command -v git >/dev/null || need+=(git)
  command -v ssh >/dev/null || need+=(openssh-client)
  [ -x /usr/sbin/sshd ] || need+=(openssh-server)
  command -v dig >/dev/null || need+=(dnsutils)
  command -v nc >/dev/null || need+=(netcat-openbsd)
  # The live view is tested in a real headless browser.
  command -v chromium >/dev/null || need+=(chromium)
  command -v chromedriver >/dev/null || need+=(chromium-driver)
fi

# chromedriver and Chromium find each other at "localhost"; every installed Debian has it
# in /etc/hosts, a bare container image may not.
if [ "${1:-}" = "--test" ] && ! getent hosts localhost >/dev/null; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "corral setup: adding localhost to /etc/hosts (the browser tests need it)" >&2
    printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >> /etc/hosts
  else
    echo "corral setup: 'localhost' does not resolve here; add '127.0.0.1 localhost' to /etc/hosts" >&2
    exit 1
  fi
fi

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  echo "corral setup: installing ${need[*]} with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt_opts=()
  # apt verifies signatures as the unprivileged _apt user, which needs a world-writable
  # /tmp; minimal containers sometimes mount /tmp without it.
  if [ "$(stat -c %a /tmp)" != 1777 ]; then apt_opts+=(-o APT::Sandbox::User=root); fi
  apt-get "${apt_opts[@]}" update -qq >/dev/null
  apt-get "${apt_opts[@]}" install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  exit 0
fi

cat >&2 <<MSG
corral setup: missing system packages: ${need[*]}
Install them, then run make again. On Debian or Ubuntu:
    sudo apt-get install ${need[*]}
On Fedora: sudo dnf install bubblewrap libseccomp python3
MSG
exit 1
