#!/bin/sh
# Makes the proxy's image (nginx, the Debian package) for hosts that cannot pull nginxinc/nginx-unprivileged:1.27-bookworm:
#
#   docker/make-proxy-image.sh [NAME]                 # default NAME: upgrader-proxy:bookworm
#   UPGRADER_PROXY_IMAGE=upgrader-proxy:bookworm docker compose --profile cpu up -d
#
# It starts as the official image does: every /etc/nginx/templates/*.template is rendered by envsubst (only
# the UPGRADER_* variables; nginx's own $variables stay) into /etc/nginx/conf.d/, then nginx runs in the
# foreground. Needs mmdebstrap and a Debian package mirror; runs as root.
set -eu
name="${1:-upgrader-proxy:bookworm}"
here="$(cd "$(dirname "$0")" && pwd)"
mmdebstrap --quiet --variant=minbase --include=nginx-light,gettext-base \
  --customize-hook='rm -f "$1"/etc/nginx/sites-enabled/default; mkdir -p "$1"/etc/nginx/templates' \
  --customize-hook="upload $here/proxy-entrypoint.sh /docker-entrypoint.sh" \
  --customize-hook='chmod 755 "$1"/docker-entrypoint.sh' \
  bookworm - | docker import --change 'ENTRYPOINT ["/docker-entrypoint.sh"]' - "$name"
docker image inspect --format '{{.RepoTags}} {{.Size}} bytes' "$name"
