#!/bin/sh
# The proxy image's start (docker/make-proxy-image.sh): templates rendered as the official nginx image renders them.
set -eu
variables="$(env | sed -n 's/^\(UPGRADER_[A-Z0-9_]*\)=.*/${\1}/p' | tr '\n' ' ')"
for template in /etc/nginx/templates/*.template; do
  [ -e "$template" ] || continue
  envsubst "$variables" < "$template" > "/etc/nginx/conf.d/$(basename "$template" .template)"
done
exec nginx -g 'daemon off;'
