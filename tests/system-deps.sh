#!/usr/bin/env bash
# Install the Debian packages the tests and benchmarks use, only those missing,
# so that a new machine needs nothing installed by hand. Idempotent.
#
#   tests/system-deps.sh              the test group (what `make test` needs)
#   tests/system-deps.sh bench        the benchmark group only
#   tests/system-deps.sh test bench   both
#
# test:  chromium (the real browser of the OAuth tests, driven by Playwright),
#        nodejs + npm when `node` / `npm` are not on PATH (the OAuth authorization server
#        peer, oidc-provider, and the MCP Inspector's CLI, whose npm packages
#        tests/peers/oauth and tests/peers/inspector install themselves),
#        tinyproxy (the corporate forward proxy of tests/test_egress_proxy.py; the
#        tests start their own on loopback, never the system service),
#        prometheus when `promtool` is not on PATH (it checks and unit-tests the alert rules in
#        deploy/prometheus; the package's server is not started where policy-rc.d forbids it,
#        as in containers, and is not used by the tests).
# bench: wrk, nginx-light.
set -euo pipefail

groups=("$@")
[ ${#groups[@]} -eq 0 ] && groups=(test)

packages=()
for group in "${groups[@]}"; do
  case "$group" in
    test)
      packages+=(chromium tinyproxy)
      command -v node >/dev/null 2>&1 || packages+=(nodejs)
      command -v npm >/dev/null 2>&1 || packages+=(npm)
      command -v promtool >/dev/null 2>&1 || packages+=(prometheus)
      ;;
    bench)
      packages+=(wrk nginx-light)
      ;;
    *)
      echo "unknown group: $group (expected: test, bench)" >&2
      exit 2
      ;;
  esac
done

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing system packages: ${missing[*]}"
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq >/dev/null || true
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
