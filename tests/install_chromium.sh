#!/bin/sh
# Install headless Chromium for tests/test_explain_page.py, which renders the explain page and checks the screenshot
# (Debian/Ubuntu, run as root). Idempotent: exits 0 at once when a chromium binary is already on PATH.
set -eu

have() { command -v "$1" >/dev/null 2>&1; }

for bin in chromium chromium-browser; do
    have "$bin" && exit 0
done

if [ "$(id -u)" -ne 0 ]; then
    echo "install_chromium.sh: needs root (apt-get); run: sudo $0" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
# quiet on success; the whole apt output on failure. fonts-dejavu-core: text in the screenshot, not boxes.
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core; } \
        >"$log" 2>&1; then
    cat "$log" >&2
    echo "install_chromium.sh: apt-get failed (output above)" >&2
    rm -f "$log"
    exit 1
fi
rm -f "$log"

have chromium || { echo "install_chromium.sh: chromium still missing after apt-get" >&2; exit 1; }
exit 0
